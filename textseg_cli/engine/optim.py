"""Optimiser and learning-rate schedules (constant, poly, step, linear, cosine_restarts; optional linear warm-up)."""

from __future__ import annotations

import math
from typing import Any

import torch

from textseg_cli.errors import ConfigError


def build_optimizer(param_groups: list[dict[str, Any]], optim: dict[str, Any]) -> torch.optim.Optimizer:
    name = optim["name"]
    if name == "sgd":
        return torch.optim.SGD(param_groups, lr=optim["lr"], momentum=optim["momentum"],
                               weight_decay=optim["weight_decay"], nesterov=bool(optim.get("nesterov", False)))
    if name in ("adam", "adamw"):
        cls = torch.optim.Adam if name == "adam" else torch.optim.AdamW
        return cls(param_groups, lr=optim["lr"], weight_decay=optim["weight_decay"])
    raise ConfigError(f"optim.name {name!r}: expected sgd, adam or adamw")


def lr_factor(iteration: int, max_iterations: int, optim: dict[str, Any],
              iterations_per_epoch: int | None = None) -> float:
    """Multiplier of the base lr for the step with 0-based index `iteration`.

    cosine_restarts (SGDR, as torch's CosineAnnealingWarmRestarts with T_mult=1) counts epochs when the run
    has epochs (`iterations_per_epoch`), so the lr changes once per epoch, as LViT steps it; else iterations.
    """
    warm = int(optim.get("warmup_iterations") or 0)
    if warm and iteration < warm:
        return (iteration + 1) / warm
    sched = optim["schedule"]
    if sched == "constant":
        return 1.0
    if sched == "poly":  # over optim.poly_iterations when set (CrossMatch: 17,000 in a 14,001-step run), else the run
        span = int(optim.get("poly_iterations") or max_iterations)
        # step_offset: the decay starts that many steps later (URPC's script sets lr(t − 1) after step t)
        counted = max(0, iteration - int(optim.get("step_offset") or 0))
        return (1.0 - min(1.0, counted / max(1, span))) ** float(optim.get("poly_power", 0.9))
    if sched == "step":
        # step_offset: where the step count starts (BCP restarts its schedule when self-training begins)
        counted = max(0, iteration - int(optim.get("step_offset") or 0))
        return float(optim.get("step_gamma", 0.1)) ** (counted // int(optim.get("step_size", 2500)))
    if sched == "linear":  # step_offset: as poly (Text-SemiSeg sets lr(t − 1) after step t, trainer.py:222)
        return 1.0 - min(1.0, max(0, iteration - int(optim.get("step_offset") or 0)) / max(1, max_iterations))
    if sched == "cosine_restarts":
        t = (iteration // max(1, int(iterations_per_epoch or 1))) % int(optim.get("restart_period") or 10)
        lo = float(optim.get("eta_min") or 0.0) / float(optim["lr"])
        return lo + (1.0 - lo) * (1 + math.cos(math.pi * t / int(optim.get("restart_period") or 10))) / 2
    raise ConfigError(f"optim.schedule {sched!r}: expected constant, poly, step, linear or cosine_restarts")


def build_scheduler(optimizer: torch.optim.Optimizer, max_iterations: int, optim: dict[str, Any],
                    iterations_per_epoch: int | None = None):
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda it: lr_factor(it, max_iterations, optim, iterations_per_epoch))
