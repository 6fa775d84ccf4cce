"""Optimiser and learning-rate schedules (constant, poly, step, linear; optional linear warm-up)."""

from __future__ import annotations

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


def lr_factor(iteration: int, max_iterations: int, optim: dict[str, Any]) -> float:
    """Multiplier of the base lr for the step with 0-based index `iteration`."""
    warm = int(optim.get("warmup_iterations") or 0)
    if warm and iteration < warm:
        return (iteration + 1) / warm
    sched = optim["schedule"]
    frac = min(1.0, iteration / max(1, max_iterations))
    if sched == "constant":
        return 1.0
    if sched == "poly":
        return (1.0 - frac) ** float(optim.get("poly_power", 0.9))
    if sched == "step":
        # step_offset: where the step count starts (BCP restarts its schedule when self-training begins)
        counted = max(0, iteration - int(optim.get("step_offset") or 0))
        return float(optim.get("step_gamma", 0.1)) ** (counted // int(optim.get("step_size", 2500)))
    if sched == "linear":
        return 1.0 - frac
    raise ConfigError(f"optim.schedule {sched!r}: expected constant, poly, step or linear")


def build_scheduler(optimizer: torch.optim.Optimizer, max_iterations: int, optim: dict[str, Any]):
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda it: lr_factor(it, max_iterations, optim))
