"""What `--deterministic` guarantees, and what it cannot on CUDA.

`torch.use_deterministic_algorithms(True)` raises on the first op without a deterministic CUDA kernel, and
almost every method uses one (below), so a `--deterministic` run would stop at step 1 on a GPU. We switch
it on with `warn_only=True`: every op that has a deterministic kernel uses it (cuDNN included), and the
ops listed here run their usual kernel with a warning. Runs are then repeatable on a CPU, and on CUDA up to
the atomic-add order of these ops. The list is written to `env.json` of deterministic runs.
"""

from __future__ import annotations

import os
import random
from typing import Any

import numpy as np
import torch

# op (as PyTorch names its CUDA kernel in the warning) → where textseg uses it. Source: the table in the
# documentation of torch.use_deterministic_algorithms (PyTorch 2.x), checked against our models.
CUDA_NONDETERMINISTIC_OPS: dict[str, str] = {
    "nll_loss2d_forward_out_cuda_template": "F.cross_entropy on 4D/5D logits with reduction='mean' "
                                           "(every CE loss: sup, mcnet, mcf, bcp, cps, urpc, text methods)",
    "upsample_bilinear2d_backward_out_cuda": "F.interpolate(mode='bilinear') backward (2D decoders, TGC-Net, "
                                             "V-Net up_mode 1 in 2D)",
    "upsample_trilinear3d_backward_out_cuda": "F.interpolate(mode='trilinear') backward (V-Net up_mode 1, URPC, "
                                              "MLRP, text fusion)",
    "grid_sampler_2d_backward_cuda": "F.grid_sample backward (TGC-Net deformable attention)",
    "adaptive_avg_pool2d_backward_cuda": "F.adaptive_avg_pool2d backward (CSA prototypes, 2D)",
    "adaptive_avg_pool3d_backward_cuda": "F.adaptive_avg_pool3d backward (CSA prototypes, 3D)",
    "max_pool3d_with_indices_backward_cuda": "F.max_pool3d backward (3D U-Net of LLM-SegNet)",
}


def set_deterministic() -> None:
    """Deterministic kernels wherever PyTorch has them; a warning (not an error) where it has none."""

    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.backends.cudnn.benchmark = False
    torch.backends.cudnn.deterministic = True


def determinism_record(deterministic: bool) -> dict[str, Any]:
    """The `env.json` fields describing what `--deterministic` did in this run."""
    if not deterministic:
        return {}

    return {"deterministic_warn_only": bool(torch.is_deterministic_algorithms_warn_only_enabled()),
            "cuda_nondeterministic_ops": dict(CUDA_NONDETERMINISTIC_OPS)}



def seed_everything(seed: int, deterministic: bool = False) -> None:
    """Seed python, numpy and torch; optionally switch torch to deterministic kernels."""

    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(seed)
    if deterministic:
        set_deterministic()
