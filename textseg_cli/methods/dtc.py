"""DTC: dual-task consistency (Luo et al., AAAI 2021), as in the published `HiLab-git/DTC` code.

One V-Net whose last decoder feature feeds two 1×1×1 heads: segmentation logits z (sigmoid, one channel per
foreground class) and a signed-distance regression s = tanh(·). On labeled cases

    L_sup = Dice(σ(z), y) + β · MSE(s, SDF(y))            (β = 0.3; SDF normalised to [−1, 1])

and on every case of the batch the dual-task consistency  L_dtc = mean (σ(−k·s) − σ(z))²  with k = 1500
turns the distance map back into a soft mask; L = L_sup + λ(t) · L_dtc, λ(t) = 1.0 · ramp(t // 150, 40).
The published code computes the cross-entropy of the segmentation head but leaves it out of the loss (the
paper text includes it): `method.ce_weight` defaults to 0 and 1 gives the paper's version.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from textseg_cli.data.batch import Batch
from textseg_cli.methods.base import Method, StepContext
from textseg_cli.methods.losses import dice_loss, one_hot
from textseg_cli.methods.registry import register_method
from textseg_cli.methods.ssl_common import (
    backbone_kwargs,
    normalized_sdf,
    ramped_weight,
)
from textseg_cli.models.vnet import VNetDecoder, VNetEncoder


class DualHeadVNet(nn.Module):
    """V-Net with a segmentation head (the decoder's own output conv) and a tanh SDF head on the same
    last feature; forward(x) → (seg_logits, sdf), each (B, K−1, *spatial)."""

    def __init__(self, in_channels: int, out_channels: int, n_filters: int = 16, normalization: str = "batchnorm",
                 has_dropout: bool = True, dim: int = 3):
        super().__init__()
        self.encoder = VNetEncoder(in_channels, n_filters, normalization, has_dropout, dim)
        self.decoder = VNetDecoder(out_channels, n_filters, normalization, has_dropout, up_mode=0, dim=dim)
        self.sdf_head = (nn.Conv3d if dim == 3 else nn.Conv2d)(n_filters, out_channels, 1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        seg, feat = self.decoder(self.encoder(x), return_feature=True)
        return seg, torch.tanh(self.sdf_head(feat))


def sdf_targets(labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """(B, K−1, *spatial) normalised SDF of each foreground class of (B, *spatial) labels."""
    maps = [torch.from_numpy(normalized_sdf((labels == c).cpu().numpy())) for c in range(1, num_classes)]
    return torch.stack(maps, dim=1).to(labels.device)


def patch_sdf(label: np.ndarray, num_classes: int) -> np.ndarray:
    """(K−1, *spatial) normalised SDF of one patch's label: `sdf_targets` of a batch of one, on the host."""
    return np.stack([normalized_sdf((np.asarray(label) == c)[None])[0] for c in range(1, num_classes)])


def dtc_losses(seg_logits: torch.Tensor, sdf: torch.Tensor, labels: torch.Tensor, n_labeled: int,
               num_classes: int, k: float = 1500.0, gt_sdf: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """DTC's terms: Dice and BCE of σ(z) and MSE of the SDF head on the first `n_labeled` samples, and the
    dual-task consistency mean (σ(−k·s) − σ(z))² on all samples."""
    seg_logits, sdf = seg_logits.float(), sdf.float()
    probs = torch.sigmoid(seg_logits)
    fg = one_hot(labels, num_classes)[:, 1:]
    if gt_sdf is None:
        gt_sdf = sdf_targets(labels, num_classes)
    return {
        "dice": dice_loss(probs[:n_labeled], fg, include_background=True, squared=True),
        "ce": F.binary_cross_entropy_with_logits(seg_logits[:n_labeled], fg),
        "sdf": F.mse_loss(sdf[:n_labeled], gt_sdf.float()),
        "consistency": torch.mean((torch.sigmoid(-k * sdf) - probs) ** 2),
    }


@register_method("dtc")
class DTC(Method):
    paper = "Luo et al., Semi-supervised medical image segmentation through dual-task consistency, AAAI 2021"
    display_name = "DTC"
    official_code = "HiLab-git/DTC"
    official_commit = "2525b9c"
    ledger = "docs/fidelity.md#dtc-dtc"
    protocol_lcc = "HiLab-git/DTC code/test_LA.py:15 (--nms default 1)"

    def __init__(self, cfg: dict[str, Any], in_channels: int, num_classes: int, dim: int = 3, **context: Any):
        super().__init__(cfg, in_channels, num_classes, dim, **context)
        self.net = DualHeadVNet(in_channels, num_classes - 1, dim=dim, **backbone_kwargs(self.hparams))

    def training_step(self, batch: Batch, ctx: StepContext) -> dict[str, torch.Tensor]:
        hp = self.hparams
        bl = batch.image_l.shape[0]
        seg, sdf = self.net(torch.cat([batch.image_l, batch.image_u]))
        parts = dtc_losses(seg, sdf, batch.label_l, bl, self.num_classes, float(hp.get("sdf_sharpness", 1500)),
                           gt_sdf=batch.extra.get("sdf_l"))  # made by the sampler (label_targets)
        sup = parts["dice"] + float(hp.get("ce_weight", 0.0)) * parts["ce"] + float(hp.get("beta", 0.3)) * parts["sdf"]
        w = ramped_weight(hp, ctx.iteration, 1.0, 40)
        loss = sup + w * parts["consistency"]
        return {"loss": loss, "loss_dice": parts["dice"].detach(), "loss_ce": parts["ce"].detach(),
                "loss_sdf": parts["sdf"].detach(), "loss_consistency": parts["consistency"].detach(),
                "consistency_weight": torch.tensor(w)}

    def label_targets(self, label: np.ndarray) -> dict[str, np.ndarray]:
        return {"sdf_l": patch_sdf(label, self.num_classes)}

    def predict_logits(self, x: torch.Tensor, decoder: int | str | None = None) -> torch.Tensor:
        """Segmentation head by default; decoder="sdf" (or 1) segments from the distance head, σ(−k·s).

        The sigmoid channels z become K-class logits [0, z_1, …]: for two classes softmax gives exactly
        (1 − σ(z), σ(z)); with more classes the argmax picks the most confident foreground channel above 0.
        """
        decoder = self.hparams.get("eval_decoder", "seg") if decoder is None else decoder
        seg, sdf = self.net(x)
        z = -float(self.hparams.get("sdf_sharpness", 1500)) * sdf if decoder in ("sdf", 1, "1") else seg
        return torch.cat([torch.zeros_like(z[:, :1]), z], dim=1)
