"""Decisions a method takes from its losses, made once for all DDP processes.

Under DistributedDataParallel each process sees its own patches, so a choice made from local losses
(MCF's "good student", Text-SemiSeg's better/worse decoder in DCA) could differ between ranks, and the
averaged gradients would mix two different objectives. `global_mean` averages the deciding values over
the processes first (a no-op in one process, so single-process results are unchanged).
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def global_mean(values: torch.Tensor) -> torch.Tensor:
    """`values` (detached) averaged over the DDP process group; `values` itself outside DDP."""

    values = values.detach()
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return values
    total = values.float().clone()
    dist.all_reduce(total, op=dist.ReduceOp.SUM)
    return total / dist.get_world_size()
