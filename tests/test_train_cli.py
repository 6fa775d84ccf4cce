"""`textseg train` end to end on a tiny synthetic set (acceptance: validation Dice rises on CPU)."""

import csv
import json

import pytest
import torch
from conftest import run_cli


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def small_data(tmp_path_factory):
    from textseg_cli.data.prep.synthetic import prep_synthetic

    out = tmp_path_factory.mktemp("syn") / "data"
    prep_synthetic(out, n_cases=8, size=(32, 32, 24), n_val=2, n_test=1, patch_size=(16, 16, 16))
    return out


def test_mcnet_200_iterations_raise_validation_dice(small_data, tmp_path):
    run = tmp_path / "run"
    code, out = run_cli("train", "--method", "mcnet", "--data", small_data, "--labeled", "3", "--iterations", "200",
                        "--out", run, "--device", "cpu", "--val-every", "100", "--set", "val.at_start=true",
                        "--set", "method.backbone.n_filters=4", "--set", "train.log_every=20")
    assert code == 0, out
    rows = list(csv.DictReader(open(run / "log.csv", newline="")))
    val = {int(r["iteration"]): float(r["val_dice"]) for r in rows if r.get("val_dice")}
    assert sorted(val) == [0, 100, 200]
    assert max(val[100], val[200]) > val[0] + 0.3, val
    losses = [float(r["loss"]) for r in rows if r.get("loss")]
    assert losses[-1] < losses[0]
    cfg = (run / "config.yaml").read_text(encoding="utf-8")
    assert "iterations: 200" in cfg and "labeled: '3'" in cfg
    best = torch.load(run / "checkpoints" / "best.pt", weights_only=True)
    assert best["best_metric"] == pytest.approx(max(val.values()))
    assert json.loads((run / "cases.json").read_text(encoding="utf-8"))["val"] == ["synth_005", "synth_006"]


def test_cli_errors_and_print_config(small_data, tmp_path):
    code, out = run_cli("train", "--method", "nosuch", "--data", small_data, "--out", tmp_path / "r")
    assert code == 2 and "unknown method 'nosuch'" in out
    code, out = run_cli("train", "--method", "mcnet", "--data", small_data, "--set", "val.split=test")
    assert code == 2 and "refused" in out
    code, out = run_cli("train", "--method", "mcnet+", "--data", small_data, "--print-config",
                        "--set", "optim.lr=0.005")
    assert code == 0 and "lr: 0.005" in out and "up_modes: [0, 1, 2]" in out
    code, out = run_cli("train", "--resume", "--out", tmp_path / "missing")
    assert code == 2 and "holds no run to continue (no config.yaml)" in out


def test_cli_resume_extends_a_run(small_data, tmp_path):
    run = tmp_path / "run"
    common = ["--set", "method.backbone.n_filters=4", "--set", "train.log_every=1", "--val-every", "0"]
    code, out = run_cli("train", "--method", "mcnet+", "--data", small_data, "--labeled", "3", "--iterations", "2",
                        "--out", run, "--device", "cpu", *common)
    assert code == 0, out
    import torch

    threads = torch.get_num_threads()
    try:
        code, out = run_cli("train", "--resume", "--out", run, "--iterations", "4", "--threads", "1")
    finally:
        torch.set_num_threads(threads)
    assert code == 0, out
    rows = list(csv.DictReader(open(run / "log.csv", newline="")))
    assert [int(r["iteration"]) for r in rows] == [1, 2, 3, 4]
    sessions = json.loads((run / "env.json").read_text(encoding="utf-8"))["sessions"]
    assert len(sessions) == 2 and sessions[1]["torch_threads"] == 1
    code, out = run_cli("train", "--resume", "--out", run, "--threads", "0")
    assert code == 2 and "--threads 0" in out
