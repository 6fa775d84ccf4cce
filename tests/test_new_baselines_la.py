"""AD-MT and CrossMatch train on REAL LA volumes (default suite, CPU): three cases of the official training list,
prepared by `textseg prep la` from a copy holding only those cases, then 2 iterations of each method at a small
patch and width through `textseg train`. Skipped, and listed in the summary, when ../shared/data/la is absent."""

from __future__ import annotations

import csv
import json
import math

import pytest
from conftest import LA_DIR, run_cli

from textseg_cli.data.prep.la import LA_TEST_IDS
from textseg_cli.runs.checkpoint import load_checkpoint

pytestmark = [pytest.mark.realdata, pytest.mark.usefixtures("one_thread")]

N_CASES = 3
SMALL = ["--set", "data.patch_size=[32,32,16]", "--set", "method.backbone.n_filters=2", "--set", "train.log_every=1",
         "--set", "train.batch_labeled=1", "--set", "train.batch_unlabeled=2"]  # CrossMatch: an even unlabeled batch


@pytest.fixture(scope="module")
def la_subset(tmp_path_factory):
    """A prepared LA set of the first three cases of train.list (never a test.list case): 2 train (1 labeled), 1 val"""
    if not (LA_DIR / "train.list").is_file():
        pytest.skip(f"real LA data not available at {LA_DIR} (../shared/data/la)")
    train_ids = (LA_DIR / "train.list").read_text(encoding="utf-8").split()
    test_ids = set((LA_DIR / "test.list").read_text(encoding="utf-8").split()) | set(LA_TEST_IDS)
    ids = [c for c in train_ids if c not in test_ids and (LA_DIR / c / "mri_norm2.h5").is_file()][:N_CASES]
    assert len(ids) == N_CASES, f"fewer than {N_CASES} training cases with mri_norm2.h5 in {LA_DIR}"
    root = tmp_path_factory.mktemp("la_subset")
    src = root / "src"
    src.mkdir()
    for cid in ids:  # the copy the preparer reads: only these cases, linked, never written
        (src / cid).symlink_to(LA_DIR / cid, target_is_directory=True)
    out = root / "prepared"
    code, text = run_cli("prep", "la", "--src", src, "--out", out, "--val", "1", "--keep-labeled", "1")
    assert code == 0, text
    spec = json.loads((out / "dataset.json").read_text(encoding="utf-8"))
    assert sorted(c["id"] for c in spec["cases"]) == sorted(ids) and not test_ids & {c["id"] for c in spec["cases"]}
    assert len(spec["splits"]["train"]) == 2 and len(spec["splits"]["val"]) == 1
    return out


@pytest.mark.parametrize("method", ["ad-mt", "crossmatch"])
def test_new_baseline_trains_on_real_la_cases(la_subset, tmp_path, method):
    run = tmp_path / method
    code, out = run_cli("train", "--method", method, "--data", la_subset, "--labeled", "1", "--iterations", "2",
                        "--out", run, "--device", "cpu", "--threads", "1", "--val-every", "0", "--seed", "0", *SMALL)
    assert code == 0, out
    with open(run / "log.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["iteration"]) for r in rows] == [1, 2]
    assert all(math.isfinite(float(r["loss"])) for r in rows), rows
    ckpt = load_checkpoint(run / "checkpoints" / "last.pt")
    assert ckpt["iteration"] == 2 and ckpt["config"]["data"]["patch_size"] == [32, 32, 16]
    assert ckpt["config"]["method"]["name"] == method
