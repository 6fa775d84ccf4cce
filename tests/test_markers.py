"""The markers mean what pyproject.toml says: a plain `pytest` leaves out benchmarks, real-data skips are visible."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _pytest(*args: str, **env: str) -> subprocess.CompletedProcess:
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", **env}
    return subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", *args], cwd=REPO, env=full_env,
                          capture_output=True, text=True, encoding="utf-8", errors="replace", timeout=1500)


def test_plain_pytest_deselects_benchmarks_and_parity():
    proc = _pytest("--collect-only", "-q", "tests/test_metrics.py")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "test_benchmark_faster_than_medpy" not in proc.stdout
    assert "deselected" in proc.stdout
    proc = _pytest("--collect-only", "-q", "-m", "benchmark", "tests/test_metrics.py")
    assert "test_benchmark_faster_than_medpy" in proc.stdout


def test_skipped_real_data_tests_are_named_in_the_summary(tmp_path):
    proc = _pytest("-q", "tests/test_prep_la.py::test_real_la_cases_equal_the_h5_contents",
                   "tests/test_prep_lvit.py::test_real_monuseg_train_and_val", TEXTSEG_SHARED_DIR=str(tmp_path))
    out = proc.stdout
    assert proc.returncode == 0, out + proc.stderr
    assert "REAL DATA NOT TESTED: 2 realdata test(s) skipped" in out
    assert "test_real_la_cases_equal_the_h5_contents" in out and "test_real_monuseg_train_and_val" in out
    # the MoNuSeg test carries no explicit marker: the fixture marks it
    proc = _pytest("--collect-only", "-q", "-m", "realdata", "tests/test_prep_lvit.py")
    assert "test_real_monuseg_train_and_val" in proc.stdout and "test_real_monuseg_smoke_train_and_eval" in proc.stdout
