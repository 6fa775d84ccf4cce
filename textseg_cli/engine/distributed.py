"""DDP for training: the process layout from torchrun's environment, the collectives the loop needs, and a
clean shutdown of the process group.

Every function is a no-op (or returns its input) in a single process, so the loop calls them unconditionally.
Closing the group: destroying a gloo group while a peer still talks to it aborts that peer ("terminate called
without an active exception") and torchrun then reports a failed job although training finished. Every rank
therefore reaches a barrier first; on error paths the barrier has a short timeout, so a rank that died does
not keep the others waiting.
"""

from __future__ import annotations

import datetime as _dt
import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as tdist
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel as DDP


@dataclass
class Dist:
    world_size: int = 1
    rank: int = 0
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def main(self) -> bool:
        return self.rank == 0


def dist_from_env() -> Dist:
    """The layout torchrun sets (WORLD_SIZE, RANK, LOCAL_RANK); one process otherwise."""
    ws = int(os.environ.get("WORLD_SIZE", "1"))
    if ws <= 1:
        return Dist()
    return Dist(ws, int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0")))


def init_process_group(dist: Dist, device: torch.device) -> None:
    """nccl on CUDA, gloo on the CPU; a long timeout, since rank 0 validates while the others wait."""
    if dist.enabled and not tdist.is_initialized():
        tdist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=_dt.timedelta(hours=2))


def barrier(dist: Dist) -> None:
    if dist.enabled:
        tdist.barrier()


class StepModule(nn.Module):
    """Routes `training_step` through `forward` so DistributedDataParallel can sync its gradients."""

    def __init__(self, method: nn.Module):
        super().__init__()
        self.method = method

    def forward(self, batch, ctx):
        return self.method.training_step(batch, ctx)


def wrap_for_training(method: nn.Module, dist: Dist, device: torch.device, find_unused: bool) -> nn.Module:
    """The module the loop calls: the method's step, under DDP when there are several processes."""
    step = StepModule(method)
    if not dist.enabled:
        return step

    return DDP(step, device_ids=[device.index] if device.type == "cuda" else None, find_unused_parameters=find_unused)


def any_rank(dist: Dist, flag: bool, device: torch.device) -> bool:
    """True on every rank when `flag` is true on any rank (stop requests, non-finite losses)."""
    if not dist.enabled:
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=device if device.type == "cuda" else "cpu")
    tdist.all_reduce(t, op=tdist.ReduceOp.MAX)
    return bool(t.item() > 0)


def from_main(dist: Dist, flag: bool) -> bool:
    """Rank 0's value of `flag` on every rank (only rank 0 validates)."""
    if not dist.enabled:
        return flag
    box = [flag]
    tdist.broadcast_object_list(box, src=0)
    return bool(box[0])


def main_value(dist: Dist, obj: Any) -> Any:
    """Rank 0's `obj` on every rank (a value every rank must agree on, e.g. a run length fitted to a budget)."""
    if not dist.enabled:
        return obj
    box = [obj]
    tdist.broadcast_object_list(box, src=0)
    return box[0]


def gather_objects(dist: Dist, obj: Any) -> list[Any]:
    """Every rank's `obj`, in rank order (RNG and sampler states for a checkpoint)."""
    if not dist.enabled:
        return [obj]
    out: list[Any] = [None] * dist.world_size
    tdist.all_gather_object(out, obj)
    return out


def shutdown_process_group(ok: bool = True) -> None:
    if not (tdist.is_available() and tdist.is_initialized()):
        return
    try:
        if tdist.get_backend() == "gloo":
            tdist.monitored_barrier(timeout=_dt.timedelta(seconds=300 if ok else 20))
        elif ok:  # nccl has no bounded barrier: only wait when every rank is known to be here
            tdist.barrier()
    except Exception:  # a peer is gone: still release this rank's resources
        pass
    finally:
        tdist.destroy_process_group()
