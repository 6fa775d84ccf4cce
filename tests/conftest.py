"""Shared test fixtures. Tests are small and CPU-only; the real data in ../shared is optional."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# precision "auto" stays fp32 on CPU in the suite, whatever the CPU: the suite's thresholds were set in fp32 and
# must not depend on the machine; the bf16 paths are tested with explicit --precision bf16 (tests/test_precision.py,
# test_bench.py)
os.environ.setdefault("TEXTSEG_CPU_BF16", "0")

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("TEXTSEG_SHARED_DIR", REPO.parent / "shared"))  # override: tests of the markers
LA_DIR = SHARED / "data" / "la"
MONUSEG_DIR = SHARED / "data" / "monuseg"


_REAL_DATA_FIXTURES = {"la_dir", "monuseg_dir"}


def pytest_collection_modifyitems(config, items):
    # Any test that asks for real data is a realdata test, marked or not, so `-m "not realdata"` means what it says.
    for item in items:
        if _REAL_DATA_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.realdata)


def pytest_terminal_summary(terminalreporter):
    # A skipped real-data test must not pass unnoticed inside "N skipped": say which and why on its own line.
    skipped = [r for r in terminalreporter.stats.get("skipped", []) if "realdata" in getattr(r, "keywords", {})]
    if skipped:
        names = ", ".join(r.nodeid.split("::")[-1] for r in skipped)
        terminalreporter.write_line(f"REAL DATA NOT TESTED: {len(skipped)} realdata test(s) skipped "
                                    f"(../shared/data missing): {names}", yellow=True, bold=True)


@pytest.fixture(autouse=True, scope="session")
def _torch_threads():
    import torch

    # OMP_NUM_THREADS wins (scripts/test.sh sets 2; the mutation check forks test processes and needs 1)
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS") or max(1, min(2, os.cpu_count() or 1))))
    yield


@pytest.fixture(scope="module")
def one_thread():
    """Tiny convolutions run fastest single-threaded (and do not fight other processes for the cores)."""
    import torch

    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.fixture
def la_dir() -> Path:
    if not (LA_DIR / "train.list").exists():
        pytest.skip("real LA data not available at ../shared/data/la")
    return LA_DIR


@pytest.fixture
def monuseg_dir() -> Path:
    if not (MONUSEG_DIR / "Train_Folder").exists():
        pytest.skip("real MoNuSeg data not available at ../shared/data/monuseg")
    return MONUSEG_DIR


def run_cli(*args: str) -> tuple[int, str]:
    """Run `textseg ARGS` in-process; return (exit code, combined output)."""
    import io
    from contextlib import redirect_stderr, redirect_stdout

    from textseg_cli import console as console_mod
    from textseg_cli.cli import run

    buf = io.StringIO()
    old_out, old_err = console_mod.console.file, console_mod.err_console.file
    console_mod.console.file = buf
    console_mod.err_console.file = buf
    try:
        with redirect_stdout(buf), redirect_stderr(buf):
            code = run([str(a) for a in args])
    finally:
        console_mod.console.file, console_mod.err_console.file = old_out, old_err
    return code, buf.getvalue()


@pytest.fixture(scope="session")
def synthetic_data(tmp_path_factory) -> Path:
    """A tiny prepared synthetic 3D set, built once per session: 10 cases of 32×32×24 (train 6 / val 2 /
    test 2), one foreground class, patch 32×32×16 (multiples of 16 for the V-Net family). Treat as read-only."""
    from textseg_cli.data.prep.synthetic import prep_synthetic

    out = tmp_path_factory.mktemp("synthetic") / "prepared"
    prep_synthetic(out, n_cases=10, size=(32, 32, 24), n_classes=1, seed=0, n_val=2, n_test=2,
                   patch_size=(32, 32, 16))
    return out


def one_line_error(code: int, text: str, *needles) -> str:
    """Assert a user error: exit 2, exactly one `error` line holding every needle, no traceback; return the line."""
    assert code == 2, text
    err = [line for line in text.splitlines() if "error" in line]
    assert len(err) == 1 and "Traceback" not in text and "internal error" not in text, text
    for n in needles:
        assert str(n) in err[0], err[0]
    return err[0]


def fingerprint_outside(root: Path, sandbox: Path) -> dict[str, str]:
    """Every path under `root` outside `sandbox` with a sha256 of its content (a symlink: its target; a folder:
    "dir"), to show that a command wrote nothing outside its sandbox."""
    seen = {}
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        here = Path(dirpath)
        if here == sandbox or sandbox in here.parents:
            continue
        for name in dirnames + filenames:
            p = here / name
            if p == sandbox:
                continue
            if p.is_symlink():
                seen[str(p)] = "link:" + os.readlink(p)
            elif p.is_file():
                seen[str(p)] = hashlib.sha256(p.read_bytes()).hexdigest()
            else:
                seen[str(p)] = "dir"
    return seen
