"""Parity tests against the official code (issue 13). Skipped unless TEXTSEG_OFFICIAL points to a folder with one
plain checkout per repository (`MC-Net`, `UA-MT`, `DTC`, `SSL4MIS`, `BCP`, `MCF`, `MLRP`, `VCLIPSeg`, `Text-SemiSeg`),
each with a `.commit` file. The official modules are imported at run time from there (never copied): `official_module`
puts the repository's code folder first on sys.path, evicts same-named modules a previous repository left in
sys.modules (every repository has its own `networks`, `utils`, `dataloaders`), and makes `.cuda()` a no-op so the
code runs on CPU.

Weights travel from an official network into textseg's through `copy_by_order`: the documented name mapping is the
registration order of the two state dicts (both build the V-Net blocks in the same order), checked entry by entry
on the leaf name (weight/bias/running_mean/...) and the shape; the mapping used is returned for the test to assert.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import sys
from pathlib import Path

import pytest
import torch

_REPO_MODULE_ROOTS = ("networks", "utils", "dataloaders", "test_util", "val_3D", "ramps", "losses", "test_patch")


def pytest_collection_modifyitems(config, items):
    here = Path(__file__).parent
    for item in items:
        if Path(str(item.fspath)).is_relative_to(here):
            item.add_marker(pytest.mark.parity)


@pytest.fixture(scope="session")
def official_dir() -> Path:
    root = os.environ.get("TEXTSEG_OFFICIAL")
    if not root:
        pytest.skip("TEXTSEG_OFFICIAL is not set (folder of the official repositories)")
    path = Path(root).resolve()
    if not path.is_dir():
        pytest.skip(f"TEXTSEG_OFFICIAL={root} is not a folder")
    return path


def official_commit(official: Path, repo: str) -> str:
    """The commit the checkout `repo` is at (its `.commit` file), for the test's record."""
    f = official / repo / ".commit"
    return f.read_text().strip() if f.exists() else "unknown"


@pytest.fixture(scope="session")
def commits(official_dir) -> dict[str, str]:
    return {p.name: official_commit(official_dir, p.name) for p in official_dir.iterdir() if p.is_dir()}


@contextlib.contextmanager
def _no_cuda():
    saved = (torch.Tensor.cuda, torch.nn.Module.cuda)
    torch.Tensor.cuda = lambda self, *a, **k: self
    torch.nn.Module.cuda = lambda self, *a, **k: self
    try:
        yield
    finally:
        torch.Tensor.cuda, torch.nn.Module.cuda = saved


@pytest.fixture(autouse=True)
def cpu_only_official():
    """`.cuda()` is a no-op while a parity test runs (the official code calls it unconditionally)."""
    with _no_cuda():
        yield


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


def copy_by_order(src: torch.nn.Module, dst: torch.nn.Module) -> dict[str, str]:
    """dst ← src, pairing the state-dict entries in registration order; returns {src name: dst name}."""
    s_items, d_items = list(src.state_dict().items()), list(dst.state_dict().items())
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
