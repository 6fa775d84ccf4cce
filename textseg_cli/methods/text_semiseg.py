"""Text-SemiSeg (Huang et al., MICCAI 2025): text-driven multi-plane visual interaction on MC-Net.

Defaults follow the published code (taozh2017/Text-SemiSeg@18ceced, trainer.py, model/MC_CLIP.py, CoOp.py);
docs/fidelity.md lists each item with its file:line and the switch for the paper's reading.

Backbone: MC-Net's shared V-Net encoder with decoders of upsampling modes 0 and 1. Text features F_t (K×512)
come from learnable CoOp prompts over the frozen CLIP ViT-B/32 text tower (or a frozen `textseg encode`
file), L2-normalised per class (CoOp.py:199; `method.text.normalize`). Per decoder d:

- TMR on the bottleneck: textseg's interpretation of the paper's mechanism (`text_fusion.TMR`, default; Eq. 2 is
  dimensionally ambiguous and the published layer gives the text no forward effect, so the ledger lists it as an
  interpretation) or the published layer (`--tmr official`, `text_fusion.TMROfficial`, which the paper-table
  presets use); or the "repeat" fusion;
- CSA: a projection head maps the fused bottleneck to 512 channels; avg(F_p · ŷ_d,k) is pulled to F_t^k.
  Published scale: ŷ = sigmoid(logits) sampled trilinearly onto the grid, mean of the squared error over
  batch, classes and channels, and F_p of decoder 1 divided by its norm along the last spatial axis
  (trainer.py:123; both decoders in the mixed pass, :196/:205) — `csa_loss.feature_norm: official`.

Loss: Σ_d (CE + Dice)(labeled) + λ_csa · CSA + λ(t) · Σ_{i≠j} (CE + Dice)(f_j(x_u), PL_i). The Dice term is
the published DiceLoss (squared denominators, all classes, smooth 1e-10) on sigmoid(logits) (trainer.py:118,
141; `seg_activation: softmax` for the softmax reading). PL_i: softmax ≥ 0.5, largest component.
λ(t) = 0.1 · ramp(t // 150, 200) at the 0-based iteration t (trainer.py:153). DCA when t > `dca_start`
(6,000; trainer.py:157): decoder 1 gives the pseudo-label when its supervised loss is strictly lower, else
decoder 2; labeled foreground is pasted onto the unlabeled image and pseudo-foreground onto the labeled one;
(CE + Dice) on the mixed pair trains the other decoder, and CSA also applies to the mixed batch. SGD 0.01
with linear decay. Inference: sigmoid of decoder 1's foreground logit > 0.5 (prediction.py:70-80), then LCC.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from textseg_cli.data.batch import Batch
from textseg_cli.errors import ConfigError
from textseg_cli.methods.base import Method, StepContext, decoder_index
from textseg_cli.methods.distributed import global_mean
from textseg_cli.methods.losses import dice_loss
from textseg_cli.methods.registry import register_method
from textseg_cli.methods.ssl_common import (
    backbone_kwargs,
    ramped_weight,
    threshold_pseudo_label,
)
from textseg_cli.methods.text_addon import build_fusion, build_text_source, tmr_setting
from textseg_cli.methods.text_losses import ProjectionHead, csa_loss, dca_mix
from textseg_cli.models.registry import build_model


def ce_plus_dice(logits: torch.Tensor, labels: torch.Tensor, dice_kw: dict[str, Any], ce_weight: float = 1.0,
                 dice_weight: float = 1.0, activation: str = "softmax") -> torch.Tensor:
    """w_ce · CE + w_dice · Dice (weights 1 and 1: the published code's sup/cons/mixed loss); the Dice term
    on `activation` (sigmoid or softmax) of the logits."""
    logits = logits.float()
    ce = F.cross_entropy(logits, labels.long()) if ce_weight else logits.new_zeros(())
    probs = torch.sigmoid(logits) if activation == "sigmoid" else torch.softmax(logits, 1)
    return ce_weight * ce + dice_weight * dice_loss(probs, labels, **dice_kw)


def _activation(hp: dict[str, Any], key: str) -> str:
    v = str(hp.get(key, "sigmoid"))
    if v not in ("sigmoid", "softmax"):
        raise ConfigError(f"method.{key} {v!r}: expected sigmoid (published code) or softmax")
    return v


FEATURE_NORMS = ("official", "channel", "none")


@register_method("text-semiseg")
class TextSemiSeg(Method):
    paper = ("Huang et al., Text-driven multiplanar visual interaction for semi-supervised medical image "
             "segmentation, MICCAI 2025")
    display_name = "Text-SemiSeg"
    official_code = "taozh2017/Text-SemiSeg"
    official_commit = "18ceced"
    ledger = "docs/fidelity.md#text-semiseg-text-semiseg"
    protocol_lcc = "taozh2017/Text-SemiSeg prediction.py:139-140 (LCC always applied)"
    cli_flags = {"tmr": ("paper", "official", "off"), "text_fusion": ("tmr", "repeat"), "csa": None, "dca": None}
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
                         int(hp.get("tmr_heads", 8)), patch_size=self.patch_size())
            for _ in range(n)) if self.tmr_mode is not None else None
        self.csa_heads = nn.ModuleList(ProjectionHead(channels, text_dim) for _ in range(n)) if self.use_csa else None
        self.seg_activation = _activation(hp, "seg_activation")
        self.inference_activation = _activation(hp, "inference_activation")
        c = hp.get("csa_loss") or {}
        self.feature_norm = str(c.get("feature_norm", "official"))
        if self.feature_norm not in FEATURE_NORMS:
            raise ConfigError(f"method.csa_loss.feature_norm {self.feature_norm!r}: expected "
                              f"{', '.join(FEATURE_NORMS)}")

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

    def _csa(self, fused: list[torch.Tensor], logits: list[torch.Tensor], text: torch.Tensor,
             mixed: bool = False) -> torch.Tensor:
        c = self.hparams.get("csa_loss") or {}
        total = None
        for d, (head, f, o) in enumerate(zip(self.csa_heads, fused, logits)):
            feats = head(f.float())
            if self.feature_norm == "channel":
                feats = F.normalize(feats, dim=1)
            elif self.feature_norm == "official" and (mixed or d == 0):
                # the published code divides by the norm over dim=-1, the last spatial axis (trainer.py:123)
                feats = feats / feats.norm(dim=-1, keepdim=True)
            o = o.float()
            p = torch.sigmoid(o) if self.seg_activation == "sigmoid" else torch.softmax(o, 1)
            term = csa_loss(feats, [p], text, pool=str(c.get("pool", "mean")),
                            channel_reduction=str(c.get("channel_reduction", "mean")),
                            class_reduction=str(c.get("class_reduction", "mean")),
                            resize=str(c.get("resize", "trilinear")))
            total = term if total is None else total + term
        return total

    # --- training --------------------------------------------------------------------------------------
    def training_step(self, batch: Batch, ctx: StepContext) -> dict[str, torch.Tensor]:
        hp = self.hparams
        seg_w = hp.get("seg_loss") or {}
        seg = lambda o, y: ce_plus_dice(o, y, dict(hp.get("dice") or {}), float(seg_w.get("ce", 1.0)),  # noqa: E731
                                        float(seg_w.get("dice", 1.0)), self.seg_activation)
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
            csa = self._csa(fused, logits, text)
            loss = loss + csa_w * csa
            out["loss_csa"] = csa.detach()
        if bu:
            pls = [threshold_pseudo_label(p[bl:].detach(), thr, lcc=lcc) for p in probs]
            cons = sum(seg(logits[j][bl:], pls[i])
                       for i in range(len(logits)) for j in range(len(logits)) if i != j)
            # the published ramp takes the 0-based iteration (trainer.py:153, train.py:139-140)
            w = ramped_weight(hp, ctx.iteration, 0.1, 200)
            loss = loss + w * cons
            out.update(loss_consistency=cons.detach(), consistency_weight=torch.tensor(w))
            if self.use_dca and ctx.iteration > int(hp.get("dca_start", 6000)):  # trainer.py:157
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
        losses = global_mean(torch.stack([s.detach() for s in sup]))  # one choice for all DDP ranks
        if len(sup) == 2:  # decoder 1 gives the labels only when strictly better (trainer.py:162, :187)
            better = 0 if bool(losses[0] < losses[1]) else 1
            worse = 1 - better
        else:
            better, worse = int(losses.argmin()), int(losses.argmax())
        n = min(batch.image_l.shape[0], batch.image_u.shape[0])  # labeled i is paired with unlabeled i
        xu_mix, yu_mix, xl_mix, yl_mix = dca_mix(batch.image_l[:n], batch.label_l[:n], batch.image_u[:n],
                                                 pls[better][:n])
        images, labels = torch.cat([xu_mix, xl_mix]), torch.cat([yu_mix, yl_mix])
        logits, fused = self.forward_decoders(images, text)
        mixed = seg(logits[worse], labels)
        csa = self._csa(fused, logits, text, mixed=True) if self.use_csa else None
        return mixed, csa

    # --- inference -------------------------------------------------------------------------------------
    def _to_proba(self, logits: torch.Tensor) -> torch.Tensor:
        """Softmax, or (published test script) sigmoid: two classes give [1 − σ(z_1), σ(z_1)], so the argmax
        is σ(z_1) > 0.5 as in prediction.py:70-80."""
        logits = logits.float()
        if self.inference_activation == "softmax":
            return torch.softmax(logits, 1)
        s = torch.sigmoid(logits)
        return torch.cat([1 - s[:, 1:2], s[:, 1:2]], 1) if s.shape[1] == 2 else s

    def predict_proba(self, x: torch.Tensor, decoder: int | str | None = None) -> torch.Tensor:
        idx = decoder_index(decoder, self.hparams.get("eval_decoder", 0), len(self.net.decoders))
        text = self._text()
        if idx == "mean":
            logits, _ = self.forward_decoders(x, text)
            return torch.stack([self._to_proba(o) for o in logits]).mean(0)
        return self._to_proba(self.forward_decoders(x, text, [idx])[0][0])

    def predict_logits(self, x: torch.Tensor, decoder: int | str | None = None) -> torch.Tensor:
        idx = decoder_index(decoder, self.hparams.get("eval_decoder", 0), len(self.net.decoders))
        if idx == "mean" or self.inference_activation == "sigmoid":
            return torch.log(self.predict_proba(x, idx).clamp_min(1e-12))
        return self.forward_decoders(x, self._text(), [idx])[0][0]
