"""MCF: mutual correction framework (Wang et al., CVPR 2023), as in the published `WYC-321/MCF` code.

Two heterogeneous networks see the same batch: the V-Net and a 3D ResNet-34 encoder with the V-Net decoder
(`models.resnet3d.ResVNet`). Each is supervised on labeled cases by CE + Dice (foreground, squared
denominators) plus 0.5 · MSE between its foreground probability and the label on the voxels where the two
networks' argmax predictions disagree. The network with the lower labeled Dice loss is this step's "good
student"; its sharpened output (p^(1/T) normalised over classes, T = 0.1, no gradient) supervises the other
network on the unlabeled cases by MSE, weighted λ(t) = 0.1 · ramp(t // 150, 40):

    L_good = L_sup,   L_other = L_sup + λ(t) · MSE(q_other, q_good^sharp)

The published `softmax_mse_loss` has its two softmax lines commented out (code/utils/losses.py:65-66), so
both MSE terms are plain squared differences of the probability maps, as here.
`method.consistency.double_softmax: true` applies one more softmax to both maps before the consistency MSE
(textseg's earlier default, a ~4.6x weaker term); it is not the published behaviour.
The two networks are trained by one SGD optimiser over both parameter sets, which is the same as the
code's two optimisers with equal settings (SGD updates each parameter independently and the two losses
share no parameters). Inference averages the two networks' softmax (as the published test script);
decoder="vnet"/0 or "resnet"/1 evaluates one network.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from textseg_cli.data.batch import Batch
from textseg_cli.errors import ConfigError
from textseg_cli.methods.base import Method, StepContext
from textseg_cli.methods.distributed import global_mean
from textseg_cli.methods.losses import dice_loss, one_hot
from textseg_cli.methods.registry import register_method
from textseg_cli.methods.ssl_common import (
    backbone_kwargs,
    masked_mean,
    ramped_weight,
    sharpen_softmax,
)
from textseg_cli.models.resnet3d import ResVNet
from textseg_cli.models.vnet import VNet


def disagreement_mse(probs: torch.Tensor, labels: torch.Tensor, disagree: torch.Tensor) -> torch.Tensor:
    """Mean over foreground classes of Σ_disagree (p_c − [y = c])² / Σ_disagree (labeled samples)."""
    target = one_hot(labels, probs.shape[1])
    mask = disagree.unsqueeze(1).float()
    return torch.stack([masked_mean((probs[:, c:c + 1] - target[:, c:c + 1]) ** 2, mask)
                        for c in range(1, probs.shape[1])]).mean()


def mcf_consistency(probs: torch.Tensor, pseudo: torch.Tensor, double_softmax: bool = False) -> torch.Tensor:
    """MSE between a network's probabilities and the good student's sharpened ones (each (B, K, ...))."""
    if double_softmax:
        probs, pseudo = torch.softmax(probs, 1), torch.softmax(pseudo, 1)
    return torch.mean((probs - pseudo) ** 2)


@register_method("mcf")
class MCF(Method):
    paper = "Wang et al., MCF: Mutual correction framework for semi-supervised medical image segmentation, CVPR 2023"
    display_name = "MCF"
    official_code = "WYC-321/MCF"
    official_commit = "ad20659"
    ledger = "docs/fidelity.md#mcf-mcf"

    def __init__(self, cfg: dict[str, Any], in_channels: int, num_classes: int, dim: int = 3, **context: Any):
        super().__init__(cfg, in_channels, num_classes, dim, **context)
        if dim != 3:
            raise ConfigError("method mcf: its 3D ResNet needs a 3D data set")
        bb = backbone_kwargs(self.hparams)
        self.vnet = VNet(in_channels, num_classes, **bb)
        self.resnet = ResVNet(in_channels, num_classes, normalization=bb.get("normalization", "batchnorm"),
                              has_dropout=bb.get("has_dropout", True), n_filters=bb.get("n_filters", 16))

    def training_step(self, batch: Batch, ctx: StepContext) -> dict[str, torch.Tensor]:
        hp = self.hparams
        bl, bu = batch.image_l.shape[0], batch.image_u.shape[0]
        x, y = torch.cat([batch.image_l, batch.image_u]), batch.label_l
        logits = {"v": self.vnet(x).float(), "r": self.resnet(x).float()}
        probs = {k: torch.softmax(v, 1) for k, v in logits.items()}
        disagree = probs["v"][:bl].argmax(1) != probs["r"][:bl].argmax(1)
        sup, dice, out = {}, {}, {}
        for k in ("v", "r"):
            ce = F.cross_entropy(logits[k][:bl], y.long())
            dice[k] = dice_loss(probs[k][:bl], y, squared=True)
            mse = disagreement_mse(probs[k][:bl], y, disagree)
            sup[k] = ce + dice[k] + float(hp.get("disagreement_weight", 0.5)) * mse
            out.update({f"{k}_loss_ce": ce.detach(), f"{k}_loss_dice": dice[k].detach(), f"{k}_loss_mse": mse.detach()})
        dice_v, dice_r = global_mean(torch.stack([dice["v"], dice["r"]]))  # one choice for all DDP ranks
        good, other = ("v", "r") if dice_v < dice_r else ("r", "v")
        loss = sup["v"] + sup["r"]
        if bu:
            cons_cfg = hp.get("consistency") or {}
            pseudo = sharpen_softmax(probs[good][bl:].detach(), float(cons_cfg.get("temperature", 0.1)))
            cons = mcf_consistency(probs[other][bl:], pseudo, bool(cons_cfg.get("double_softmax", False)))
            w = ramped_weight(hp, ctx.iteration, 0.1, 40)
            loss = loss + w * cons
            out.update(loss_consistency=cons.detach(), consistency_weight=torch.tensor(w))
        out.update(loss=loss, good_student_is_resnet=torch.tensor(float(good == "r")))
        return out

    def predict_logits(self, x: torch.Tensor, decoder: int | str | None = None) -> torch.Tensor:
        decoder = self.hparams.get("eval_decoder", "mean") if decoder is None else decoder
        if decoder in ("vnet", 0, "0"):
            return self.vnet(x)
        if decoder in ("resnet", 1, "1"):
            return self.resnet(x)
        if decoder != "mean":
            raise ConfigError(f"method mcf: decoder {decoder!r}: expected vnet/0, resnet/1 or mean")
        mean = (torch.softmax(self.vnet(x).float(), 1) + torch.softmax(self.resnet(x).float(), 1)) / 2
        return torch.log(mean.clamp_min(1e-12))
