"""Epoch-based training lengths, early stopping and a wall-clock budget (LViT's protocol; any method).

All are off by default. `train.epochs` turns the run into epochs of ⌈labeled cases / batch_labeled⌉
iterations (the sampler's shuffled passes are those epochs) with one validation per epoch. Then
`val.patience` (validations without a new best before stopping) and `val.best_after` (the first N
validations never become best) read as epochs; `val.best_floor` is what the first best must beat.
`train.time_budget_min` stops cleanly, with a checkpoint and the reason recorded, before an epoch (or,
without validation, a step) that would not fit in the budget. With `train.fit_budget_after: N` the run's length
is fitted to the budget instead: every N steps the seconds per step of the last ones set `train.iterations` so
that the run ends at the budget, less what is left of `train.fit_budget_reserve_s` for validations
(`fitted_iterations`); the lr schedule and the methods' ramps then run over the fitted length, and the stop stays
as the safety net.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from textseg_cli.errors import ConfigError
from textseg_cli.storage.files import atomic_write_json


def resolve_epochs(cfg: dict[str, Any], n_labeled: int) -> int:
    """Apply `train.epochs` to the config (iterations, iterations_per_epoch, val.every); return the length."""
    tr, val = cfg["train"], cfg["val"]
    for key, sect in (("patience", val), ("time_budget_min", tr)):
        v = sect.get(key)
        if v is not None and float(v) <= 0:
            raise ConfigError(f"{'val' if sect is val else 'train'}.{key} {v!r}: expected a positive number or null")
    fit = tr.get("fit_budget_after")
    if fit is not None:
        if isinstance(fit, bool) or not isinstance(fit, int) or fit < 2:
            raise ConfigError(f"train.fit_budget_after {fit!r}: expected a whole number of steps ≥ 2 (the first "
                              "one is not timed) or null")
        if tr.get("time_budget_min") is None or tr.get("epochs") is not None:
            raise ConfigError("train.fit_budget_after fits the iterations to train.time_budget_min: set the budget, "
                              "and use iterations, not train.epochs")
    if not float(tr.get("fit_budget_reserve_s") or 0) >= 0:
        raise ConfigError(f"train.fit_budget_reserve_s {tr.get('fit_budget_reserve_s')!r}: expected ≥ 0 seconds")
    if int(val.get("best_after") or 0) < 0:
        raise ConfigError(f"val.best_after {val['best_after']!r}: expected ≥ 0")
    if tr.get("epochs") is None:
        return int(tr["iterations"])
    epochs = int(tr["epochs"])
    if epochs < 0:
        raise ConfigError(f"train.epochs {epochs}: expected ≥ 0")
    per_epoch = max(1, math.ceil(n_labeled / int(tr["batch_labeled"])))
    tr["iterations_per_epoch"] = per_epoch
    tr["iterations"] = epochs * per_epoch
    val["every"] = per_epoch
    return tr["iterations"]


class StopRules:
    """Decisions of the training loop beyond its length; validations are counted in units of `val.every`."""
    def __init__(self, cfg: dict[str, Any]):
        tr, val = cfg["train"], cfg["val"]
        self.every = int(val.get("every") or 0)
        self.per_epoch = tr.get("iterations_per_epoch")
        self.patience = None if val.get("patience") is None else int(val["patience"])
        self.best_after = int(val.get("best_after") or 0)
        self.floor = -math.inf if val.get("best_floor") is None else float(val["best_floor"])
        budget = tr.get("time_budget_min")
        self.budget_s = None if budget is None else float(budget) * 60.0
        self.fit_after = None if tr.get("fit_budget_after") is None else int(tr["fit_budget_after"])
        self.fit_reserve_s = float(tr.get("fit_budget_reserve_s") or 0.0)
        self.fitted: dict[str, Any] | None = None  # what the fit measured and set (training.json)
        self.reason: str | None = None

    def is_best(self, iteration: int, value: float, best: float | None) -> bool:
        """Better than the best so far (or than `val.best_floor` for the first), and past `val.best_after`.

        LViT: `val_dice > max_dice` with max_dice starting at 0.0 (train_model.py:150, 169), and no best
        model in epochs 1-5 (train_model.py:170).
        """
        if self.every and iteration <= self.best_after * self.every:
            return False
        return value > (self.floor if best is None else best)

    def early_stop(self, iteration: int, best_iteration: int | None) -> bool:
        """Validations since the best one (or since the first one, while none is best) exceed the patience.

        LViT (train_model.py:184-189): count = epoch − best_epoch + 1 with best_epoch starting at 1, stop
        when count > patience; with 1-based epochs that is (E − B) > patience, B = the first epoch at start.
        """
        if self.patience is None or not self.every:
            return False
        ref = self.every if best_iteration is None else best_iteration
        if (iteration - ref) // self.every > self.patience:
            self.reason = (f"early stopping: {self.patience} validations without a better validation Dice "
                           f"(best at iteration {ref})")
            return True
        return False

    def time_up(self, elapsed_s: float, chunk_s: float) -> bool:
        """True when another chunk as long as the last one (an epoch, in epoch mode) would pass the budget."""
        if self.budget_s is None or elapsed_s + chunk_s <= self.budget_s:
            return False
        self.reason = (f"time budget: train.time_budget_min={self.budget_s / 60:g} would be exceeded by the next "
                       f"{'epoch' if self.per_epoch else 'step'} (elapsed {elapsed_s / 60:.1f} min)")
        return True

    def epoch(self, iteration: int | None) -> int | None:
        """1-based epoch that ends at `iteration` (None outside epoch mode)."""
        if iteration is None or not self.per_epoch:
            return None
        return math.ceil(iteration / self.per_epoch)


def fitted_iterations(done: int, elapsed_s: float, step_s: float, budget_s: float, reserve_s: float,
                      planned: int) -> int:
    """The run length that ends at the budget: `done` steps took `elapsed_s` of it, a step now takes `step_s`,
    and `reserve_s` stays for validations and the last save. Never below `done` (the run then ends now), never
    above 10 × `planned` (a mismeasured step must not make a run endless)."""
    left = budget_s - elapsed_s - reserve_s
    more = int(left // step_s) if step_s > 0 and left > 0 else 0
    return max(int(done), min(int(done) + more, 10 * int(planned)))


def write_summary(run_dir, result, stop: StopRules, max_iterations: int) -> None:
    """RUN/training.json: how the run ended (completed, early stopping, time budget) and its best epoch."""


    ended = ("completed" if result.iteration >= max_iterations else
             "early_stopping" if (stop.reason or "").startswith("early") else
             "time_budget" if stop.reason else "interrupted")
    atomic_write_json(Path(run_dir) / "training.json", {
        "ended": ended, "reason": stop.reason, "iterations": result.iteration, "max_iterations": max_iterations,
        "epochs": stop.epoch(result.iteration), "best_iteration": result.best_iteration,
        "best_epoch": stop.epoch(result.best_iteration), "best_val_dice": result.best_metric,
        "train_seconds": round(result.seconds, 3), "fitted_to_budget": stop.fitted,
        "val_history": [[it, d] for it, d in result.val_history]})
