"""Losses and schedules shared by the training methods.

Conventions follow the semi-supervised literature's code so configs reproduce published numbers:
Dice is computed over the whole batch (sums over batch and space, not a per-sample mean), consistency
weights ramp up with a Gaussian curve on `iteration // 150`. Everything is computed in float32, also
under bf16 autocast.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def one_hot(labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """(B, *spatial) integer labels → (B, K, *spatial) float one-hot."""
    oh = F.one_hot(labels.long(), num_classes)  # (B, *spatial, K)
    return oh.movedim(-1, 1).float()


def dice_loss(probs: torch.Tensor, target: torch.Tensor, include_background: bool = False,
              smooth: float = 1e-5, squared: bool = False, reduction: str = "mean") -> torch.Tensor:
    """Soft Dice loss `1 - (2·Σ p·t + s) / (Σ p + Σ t + s)` per class, summed over batch and space.

    probs: (B, K, *spatial) probabilities. target: (B, *spatial) class indices or (B, K, *spatial) one-hot.
    `squared=True` uses Σp² + Σt² in the denominator (UA-MT/SASSNet/DTC code); MC-Net uses the plain sums.
    Returns the mean over the chosen classes (`reduction="none"`: one value per class).
    """
    probs = probs.float()
    k = probs.shape[1]
    t = one_hot(target, k) if target.dim() == probs.dim() - 1 else target.float()
    dims = [0] + list(range(2, probs.dim()))
    inter = (probs * t).sum(dims)
    if squared:
        denom = (probs * probs).sum(dims) + (t * t).sum(dims)
    else:
        denom = probs.sum(dims) + t.sum(dims)
    loss = 1.0 - (2.0 * inter + smooth) / (denom + smooth)
    if not include_background and k > 1:
        loss = loss[1:]
    return loss if reduction == "none" else loss.mean()


def ce_dice_loss(logits: torch.Tensor, labels: torch.Tensor, ce_weight: float = 0.5, dice_weight: float = 0.5,
                 **dice_kw) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Weighted cross-entropy + soft Dice on softmax; returns (total, ce, dice)."""
    logits = logits.float()
    ce = F.cross_entropy(logits, labels.long())
    dice = dice_loss(torch.softmax(logits, dim=1), labels, **dice_kw)
    return ce_weight * ce + dice_weight * dice, ce, dice


def sharpen(p: torch.Tensor, temperature: float = 0.1) -> torch.Tensor:
    """Entropy-minimising sharpening `p^(1/T) / (p^(1/T) + (1-p)^(1/T))` applied per channel (MC-Net).

    Not the same function as `ssl_common.sharpen_softmax` (MCF), which normalises over the classes: the two agree
    only for two classes, and then only to rounding (parity with each official code needs each)."""
    p = p.float()
    inv = 1.0 / temperature
    a = p.pow(inv)
    return a / (a + (1.0 - p).pow(inv))


def mse(a: torch.Tensor, b: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    d = (a.float() - b.float()) ** 2
    return d.mean() if reduction == "mean" else d


def softmax_mse(logits_a: torch.Tensor, logits_b: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """MSE between the softmax probabilities of two logit tensors (mean-teacher consistency)."""
    return mse(torch.softmax(logits_a.float(), 1), torch.softmax(logits_b.float(), 1), reduction)


def sigmoid_rampup(current: float, length: float) -> float:
    """Gaussian ramp-up `exp(-5 (1 - min(t, T)/T)^2)` from Laine & Aila (2017); 1.0 when length is 0."""
    if length == 0:
        return 1.0
    t = min(max(float(current), 0.0), float(length))
    phase = 1.0 - t / float(length)
    return float(math.exp(-5.0 * phase * phase))


def consistency_weight(iteration: int, w_max: float, length: float, per: int = 150) -> float:
    """`w_max · sigmoid_rampup(iteration // per, length)`: the field's ramp on 'epochs' of 150 iterations."""
    return float(w_max) * sigmoid_rampup(int(iteration) // int(per), length)
