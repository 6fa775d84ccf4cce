"""Helpers of the parity tests (see conftest.py): import official modules at run time, copy weights by a
documented name mapping, compare tensors."""

from __future__ import annotations

import contextlib
import importlib
import os
import sys
from pathlib import Path

import pytest
import torch

from textseg_cli.methods.registry import list_methods

_REPO_MODULE_ROOTS = ("networks", "utils", "dataloaders", "test_util", "val_3D", "ramps", "losses", "test_patch")
# top-level names the official repositories import by (here and in _text_helpers.GENERIC): evicted and restored
OFFICIAL_MODULE_ROOTS = frozenset(_REPO_MODULE_ROOTS) | {"model", "prediction", "nets", "Config", "Load_Dataset",
                                                        "Train_one_epoch", "trainer", "train"}
_FOLDER = {"mutual-learning-with-reliable-pseudo-labels": "MLRP"}  # GitHub name → TEXTSEG_OFFICIAL folder


def expected_commits() -> dict[str, str]:
    """{TEXTSEG_OFFICIAL folder: commit prefix} the parity tests were written against: each method class's
    `official_code` ("owner/name ...") and `official_commit`."""
    out: dict[str, str] = {}
    for cls in list_methods().values():
        code, commit = cls.official_code.strip(), cls.official_commit.strip()
        if "/" not in code.split(" ")[0] or not commit:
            continue
        name = code.split(" ")[0].split("/")[-1]
        out[_FOLDER.get(name, name)] = commit
    return out


def parity_strict() -> bool:
    """True under CI (`CI` set to anything but empty/0/false) or TEXTSEG_PARITY_STRICT=1: a missing or mismatched
    official checkout then fails the test instead of skipping it."""
    ci = os.environ.get("CI", "").strip().lower()
    return ci not in ("", "0", "false", "no") or os.environ.get("TEXTSEG_PARITY_STRICT", "").strip() == "1"


def unavailable(reason: str):
    """Skip (locally) or fail (strict: CI / TEXTSEG_PARITY_STRICT=1) a parity test whose reference is missing."""
    if parity_strict():
        pytest.fail(f"{reason} (strict parity: CI or TEXTSEG_PARITY_STRICT=1)", pytrace=False)
    pytest.skip(reason)


def official_commit(official: Path, repo: str) -> str:
    """The commit the checkout `repo` is at (its `.commit` file), for the test's record."""
    f = official / repo / ".commit"
    return f.read_text(encoding="utf-8").strip() if f.exists() else "unknown"


def require_checkout(official: Path, repo: str, commit: str | None = None) -> Path:
    """`official/repo`, checked: the folder exists and its `.commit` starts with `commit` (default: the commit the
    method classes name for it, `expected_commits()`). Otherwise the test is skipped, or failed when strict."""
    path = official / repo
    if not path.is_dir():
        unavailable(f"{path} missing from TEXTSEG_OFFICIAL")
    want = commit or expected_commits().get(repo)
    found = official_commit(official, repo)
    if want and not (found != "unknown" and (found.startswith(want) or want.startswith(found))):
        unavailable(f"{repo}: tests written against {want[:7]}, checkout at {found[:7]}")
    return path


def _from_official(mod, official: Path | None) -> bool:
    if official is None:
        return False
    files = [getattr(mod, "__file__", None), *list(getattr(mod, "__path__", None) or [])]
    return any(f and Path(f).resolve().is_relative_to(official) for f in files)


@contextlib.contextmanager
def isolated_imports(official: Path | None = None):
    """Leave sys.path and sys.modules as they were: official modules imported inside (those under `official`, or
    with one of the generic top-level names the repositories use) are dropped afterwards, and entries of those names
    that were evicted or replaced inside are put back, so no test sees another test's `utils` or `networks`."""
    saved_path, saved = list(sys.path), dict(sys.modules)
    root = official.resolve() if official is not None else None
    try:
        yield
    finally:
        sys.path[:] = saved_path
        for name, mod in list(sys.modules.items()):
            if saved.get(name) is not mod and (name.split(".")[0] in OFFICIAL_MODULE_ROOTS
                                               or _from_official(mod, root)):
                del sys.modules[name]
        for name, mod in saved.items():
            if name.split(".")[0] in OFFICIAL_MODULE_ROOTS and sys.modules.get(name) is not mod:
                sys.modules[name] = mod


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
    """Import `module` (e.g. "networks.VNet") of the official checkout `repo` (its `code_dir` on sys.path).

    The checkout must be at the commit the method classes name (`require_checkout`: skip, or fail when strict).
    Same-named modules of another repository are evicted first; the conftest's `isolated_imports` fixtures restore
    sys.modules after the test, and sys.path is restored here at once."""
    require_checkout(official, repo)
    base = official / repo / code_dir if code_dir else official / repo
    if not base.is_dir():
        unavailable(f"{base} missing from TEXTSEG_OFFICIAL")
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
