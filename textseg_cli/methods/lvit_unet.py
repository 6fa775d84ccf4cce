"""`lvit-unet`: LViT's U-Net baseline trained exactly as LViT trains it (MoNuSeg: 76.45 Dice / 62.86 IoU).

Network `lvit-unet` (one sigmoid output), loss WeightedDiceBCE(0.5, 0.5) on the sigmoid probabilities.
The rest of LViT's protocol (epochs, early stopping, cosine warm restarts per epoch, its augmentation)
is engine configuration: `textseg_cli/configs/lvit-unet.yaml`; every fact with its LViT file:line is in
docs/fidelity.md.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
import torch.nn.functional as F

from textseg_cli.data.batch import Batch
from textseg_cli.errors import ConfigError
from textseg_cli.methods.base import Method, StepContext
from textseg_cli.methods.registry import register_method
from textseg_cli.models.registry import build_model


def weighted_bce(prob: torch.Tensor, target: torch.Tensor, weights: Sequence[float] = (0.5, 0.5)) -> torch.Tensor:
    """LViT's WeightedBCE: per-pixel BCE averaged separately over foreground and background pixels of the
    whole batch, then weights[0]·fg + weights[1]·bg (each class counts equally, whatever its size)."""
    p, t = prob.reshape(-1).float(), target.reshape(-1).float()
    bce = F.binary_cross_entropy(p, t, reduction="none")
    pos, neg = (t > 0.5).float(), (t < 0.5).float()
    # LViT divides by Python floats (`.item()`), so the denominators carry no gradient either way
    n_pos, n_neg = pos.sum().detach() + 1e-12, neg.sum().detach() + 1e-12
    return (weights[0] * pos * bce / n_pos + weights[1] * neg * bce / n_neg).sum()


def weighted_soft_dice(prob: torch.Tensor, target: torch.Tensor, weights: Sequence[float] = (0.5, 0.5),
                       smooth: float = 1e-5) -> torch.Tensor:
    """LViT's WeightedDiceLoss: per image 1 − (2Σ(wp)(wt) + s) / (Σ(wp)² + Σ(wt)² + s) with w = weights[1] on
    foreground and weights[0] on background pixels, averaged over the batch."""
    b = prob.shape[0]
    p, t = prob.reshape(b, -1).float(), target.reshape(b, -1).float()
    w = t.detach() * (weights[1] - weights[0]) + weights[0]
    p, t = w * p, w * t
    inter = (p * t).sum(-1)
    union = (p * p).sum(-1) + (t * t).sum(-1)
    return (1 - (2 * inter + smooth) / (union + smooth)).mean()


def weighted_dice_bce(prob: torch.Tensor, target: torch.Tensor, dice_weight: float = 0.5,
                      bce_weight: float = 0.5) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """LViT's WeightedDiceBCE(dice_weight, BCE_weight) on probabilities; returns (total, dice, bce)."""
    dice, bce = weighted_soft_dice(prob, target), weighted_bce(prob, target)
    return dice_weight * dice + bce_weight * bce, dice, bce


@register_method("lvit-unet")
class LViTUNetMethod(Method):
    paper = "U-Net as LViT trains it (Li et al., IEEE TMI 2023; nets/UNet.py, train_model.py); binary"
    display_name = "U-Net (LViT)"
    official_code = "HUANGLIZI/LViT (nets/UNet.py)"
    official_commit = "a9b0b41"
    ledger = "docs/fidelity.md#lvits-u-net-on-monuseg-lvit-unet-issue-19"
    needs_unlabeled = False
    dims = (2,)
    dims_note = "LViT's U-Net is a 2D network"
    listing_in_channels = 3  # `textseg models` in a 3D listing counts it as LViT builds it: UNet(n_channels=3)

    def __init__(self, cfg: dict[str, Any], in_channels: int, num_classes: int, dim: int = 2, **context: Any):
        super().__init__(cfg, in_channels, num_classes, dim=dim, **context)
        if num_classes != 2:
            raise ConfigError(f"lvit-unet is binary (one sigmoid output, WeightedDiceBCE); this data set has "
                              f"{num_classes} classes")
        hp = self.hparams
        self.net = build_model(hp.get("model", "lvit-unet"), in_channels, num_classes, **(hp.get("backbone") or {}))

    def training_step(self, batch: Batch, ctx: StepContext) -> dict[str, torch.Tensor]:
        hp = self.hparams
        logits = self.net.logits(batch.image_l)
        with torch.autocast(device_type=logits.device.type, enabled=False):  # BCE is unsafe under autocast
            prob = torch.sigmoid(logits.float())
            loss, dice, bce = weighted_dice_bce(prob, batch.label_l, hp.get("dice_weight", 0.5),
                                                hp.get("bce_weight", 0.5))
        return {"loss": loss, "loss_dice": dice.detach(), "loss_bce": bce.detach()}

    def predict_logits(self, x: torch.Tensor, decoder: int | str | None = None) -> torch.Tensor:
        """Two-class logits (0, z): their softmax is (1 − σ(z), σ(z)), so argmax is LViT's σ(z) > 0.5."""
        z = self.net.logits(x)
        return torch.cat([torch.zeros_like(z), z], dim=1)
