"""Every semi-supervised baseline trains from the CLI on the tiny synthetic set, its validation Dice rises, and
`textseg eval RUN` evaluates the run. Runs are kept tiny (the CPU is shared): narrow networks (4 base
filters), 2 labeled cases, 30 iterations with Adam 3e-3 instead of the papers' SGD (for speed, not fidelity)."""

from __future__ import annotations

import json

import pandas as pd
import pytest
import torch
from conftest import run_cli

from textseg_cli.data.batch import Batch
from textseg_cli.methods.base import StepContext
from textseg_cli.methods.registry import build_method, list_methods

ITERATIONS = 30
COMMON_SETS = ["val.at_start=true", "method.backbone.n_filters=4", "optim.name=adam", "optim.lr=0.003",
               "optim.schedule=constant", "train.batch_labeled=2", "train.batch_unlabeled=2"]
METHOD_SETS = {
    "uamt": ["method.mc_passes=2"],
    "dtc": [],
    "urpc": [],
    "mcf": [],
    "bcp": ["method.pretrain_iterations=15", "optim.step_offset=15"],
    "mlrp": [],
    "cps": [],
}


def _sets(method: str) -> list[str]:
    out = []
    for s in COMMON_SETS + METHOD_SETS[method]:
        out += ["--set", s]
    return out


def test_all_baselines_registered_with_networks():
    methods = list_methods()
    for name in METHOD_SETS:
        assert name in methods
        assert methods[name].paper


@pytest.mark.parametrize("method", list(METHOD_SETS))
def test_trains_from_cli_and_validation_dice_rises(method, synthetic_data, tmp_path):
    run = tmp_path / "run"
    code, out = run_cli("train", "--method", method, "--data", synthetic_data, "--labeled", "2",
                        "--iterations", ITERATIONS, "--val-every", "10", "--seed", "0", "--device", "cpu",
                        "--out", run, *_sets(method))
    assert code == 0, out
    log = pd.read_csv(run / "log.csv")
    val = log.dropna(subset=["val_dice"]).set_index("iteration")["val_dice"]
    assert val.index[0] == 0 and val.index[-1] == ITERATIONS
    assert val.iloc[1:].max() > val.iloc[0] + 0.03, val.to_dict()
    assert {"loss"} <= set(log.columns) and log["loss"].dropna().map(pd.notna).all()

    code, out = run_cli("eval", run, "--split", "val", "--out", tmp_path / "eval")
    assert code == 0, out
    summary = pd.read_csv(tmp_path / "eval" / "per_case.csv")
    assert len(summary) == 2 and summary["dice"].notna().all()
    # LCC by method protocol (DTC's and BCP's official test_LA.py: --nms 1), recorded with its source
    meta = json.loads((tmp_path / "eval" / "meta.json").read_text(encoding="utf-8"))
    assert meta["lcc"] is (method in ("dtc", "bcp")), meta["lcc_source"]


def test_bcp_switches_phase_and_copies_student_into_teacher():
    cfg = {"method": {"pretrain_iterations": 1, "backbone": {"n_filters": 4}}, "train": {"iterations": 3}}
    m = build_method("bcp", cfg, 1, 2, dim=3)
    x, y = torch.randn(4, 1, 32, 32, 32), (torch.rand(2, 32, 32, 32) > 0.5).long()
    batch = Batch(x[:2], y, x[2:])
    out = m.training_step(batch, StepContext(0, 3, torch.device("cpu")))
    assert float(out["phase"]) == 1.0 and not bool(m.self_training)
    with torch.no_grad():
        for t in m.teacher.parameters():
            t.zero_()
    m.on_after_optimizer_step(StepContext(0, 3, torch.device("cpu")))  # no EMA during pre-training
    assert all(not t.any() for t in m.teacher.parameters())
    out = m.training_step(batch, StepContext(1, 3, torch.device("cpu")))
    assert float(out["phase"]) == 2.0 and bool(m.self_training)
    for t, s in zip(m.teacher.parameters(), m.student.parameters()):
        assert torch.equal(t, s)


def test_bcp_refuses_a_run_without_self_training():
    from textseg_cli.errors import ConfigError

    with pytest.raises(ConfigError, match="pretrain_iterations"):
        build_method("bcp", {"method": {"pretrain_iterations": 2000}, "train": {"iterations": 300}}, 1, 2)
