"""MLRP: mutual learning with reliable pseudo-labels (Su et al., MedIA 2024), as in the published
`Jiawei0o0/mutual-learning-with-reliable-pseudo-labels` code.

A V-Net encoder with two decoders (upsampling modes 0 and 2) gives probabilities p_1, p_2 and last decoder
features f_1, f_2 (16 channels). Each decoder i learns from the other j ("teacher") on every case of the
batch, but only where it is less certain than the teacher (entropy H(p_i) > H(p_j)), by cross-entropy to the
teacher's argmax ŷ_j, weighted by the teacher's reliability

    r_j = 1 − mean_c (cos(f_j, proto_{j,c}) − p_{j,c})²,

proto_{j,c} the mean teacher feature over the voxels the teacher assigns to class c (per sample, L2
normalised). L_cons = Σ_{i≠j} Σ m·r_j·CE(p_i, ŷ_j) / (Σ m + 1e-6); L = 0.5 · Σ_i Dice_i + λ(t) · L_cons with
Dice the foreground Dice of each decoder on labeled cases (plain sums, smooth 1e-8) and
λ(t) = 1.0 · ramp((t + 1) // 150, 40). The cross-entropy takes the student's logits, as the current published
code (train_Mutual_Reliable.py:197, `consistency_criterion(outputs[i], ...)`, after the October 2024 fix);
`method.ce_on_probabilities: true` feeds the softmax probabilities instead (the code before that fix).
Decoder 0 is evaluated (as the published validation); decoder 1 or "mean" are available.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from textseg_cli.data.batch import Batch
from textseg_cli.methods.base import Method, StepContext
from textseg_cli.methods.losses import dice_loss
from textseg_cli.methods.registry import register_method
from textseg_cli.methods.ssl_common import backbone_kwargs, entropy, ramped_weight
from textseg_cli.models.vnet import MultiDecoderVNet


@torch.no_grad()
def reliability(teacher_probs: torch.Tensor, teacher_feat: torch.Tensor) -> torch.Tensor:
    """r = 1 − mean_c (cos(f, proto_c) − p_c)² per voxel, (B, *spatial); prototypes from the teacher's argmax."""
    b, k = teacher_probs.shape[:2]
    c = teacher_feat.shape[1]
    feat = teacher_feat.float().reshape(b, c, -1)
    assign = F.one_hot(teacher_probs.argmax(1).reshape(b, -1), k).to(feat.dtype)  # (B, N, K), feat's precision
    protos = torch.einsum("bcn,bnk->bkc", feat, assign) / (assign.sum(1).unsqueeze(-1) + 1e-6)
    protos = F.normalize(protos, dim=-1)
    # cosine similarity of every voxel feature with every prototype, without a (B, K, C, N) intermediate
    dots = torch.einsum("bkc,bcn->bkn", protos, feat)
    norms = protos.norm(dim=-1).unsqueeze(-1) * feat.norm(dim=1).unsqueeze(1)
    sim = dots / norms.clamp_min(1e-8)  # (B, K, N)
    sq = (sim - teacher_probs.float().reshape(b, k, -1)) ** 2
    return (1 - sq.mean(1)).reshape(teacher_probs.shape[:1] + teacher_probs.shape[2:])


def reliable_cross_supervision(student_probs: torch.Tensor, student_logits: torch.Tensor,
                               teacher_probs: torch.Tensor, teacher_feat: torch.Tensor,
                               ce_on_probabilities: bool = False) -> torch.Tensor:
    """Σ m·r·CE(student, argmax teacher) / (Σ m + 1e-6), m = [H(student) > H(teacher)]."""
    mask = (entropy(student_probs, keepdim=False) > entropy(teacher_probs, keepdim=False)).float()
    weight = reliability(teacher_probs, teacher_feat) * mask
    scores = student_probs if ce_on_probabilities else student_logits
    ce = F.cross_entropy(scores, teacher_probs.argmax(1).detach(), reduction="none")
    return (ce * weight.detach()).sum() / (mask.sum() + 1e-6)


@register_method("mlrp")
class MLRP(Method):
    paper = ("Su et al., Mutual learning with reliable pseudo label for semi-supervised medical image segmentation, "
             "MedIA 2024")
    display_name = "MLRP"
    official_code = "Jiawei0o0/mutual-learning-with-reliable-pseudo-labels"
    official_commit = "5ca2d87"
    ledger = "docs/fidelity.md#mlrp-mlrp"

    def __init__(self, cfg: dict[str, Any], in_channels: int, num_classes: int, dim: int = 3, **context: Any):
        super().__init__(cfg, in_channels, num_classes, dim, **context)
        self.net = MultiDecoderVNet(in_channels, num_classes, up_modes=tuple(self.hparams.get("up_modes", (0, 2))),
                                    dim=dim, **backbone_kwargs(self.hparams))

    def _forward(self, x: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        # through net.forward, so forward hooks (the +Text add-on's CSA) see the outputs
        logits, feats = self.net(x, return_features=True)
        return [z.float() for z in logits], feats

    def training_step(self, batch: Batch, ctx: StepContext) -> dict[str, torch.Tensor]:
        hp = self.hparams
        bl = batch.image_l.shape[0]
        logits, feats = self._forward(torch.cat([batch.image_l, batch.image_u]))
        probs = [torch.softmax(z, 1) for z in logits]
        dice = sum(dice_loss(p[:bl], batch.label_l, smooth=1e-8) for p in probs)
        ce_on_p = bool(hp.get("ce_on_probabilities", False))
        cons = sum(reliable_cross_supervision(probs[i], logits[i], probs[j].detach(), feats[j], ce_on_p)
                   for i in range(len(probs)) for j in range(len(probs)) if i != j)
        w = ramped_weight(hp, ctx.iteration + 1, 1.0, 40)  # the code ramps on the 1-based step
        loss = float(hp.get("dice_weight", 0.5)) * dice + w * cons
        return {"loss": loss, "loss_dice": dice.detach(), "loss_consistency": cons.detach(),
                "consistency_weight": torch.tensor(w)}

    def predict_logits(self, x: torch.Tensor, decoder: int | str | None = None) -> torch.Tensor:
        decoder = self.hparams.get("eval_decoder", 0) if decoder is None else decoder
        if decoder == "mean":
            outs = self.net(x)
            return torch.log(torch.stack([torch.softmax(o.float(), 1) for o in outs]).mean(0).clamp_min(1e-12))
        return self.net.decoders[int(decoder)](self.net.encoder(x))
