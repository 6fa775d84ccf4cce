"""Text-SemiSeg (Huang et al., MICCAI 2025): text-driven multi-plane visual interaction on MC-Net.

Backbone: MC-Net's shared V-Net encoder with decoders of upsampling modes 0 and 1. Text features F_t (K×512)
come from learnable CoOp prompts over the frozen CLIP ViT-B/32 text tower (or a frozen `textseg encode`
file). Per decoder d:

- TMR on the bottleneck (`textseg_cli.models.text_fusion.TMR`, residual included), or the "repeat" fusion;
- CSA: a projection head maps the fused bottleneck to 512 channels; avg(F_p · ŷ_d,k) is pulled to F_t^k.

Loss (Eq. 9): Σ_d (CE + Dice)(labeled) + λ_csa · CSA + λ(t) · Σ_{i≠j} (CE + Dice)(f_j(x_u), PL_i) with PL_i
decoder i's prediction binarised at 0.5 and reduced to its largest component, λ(t) = 0.1 · ramp(t // 150, 200).
DCA from iteration `dca_start` (6,000): the decoder with the lower supervised loss gives the pseudo-label of
the unlabeled image; labeled foreground is pasted onto the unlabeled image and pseudo-foreground onto the
labeled one (Eqs. 5–6); (CE + Dice) on the mixed pair trains the worse decoder only, and CSA also applies to
the mixed batch. SGD 0.01 with linear decay. Evaluation: decoder 1 (index 0), threshold 0.5, then LCC
(`textseg eval RUN --lcc`).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from textseg_cli.errors import ConfigError
from textseg_cli.losses import consistency_weight, dice_loss
from textseg_cli.methods.base import Batch, Method, StepContext, decoder_index, register_method
from textseg_cli.methods.distributed import global_mean
from textseg_cli.methods.ssl_common import backbone_kwargs, threshold_pseudo_label
from textseg_cli.methods.text_addon import build_fusion, build_text_source, tmr_setting
from textseg_cli.methods.text_losses import ProjectionHead, csa_loss, dca_mix
from textseg_cli.models.registry import build_model


def ce_plus_dice(logits: torch.Tensor, labels: torch.Tensor, dice_kw: dict[str, Any], ce_weight: float = 1.0,
                 dice_weight: float = 1.0) -> torch.Tensor:
    """w_ce · CE + w_dice · Dice (weights 1 and 1: the published code's sup/cons/mixed loss)."""
    logits = logits.float()
    ce = F.cross_entropy(logits, labels.long()) if ce_weight else logits.new_zeros(())
    return ce_weight * ce + dice_weight * dice_loss(torch.softmax(logits, 1), labels, **dice_kw)


@register_method("text-semiseg")
class TextSemiSeg(Method):
    paper = ("Huang et al., Text-driven multiplanar visual interaction for semi-supervised medical image "
             "segmentation, MICCAI 2025")
    has_text = True
    dims = (3,)
    dims_note = "TMR pools the bottleneck along three axes"

    def __init__(self, cfg: dict[str, Any], in_channels: int, num_classes: int, dim: int = 3, **context: Any):
        super().__init__(cfg, in_channels, num_classes, dim=dim, **context)
        hp = self.hparams
        modes = hp.get("up_modes") or (0, 1)
        if len(modes) < 2:
            raise ConfigError(f"method.up_modes {modes}: Text-SemiSeg needs at least two decoders")
        self.net = build_model("vnet_multi", in_channels, num_classes, up_modes=modes, dim=dim,
                               **backbone_kwargs(hp))
        channels = int(self.net.encoder.channels[-1])
        self.tmr_mode = tmr_setting(hp)
        fusion_kind = str(hp.get("text_fusion", "tmr"))
        self.use_csa = bool(hp.get("csa", True))
        self.use_dca = bool(hp.get("dca", True))
        needs_text = self.tmr_mode is not None or self.use_csa
        self.text = build_text_source(hp, context, num_classes, "text-semiseg") if needs_text else None
        text_dim = self.text.dim if self.text is not None else 0
        n = len(self.net.decoders)
        self.fusions = nn.ModuleList(
            build_fusion(fusion_kind, channels, text_dim, num_classes, self.tmr_mode or "paper",
                         int(hp.get("tmr_heads", 8))) for _ in range(n)) if self.tmr_mode is not None else None
        self.csa_heads = nn.ModuleList(ProjectionHead(channels, text_dim) for _ in range(n)) if self.use_csa else None

    # --- forward ---------------------------------------------------------------------------------------
    def _text(self) -> torch.Tensor | None:
        return self.text() if self.text is not None else None

    def forward_decoders(self, x: torch.Tensor, text: torch.Tensor | None, which=None):
        """(logits per decoder, fused bottleneck per decoder) for the decoders in `which` (default all)."""
        feats = self.net.encoder(x)
        which = range(len(self.net.decoders)) if which is None else which
        logits, fused = [], []
        for d in which:
            x5 = feats[-1] if self.fusions is None else self.fusions[d](feats[-1], text)
            fused.append(x5)
            logits.append(self.net.decoders[d]([*feats[:-1], x5]))
        return logits, fused

    def _csa(self, fused: list[torch.Tensor], probs: list[torch.Tensor], text: torch.Tensor) -> torch.Tensor:
        c = self.hparams.get("csa_loss") or {}
        return sum(csa_loss(head(f.float()), [p], text, pool=str(c.get("pool", "mean")),
                            channel_reduction=str(c.get("channel_reduction", "mean")))
                   for head, f, p in zip(self.csa_heads, fused, probs))

    # --- training --------------------------------------------------------------------------------------
    def training_step(self, batch: Batch, ctx: StepContext) -> dict[str, torch.Tensor]:
        hp = self.hparams
        seg_w = hp.get("seg_loss") or {}
        seg = lambda o, y: ce_plus_dice(o, y, dict(hp.get("dice") or {}), float(seg_w.get("ce", 1.0)),  # noqa: E731
                                        float(seg_w.get("dice", 1.0)))
        thr = float(hp.get("pseudo_threshold", 0.5))
        lcc = bool(hp.get("pseudo_lcc", True))
        if self.text is not None:
            self.text.reset()
        text = self._text()
        bl, bu = batch.image_l.shape[0], batch.image_u.shape[0]
        x = torch.cat([batch.image_l, batch.image_u]) if bu else batch.image_l
        logits, fused = self.forward_decoders(x, text)
        probs = [torch.softmax(o.float(), 1) for o in logits]
        sup = [seg(o[:bl], batch.label_l) for o in logits]
        loss = sum(sup)
        out: dict[str, torch.Tensor] = {"loss_sup": loss.detach()}
        csa_w = float(hp.get("csa_weight", 1.0))
        if self.use_csa:
            csa = self._csa(fused, probs, text)
            loss = loss + csa_w * csa
            out["loss_csa"] = csa.detach()
        if bu:
            pls = [threshold_pseudo_label(p[bl:].detach(), thr, lcc=lcc) for p in probs]
            cons = sum(seg(logits[j][bl:], pls[i])
                       for i in range(len(logits)) for j in range(len(logits)) if i != j)
            c = hp.get("consistency") or {}
            w = consistency_weight(ctx.iteration + 1, float(c.get("weight", 0.1)), float(c.get("rampup", 200)),
                                   int(c.get("per", 150)))
            loss = loss + w * cons
            out.update(loss_consistency=cons.detach(), consistency_weight=torch.tensor(w))
            if self.use_dca and ctx.iteration >= int(hp.get("dca_start", 6000)):
                mixed, csa_mixed = self._dca(batch, sup, pls, text, seg)
                loss = loss + mixed
                out["loss_dca"] = mixed.detach()
                if csa_mixed is not None:
                    loss = loss + csa_w * csa_mixed
                    out["loss_csa_mixed"] = csa_mixed.detach()
        out["loss"] = loss
        return out

    def _dca(self, batch: Batch, sup: list[torch.Tensor], pls: list[torch.Tensor], text, seg):
        """Dual copy-paste with the better decoder's pseudo-labels; the mixed loss trains the worse decoder."""
        sups = global_mean(torch.stack([s.detach() for s in sup]))  # one choice for all DDP ranks
        better, worse = int(sups.argmin()), int(sups.argmax())
        n = min(batch.image_l.shape[0], batch.image_u.shape[0])  # labeled i is paired with unlabeled i
        xu_mix, yu_mix, xl_mix, yl_mix = dca_mix(batch.image_l[:n], batch.label_l[:n], batch.image_u[:n],
                                                 pls[better][:n])
        images, labels = torch.cat([xu_mix, xl_mix]), torch.cat([yu_mix, yl_mix])
        logits, fused = self.forward_decoders(images, text)
        mixed = seg(logits[worse], labels)
        csa = self._csa(fused, [torch.softmax(o.float(), 1) for o in logits], text) if self.use_csa else None
        return mixed, csa

    # --- inference -------------------------------------------------------------------------------------
    def predict_proba(self, x: torch.Tensor, decoder: int | str | None = None) -> torch.Tensor:
        idx = decoder_index(decoder, self.hparams.get("eval_decoder", 0), len(self.net.decoders))
        text = self._text()
        if idx == "mean":
            logits, _ = self.forward_decoders(x, text)
            return torch.stack([torch.softmax(o.float(), 1) for o in logits]).mean(0)
        return torch.softmax(self.forward_decoders(x, text, [idx])[0][0].float(), 1)

    def predict_logits(self, x: torch.Tensor, decoder: int | str | None = None) -> torch.Tensor:
        idx = decoder_index(decoder, self.hparams.get("eval_decoder", 0), len(self.net.decoders))
        if idx == "mean":
            return torch.log(self.predict_proba(x, "mean").clamp_min(1e-12))
        return self.forward_decoders(x, self._text(), [idx])[0][0]
