"""UA-MT: uncertainty-aware mean teacher (Yu et al., MICCAI 2019), as in the published `yulequan/UA-MT` code.

Student: a V-Net with dropout fed the whole batch (labeled + unlabeled). Teacher: its EMA (decay 0.99, with
the code's warm start α = min(1 − 1/(t+1), 0.99)). Loss:

    L = ½ (CE + Dice) on labeled + λ(t) · Σ m·(p_s − p_t)² / (K · Σ m)        on unlabeled

with p_t the teacher's softmax on the input plus clamp(N(0, 0.1²), ±0.2) noise, the mask m = [U < τ(t)],
U the entropy of the mean of 8 noisy teacher passes, τ(t) = (0.75 + 0.25·ramp(t, T_max))·ln K, and
λ(t) = 0.1 · ramp(t // 150, 40). Differences to the paper text, following the code: the uncertainty
threshold ramps over the whole run on raw iterations, the consistency weight on iteration // 150.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F

from textseg_cli.data.batch import Batch
from textseg_cli.methods.base import Method, StepContext
from textseg_cli.methods.losses import dice_loss, sigmoid_rampup
from textseg_cli.methods.registry import register_method
from textseg_cli.methods.ssl_common import (
    backbone_kwargs,
    ema_update,
    entropy_of_mean,
    make_teacher,
    noisy,
    ramped_weight,
)
from textseg_cli.models.vnet import VNet


def uamt_consistency(student_logits: torch.Tensor, teacher_logits: torch.Tensor, uncertainty: torch.Tensor,
                     threshold: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Σ m·(softmax(s) − softmax(t))² / (K·Σ m + 1e-16) with m = [uncertainty < threshold]; returns
    (loss, mask). K = number of classes (the code's divisor 2 for its two classes)."""
    k = student_logits.shape[1]
    dist = (torch.softmax(student_logits.float(), 1) - torch.softmax(teacher_logits.float(), 1)) ** 2
    mask = (uncertainty < threshold).float()
    return (mask * dist).sum() / (k * mask.sum() + 1e-16), mask


def supervised_ce_dice(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(CE, foreground Dice with squared denominators) — the supervised terms of the UA-MT/DTC/MCF code."""
    logits = logits.float()
    return F.cross_entropy(logits, labels.long()), dice_loss(torch.softmax(logits, 1), labels, squared=True)


@register_method("uamt")
class UAMT(Method):
    paper = ("Yu et al., Uncertainty-aware self-ensembling model for semi-supervised 3D left atrium segmentation, "
             "MICCAI 2019")
    display_name = "UA-MT"
    official_code = "yulequan/UA-MT"
    official_commit = "88ed29a"
    ledger = "docs/fidelity.md#ua-mt-uamt"

    def __init__(self, cfg: dict[str, Any], in_channels: int, num_classes: int, dim: int = 3, **context: Any):
        super().__init__(cfg, in_channels, num_classes, dim, **context)
        hp = self.hparams
        self.student = VNet(in_channels, num_classes, dim=dim, **backbone_kwargs(hp))
        self.teacher = make_teacher(self.student)

    def networks(self):
        return {"student": self.student}  # the teacher is an EMA copy of the same size

    def training_step(self, batch: Batch, ctx: StepContext) -> dict[str, torch.Tensor]:
        hp = self.hparams
        bl, bu = batch.image_l.shape[0], batch.image_u.shape[0]
        logits = self.student(torch.cat([batch.image_l, batch.image_u])).float()
        ce, dice = supervised_ce_dice(logits[:bl], batch.label_l)
        loss = 0.5 * (ce + dice)
        out = {"loss_ce": ce.detach(), "loss_dice": dice.detach()}
        if bu:
            std, clip = float(hp.get("noise_std", 0.1)), float(hp.get("noise_clip", 0.2))
            with torch.no_grad():
                t_logits = self.teacher(noisy(batch.image_u, std, clip)).float()
                uncertainty = self._mc_uncertainty(batch.image_u, std, clip)
            start = float(hp.get("threshold_start", 0.75))
            ramp = sigmoid_rampup(ctx.iteration, ctx.max_iterations)
            thr = (start + (1 - start) * ramp) * math.log(self.num_classes)
            cons, mask = uamt_consistency(logits[bl:], t_logits, uncertainty, thr)
            w = ramped_weight(hp, ctx.iteration, 0.1, 40)
            loss = loss + w * cons
            out.update(loss_consistency=cons.detach(), consistency_weight=torch.tensor(w),
                       uncertainty_threshold=torch.tensor(thr), mask_fraction=mask.mean())
        out["loss"] = loss
        return out

    @torch.no_grad()
    def _mc_uncertainty(self, x: torch.Tensor, std: float, clip: float) -> torch.Tensor:
        """Entropy of the mean of `mc_passes` noisy teacher passes, run `mc_batch_repeat` copies at a time
        (the code's 8 passes as 4 forward calls on the batch repeated twice)."""
        passes = int(self.hparams.get("mc_passes", 8))
        rep = max(1, int(self.hparams.get("mc_batch_repeat", 2)))
        bu = x.shape[0]
        xr = x.repeat(rep, *([1] * (x.dim() - 1)))
        samples: list[torch.Tensor] = []
        while len(samples) < passes:
            probs = torch.softmax(self.teacher(noisy(xr, std, clip)).float(), 1)
            samples.extend(probs.split(bu))
        return entropy_of_mean(samples[:passes])

    def on_after_optimizer_step(self, ctx: StepContext) -> None:
        ema_update(self.teacher, self.student, float(self.hparams.get("ema_decay", 0.99)), ctx.iteration)

    def predict_logits(self, x: torch.Tensor, decoder: int | str | None = None) -> torch.Tensor:
        """The student (evaluated in the published code); decoder="teacher" evaluates the EMA teacher."""
        decoder = self.hparams.get("eval_decoder", "student") if decoder is None else decoder
        return (self.teacher if decoder in ("teacher", 1, "1") else self.student)(x)
