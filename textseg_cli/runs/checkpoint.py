"""Checkpoints: atomic writes, RNG capture/restore.

A checkpoint is a dict `{"format", "method", "optimizer", "scheduler", "iteration", "rng", "config",
"best_metric", "best_iteration", "log_window"}`. Everything in it loads with `torch.load(weights_only=True)`
(RNG states are stored as plain Python values and tensors).
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from textseg_cli.errors import DataError
from textseg_cli.storage.files import atomic_path

FORMAT = "textseg-checkpoint/1"


def capture_rng() -> dict[str, Any]:
    """Global RNG states of python, numpy and torch (CPU and CUDA) as checkpointable values."""
    np_state = np.random.get_state(legacy=True)
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": {"name": np_state[0], "keys": torch.from_numpy(np_state[1].astype(np.int64)),
                  "pos": int(np_state[2]), "has_gauss": int(np_state[3]), "cached_gaussian": float(np_state[4])},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict[str, Any]) -> None:
    random.setstate(_as_tuple(state["python"]))
    n = state["numpy"]
    np.random.set_state((n["name"], n["keys"].cpu().numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    # set_rng_state needs CPU ByteTensors, wherever the checkpoint was mapped
    torch.set_rng_state(state["torch"].cpu())
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])


def _as_tuple(x: Any) -> Any:
    return tuple(_as_tuple(v) for v in x) if isinstance(x, (list, tuple)) else x


def save_checkpoint(path: str | Path, state: dict[str, Any]) -> Path:
    """Write atomically: a crash mid-write leaves the previous file intact."""
    path = Path(path)
    with atomic_path(path, suffix=".pt") as tmp:
        torch.save({"format": FORMAT, **state}, tmp)
    return path


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    path = Path(path)
    if not path.exists():
        raise DataError("checkpoint not found", path)
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:
        raise DataError(f"unreadable checkpoint ({type(exc).__name__}: {exc})", path) from exc
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT or "method" not in ckpt:
        raise DataError(f"not a textseg checkpoint (expected format {FORMAT!r})", path)
    return ckpt
