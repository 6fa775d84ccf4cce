"""Pieces shared by the semi-supervised baselines (UA-MT, DTC, URPC, MCF, BCP, MLRP, CPS).

Each lives here once, with its own tests (tests/test_ssl_common.py):

- EMA teachers: `make_teacher`, `ema_update`, `copy_weights`.
- Copy-paste / CutMix: `cuboid_mask`, `mix`.
- Signed distance of a label, normalised as DTC's published code does: `normalized_sdf`.
- Uncertainty: `entropy`, `entropy_of_mean` (UA-MT's Monte-Carlo estimate), `noisy`.
- Pseudo-labels: `threshold_pseudo_label` (optionally largest connected component), `sharpen_softmax`.
- `masked_mean`.

Dice losses, ramp-ups and MC-Net's two-class sharpening live in `textseg_cli.methods.losses` (the `dice_loss` of
the UA-MT/DTC/MCF code is `losses.dice_loss(..., squared=True)`); the largest connected component in
`textseg_cli.metrics.postprocess`.
"""

from __future__ import annotations

import copy
from typing import Sequence

import numpy as np
import torch
import torch.nn as nn
from scipy.ndimage import distance_transform_edt
from skimage.segmentation import find_boundaries

from textseg_cli.methods.losses import consistency_weight
from textseg_cli.metrics.postprocess import lcc_batch

# ----------------------------------------------------------------------------------------------------------
# EMA teachers


def make_teacher(student: nn.Module) -> nn.Module:
    """A deep copy of `student` whose parameters take no gradient (an EMA or pseudo-label teacher)."""
    teacher = copy.deepcopy(student)
    for p in teacher.parameters():
        p.requires_grad_(False)
    return teacher


@torch.no_grad()
def ema_update(teacher: nn.Module, student: nn.Module, decay: float, iteration: int | None = None) -> float:
    """teacher ← α·teacher + (1-α)·student on the parameters; returns α.

    With `iteration` (0-based index of the step just taken) α = min(1 - 1/(iteration+1), decay): the
    "true average until the exponential average is more correct" warm start of UA-MT's code (α = 0 at the
    first step, so the teacher starts as a copy). Without it α = decay (BCP's code).
    Buffers (BatchNorm running statistics) are not averaged: as in the published code the teacher keeps the
    statistics of its own forward passes.
    """
    alpha = decay if iteration is None else min(1.0 - 1.0 / (iteration + 1), decay)
    for t, s in zip(teacher.parameters(), student.parameters()):
        t.mul_(alpha).add_(s.detach(), alpha=1.0 - alpha)
    return alpha


@torch.no_grad()
def copy_weights(dst: nn.Module, src: nn.Module) -> None:
    """dst ← src (parameters and buffers); e.g. BCP's teacher initialised from the pre-trained student."""
    dst.load_state_dict(src.state_dict())


# ----------------------------------------------------------------------------------------------------------
# Copy-paste / CutMix


def cuboid_mask(spatial: Sequence[int], ratio: float | Sequence[float] = 2 / 3,
                size: Sequence[int] | None = None, device: torch.device | str | None = None,
                generator: torch.Generator | None = None) -> torch.Tensor:
    """A (*spatial) long mask that is 1 everywhere except one randomly placed cuboid of zeros.

    The cuboid is `size` voxels per axis, or int(dim · ratio) (BCP: 2/3 of the patch per axis). Its corner
    is drawn uniformly from 0..d−s−1 per axis, as BCP's code (not d−s: its randint excludes it). BCP's convention:
    `mix(a, b, mask)` keeps `a` outside the cuboid and pastes `b` into it.
    """
    spatial = [int(s) for s in spatial]
    if size is None:
        ratios = [float(ratio)] * len(spatial) if np.isscalar(ratio) else [float(r) for r in ratio]
        size = [int(d * r) for d, r in zip(spatial, ratios)]
    size = [min(int(s), d) for s, d in zip(size, spatial)]
    mask = torch.ones(spatial, dtype=torch.long, device=device)
    # corner in 0..d-s-1 as BCP's context_mask (utils/BCP_utils.py:23-25, np.random.randint(0, d - s)): the last
    # position is never drawn; 0 when the cuboid fills the axis
    starts = [int(torch.randint(0, max(1, d - s), (1,), generator=generator)) for d, s in zip(spatial, size)]
    region = tuple(slice(st, st + s) for st, s in zip(starts, size))
    mask[region] = 0
    return mask


def mix(a: torch.Tensor, b: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """a where mask == 1, b where mask == 0; `mask` (*spatial) broadcasts over batch and channel dims."""
    m = mask.to(a.dtype)
    return a * m + b * (1 - m)


# ----------------------------------------------------------------------------------------------------------
# Signed distance function


def normalized_sdf(labels: np.ndarray | torch.Tensor) -> np.ndarray:
    """Normalised signed distance of binary masks, as DTC's `compute_sdf`: (B, *spatial) → float32.

    Inside the object −posdis/max(posdis), outside +negdis/max(negdis) (each min-max normalised, the minimum
    being 0), 0 on the inner boundary (skimage `find_boundaries(mode="inner")`), all-zero for an empty mask.
    Distances are Euclidean (scipy `distance_transform_edt`) in voxels. A mask that fills the patch has no
    outside; its outside term is taken as 0 (DTC's code would divide by zero there).
    """

    arr = labels.detach().cpu().numpy() if isinstance(labels, torch.Tensor) else np.asarray(labels)
    out = np.zeros(arr.shape, dtype=np.float32)
    for b in range(arr.shape[0]):
        pos = arr[b].astype(bool)
        if not pos.any():
            continue
        neg = ~pos
        posdis = distance_transform_edt(pos)
        negdis = distance_transform_edt(neg) if neg.any() else np.zeros_like(posdis)
        sdf = _minmax(negdis) - _minmax(posdis)
        sdf[find_boundaries(pos, mode="inner")] = 0
        out[b] = sdf
    return out


def _minmax(d: np.ndarray) -> np.ndarray:
    span = d.max() - d.min()
    return (d - d.min()) / span if span > 0 else np.zeros_like(d)


# ----------------------------------------------------------------------------------------------------------
# Uncertainty


def entropy(probs: torch.Tensor, eps: float = 1e-6, keepdim: bool = True) -> torch.Tensor:
    """Per-voxel entropy −Σ_c p_c ln(p_c + eps) over the class dim 1 (natural log: at most ln K)."""
    return -(probs * torch.log(probs + eps)).sum(dim=1, keepdim=keepdim)


def entropy_of_mean(prob_samples: Sequence[torch.Tensor] | torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """UA-MT's uncertainty: the entropy of the mean of T stochastic probability maps, (B, 1, *spatial).

    `prob_samples`: a list of T tensors (B, K, *spatial), or one tensor (T, B, K, *spatial).
    """
    stack = torch.stack(list(prob_samples)) if not isinstance(prob_samples, torch.Tensor) else prob_samples
    return entropy(stack.mean(dim=0), eps=eps)


def noisy(x: torch.Tensor, std: float = 0.1, clip: float = 0.2) -> torch.Tensor:
    """x + clamp(N(0, std²), −clip, clip): the teacher input perturbation of mean-teacher code."""
    return x + torch.clamp(torch.randn_like(x) * std, -clip, clip)


# ----------------------------------------------------------------------------------------------------------
# Pseudo-labels and sharpening


@torch.no_grad()
def threshold_pseudo_label(probs: torch.Tensor, threshold: float = 0.5, lcc: bool = False) -> torch.Tensor:
    """Hard pseudo-labels (B, *spatial) long from probabilities (B, K, *spatial).

    Two classes: foreground where p_1 ≥ threshold (BCP's `get_cut_mask`). More classes: the argmax class where
    its probability ≥ threshold, background elsewhere. With `lcc`, each foreground class of each sample keeps
    only its largest connected component (`metrics.postprocess.lcc_batch`, full connectivity as skimage's
    `label` that BCP's code calls).
    """
    if probs.shape[1] == 2:
        labels = (probs[:, 1] >= threshold).long()
    else:
        conf, labels = probs.max(dim=1)
        labels = torch.where(conf >= threshold, labels, torch.zeros_like(labels))
    if lcc:
        labels = lcc_batch(labels)
    return labels


def sharpen_softmax(probs: torch.Tensor, temperature: float) -> torch.Tensor:
    """p_c^(1/T) / Σ_k p_k^(1/T) over the class dim 1 (MCF's pseudo-label); for two classes this equals
    MC-Net's p^(1/T) / (p^(1/T) + (1−p)^(1/T)). Computed in log space so small T cannot underflow to 0/0."""
    return torch.softmax(torch.log(probs.clamp_min(1e-12)) / temperature, dim=1)


# ----------------------------------------------------------------------------------------------------------
# Reductions


def masked_mean(values: torch.Tensor, mask: torch.Tensor, eps: float = 1e-16) -> torch.Tensor:
    """Σ mask·values / (Σ mask + eps); mask broadcasts against values."""
    mask = mask.to(values.dtype)
    prod = values * mask
    return prod.sum() / (mask.expand_as(prod).sum() + eps)



# ----------------------------------------------------------------------------------------------------------
# Config helpers shared by the method modules


def ramped_weight(hparams: dict, step: int, weight: float, rampup: float, per: int = 150) -> float:
    """`method.consistency.{weight, rampup, per}` (defaults: the published values given) applied as
    `losses.consistency_weight(step, weight, rampup, per)`."""
    cons = hparams.get("consistency") or {}
    return consistency_weight(step, float(cons.get("weight", weight)), float(cons.get("rampup", rampup)),
                              int(cons.get("per", per)))


def backbone_kwargs(hparams: dict) -> dict:
    """`method.backbone` (V-Net options such as normalization, n_filters) as constructor keywords."""
    return dict(hparams.get("backbone") or {})
