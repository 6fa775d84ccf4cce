"""URPC: uncertainty-rectified pyramid consistency (Luo et al., MedIA 2022), as in the published SSL4MIS
`train_uncertainty_rectified_pyramid_consistency_3D.py`.

A 3D U-Net predicts at four scales (upsampled to the input size), p_1 … p_4. Labeled cases: the mean over
scales of CE + Dice (all classes, squared denominators). Unlabeled cases: with p̄ the mean of the four
softmax maps and the per-voxel uncertainty D_s = KL(p̄ ‖ p_s) = Σ_c p̄ (ln p̄ − ln p_s),

    L_s = mean((p̄ − p_s)² · e^(−D_s)) / (mean(e^(−D_s)) + 1e-8) + mean(D_s),    L_cons = ¼ Σ_s L_s

and L = L_sup + λ(t) · L_cons with λ(t) = 0.1 · ramp(t // 150, 400) (the code's GTV schedule; the LA profile
uses the LA scripts' ramp length 40), lr 0.1 with poly decay. As in the code, the gradient also flows
through p̄.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from textseg_cli.data.batch import Batch
from textseg_cli.errors import ConfigError
from textseg_cli.methods.base import Method, StepContext
from textseg_cli.methods.losses import dice_loss
from textseg_cli.methods.registry import register_method
from textseg_cli.methods.ssl_common import ramped_weight
from textseg_cli.models.unet3d import UNet3DDeepSup


def pyramid_consistency(probs: list[torch.Tensor]) -> torch.Tensor:
    """URPC's rectified consistency over scale probabilities (each (B, K, *spatial))."""
    mean = torch.stack(probs).mean(0)
    total = 0.0
    for p in probs:
        kl = torch.sum(F.kl_div(torch.log(p), mean, reduction="none"), dim=1, keepdim=True)  # KL(mean ‖ p)
        w = torch.exp(-kl)
        total = total + torch.mean((mean - p) ** 2 * w) / (torch.mean(w) + 1e-8) + torch.mean(kl)
    return total / len(probs)


@register_method("urpc")
class URPC(Method):
    paper = ("Luo et al., Semi-supervised medical image segmentation via uncertainty rectified pyramid consistency, "
             "MedIA 2022")
    display_name = "URPC"
    official_code = "HiLab-git/SSL4MIS"
    official_commit = "06df604"
    ledger = "docs/fidelity.md#urpc-urpc"

    def __init__(self, cfg: dict[str, Any], in_channels: int, num_classes: int, dim: int = 3, **context: Any):
        super().__init__(cfg, in_channels, num_classes, dim, **context)
        if dim != 3:
            raise ConfigError("method urpc: its 3D U-Net needs a 3D data set")
        self.net = UNet3DDeepSup(in_channels, num_classes, **(self.hparams.get("backbone") or {}))

    def training_step(self, batch: Batch, ctx: StepContext) -> dict[str, torch.Tensor]:
        hp = self.hparams
        bl, bu = batch.image_l.shape[0], batch.image_u.shape[0]
        outputs = [o.float() for o in self.net(torch.cat([batch.image_l, batch.image_u]))]
        probs = [torch.softmax(o, 1) for o in outputs]
        ce = sum(F.cross_entropy(o[:bl], batch.label_l.long()) for o in outputs)
        dice = sum(dice_loss(p[:bl], batch.label_l, include_background=True, squared=True) for p in probs)
        loss = (ce + dice) / (2 * len(outputs))
        out = {"loss_ce": ce.detach() / len(outputs), "loss_dice": dice.detach() / len(outputs)}
        if bu:
            cons = pyramid_consistency([p[bl:] for p in probs])
            w = ramped_weight(hp, ctx.iteration, 0.1, 400)
            loss = loss + w * cons
            out.update(loss_consistency=cons.detach(), consistency_weight=torch.tensor(w))
        out["loss"] = loss
        return out

    def predict_logits(self, x: torch.Tensor, decoder: int | str | None = None) -> torch.Tensor:
        """The finest output (index 0) by default; 0-3 pick a scale, "mean" averages the four softmaxes."""
        decoder = self.hparams.get("eval_decoder", 0) if decoder is None else decoder
        outputs = self.net(x)
        if decoder == "mean":
            return torch.log(torch.stack([torch.softmax(o.float(), 1) for o in outputs]).mean(0))
        return outputs[int(decoder)]
