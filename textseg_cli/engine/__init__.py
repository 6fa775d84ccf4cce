"""Training engine: config resolution, two-stream sampling, the loop, checkpoints, run folders, DDP."""

from textseg_cli.engine.runs import LoadedRun, load_run
from textseg_cli.engine.trainer import NonFiniteLossError, TrainResult, train

__all__ = ["LoadedRun", "NonFiniteLossError", "TrainResult", "load_run", "train"]
