"""Checkpoint selection (issue 26 point 5): textseg selects best.pt on a validation split; the official MC-Net, BCP,
VCLIPSeg and Text-SemiSeg scripts pick it on the test list every 200 iterations. `--select legacy-test` reproduces
that protocol like for like, loudly, and every evaluation of such a run says "best-on-test"."""

from __future__ import annotations

import json

import pytest
from conftest import run_cli

TINY = ["--device", "cpu", "--set", "method.backbone.n_filters=4", "--set", "train.batch_labeled=1",
        "--set", "train.batch_unlabeled=1", "--iterations", "2", "--val-every", "1", "--labeled", "2"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory, synthetic_data):
    root = tmp_path_factory.mktemp("select")
    out = {}
    for name, extra in {"val": [], "legacy": ["--select", "legacy-test"]}.items():
        code, text = run_cli("train", "--method", "mcnet", "--data", synthetic_data, "--out", root / name, *TINY, *extra)
        assert code == 0, text
        out[name] = (root / name, text)
    return out


def _spec(data):
    return json.loads((data / "dataset.json").read_text(encoding="utf-8"))


def test_default_selects_on_validation_and_tables_say_so(runs, synthetic_data):
    run, _ = runs["val"]
    cases = json.loads((run / "cases.json").read_text())
    assert cases["val_split"] == "val" and cases["val"] == _spec(synthetic_data)["splits"]["val"]
    code, text = run_cli("eval", run, "--split", "test", "--device", "cpu")
    assert code == 0, text
    meta = json.loads(next((run / "eval").glob("test-*/meta.json")).read_text())
    assert meta["checkpoint_rule"] == "best-on-val"


def test_legacy_test_selection_is_loud_and_marked_in_every_table(runs, synthetic_data):
    run, text = runs["legacy"]
    assert "LEGACY SELECTION" in text and "TEST split" in text
    cases = json.loads((run / "cases.json").read_text())
    assert cases["val_split"] == "test" and cases["val"] == _spec(synthetic_data)["splits"]["test"]
    log = (run / "log.csv").read_text()
    assert "val_dice" in log.splitlines()[0]
    code, text = run_cli("eval", run, "--split", "test", "--device", "cpu")
    assert code == 0, text
    meta = json.loads(next((run / "eval").glob("test-*/meta.json")).read_text())
    assert meta["checkpoint_rule"].startswith("best-on-test every 1 it") and "official" in meta["checkpoint_rule"]
    assert "best-on-test" in " ".join(text.split())  # the printed table's caption
    code, text = run_cli("eval", "--compare", next((run / "eval").glob("test-*")), next((runs["val"][0] / "eval").glob("test-*")),
                         "--out", run / "table.md")
    assert code == 0, text
    notes = (run / "table.md").read_text(encoding="utf-8")
    assert "best-on-test every 1 it" in notes and "best-on-val" in notes  # MIXED: each row says how it was chosen
    # the precision each run recorded (fp32 with TEXTSEG_CPU_BF16=0, bf16 on a bf16 CPU with =1): the same in both
    trained = {json.loads((r / "env.json").read_text())["precision"]["train"]["precision"] for r, _ in runs.values()}
    assert len(trained) == 1 and trained <= {"fp32", "bf16"}
    assert f"Training precision: {trained.pop()} (the official codes train in fp32)" in notes


@pytest.mark.parametrize("sets, needle", [(["--set", "val.split=test"], "val.split=test"),
                                          (["--select", "bogus"], "bogus")])
def test_selection_values_are_checked(synthetic_data, tmp_path, sets, needle):
    code, text = run_cli("train", "--method", "mcnet", "--data", synthetic_data, "--out", tmp_path / "r", *TINY, *sets)
    assert code == 2 and needle in text, text
    assert not (tmp_path / "r").exists()
