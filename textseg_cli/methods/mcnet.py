"""MC-Net (Wu et al., MICCAI 2021) and MC-Net+ (Wu et al., MedIA 2022): mutual consistency of decoders.

A shared V-Net encoder feeds decoders that differ only in their upsampling (MC-Net: transposed conv and
trilinear; MC-Net+ adds nearest). Loss, as in the published code:

    L = λ · Σ_d Dice(softmax(f_d(x_l)), y_l) + w(t) · Σ_{i≠j} MSE(p_i, sharpen(p_j, T))

over all samples of the batch for the consistency term, with λ = 0.5, T = 0.1 and
w(t) = 1.0 · exp(-5 (1 - min(t/150, 40)/40)²). Cross-entropy is logged but not optimised (it is not
part of the published objective). The sharpened targets are not detached, as in the published code
(`method.consistency.detach_target: true` detaches them).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from textseg_cli.data.batch import Batch
from textseg_cli.errors import ConfigError
from textseg_cli.methods.base import Method, StepContext, decoder_index
from textseg_cli.methods.losses import dice_loss, mse, sharpen
from textseg_cli.methods.registry import register_method
from textseg_cli.methods.ssl_common import ramped_weight
from textseg_cli.models.registry import build_model


@register_method("mcnet")
class MCNet(Method):
    paper = "Wu et al., Semi-supervised left atrium segmentation with mutual consistency training, MICCAI 2021"
    display_name = "MC-Net"
    official_code = "ycwu1997/MC-Net"
    official_commit = "fee453c"
    ledger = "docs/fidelity.md#mc-net-and-mc-net-mcnet-mcnet"
    default_up_modes: tuple[int, ...] = (0, 1)

    def __init__(self, cfg: dict[str, Any], in_channels: int, num_classes: int, dim: int = 3, **context: Any):
        super().__init__(cfg, in_channels, num_classes, dim=dim, **context)
        hp = self.hparams
        modes = hp.get("up_modes") or self.default_up_modes
        if len(modes) < 2:
            raise ConfigError(f"method.up_modes {modes}: mutual consistency needs at least two decoders")
        self.net = build_model("vnet_multi", in_channels, num_classes, up_modes=modes, dim=dim,
                               **(hp.get("backbone") or {}))

    def training_step(self, batch: Batch, ctx: StepContext) -> dict[str, torch.Tensor]:
        hp = self.hparams
        cons_cfg = hp.get("consistency") or {}
        bl = batch.image_l.shape[0]
        x = torch.cat([batch.image_l, batch.image_u]) if batch.image_u.shape[0] else batch.image_l
        outputs = self.net(x)
        probs = [torch.softmax(o.float(), dim=1) for o in outputs]
        dice_sum = sum(dice_loss(p[:bl], batch.label_l, **(hp.get("dice") or {"smooth": 1e-8})) for p in probs)
        with torch.no_grad():
            ce_sum = sum(F.cross_entropy(o[:bl].float(), batch.label_l) for o in outputs)
        temperature = float(cons_cfg.get("temperature", 0.1))
        targets = [sharpen(p, temperature) for p in probs]
        if cons_cfg.get("detach_target", False):
            targets = [t.detach() for t in targets]
        cons = sum(mse(probs[i], targets[j]) for i in range(len(probs)) for j in range(len(probs)) if i != j)
        # the published code increments its step counter before computing the weight: step = iteration + 1
        w = ramped_weight(hp, ctx.iteration + 1, 1.0, 40.0)
        loss = float(hp.get("sup_weight", 0.5)) * dice_sum + w * cons
        return {"loss": loss, "loss_dice": dice_sum.detach(), "loss_ce": ce_sum, "loss_consistency": cons.detach(),
                "consistency_weight": torch.tensor(w)}

    def _decoder_index(self, decoder: int | str | None) -> int | str:
        return decoder_index(decoder, self.hparams.get("eval_decoder", 0), len(self.net.decoders))

    def predict_proba(self, x: torch.Tensor, decoder: int | str | None = None) -> torch.Tensor:
        idx = self._decoder_index(decoder)
        if idx == "mean":
            return torch.stack([torch.softmax(o.float(), 1) for o in self.net(x)]).mean(0)
        return torch.softmax(self.net.decoders[idx](self.net.encoder(x)).float(), dim=1)

    def predict_logits(self, x: torch.Tensor, decoder: int | str | None = None) -> torch.Tensor:
        idx = self._decoder_index(decoder)
        if idx == "mean":  # log of the averaged probabilities: argmax and softmax give the ensemble
            return torch.log(self.predict_proba(x, "mean").clamp_min(1e-12))
        return self.net.decoders[idx](self.net.encoder(x))


@register_method("mcnet+")
class MCNetPlus(MCNet):
    paper = ("Wu et al., Mutual consistency learning for semi-supervised medical image segmentation, "
             "Medical Image Analysis 2022")
    display_name = "MC-Net+"
    official_code = "ycwu1997/MC-Net"
    official_commit = "fee453c"
    ledger = "docs/fidelity.md#mc-net-and-mc-net-mcnet-mcnet"
    default_up_modes = (0, 1, 2)
