"""CPS: cross pseudo supervision (Chen et al., CVPR 2021), as in the 3D script of SSL4MIS
(`train_cross_pseudo_supervision_3D.py`), the implementation medical-imaging comparisons use.

Two networks of the same architecture (V-Net here, the LA literature's backbone), initialised differently
(Kaiming-normal and Xavier-normal convolutions), see the same batch. Each gets ½ (CE + Dice) on labeled cases
(Dice over all classes with squared denominators, as SSL4MIS's `DiceLoss`) and the cross-entropy to the
other network's argmax on unlabeled cases:

    L = Σ_n ½ (CE + Dice)(p_n, y) + λ(t) · [CE(p_1, argmax p_2) + CE(p_2, argmax p_1)]

with λ(t) = 0.1 · ramp(t // 150, 200) and poly lr decay. One SGD optimiser over both networks equals the
script's two optimisers with equal settings (per-parameter updates, disjoint parameters). Network 1 is
evaluated by default (decoder 1 picks network 2, "mean" averages the two softmaxes).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from textseg_cli.data.batch import Batch
from textseg_cli.methods.base import Method, StepContext
from textseg_cli.methods.losses import dice_loss
from textseg_cli.methods.registry import register_method
from textseg_cli.methods.ssl_common import backbone_kwargs, ramped_weight
from textseg_cli.models.vnet import VNet


def _init(net: nn.Module, kind: str) -> nn.Module:
    for m in net.modules():
        if isinstance(m, (nn.Conv3d, nn.Conv2d)):
            (nn.init.kaiming_normal_ if kind == "kaiming" else nn.init.xavier_normal_)(m.weight)
        elif isinstance(m, (nn.BatchNorm3d, nn.BatchNorm2d)):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
    return net


def cps_losses(logits1: torch.Tensor, logits2: torch.Tensor, labels: torch.Tensor, n_labeled: int):
    """(supervised_1, supervised_2, pseudo_1, pseudo_2) for two logit tensors over a labeled+unlabeled batch."""
    sup = []
    for z in (logits1, logits2):
        z = z.float()
        sup.append(0.5 * (F.cross_entropy(z[:n_labeled], labels.long())
                          + dice_loss(torch.softmax(z[:n_labeled], 1), labels, include_background=True,
                                      squared=True)))
    u1, u2 = logits1[n_labeled:].float(), logits2[n_labeled:].float()
    if not len(u1):
        zero = u1.sum()
        return sup[0], sup[1], zero, zero
    pseudo1 = F.cross_entropy(u1, u2.argmax(1).detach())
    pseudo2 = F.cross_entropy(u2, u1.argmax(1).detach())
    return sup[0], sup[1], pseudo1, pseudo2


@register_method("cps")
class CPS(Method):
    paper = "Chen et al., Semi-supervised semantic segmentation with cross pseudo supervision, CVPR 2021"
    display_name = "CPS"
    official_code = "HiLab-git/SSL4MIS"
    official_commit = "06df604"
    ledger = "docs/fidelity.md#cps-cps"

    def __init__(self, cfg: dict[str, Any], in_channels: int, num_classes: int, dim: int = 3, **context: Any):
        super().__init__(cfg, in_channels, num_classes, dim, **context)
        bb = backbone_kwargs(self.hparams)
        self.net1 = _init(VNet(in_channels, num_classes, dim=dim, **bb), "kaiming")
        self.net2 = _init(VNet(in_channels, num_classes, dim=dim, **bb), "xavier")

    def training_step(self, batch: Batch, ctx: StepContext) -> dict[str, torch.Tensor]:
        hp = self.hparams
        bl, bu = batch.image_l.shape[0], batch.image_u.shape[0]
        x = torch.cat([batch.image_l, batch.image_u])
        sup1, sup2, ps1, ps2 = cps_losses(self.net1(x), self.net2(x), batch.label_l, bl)
        w = ramped_weight(hp, ctx.iteration, 0.1, 200)
        loss = sup1 + sup2 + w * (ps1 + ps2)
        out = {"loss": loss, "loss_sup1": sup1.detach(), "loss_sup2": sup2.detach(),
               "consistency_weight": torch.tensor(w)}
        if bu:
            out.update(loss_cps1=ps1.detach(), loss_cps2=ps2.detach())
        return out

    def predict_logits(self, x: torch.Tensor, decoder: int | str | None = None) -> torch.Tensor:
        decoder = self.hparams.get("eval_decoder", 0) if decoder is None else decoder
        if decoder == "mean":
            mean = (torch.softmax(self.net1(x).float(), 1) + torch.softmax(self.net2(x).float(), 1)) / 2
            return torch.log(mean.clamp_min(1e-12))
        return self.net2(x) if decoder in (1, "1", "net2") else self.net1(x)
