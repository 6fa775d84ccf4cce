"""Helpers of the parity tests (see conftest.py): import official modules at run time, copy weights by a
documented name mapping, compare tensors."""

from __future__ import annotations

import contextlib
import importlib
import sys
from pathlib import Path

import pytest
import torch

_REPO_MODULE_ROOTS = ("networks", "utils", "dataloaders", "test_util", "val_3D", "ramps", "losses", "test_patch")


def official_commit(official: Path, repo: str) -> str:
    """The commit the checkout `repo` is at (its `.commit` file), for the test's record."""
    f = official / repo / ".commit"
    return f.read_text(encoding="utf-8").strip() if f.exists() else "unknown"


@contextlib.contextmanager
def _no_cuda():
    saved = (torch.Tensor.cuda, torch.nn.Module.cuda)
    torch.Tensor.cuda = lambda self, *a, **k: self
    torch.nn.Module.cuda = lambda self, *a, **k: self
    try:
        yield
    finally:
        torch.Tensor.cuda, torch.nn.Module.cuda = saved


def official_module(official: Path, repo: str, module: str, code_dir: str = "code"):
    """Import `module` (e.g. "networks.VNet") of the official checkout `repo` (its `code_dir` on sys.path)."""
    base = official / repo / code_dir if code_dir else official / repo
    if not base.is_dir():
        pytest.skip(f"{base} missing from TEXTSEG_OFFICIAL")
    for name in list(sys.modules):
        if name.split(".")[0] in _REPO_MODULE_ROOTS:
            del sys.modules[name]
    sys.path.insert(0, str(base))
    try:
        return importlib.import_module(module)
    finally:
        sys.path.remove(str(base))


def copy_by_order(src: torch.nn.Module, dst: torch.nn.Module, skip: tuple[str, ...] = (),
                  order: list[str] | None = None) -> dict[str, str]:
    """dst ← src, pairing the state-dict entries in registration order; returns {src name: dst name}.

    `skip`: official name prefixes with no textseg counterpart (heads the method's training never uses);
    `order`: official names to move to the end, in this order (where textseg registers a head later)."""
    s_items = [(n, v) for n, v in src.state_dict().items() if not n.startswith(skip)]
    if order:
        moved = {n: v for n, v in s_items if n in order}
        s_items = [(n, v) for n, v in s_items if n not in moved] + [(n, moved[n]) for n in order]
    d_items = list(dst.state_dict().items())
    assert len(s_items) == len(d_items), f"{len(s_items)} official vs {len(d_items)} textseg entries"
    mapping, new = {}, {}
    for (sn, sv), (dn, dv) in zip(s_items, d_items):
        assert sn.rsplit(".", 1)[-1] == dn.rsplit(".", 1)[-1] and sv.shape == dv.shape, (sn, dn, sv.shape, dv.shape)
        mapping[sn] = dn
        new[dn] = sv.clone()
    dst.load_state_dict(new)
    return mapping


def assert_close(a: torch.Tensor, b: torch.Tensor, atol: float = 1e-5, rtol: float = 0.0) -> None:
    torch.testing.assert_close(a.float(), b.float(), atol=atol, rtol=rtol)
