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


def _fake_clock(monkeypatch, step_seconds):
    """The loop's clock advances only in training steps: step k (1-based) takes step_seconds(k) seconds."""
    clock = types.SimpleNamespace(t=0.0, k=0)
    monkeypatch.setattr(loop_mod, "time", types.SimpleNamespace(perf_counter=lambda: clock.t))
    real_step = loop_mod.Trainer._step

    def timed_step(self):
        out = real_step(self)
        clock.k += 1
        clock.t += step_seconds(clock.k)
        return out

    monkeypatch.setattr(loop_mod.Trainer, "_step", timed_step)


SETS = ["val.every=1000", "val.at_start=false", "train.time_budget_min=1", "train.fit_budget_after=3",
        "train.fit_budget_reserve_s=10", "train.log_every=1", "optim.schedule=poly", "method.backbone.base=2"]


def test_a_fitted_run_ends_at_its_budget_with_schedule_and_validation_moved(tiny_2d, tmp_path, monkeypatch,
                                                                            one_thread):
    _fake_clock(monkeypatch, lambda k: 2.0)
    run = tmp_path / "run"
    # planned 1000 steps, validation only at the end; 60 s budget, 10 s reserved: at step 3 (6 s used, 2 s a
    # step) the fit gives 3 + (60 − 6 − 10) // 2 = 25 steps; the refits every 3 steps keep 25
    res = train("lvit-unet", tiny_2d, out=run, quiet=True, iterations=1000, sets=SETS)
    end = json.loads((run / "training.json").read_text(encoding="utf-8"))
    assert res.iteration == 25 and end["ended"] == "completed" and end["max_iterations"] == 25
    assert end["fitted_to_budget"] == {"after": 3, "planned": 1000, "refits": 8, "s_per_it": 2.0, "elapsed_s": 48.0,
                                       "reserve_s": 10.0, "fitted": 25}
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


def test_a_run_that_gets_faster_is_refitted_longer(tiny_2d, tmp_path, monkeypatch, one_thread):
    _fake_clock(monkeypatch, lambda k: 2.0 if k <= 6 else 1.0)
    run = tmp_path / "run"
    # 25 steps fitted at steps 3 and 6; at step 9 (15 s used, 1 s a step over steps 7-9): 9 + (60 − 15 − 10) = 44
    res = train("lvit-unet", tiny_2d, out=run, quiet=True, iterations=1000, sets=SETS)
    end = json.loads((run / "training.json").read_text(encoding="utf-8"))
    assert res.iteration == 44 and end["ended"] == "completed"
    assert end["fitted_to_budget"]["fitted"] == 44 and end["fitted_to_budget"]["s_per_it"] == 1.0
