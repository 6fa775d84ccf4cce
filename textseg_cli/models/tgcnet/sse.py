"""SSE, the Semantic–Structural Synergy Encoder.

A light trainable CNN sees the image at 32·g pixels (768 for ViT-L-14-336's 24×24 grid) and gives
features at 1/8, 1/16 and 1/32; the 1/32 grid equals CLIP's patch grid, where
`F_fused = LayerNorm(P_V(F_clip) + P_C(F_cnn^1/32))`. The pyramid {F_cnn^1/8, F_cnn^1/16, F_fused},
projected to `d_model`, is refined by multi-scale deformable attention layers into
F_V = {F_V^1/8, F_V^1/16, F_V^1/32}.

Modes (ablation `--sse`): "on" as above; "cnn-only" is Table 4's "CNN-only (no CLIP)" row: the CNN pyramid
alone, F_V^1/32 = LayerNorm(P_C(F_cnn^1/32)), refined by the same deformable layers, and the model never runs
CLIP's image tower; "no-deform" keeps the CNN pyramid and the CLIP fusion but skips the deformable refinement
(what "cnn-only" meant before); "off" drops the CNN: F_V^1/32 = LayerNorm(P_V(F_clip)) and the finer levels are
learned ×2 / ×4 transposed-convolution upsamplings of it.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from textseg_cli.errors import ConfigError
from textseg_cli.models.tgcnet.msdeform_attn import (
    DeformableEncoderLayer,
    reference_points,
    sine_position_2d,
)

SSE_MODES = ("on", "off", "cnn-only", "no-deform")
USES_CLIP_IMAGE = ("on", "off", "no-deform")  # modes that read CLIP's dense image features


def _conv_bn(cin: int, cout: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class LightCNN(nn.Module):
    """Stem (/2) and four stride-2 stages of two 3×3 conv-BN-ReLU each; returns the /8, /16, /32 maps."""

    def __init__(self, channels: tuple[int, ...] = (32, 64, 128, 256, 352), in_channels: int = 3):
        super().__init__()
        self.stem = _conv_bn(in_channels, channels[0], 2)
        self.stages = nn.ModuleList(nn.Sequential(_conv_bn(channels[i], channels[i + 1], 2),
                                                  _conv_bn(channels[i + 1], channels[i + 1]))
                                    for i in range(4))
        self.out_channels = channels[2:]

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        x = self.stem(x)
        outs = []
        for stage in self.stages:
            x = stage(x)
            outs.append(x)
        return outs[1:]  # /8, /16, /32


class SSE(nn.Module):
    def __init__(self, clip_dim: int, d_model: int = 256, mode: str = "on", cnn_channels=(32, 64, 128, 256, 352),
                 layers: int = 3, heads: int = 8, points: int = 4, ffn: int = 1024):
        super().__init__()
        if mode not in SSE_MODES:
            raise ConfigError(f"sse '{mode}': expected one of {', '.join(SSE_MODES)}")
        self.mode, self.d_model = mode, d_model
        self.p_v = nn.Linear(clip_dim, d_model) if mode != "cnn-only" else None
        self.norm = nn.LayerNorm(d_model)
        if mode == "off":
            self.up16 = nn.Sequential(nn.ConvTranspose2d(d_model, d_model, 2, 2), nn.GroupNorm(32, d_model))
            self.up8 = nn.Sequential(nn.ConvTranspose2d(d_model, d_model, 4, 4), nn.GroupNorm(32, d_model))
            return
        self.cnn = LightCNN(tuple(cnn_channels))
        c8, c16, c32 = self.cnn.out_channels
        self.proj8 = nn.Sequential(nn.Conv2d(c8, d_model, 1), nn.GroupNorm(32, d_model))
        self.proj16 = nn.Sequential(nn.Conv2d(c16, d_model, 1), nn.GroupNorm(32, d_model))
        self.p_c = nn.Conv2d(c32, d_model, 1)
        self.layers = nn.ModuleList()
        if mode in ("on", "cnn-only"):
            self.level_embed = nn.Parameter(torch.randn(3, d_model) * 0.02)
            self.layers = nn.ModuleList(DeformableEncoderLayer(d_model, 3, heads, points, ffn) for _ in range(layers))

    def forward(self, clip_feats: torch.Tensor | None, image: torch.Tensor | None, grid: int | None = None
                ) -> list[torch.Tensor]:
        """clip_feats (B, D, g, g) (None in "cnn-only", which then needs `grid`); image (B, 3, H, W) in [0, 1]
        (unused when mode is "off").

        Returns [F_V^1/8 (4g), F_V^1/16 (2g), F_V^1/32 (g)], each (B, d_model, ·, ·).
        """
        if self.mode == "cnn-only":
            b, g = image.shape[0], int(grid)
        else:
            b, _, g, _ = clip_feats.shape
            clip_tok = self.p_v(clip_feats.flatten(2).transpose(1, 2))  # (B, g², d)
        if self.mode == "off":
            f32 = self.norm(clip_tok).transpose(1, 2).reshape(b, self.d_model, g, g)
            return [self.up8(f32), self.up16(f32), f32]
        x = F.interpolate(image, size=(32 * g, 32 * g), mode="bilinear", align_corners=False)
        c8, c16, c32 = self.cnn(x)
        cnn_tok = self.p_c(c32).flatten(2).transpose(1, 2)
        fused = self.norm(cnn_tok if self.mode == "cnn-only" else clip_tok + cnn_tok)
        fused = fused.transpose(1, 2).reshape(b, -1, g, g)
        pyramid = [self.proj8(c8), self.proj16(c16), fused]
        if not self.layers:
            return pyramid
        shapes = [(p.shape[-2], p.shape[-1]) for p in pyramid]
        src = torch.cat([p.flatten(2).transpose(1, 2) for p in pyramid], 1)
        pos = torch.cat([sine_position_2d(h, w, self.d_model, src.device, src.dtype) + self.level_embed[i]
                         for i, (h, w) in enumerate(shapes)], 0)[None]
        ref = reference_points(shapes, b, src.device, src.dtype)
        for layer in self.layers:
            src = layer(src, pos, ref, shapes)
        outs, start = [], 0
        for h, w in shapes:
            outs.append(src[:, start:start + h * w].transpose(1, 2).reshape(b, self.d_model, h, w))
            start += h * w
        return outs
