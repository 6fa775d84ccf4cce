"""Shared helpers of the text-method parity tests (Text-SemiSeg, VCLIPSeg).

The official repositories are imported at run time from `$TEXTSEG_OFFICIAL/<Repo>`; nothing of them is
copied here. Both repositories have top-level packages with generic names (`utils`, `model`, `networks`), so
each import purges those names from `sys.modules` before and after.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import re
import sys
from pathlib import Path

import torch
from parity_helpers import require_checkout, unavailable

GENERIC = ("utils", "model", "networks", "dataloaders", "prediction", "test_patch", "losses", "ramps")


def official_repo(name: str, commit: str) -> Path:
    """`$TEXTSEG_OFFICIAL/<name>`; absent or at another commit than `commit`: skipped, failed when strict (CI or
    TEXTSEG_PARITY_STRICT=1, parity_helpers.require_checkout)."""
    root = os.environ.get("TEXTSEG_OFFICIAL")
    if not root:
        unavailable("TEXTSEG_OFFICIAL is not set (folder of official checkouts)")
    return require_checkout(Path(root), name, commit)


def _purge() -> None:
    for key in list(sys.modules):
        if key.split(".")[0] in GENERIC:
            del sys.modules[key]


@contextlib.contextmanager
def official_imports(path: Path):
    """Import official modules from `path` (sys.path first), leaving no trace afterwards."""
    _purge()
    sys.path.insert(0, str(path))
    try:
        yield lambda mod: importlib.import_module(mod)
    finally:
        sys.path.remove(str(path))
        _purge()


def vnet_key(key: str) -> str:
    """Official V-Net block names → textseg's: the blocks are `nn.Sequential`s without the `.conv` level
    (`encoder.block_one.conv.0.weight` → `encoder.block_one.0.weight`)."""
    return re.sub(r"\.conv\.(\d+)\.", r".\1.", key)


def load_mapped(target: torch.nn.Module, official_sd: dict[str, torch.Tensor], mapping, drop=()) -> None:
    """Copy every official tensor into `target` through `mapping(name) -> name`; both sides must be complete."""
    mapped = {}
    for k, v in official_sd.items():
        if any(re.search(d, k) for d in drop):
            continue
        mapped[mapping(k)] = v
    own = target.state_dict()
    missing = sorted(set(own) - set(mapped))
    extra = sorted(set(mapped) - set(own))
    assert not extra, f"official names without a textseg counterpart: {extra[:8]}"
    return missing, target.load_state_dict(mapped, strict=False)


def assert_close(a: torch.Tensor, b: torch.Tensor, atol: float = 1e-5, what: str = "") -> None:
    """max |a − b| ≤ atol · max(1, max |b|): float32 round-off through a V-Net grows with the values' scale."""
    err = float((a.float() - b.float()).abs().max()) if a.numel() else 0.0
    tol = atol * max(1.0, float(b.float().abs().max()) if b.numel() else 0.0)
    assert a.shape == b.shape and err <= tol, (f"{what}: shape {tuple(a.shape)} vs {tuple(b.shape)}, "
                                               f"max |diff| {err:.3g} > {tol:.3g}")


def assert_grads_close(pairs, rel: float = 1e-4) -> None:
    """pairs: (name, textseg grad, official grad). Over all tensors ||g_t − g_o|| ≤ rel · ||g_o|| (the criterion of
    test_loss_parity.py), and per tensor the same wherever the tensor carries a real share of the gradient.

    A conv bias followed by BatchNorm has a true gradient of 0; float32 round-off over a 96³ batch leaves ~1e-9
    there in both codes, so a per-tensor ratio of two noises says nothing about the method."""
    rows = []
    for name, g_t, g_o in pairs:
        if g_o is None:
            assert g_t is None or float(g_t.abs().max()) == 0.0, name
            continue
        rows.append((name, float((g_t - g_o).norm()), float(g_o.norm())))
    assert len(rows) > 10
    total_err = sum(e * e for _, e, _ in rows) ** 0.5
    total = sum(r * r for _, _, r in rows) ** 0.5
    assert total_err <= rel * total, f"all gradients: ||diff|| {total_err:.3g} vs ||grad|| {total:.3g}"
    for name, err, ref in rows:
        if ref >= 1e-3 * total:
            assert err <= rel * ref, f"grad {name}: ||diff|| {err:.3g} vs ||grad|| {ref:.3g}"


def keep_float64(monkeypatch) -> None:
    """textseg casts loss inputs with `.float()` (float32 losses under autocast); in a float64 comparison that cast
    leaves float64 tensors as they are (bool, integer and half tensors still become float32)."""
    orig = torch.Tensor.float
    monkeypatch.setattr(torch.Tensor, "float",
                        lambda self, *a, **k: self if self.dtype == torch.float64 else orig(self, *a, **k))
