"""Checkpoints: atomic writes, RNG capture/restore.

A checkpoint is a dict `{"format", "method", "optimizer", "scheduler", "iteration", "rng", "config",
"best_metric", "best_iteration", "log_window"}`. Everything in it loads with `torch.load(weights_only=True)`
(RNG states are stored as plain Python values and tensors).
"""

from __future__ import annotations

import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

from textseg_cli.errors import DataError
from textseg_cli.storage.files import atomic_path

try:  # POSIX only: names a file-size limit (`ulimit -f`) as the reason a checkpoint could not be written
    import resource
except ImportError:  # pragma: no cover - Windows
    resource = None  # type: ignore[assignment]

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
    """Write atomically: a crash mid-write leaves the previous file intact.

    A full disk or a file-size limit makes torch.save raise a RuntimeError (`_WRITE_FAILURES`), not an
    OSError; both become a DataError naming this checkpoint."""
    path = Path(path)
    with atomic_path(path, suffix=".pt") as tmp:
        try:
            torch.save({"format": FORMAT, **state}, tmp)
        except RuntimeError as exc:  # torch's writer: "[enforce fail at inline_container.cc:...] ..."
            if not any(m in str(exc) for m in _WRITE_FAILURES):
                raise
            raise DataError(f"cannot write the checkpoint: {_write_failure(path)}; the previous version of the "
                            "file, if any, is unchanged", path) from None
    return path


# torch.save's messages when the file cannot be written: "PytorchStreamWriter failed writing file data/0: file
# write failed" (a full disk), "unexpected pos 190336 vs 190232" (a file-size limit cut the write short)
_WRITE_FAILURES = ("PytorchStreamWriter", "write failed", "unexpected pos", "inline_container")


def _write_failure(path: Path) -> str:
    """Why torch could not write (its RuntimeError carries no errno): a full disk, else a size limit or quota."""
    try:
        free = shutil.disk_usage(path.parent).free
    except OSError:
        free = None
    if free is not None and free < 64 * 2**20:
        return f"no space left on the device ({free // 2**20} MiB free)"
    limit = resource.getrlimit(resource.RLIMIT_FSIZE)[0] if resource is not None else None
    if limit is not None and limit != resource.RLIM_INFINITY:
        return f"the file exceeds this process's file-size limit ({limit} bytes; see `ulimit -f`)"
    return "the write failed (disk full, a quota or a file-size limit such as `ulimit -f`)"


def load_method_state(method: torch.nn.Module, state: dict[str, Any], path: str | Path) -> None:
    """Load a checkpoint's weights into `method`; a checkpoint of another network (another run's method,
    backbone or class count) is a DataError naming the file and counting the keys that do not fit, instead of
    torch's dump of every key."""
    own = method.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    wrong = [k for k in own if k in state and tuple(getattr(state[k], "shape", own[k].shape)) != tuple(own[k].shape)]
    if missing or unexpected or wrong:
        parts = [f"{len(keys)} {what} ({', '.join(keys[:3])}{', ...' if len(keys) > 3 else ''})"
                 for what, keys in (("missing keys", missing), ("unexpected keys", unexpected),
                                    ("keys of another shape", wrong)) if keys]
        raise DataError(f"checkpoint does not fit this run's network ({'; '.join(parts)}); "
                        "was it written by another run?", path)
    method.load_state_dict(state)


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
