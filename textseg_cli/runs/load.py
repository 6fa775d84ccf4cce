"""Run folders: building a run's method from its config, and loading a finished (or running) run.

Layout of a run folder::

    RUN/config.yaml              fully resolved config
    RUN/env.json                 versions, device, GPU, seed, world size, command line (one entry per session)
    RUN/cases.json               labeled / unlabeled / validation case ids used
    RUN/log.csv                  losses, lr, timing and validation metrics per logged iteration
    RUN/checkpoints/last.pt      latest state (resume point)
    RUN/checkpoints/best.pt      best mean validation Dice (validation split only, never test)
    RUN/tb/                      TensorBoard events (when tensorboard is installed)
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from textseg_cli.console import err_console
from textseg_cli.data.prepared import PreparedDataset
from textseg_cli.data.splits import apply_fold
from textseg_cli.errors import ConfigError, DataError
from textseg_cli.methods.base import Method
from textseg_cli.methods.registry import build_method, list_methods
from textseg_cli.runs.bundle import localize_config, run_dataset
from textseg_cli.runs.checkpoint import load_checkpoint, load_method_state
from textseg_cli.runs.config import load_config


def method_context(cfg: dict[str, Any], ds: PreparedDataset) -> dict[str, Any]:
    """Facts a method may need beyond its config (text methods: class names, data folder)."""
    return {"class_names": ds.class_names, "dataset_name": ds.name, "data_root": str(ds.root),
            "patch_size": cfg["data"]["patch_size"]}


def build_run_method(cfg: dict[str, Any], ds: PreparedDataset) -> Method:
    return build_method(cfg["method"]["name"], cfg, ds.in_channels, ds.num_classes, dim=ds.dim,
                        **method_context(cfg, ds))


@dataclass
class LoadedRun:
    method: Method  # in eval mode, on the requested device
    config: dict[str, Any]
    dataset: PreparedDataset
    run_dir: Path
    checkpoint_path: Path
    iteration: int = 0
    checkpoint_rule: str = "best"  # "best" (on validation), "last", or "file"
    best_metric: float | None = None


def checkpoint_path(run_dir: str | Path, checkpoint: str | Path = "best") -> tuple[Path, str]:
    run_dir = Path(run_dir)
    if str(checkpoint) in ("best", "last"):
        p = run_dir / "checkpoints" / f"{checkpoint}.pt"
        if checkpoint == "best" and not p.exists() and (run_dir / "checkpoints" / "last.pt").exists():
            err_console.print(f"[yellow]warning:[/] {run_dir}: no best.pt (validation was off); using last.pt")
            return run_dir / "checkpoints" / "last.pt", "last"
        return p, str(checkpoint)
    return Path(checkpoint), "file"


_SECTIONS = ("method", "data", "train", "optim", "val", "inference")


def check_saved_config(cfg: Any, path: Path) -> dict[str, Any]:
    """A run folder may come from someone else: RUN/config.yaml must have the shape textseg writes (the sections
    are mappings, the method is a known one) before anything reads it, else a ConfigError naming the file."""
    if not isinstance(cfg, dict):
        raise ConfigError(f"expected a mapping of config sections, got {type(cfg).__name__}", path)
    for key in _SECTIONS:
        if not isinstance(cfg.get(key), dict):
            raise ConfigError(f"section '{key}' must be a mapping, got {cfg.get(key)!r:.60}; was the file edited?", path)
    name = cfg["method"].get("name")
    if name not in list_methods():
        raise ConfigError(f"method.name {name!r:.60} is not a textseg method ({', '.join(sorted(list_methods()))})",
                          path)
    return cfg

def load_run(run_dir: str | Path, checkpoint: str | Path = "best", device: str | torch.device = "cpu",
             data_root: str | Path | None = None) -> LoadedRun:
    """Rebuild a run's method from RUN/config.yaml and load a checkpoint ("best", "last" or a path).

    `data_root` overrides the prepared folder recorded in the config (when the data moved); without the
    folder, the run's own copy of its dataset.json (RUN/prepared.json) is enough to predict new images.
    """
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise DataError("run folder not found", run_dir)

    cfg = check_saved_config(load_config(run_dir / "config.yaml"), run_dir / "config.yaml")
    cfg = localize_config(cfg, run_dir)  # text inputs: the run's own copies
    ds = run_dataset(cfg, run_dir, data_root)  # the data folder, else the run's RUN/prepared.json
    apply_fold(ds, cfg["data"].get("fold"))
    path, rule = checkpoint_path(run_dir, checkpoint)
    ckpt = load_checkpoint(path, map_location="cpu")
    method = build_run_method(cfg, ds)
    load_method_state(method, ckpt["method"], path)  # another run's checkpoint: one line, not a key dump
    method.to(torch.device(device)).eval()
    return LoadedRun(method, cfg, ds, run_dir, path, int(ckpt.get("iteration", 0)), rule, ckpt.get("best_metric"))
