"""The V-Net of the semi-supervised segmentation literature (UA-MT, SASSNet, DTC, MC-Net, BCP, ...).

Not Milletari's original V-Net nor MONAI's: plain 3×3×3 conv + norm + ReLU blocks, additive skip
connections, 16/32/64/128/256 channels with 1/2/3/3/3 convs per encoder stage, stride-2 2×2×2 conv
downsampling; decoder stages of 3/3/2/1 convs after each upsampling and a 1×1×1 output conv.
Dropout (p=0.5, channel-wise) acts on the bottleneck and on the last decoder feature while training.

Upsampling modes of a decoder (MC-Net's naming): 0 = transposed conv (k=2, s=2); 1 = (bi/tri)linear
interpolation (align_corners=True) then 3×3×3 conv; 2 = nearest interpolation then 3×3×3 conv; each
followed by norm + ReLU. `dim=2` builds the same network with 2D layers.

Parameter counts (1 input channel, 2 classes, batchnorm): V-Net 9,448,866 (encoder 7,376,896, decoder
2,071,970); two decoders (modes 0, 1) 12,347,716; three decoders (modes 0, 1, 2) 15,246,566.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn

from textseg_cli.errors import ConfigError
from textseg_cli.models.registry import register_model

NORMS = ("batchnorm", "instancenorm", "groupnorm", "none")
_NORM_ALIASES = {"batch": "batchnorm", "bn": "batchnorm", "instance": "instancenorm", "in": "instancenorm",
                 "group": "groupnorm", "gn": "groupnorm", None: "none"}
UP_MODES = {0: "transposed conv", 1: "linear interpolation + conv", 2: "nearest interpolation + conv"}


def _norm_name(normalization: str | None) -> str:
    name = _NORM_ALIASES.get(normalization, normalization)
    if name not in NORMS:
        raise ConfigError(f"normalization {normalization!r}: expected one of {', '.join(NORMS)}")
    return name


def _layers(dim: int):
    if dim == 3:
        return nn.Conv3d, nn.ConvTranspose3d, nn.BatchNorm3d, nn.InstanceNorm3d, nn.Dropout3d, "trilinear"
    if dim == 2:
        return nn.Conv2d, nn.ConvTranspose2d, nn.BatchNorm2d, nn.InstanceNorm2d, nn.Dropout2d, "bilinear"
    raise ConfigError(f"dim {dim!r}: the V-Net family supports 2 or 3 spatial dimensions")


def _norm(normalization: str, channels: int, dim: int) -> list[nn.Module]:
    _, _, bn, inorm, _, _ = _layers(dim)
    if normalization == "batchnorm":
        return [bn(channels)]
    if normalization == "instancenorm":
        return [inorm(channels)]
    if normalization == "groupnorm":  # 16 groups as in the literature's code
        return [nn.GroupNorm(num_groups=min(16, channels), num_channels=channels)]
    return []


class ConvBlock(nn.Sequential):
    """`n_stages` × (3×3×3 conv → norm → ReLU)."""

    def __init__(self, n_stages: int, in_ch: int, out_ch: int, normalization: str = "batchnorm", dim: int = 3):
        conv = _layers(dim)[0]
        ops: list[nn.Module] = []
        for i in range(n_stages):
            ops += [conv(in_ch if i == 0 else out_ch, out_ch, 3, padding=1), *_norm(normalization, out_ch, dim),
                    nn.ReLU(inplace=True)]
        super().__init__(*ops)


class DownBlock(nn.Sequential):
    """Stride-2 2×2×2 conv → norm → ReLU."""

    def __init__(self, in_ch: int, out_ch: int, normalization: str = "batchnorm", dim: int = 3):
        conv = _layers(dim)[0]
        super().__init__(conv(in_ch, out_ch, 2, stride=2, padding=0), *_norm(normalization, out_ch, dim),
                         nn.ReLU(inplace=True))


class UpBlock(nn.Sequential):
    """×2 upsampling in one of the three modes, then norm → ReLU."""

    def __init__(self, in_ch: int, out_ch: int, normalization: str = "batchnorm", mode: int = 0, dim: int = 3):
        conv, deconv, _, _, _, linear = _layers(dim)
        if mode == 0:
            ops: list[nn.Module] = [deconv(in_ch, out_ch, 2, stride=2, padding=0)]
        elif mode == 1:
            ops = [nn.Upsample(scale_factor=2, mode=linear, align_corners=True), conv(in_ch, out_ch, 3, padding=1)]
        elif mode == 2:
            ops = [nn.Upsample(scale_factor=2, mode="nearest"), conv(in_ch, out_ch, 3, padding=1)]
        else:
            raise ConfigError(f"upsampling mode {mode!r}: expected 0 (transposed conv), 1 (linear) or 2 (nearest)")
        super().__init__(*ops, *_norm(normalization, out_ch, dim), nn.ReLU(inplace=True))


class VNetEncoder(nn.Module):
    """Five stages; `forward` returns `[x1, x2, x3, x4, x5]` (x5 = bottleneck, 16·n_filters channels).

    Text-fusion modules act on `x5` (and optionally the skips) between the encoder and the decoders.
    """

    def __init__(self, in_channels: int = 1, n_filters: int = 16, normalization: str = "batchnorm",
                 has_dropout: bool = True, dim: int = 3):
        super().__init__()
        normalization = _norm_name(normalization)
        f = n_filters
        self.channels = [f, 2 * f, 4 * f, 8 * f, 16 * f]
        self.block_one = ConvBlock(1, in_channels, f, normalization, dim)
        self.block_one_dw = DownBlock(f, 2 * f, normalization, dim)
        self.block_two = ConvBlock(2, 2 * f, 2 * f, normalization, dim)
        self.block_two_dw = DownBlock(2 * f, 4 * f, normalization, dim)
        self.block_three = ConvBlock(3, 4 * f, 4 * f, normalization, dim)
        self.block_three_dw = DownBlock(4 * f, 8 * f, normalization, dim)
        self.block_four = ConvBlock(3, 8 * f, 8 * f, normalization, dim)
        self.block_four_dw = DownBlock(8 * f, 16 * f, normalization, dim)
        self.block_five = ConvBlock(3, 16 * f, 16 * f, normalization, dim)
        self.has_dropout = has_dropout
        self.dropout = _layers(dim)[4](p=0.5)  # identity in eval mode

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        x1 = self.block_one(x)
        x2 = self.block_two(self.block_one_dw(x1))
        x3 = self.block_three(self.block_two_dw(x2))
        x4 = self.block_four(self.block_three_dw(x3))
        x5 = self.block_five(self.block_four_dw(x4))
        if self.has_dropout:
            x5 = self.dropout(x5)
        return [x1, x2, x3, x4, x5]


class VNetDecoder(nn.Module):
    """Up 256→128 + 3 convs, →64 + 3 convs, →32 + 2 convs, →16 + 1 conv, 1×1×1 output conv; additive skips."""

    def __init__(self, num_classes: int = 2, n_filters: int = 16, normalization: str = "batchnorm",
                 has_dropout: bool = True, up_mode: int = 0, dim: int = 3):
        super().__init__()
        normalization = _norm_name(normalization)
        f = n_filters
        self.up_mode = up_mode
        self.block_five_up = UpBlock(16 * f, 8 * f, normalization, up_mode, dim)
        self.block_six = ConvBlock(3, 8 * f, 8 * f, normalization, dim)
        self.block_six_up = UpBlock(8 * f, 4 * f, normalization, up_mode, dim)
        self.block_seven = ConvBlock(3, 4 * f, 4 * f, normalization, dim)
        self.block_seven_up = UpBlock(4 * f, 2 * f, normalization, up_mode, dim)
        self.block_eight = ConvBlock(2, 2 * f, 2 * f, normalization, dim)
        self.block_eight_up = UpBlock(2 * f, f, normalization, up_mode, dim)
        self.block_nine = ConvBlock(1, f, f, normalization, dim)
        self.out_conv = _layers(dim)[0](f, num_classes, 1, padding=0)
        self.has_dropout = has_dropout
        self.dropout = _layers(dim)[4](p=0.5)

    def forward(self, features: Sequence[torch.Tensor], return_feature: bool = False):
        x1, x2, x3, x4, x5 = features
        x = self.block_six(self.block_five_up(x5) + x4)
        x = self.block_seven(self.block_six_up(x) + x3)
        x = self.block_eight(self.block_seven_up(x) + x2)
        x = self.block_nine(self.block_eight_up(x) + x1)
        if self.has_dropout:
            x = self.dropout(x)
        out = self.out_conv(x)
        return (out, x) if return_feature else out


class VNet(nn.Module):
    """One encoder, one decoder; forward(x) → logits (B, K, *spatial). Spatial sizes must be multiples of 16."""

    def __init__(self, in_channels: int = 1, num_classes: int = 2, n_filters: int = 16,
                 normalization: str = "batchnorm", has_dropout: bool = True, up_mode: int = 0, dim: int = 3):
        super().__init__()
        self.dim = dim
        self.encoder = VNetEncoder(in_channels, n_filters, normalization, has_dropout, dim)
        self.decoder = VNetDecoder(num_classes, n_filters, normalization, has_dropout, up_mode, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.encoder(x))


class MultiDecoderVNet(nn.Module):
    """A shared V-Net encoder and one decoder per upsampling mode (MC-Net: (0, 1); MC-Net+: (0, 1, 2)).

    forward(x) → list of logits, one per decoder. `decode(features)` lets fusion modules edit the
    features from `encoder(x)` first.
    """

    def __init__(self, in_channels: int = 1, num_classes: int = 2, n_filters: int = 16,
                 normalization: str = "batchnorm", has_dropout: bool = True, up_modes: Sequence[int] = (0, 1),
                 dim: int = 3):
        super().__init__()
        if not up_modes:
            raise ConfigError("up_modes: at least one decoder is needed")
        self.dim = dim
        self.up_modes = [int(m) for m in up_modes]
        self.encoder = VNetEncoder(in_channels, n_filters, normalization, has_dropout, dim)
        self.decoders = nn.ModuleList(VNetDecoder(num_classes, n_filters, normalization, has_dropout, m, dim)
                                      for m in self.up_modes)

    def decode(self, features: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        return [dec(features) for dec in self.decoders]

    def forward(self, x: torch.Tensor, return_features: bool = False):
        """Logits per decoder; with `return_features`, (logits, last decoder features) as two lists."""
        feats = self.encoder(x)
        if not return_features:
            return self.decode(feats)
        outs = [dec(feats, return_feature=True) for dec in self.decoders]
        return [o[0] for o in outs], [o[1] for o in outs]


@register_model("vnet", "V-Net of the SSL literature (16-256 ch., additive skips, one decoder)")
def build_vnet(in_channels: int = 1, num_classes: int = 2, n_filters: int = 16, normalization: str = "batchnorm",
               has_dropout: bool = True, up_mode: int = 0, dim: int = 3) -> VNet:
    return VNet(in_channels, num_classes, n_filters, normalization, has_dropout, up_mode, dim)


@register_model("vnet_multi", "shared V-Net encoder, one decoder per up mode (MC-Net: 0,1; MC-Net+: 0,1,2)")
def build_vnet_multi(in_channels: int = 1, num_classes: int = 2, n_filters: int = 16,
                     normalization: str = "batchnorm", has_dropout: bool = True, up_modes: Sequence[int] = (0, 1),
                     dim: int = 3) -> MultiDecoderVNet:
    return MultiDecoderVNet(in_channels, num_classes, n_filters, normalization, has_dropout, up_modes, dim)
