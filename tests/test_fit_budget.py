"""`train.fit_budget_after`: a run that times its own steps and refits its length to `train.time_budget_min`
(what `textseg plan` writes), so a planned run ends at its budget even when the plan's trial step was not the loop.

The integration test drives the loop with a fake clock (every training step takes exactly 2 s), so nothing here
depends on the speed of the machine."""

from __future__ import annotations

import csv
import json
import types

import pytest
import yaml

import textseg_cli.engine.loop as loop_mod
from textseg_cli.engine.optim import lr_factor
from textseg_cli.engine.setup import train
from textseg_cli.engine.stopping import fitted_iterations, resolve_epochs
from textseg_cli.errors import ConfigError
from textseg_cli.experiments.plan import fit_after


def test_fitted_iterations_fill_the_budget_and_stay_bounded():
    # 10 steps in 30 s, 3 s a step: (600 − 30 − 60) // 3 = 170 more
    assert fitted_iterations(10, 30.0, 3.0, 600.0, 60.0, planned=100) == 180
    assert fitted_iterations(10, 590.0, 3.0, 600.0, 60.0, planned=100) == 10  # no time left: end now
    assert fitted_iterations(10, 1.0, 1e-6, 600.0, 0.0, planned=100) == 1000  # a mismeasured step: 10 × planned
    assert fitted_iterations(10, 30.0, 0.0, 600.0, 0.0, planned=100) == 10


@pytest.mark.parametrize("train_sets, match", [
    ({"fit_budget_after": 5}, "set the budget"),
    ({"fit_budget_after": 5, "time_budget_min": 1, "epochs": 3}, "not train.epochs"),
    ({"fit_budget_after": 1, "time_budget_min": 1}, "≥ 2"),
    ({"fit_budget_after": True, "time_budget_min": 1}, "whole number"),
    ({"fit_budget_reserve_s": -1}, "fit_budget_reserve_s"),
])
def test_bad_fit_settings_are_config_errors(train_sets, match):
    cfg = {"train": {"iterations": 10, "batch_labeled": 2, "time_budget_min": None, **train_sets}, "val": {}}
    with pytest.raises(ConfigError, match=match):
        resolve_epochs(cfg, 4)


def test_plan_times_five_percent_of_the_run_within_bounds():
    assert [fit_after(n) for n in (10, 100, 300, 5000)] == [2, 5, 15, 20]


@pytest.fixture
def tiny_2d(tmp_path_factory):
    from textseg_cli.data.prep.synthetic2d import prep_synthetic_2d

    root = tmp_path_factory.mktemp("fit") / "s2d"
    prep_synthetic_2d(root, n_cases=8, size=16, seed=3, n_val=2, n_test=0)
    return root


def test_a_fitted_run_ends_at_its_budget_with_schedule_and_validation_moved(tiny_2d, tmp_path, monkeypatch,
                                                                            one_thread):
    clock = types.SimpleNamespace(t=0.0)
    monkeypatch.setattr(loop_mod, "time", types.SimpleNamespace(perf_counter=lambda: clock.t))
    real_step = loop_mod.Trainer._step

    def two_seconds(self):
        out = real_step(self)
        clock.t += 2.0
        return out

    monkeypatch.setattr(loop_mod.Trainer, "_step", two_seconds)
    run = tmp_path / "run"
    # planned 1000 steps, validation only at the end; 60 s budget, 10 s reserved: after 3 steps (6 s) the fit
    # gives 3 + (60 − 6 − 10) // 2 = 25 steps
    res = train("lvit-unet", tiny_2d, out=run, quiet=True, iterations=1000,
                sets=["val.every=1000", "val.at_start=false", "train.time_budget_min=1", "train.fit_budget_after=3",
                      "train.fit_budget_reserve_s=10", "train.log_every=1", "optim.schedule=poly",
                      "method.backbone.base=2"])
    end = json.loads((run / "training.json").read_text(encoding="utf-8"))
    assert res.iteration == 25 and end["ended"] == "completed" and end["max_iterations"] == 25
    assert end["fitted_to_budget"] == {"after": 3, "s_per_it": 2.0, "elapsed_s": 6.0, "reserve_s": 10.0,
                                       "planned": 1000, "fitted": 25}
    assert [it for it, _ in end["val_history"]] == [25]  # the validation planned at the end moved with the end
    cfg = yaml.safe_load((run / "config.yaml").read_text(encoding="utf-8"))
    assert cfg["train"]["iterations"] == 25 and cfg["val"]["every"] == 25  # a resume continues the fitted run
    rows = {int(r["iteration"]): float(r["lr"]) for r in csv.DictReader(open(run / "log.csv", newline=""))
            if r.get("lr")}
    base = cfg["optim"]["lr"]
    # before the fit the poly decay ran over 1000 steps, after it over 25 (the lr of step k after it)
    assert rows[2] == pytest.approx(base * lr_factor(2, 1000, cfg["optim"]))
    for k in (3, 10, 24):
        assert rows[k] == pytest.approx(base * lr_factor(k, 25, cfg["optim"]))
