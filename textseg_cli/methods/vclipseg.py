"""VCLIPSeg (Li et al., MICCAI 2024): voxel-wise CLIP-enhanced semi-supervised segmentation.

Defaults follow the published code (SmileJET/VCLIPSeg@fe50145, code/train_3d.py, code/networks/VNet_clip.py,
code/test_3d.py); docs/fidelity.md lists each item with its file:line and the paper's switch.

Frozen CLIP embeddings of "A pixel of a {class}." (K×512, `textseg encode --encoder clip`, NOT normalised as
published; a file recorded as normalised is refused, `check_raw_rows`) and a V-Net encoder with two decoders
(upsampling modes 0 and 1):

- VWPM on the bottleneck (`models.text_fusion.VWPM`): 3³ conv+BN+LeakyReLU to 64, MLP 64→16→K, softmax per
  voxel, Σ_k map_k · Linear_{512→256}(t_k), 3³ fusion conv+BN+LeakyReLU of [F, prompt];
- VTCM: per decoder a projection head (1×1 conv 256→256, ReLU, 1×1 conv →512) on the fused bottleneck,
  L2-normalised over the last axis as published (VNet_clip.py:204-218; `vtcm_norm: channel` normalises the
  512 channels); ONE prototype per class from both heads at labeled voxels where label and both decoders
  agree (1/16 grid); L_reg = 1 − mean_k cos(prototype_k, t_k) over all K classes, a class without agreeing
  voxels counting as cosine 0 (the published NaN prototype gets no gradient; `vtcm_absent: skip` = the mean
  over the present classes);
- DLB: w_i = softmax_i(1 − σ(Dice loss_i on labeled data)); pseudo-label argmax Σ_i w_i p_i over the whole
  batch (labeled and unlabeled, train_3d.py:158-193; `pseudo_label: soft` = paper Eq. 9, the soft Σ w_i p_i);
  L_u = Σ_i (CE + foreground Dice)(p_i, pseudo-label).

Total = sup_weight · Σ_i Dice_i(labeled) + λ_u(t) · L_u + 0.5 · L_reg with sup_weight 0.5 (published `--lamda`;
1.0 = paper Eq. 11), λ_u = 1 · ramp(t // 150, 40) at the 1-based iteration. Inference: decoder 1's softmax
(test_patch.py:149-163), no LCC (test_3d.py `--nms 0`).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from textseg_cli.console import err_console
from textseg_cli.data.batch import Batch
from textseg_cli.errors import ConfigError
from textseg_cli.methods.base import Method, StepContext, decoder_index
from textseg_cli.methods.losses import dice_loss
from textseg_cli.methods.registry import register_method
from textseg_cli.methods.ssl_common import backbone_kwargs, ramped_weight
from textseg_cli.methods.text_addon import method_embeddings_and_meta, text_hparams
from textseg_cli.methods.text_losses import (
    ProjectionHead,
    dlb_fused,
    dlb_weights,
    vtcm_loss,
)
from textseg_cli.models.registry import build_model
from textseg_cli.models.text_fusion import VWPM


def check_raw_rows(emb: torch.Tensor, meta: dict[str, Any], text_hp: dict[str, Any]) -> None:
    """VCLIPSeg's VWPM feeds the RAW `encode_text` rows to its Linear (official clip_embedding_LA.py:15-20 saves them
    un-normalised; ViT-B/32 rows have norms ~9× those of unit rows), so a file written with `--normalize` would train
    a different network without any error. Refused unless `method.text.allow_normalized: true`; a file without the
    `normalized` record (not written by `textseg encode`) whose rows all have norm 1 gets a loud warning."""
    path = text_hp.get("embeddings")
    allow = bool(text_hp.get("allow_normalized", False))
    recorded = meta.get("normalized")
    unit = (recorded is None and emb.device.type != "meta" and emb.numel() > 0
            and bool(((emb.norm(dim=-1) - 1).abs() < 1e-4).all()))
    what = (f"{path} holds L2-normalised CLIP rows, but VCLIPSeg's VWPM takes the raw `encode_text` rows "
            "(official clip_embedding_LA.py; ~9× larger)")
    fix = ("re-encode without --normalize (`textseg encode --encoder clip` writes raw rows by default), or set "
           "method.text.allow_normalized=true to train on unit rows on purpose")
    if recorded is True and not allow:
        raise ConfigError(f"vclipseg: {what}", hint=fix)
    if recorded is True or unit:
        how = "(method.text.allow_normalized=true)" if recorded is True else "(no `normalized` record; all norms 1)"
        err_console.print(f"[bold yellow]warning:[/] vclipseg trains on normalised text rows {how}: {what}",
                          highlight=False)


@register_method("vclipseg")
class VCLIPSeg(Method):
    embedding_encoder = "clip"  # what `textseg encode` must produce for --text-embeddings
    paper = ("Li et al., VCLIPSeg: voxel-wise CLIP-enhanced model for semi-supervised medical image segmentation, "
             "MICCAI 2024")
    display_name = "VCLIPSeg"
    official_code = "SmileJET/VCLIPSeg"
    official_commit = "fe50145"
    ledger = "docs/fidelity.md#vclipseg-vclipseg"
    cli_flags = {"vwpm": None, "vtcm": None}
    has_text = True
    dims = (3,)

    def __init__(self, cfg: dict[str, Any], in_channels: int, num_classes: int, dim: int = 3, **context: Any):
        super().__init__(cfg, in_channels, num_classes, dim=dim, **context)
        hp = self.hparams
        modes = hp.get("up_modes") or (0, 1)
        if len(modes) < 2:
            raise ConfigError(f"method.up_modes {modes}: VCLIPSeg needs at least two decoders")
        self.net = build_model("vnet_multi", in_channels, num_classes, up_modes=modes, dim=dim,
                               **backbone_kwargs(hp))
        channels = int(self.net.encoder.channels[-1])
        self.use_vwpm = bool(hp.get("vwpm", True))
        self.use_vtcm = bool(hp.get("vtcm", True))
        if self.use_vwpm or self.use_vtcm:
            emb, meta = method_embeddings_and_meta(hp, "vclipseg", "clip", context.get("dataset_name"),
                                                   rows=num_classes)
            check_raw_rows(emb, meta, text_hparams(hp))
            self.register_buffer("text_embeddings", emb)
            text_dim = int(emb.shape[-1])
        else:
            self.text_embeddings = None
            text_dim = 0
        self.vwpm = VWPM(channels, text_dim, num_classes) if self.use_vwpm else None
        hidden = int(hp.get("vtcm_hidden", channels))
        self.vtcm_heads = nn.ModuleList(ProjectionHead(channels, text_dim, hidden=hidden)
                                        for _ in modes) if self.use_vtcm else None
        self.vtcm_norm = str(hp.get("vtcm_norm", "official"))
        self.pseudo_label = str(hp.get("pseudo_label", "hard"))
        self.vtcm_absent = str(hp.get("vtcm_absent", "official"))
        if self.vtcm_norm not in ("official", "channel"):
            raise ConfigError(f"method.vtcm_norm {self.vtcm_norm!r}: expected official (last axis) or channel")
        if self.pseudo_label not in ("hard", "soft"):
            raise ConfigError(f"method.pseudo_label {self.pseudo_label!r}: expected hard (published) or soft (Eq. 9)")
        if self.vtcm_absent not in ("official", "skip"):
            raise ConfigError(f"method.vtcm_absent {self.vtcm_absent!r}: expected official (a class without agreeing "
                              "voxels counts as cosine 0, the published gradient) or skip (mean over present classes)")

    def project(self, head: nn.Module, x5: torch.Tensor) -> torch.Tensor:
        """A VTCM head's features, L2-normalised over the last axis (published) or the channels."""
        return F.normalize(head(x5.float()), dim=-1 if self.vtcm_norm == "official" else 1)

    def bottleneck_and_logits(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        feats = self.net.encoder(x)
        x5 = feats[-1]
        if self.vwpm is not None:
            x5 = self.vwpm(x5, self.text_embeddings)
        return x5, self.net.decode([*feats[:-1], x5])

    def training_step(self, batch: Batch, ctx: StepContext) -> dict[str, torch.Tensor]:
        hp = self.hparams
        dice_kw = dict(hp.get("dice") or {})
        bl, bu = batch.image_l.shape[0], batch.image_u.shape[0]
        x = torch.cat([batch.image_l, batch.image_u]) if bu else batch.image_l
        x5, logits = self.bottleneck_and_logits(x)
        probs = [torch.softmax(o.float(), 1) for o in logits]
        dices = [dice_loss(p[:bl], batch.label_l, **dice_kw) for p in probs]
        loss = float(hp.get("sup_weight", 0.5)) * sum(dices)
        out: dict[str, torch.Tensor] = {"loss_dice": sum(dices).detach()}
        if bu:
            # the published code pseudo-labels and trains the whole batch, labeled half included (train_3d.py:171-193)
            weights = dlb_weights(dices)
            fused = dlb_fused(probs, weights)
            if self.pseudo_label == "hard":
                pseudo = fused.argmax(1)
                unsup = sum(F.cross_entropy(o.float(), pseudo) + dice_loss(p, pseudo, **dice_kw)
                            for p, o in zip(probs, logits))
            else:  # paper Eq. 9: soft targets Σ_i w_i p_i
                unsup = sum(-(fused * torch.log_softmax(o.float(), 1)).sum(1).mean() + dice_loss(p, fused, **dice_kw)
                            for p, o in zip(probs, logits))
            # iter_num is incremented before the ramp (train_3d.py:195-196): the 1-based step
            w = ramped_weight(hp, ctx.iteration + 1, 1.0, 40)
            loss = loss + w * unsup
            out.update(loss_unsup=unsup.detach(), consistency_weight=torch.tensor(w),
                       dlb_weight_0=weights[0].detach())
        if self.vtcm_heads is not None:
            preds = [o[:bl].detach().argmax(1) for o in logits]
            projs = [self.project(head, x5[:bl]) for head in self.vtcm_heads]
            reg = vtcm_loss(projs, batch.label_l, preds, self.text_embeddings.detach(), absent=self.vtcm_absent)
            loss = loss + float(hp.get("reg_weight", 0.5)) * reg
            out["loss_vtcm"] = reg.detach()
        out["loss"] = loss
        return out

    def predict_proba(self, x: torch.Tensor, decoder: int | str | None = None) -> torch.Tensor:
        idx = decoder_index(decoder, self.hparams.get("eval_decoder", 0), len(self.net.decoders))
        _, logits = self.bottleneck_and_logits(x)
        probs = [torch.softmax(o.float(), 1) for o in logits]
        return torch.stack(probs).mean(0) if idx == "mean" else probs[idx]

    def predict_logits(self, x: torch.Tensor, decoder: int | str | None = None) -> torch.Tensor:
        idx = decoder_index(decoder, self.hparams.get("eval_decoder", 0), len(self.net.decoders))
        if idx == "mean":
            return torch.log(self.predict_proba(x, "mean").clamp_min(1e-12))
        return self.bottleneck_and_logits(x)[1][idx]
