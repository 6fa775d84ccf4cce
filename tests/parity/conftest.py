"""Parity tests against the official code (issue 13). Skipped unless TEXTSEG_OFFICIAL points to a folder with one
plain checkout per repository (`MC-Net`, `UA-MT`, `DTC`, `SSL4MIS`, `BCP`, `MCF`, `MLRP`, `VCLIPSeg`, `Text-SemiSeg`),
each with a `.commit` file. The official modules are imported at run time from there, never copied
(`parity_helpers.official_module`: the repository's code folder first on sys.path, same-named modules of another
repository evicted from sys.modules; `isolated_imports` restores sys.modules and sys.path after every test and module);
`.cuda()` is a no-op while a parity test runs so the code runs on CPU. A missing checkout, or one at another commit
than the method classes name (`official_commit`), skips the test locally and fails it under CI (`CI` set) or
TEXTSEG_PARITY_STRICT=1.

Weights travel from an official network into textseg's through `parity_helpers.copy_by_order`: the documented name
mapping is the registration order of the two state dicts (both build the V-Net blocks in the same order), checked
entry by entry on the leaf name (weight/bias/running_mean/...) and the shape; exceptions are named in the test.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from parity_helpers import _no_cuda, isolated_imports, official_commit, unavailable  # noqa: E402


def pytest_collection_modifyitems(config, items):
    here = Path(__file__).parent
    for item in items:
        if Path(str(item.fspath)).is_relative_to(here):
            item.add_marker(pytest.mark.parity)


@pytest.fixture(scope="session")
def official_dir() -> Path:
    root = os.environ.get("TEXTSEG_OFFICIAL")
    if not root:
        unavailable("TEXTSEG_OFFICIAL is not set (folder of the official repositories)")
    path = Path(root).resolve()
    if not path.is_dir():
        unavailable(f"TEXTSEG_OFFICIAL={root} is not a folder")
    return path


@pytest.fixture(scope="session")
def commits(official_dir) -> dict[str, str]:
    """{repository: commit} of every checkout, for the record."""
    return {p.name: official_commit(official_dir, p.name) for p in official_dir.iterdir() if p.is_dir()}


def _official_root() -> Path | None:
    root = os.environ.get("TEXTSEG_OFFICIAL")
    return Path(root) if root and Path(root).is_dir() else None


@pytest.fixture(autouse=True, scope="module")
def official_imports_per_module():
    """sys.modules / sys.path as before the module (its module-scoped fixtures may import official code)."""
    with isolated_imports(_official_root()):
        yield


@pytest.fixture(autouse=True)
def official_imports_per_test():
    """sys.modules / sys.path as before the test: no official `utils`/`networks` outlives it, whatever the order."""
    with isolated_imports(_official_root()):
        yield


@pytest.fixture(autouse=True)
def cpu_only_official():
    """`.cuda()` is a no-op while a parity test runs (the official code calls it unconditionally)."""
    with _no_cuda():
        yield
