"""LLM-SegNet (Kumari et al., "Leveraging task-specific knowledge from LLM for semi-supervised 3D medical image
segmentation", arXiv:2407.05088; no official code): co-training of two networks with LLM-description knowledge in the bottleneck.

Two networks A and B of the same architecture (V-Net for LA and Pancreas, the 3D U-Net for BraTS) each add
β · z to their bottleneck, D(E(x) + β·z), where z maps the BERT embeddings of the N LLM descriptions through an
MLP to the bottleneck's shape (C × grid, one learned map from the N descriptions to the grid; textseg's
reading, `models.text_fusion.TextInjection`; `method.text_injection: pooled` = the former per-channel constant;
β a hyperparameter (paper Table 5): 0.1 on LA, 1 on Pancreas and BraTS). Inputs get uniform noise
U(−0.2, 0.2). B sees a CutMix of the unlabeled images (a cuboid of each image replaced by the next image's);
A sees them unmixed and its probabilities are CutMixed identically, so both predictions are aligned.

L = Σ_{A,B} (Dice + CE)(labeled) + λ(t) · [USL(ŷ_A, ỹ_B) + USL(ŷ_B, ỹ_A)] with the unified segmentation
loss of `text_losses.usl_loss` (thresholds t1, t2; `--unsup-loss mse|nll` for the paper's Table 7): Eq. 8 as
printed (both NLL terms, each over its own voxel set) and Eq. 4's MSE to the argmax pseudo-label by default,
`--usl-reading textseg` (`method.usl_reading`) textseg's former reading (voxels counted once, soft MSE target); and
λ(t) = weight · ramp(t // 150, rampup); Eq. 1 has no ramp, so `consistency.rampup` defaults to 0 (constant
weight) and `--set method.consistency.rampup=40` restores the ramp textseg used before.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from textseg_cli.data.batch import Batch
from textseg_cli.errors import ConfigError
from textseg_cli.methods.base import Method, StepContext, decoder_index
from textseg_cli.methods.losses import dice_loss
from textseg_cli.methods.registry import register_method
from textseg_cli.methods.ssl_common import (
    backbone_kwargs,
    cuboid_mask,
    mix,
    ramped_weight,
)
from textseg_cli.methods.text_addon import load_method_embeddings
from textseg_cli.methods.text_losses import USL_READINGS, usl_loss
from textseg_cli.models.text_fusion import TextInjection
from textseg_cli.models.unet3d import UNet3DDeepSup
from textseg_cli.models.vnet import VNet

BACKBONES = ("vnet", "unet3d")


class InjectedNet(nn.Module):
    """A segmentation network whose bottleneck receives the text injection; forward(x) → logits."""

    def __init__(self, backbone: str, in_channels: int, num_classes: int, text: torch.Tensor, hp: dict[str, Any],
                 patch: Any = None):
        super().__init__()
        self.backbone = backbone
        if backbone == "vnet":
            self.net = VNet(in_channels, num_classes, **backbone_kwargs(hp))
            channels = int(self.net.encoder.channels[-1])
        elif backbone == "unet3d":
            self.net = UNet3DDeepSup(in_channels, num_classes, **dict(hp.get("backbone_unet3d") or {}))
            channels = int(self.net.down[-1].block[0].out_channels)
            # only the full-resolution output is used: the other deep-supervision heads are neither
            # computed nor trained (DDP stops on parameters that never get a gradient)
            for head in self.net.heads[:-1]:
                head.requires_grad_(False)
            # the U-Net has no separate encoder: inject through a hook on its deepest block
            self.net.down[-1].register_forward_hook(lambda m, i, o: self.injection(o, self._text[0]))
        else:
            raise ConfigError(f"method.backbone_model {backbone!r}: expected one of {', '.join(BACKBONES)}")
        grid = [max(1, int(p) // 16) for p in patch] if patch else None  # V-Net bottleneck: 4 stride-2 stages
        self.injection = TextInjection(channels, int(text.shape[-1]), int(hp.get("text_hidden", 512)),
                                       float(hp.get("beta", 0.1)), mode=str(hp.get("text_injection", "spatial")),
                                       num_texts=int(text.shape[0]), grid=grid,
                                       learnable_beta=bool(hp.get("learnable_beta", False)))
        self._text = [text]

    def set_text(self, text: torch.Tensor) -> None:
        self._text[0] = text

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.backbone == "vnet":
            feats = self.net.encoder(x)
            return self.net.decoder([*feats[:-1], self.injection(feats[-1], self._text[0])])
        return self.net(x, outputs=1)[0]  # the full-resolution output of the deep-supervision U-Net


def uniform_noise(x: torch.Tensor, amplitude: float) -> torch.Tensor:
    return x + (torch.rand_like(x) * 2 - 1) * amplitude if amplitude > 0 else x


@register_method("llm-segnet")
class LLMSegNet(Method):
    embedding_encoder = "bert"  # what `textseg encode` must produce for --text-embeddings
    paper = ("Kumari et al., Leveraging task-specific knowledge from LLM for semi-supervised 3D medical image "
             "segmentation (LLM-SegNet), arXiv:2407.05088")
    display_name = "LLM-SegNet"
    official_code = "none published (paper only)"
    official_commit = ""
    ledger = "docs/fidelity.md#llm-segnet-llm-segnet--no-official-code"
    cli_flags = {"unsup_loss": ("usl", "mse", "nll"), "usl_reading": USL_READINGS, "t1": None, "t2": None,
                 "beta": None}
    has_text = True
    dims = (3,)

    def __init__(self, cfg: dict[str, Any], in_channels: int, num_classes: int, dim: int = 3, **context: Any):
        super().__init__(cfg, in_channels, num_classes, dim=dim, **context)
        hp = self.hparams
        emb = load_method_embeddings(hp, "llm-segnet", "bert", context.get("dataset_name"))
        self.register_buffer("text_embeddings", emb)
        backbone = str(hp.get("backbone_model", "vnet"))
        mode = str(hp.get("text_injection", "spatial"))
        if mode not in TextInjection.MODES:
            raise ConfigError(f"method.text_injection {mode!r}: expected {' or '.join(TextInjection.MODES)}")
        if mode == "spatial" and not self.patch_size():
            raise ConfigError("llm-segnet: the spatial text injection is sized to data.patch_size, which is unset")

        patch = self.patch_size()
        self.net_a = InjectedNet(backbone, in_channels, num_classes, emb, hp, patch)
        self.net_b = InjectedNet(backbone, in_channels, num_classes, emb, hp, patch)
        kind = str(hp.get("unsup_loss", "usl"))
        if kind not in ("usl", "mse", "nll"):
            raise ConfigError(f"method.unsup_loss {kind!r}: expected usl, mse or nll")
        reading = str(hp.get("usl_reading", "paper"))
        if reading not in USL_READINGS:
            raise ConfigError(f"method.usl_reading {reading!r}: expected {' or '.join(USL_READINGS)}")

    def _apply(self, fn, recurse: bool = True):
        # keep the networks' (unregistered) view of the text buffer on the buffer's device
        super()._apply(fn, recurse)
        for net in (self.net_a, self.net_b):
            net.set_text(self.text_embeddings)
        return self

    def networks(self) -> dict[str, nn.Module]:
        return {"net_a": self.net_a, "net_b": self.net_b}

    def training_step(self, batch: Batch, ctx: StepContext) -> dict[str, torch.Tensor]:
        hp = self.hparams
        dice_kw = dict(hp.get("dice") or {})
        noise = float(hp.get("input_noise", 0.2))
        bl, bu = batch.image_l.shape[0], batch.image_u.shape[0]
        x_l, y_l, x_u = batch.image_l, batch.label_l, batch.image_u
        if bu:
            mask = cuboid_mask(x_u.shape[2:], float(hp.get("cutmix_ratio", 2 / 3)), device=x_u.device)
            perm = torch.roll(torch.arange(bu, device=x_u.device), 1)  # image i borrows a cuboid of image i−1
            x_u_mix = mix(x_u, x_u[perm], mask)
            logits_a = self.net_a(uniform_noise(torch.cat([x_l, x_u]), noise)).float()
            logits_b = self.net_b(uniform_noise(torch.cat([x_l, x_u_mix]), noise)).float()
        else:
            logits_a = self.net_a(uniform_noise(x_l, noise)).float()
            logits_b = self.net_b(uniform_noise(x_l, noise)).float()
        w_seg = hp.get("seg_loss") or {}
        w_ce, w_dice = float(w_seg.get("ce", 1.0)), float(w_seg.get("dice", 1.0))
        sup = {}
        for name, lg in (("a", logits_a), ("b", logits_b)):
            ce = F.cross_entropy(lg[:bl], y_l) if w_ce else lg.new_zeros(())
            sup[name] = w_dice * dice_loss(torch.softmax(lg[:bl], 1), y_l, **dice_kw) + w_ce * ce
        loss = sup["a"] + sup["b"]
        out: dict[str, torch.Tensor] = {"loss_sup_a": sup["a"].detach(), "loss_sup_b": sup["b"].detach()}
        if bu:
            p_a = torch.softmax(logits_a[bl:], 1)
            p_a_mix = mix(p_a, p_a[perm], mask)  # A's prediction CutMixed like B's input
            p_b = torch.softmax(logits_b[bl:], 1)
            t1, t2, kind = float(hp.get("t1", 0.9)), float(hp.get("t2", 0.1)), str(hp.get("unsup_loss", "usl"))
            reading = str(hp.get("usl_reading", "paper"))
            unsup = (usl_loss(p_a_mix, p_b, t1, t2, kind, reading=reading)
                     + usl_loss(p_b, p_a_mix, t1, t2, kind, reading=reading))
            w = ramped_weight(hp, ctx.iteration + 1, 1.0, 0)
            loss = loss + w * unsup
            out.update(loss_unsup=unsup.detach(), consistency_weight=torch.tensor(w))
        out["loss"] = loss
        return out

    def predict_proba(self, x: torch.Tensor, decoder: int | str | None = None) -> torch.Tensor:
        idx = decoder_index(decoder, self.hparams.get("eval_decoder", 0), 2)
        if idx == "mean":
            return (torch.softmax(self.net_a(x).float(), 1) + torch.softmax(self.net_b(x).float(), 1)) / 2
        return torch.softmax((self.net_a if idx == 0 else self.net_b)(x).float(), 1)

    def predict_logits(self, x: torch.Tensor, decoder: int | str | None = None) -> torch.Tensor:
        idx = decoder_index(decoder, self.hparams.get("eval_decoder", 0), 2)
        if idx == "mean":
            return torch.log(self.predict_proba(x, "mean").clamp_min(1e-12))
        return (self.net_a if idx == 0 else self.net_b)(x)
