"""BCP: bidirectional copy-paste (Bai et al., CVPR 2023), as in the published `DeepMed-Lab-ECNU/BCP` code.

`textseg train --method bcp` runs both phases of the code in one run:

1. Pre-training (the first `method.pretrain_iterations`, 2,000): the labeled batch is split in halves a, b;
   one cuboid (2/3 of the patch per axis, random position) of b is pasted into a, labels likewise;
   loss ½ (CE + Dice).
2. Self-training (the rest, 15,000): at the switch the student's weights are copied into the teacher, which
   then follows the student by EMA (decay 0.99). Teacher pseudo-labels of the unlabeled halves u_a, u_b are
   p_1 ≥ 0.5 reduced to their largest connected component. Two mixed images, one cuboid M (0 inside):

       X_in  = M ⊙ l_a + (1−M) ⊙ u_a     target M ⊙ y_a + (1−M) ⊙ ŷ_a
       X_out = M ⊙ u_b + (1−M) ⊙ l_b     target M ⊙ ŷ_b + (1−M) ⊙ y_b

   each scored by ½ (Dice + CE) restricted to the two regions, the region taken from an unlabeled image
   weighted `method.unlabeled_weight` (0.5), the labeled region 1. L = L(X_in) + L(X_out).

Dice here is BCP's masked Dice: per sample and class (background included) 1 − (2 Σ m·p·t + 1e-5) /
(Σ m·(p + t) + 1e-5), averaged. Differences to the code: phase 2 starts from the last phase-1 weights (the
code reloads the best phase-1 checkpoint on its evaluation cases) and keeps the optimiser's momentum; the
lr schedule restarts with phase 2 through `optim.step_offset` (= pretrain_iterations in bcp.yaml).
The student is evaluated (as in the code); decoder="teacher" evaluates the EMA teacher.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from textseg_cli.data.batch import Batch
from textseg_cli.errors import ConfigError
from textseg_cli.methods.base import Method, StepContext
from textseg_cli.methods.losses import one_hot
from textseg_cli.methods.registry import register_method
from textseg_cli.methods.ssl_common import (
    backbone_kwargs,
    copy_weights,
    cuboid_mask,
    ema_update,
    make_teacher,
    mix,
    threshold_pseudo_label,
)
from textseg_cli.models.vnet import VNet


def masked_dice_loss(logits: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor | None = None,
                     smooth: float = 1e-5) -> torch.Tensor:
    """BCP's `mask_DiceLoss`: softmax, one-hot over all classes, per-sample per-class Dice restricted to
    `mask` (broadcast over the batch), 1 − mean."""
    probs = torch.softmax(logits.float(), 1)
    target = one_hot(labels, probs.shape[1])
    m = torch.ones_like(probs[:, :1]) if mask is None else mask.to(probs.dtype).expand_as(labels).unsqueeze(1)
    dims = tuple(range(2, probs.dim()))
    inter = (probs * target * m).sum(dims)
    union = ((probs + target) * m).sum(dims)
    return 1 - ((2 * inter + smooth) / (union + smooth)).mean()


def masked_ce(logits: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    m = mask.to(torch.float32).expand_as(labels)
    return (F.cross_entropy(logits.float(), labels.long(), reduction="none") * m).sum() / (m.sum() + 1e-16)


def mix_loss(logits: torch.Tensor, outside: torch.Tensor, inside: torch.Tensor, mask: torch.Tensor,
             w_outside: float, w_inside: float) -> torch.Tensor:
    """BCP's `mix_loss`: ½ Σ_region w·(Dice + CE) over the outside (mask = 1) and inside (mask = 0) regions."""
    inv = 1 - mask
    dice = w_outside * masked_dice_loss(logits, outside, mask) + w_inside * masked_dice_loss(logits, inside, inv)
    ce = w_outside * masked_ce(logits, outside, mask) + w_inside * masked_ce(logits, inside, inv)
    return (dice + ce) / 2


@register_method("bcp")
class BCP(Method):
    paper = "Bai et al., Bidirectional copy-paste for semi-supervised medical image segmentation, CVPR 2023"
    display_name = "BCP"
    official_code = "DeepMed-Lab-ECNU/BCP"
    official_commit = "7879f98"
    ledger = "docs/fidelity.md#bcp-bcp"
    protocol_lcc = "DeepMed-Lab-ECNU/BCP code/test_LA.py:15 (--nms default 1)"

    def __init__(self, cfg: dict[str, Any], in_channels: int, num_classes: int, dim: int = 3, **context: Any):
        super().__init__(cfg, in_channels, num_classes, dim, **context)
        self.student = VNet(in_channels, num_classes, dim=dim, **backbone_kwargs(self.hparams))
        self.teacher = make_teacher(self.student)
        # set once phase 2 has begun, so a resumed run does not re-initialise its teacher
        self.register_buffer("self_training", torch.zeros((), dtype=torch.bool))
        total = int((cfg.get("train") or {}).get("iterations") or 0) if isinstance(cfg, dict) else 0
        if 0 < total <= self.pretrain_iterations:
            raise ConfigError(f"method bcp: method.pretrain_iterations ({self.pretrain_iterations}) must be smaller "
                              f"than train.iterations ({total}), or self-training never starts; e.g. --set "
                              f"method.pretrain_iterations={max(1, total * 2 // 17)} --set "
                              f"optim.step_offset={max(1, total * 2 // 17)}")

    def networks(self):
        return {"student": self.student}  # the teacher is an EMA copy of the same size

    @property
    def pretrain_iterations(self) -> int:
        return int(self.hparams.get("pretrain_iterations", 2000))

    def _mask(self, spatial) -> torch.Tensor:
        size = self.hparams.get("cuboid_size")
        return cuboid_mask(spatial, ratio=float(self.hparams.get("cuboid_ratio", 2 / 3)), size=size,
                           device=self.student_device)

    @property
    def student_device(self) -> torch.device:
        return next(self.student.parameters()).device

    def training_step(self, batch: Batch, ctx: StepContext) -> dict[str, torch.Tensor]:
        bl, bu = batch.image_l.shape[0], batch.image_u.shape[0]
        if bl < 2 or bl % 2:
            raise ConfigError(f"method bcp: train.batch_labeled must be even and ≥ 2 (labeled halves are mixed), "
                              f"got {bl}")
        if ctx.iteration >= self.pretrain_iterations and (bu < 2 or bu % 2):
            raise ConfigError(f"method bcp: train.batch_unlabeled must be even and ≥ 2 for self-training, got {bu}")
        if ctx.iteration < self.pretrain_iterations:
            return self._pretrain_step(batch)
        if not bool(self.self_training):
            copy_weights(self.teacher, self.student)
            self.self_training.fill_(True)
        return self._self_train_step(batch)

    def _pretrain_step(self, batch: Batch) -> dict[str, torch.Tensor]:
        h = batch.image_l.shape[0] // 2
        mask = self._mask(batch.image_l.shape[2:])
        image = mix(batch.image_l[:h], batch.image_l[h:], mask)
        label = mix(batch.label_l[:h], batch.label_l[h:], mask)
        logits = self.student(image).float()
        ce = F.cross_entropy(logits, label.long())
        dice = masked_dice_loss(logits, label)
        return {"loss": (ce + dice) / 2, "loss_ce": ce.detach(), "loss_dice": dice.detach(),
                "phase": torch.tensor(1.0)}

    def _self_train_step(self, batch: Batch) -> dict[str, torch.Tensor]:
        hp = self.hparams
        hl, hu = batch.image_l.shape[0] // 2, batch.image_u.shape[0] // 2
        if hl != hu:
            raise ConfigError(f"method bcp: batch_labeled and batch_unlabeled must be equal to pair labeled and "
                              f"unlabeled halves, got {2 * hl} and {2 * hu}")
        img_a, img_b = batch.image_l[:hl], batch.image_l[hl:]
        lab_a, lab_b = batch.label_l[:hl], batch.label_l[hl:]
        un_a, un_b = batch.image_u[:hu], batch.image_u[hu:]
        thr, lcc = float(hp.get("pseudo_threshold", 0.5)), bool(hp.get("pseudo_lcc", True))
        with torch.no_grad():  # two teacher calls, as the code (batch statistics per half)
            plab_a = threshold_pseudo_label(torch.softmax(self.teacher(un_a).float(), 1), thr, lcc)
            plab_b = threshold_pseudo_label(torch.softmax(self.teacher(un_b).float(), 1), thr, lcc)
        mask = self._mask(img_a.shape[2:])
        uw = float(hp.get("unlabeled_weight", 0.5))
        out_in = self.student(mix(img_a, un_a, mask)).float()
        out_out = self.student(mix(un_b, img_b, mask)).float()
        loss_l = mix_loss(out_in, lab_a, plab_a, mask, 1.0, uw)
        loss_u = mix_loss(out_out, plab_b, lab_b, mask, uw, 1.0)
        fg = torch.cat([plab_a, plab_b]).float().mean()
        return {"loss": loss_l + loss_u, "loss_l": loss_l.detach(), "loss_u": loss_u.detach(),
                "pseudo_fg_fraction": fg, "phase": torch.tensor(2.0)}

    def on_after_optimizer_step(self, ctx: StepContext) -> None:
        if bool(self.self_training):
            ema_update(self.teacher, self.student, float(self.hparams.get("ema_decay", 0.99)))

    def predict_logits(self, x: torch.Tensor, decoder: int | str | None = None) -> torch.Tensor:
        decoder = self.hparams.get("eval_decoder", "student") if decoder is None else decoder
        return (self.teacher if decoder in ("teacher", 1, "1") else self.student)(x)
