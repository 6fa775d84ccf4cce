"""LViT's U-Net baseline (Li et al., IEEE TMI 2023; HUANGLIZI/LViT `nets/UNet.py`), layer for layer.

Widths 64-128-256-512-512; one conv-BN-ReLU at the input, two per down/up block; max-pool down;
transposed-conv up that keeps the deep map's channel count (`ConvTranspose2d(c/2, c/2, 2, 2)` where c is
the width after concatenation); conv biases everywhere; a 1×1 output conv. For a binary task it has one
output channel and `forward` returns sigmoid probabilities, as LViT's does (14,751,873 parameters with 3
input channels). `logits` gives the pre-sigmoid map.

Names differ from LViT's only where it is clearer; the mapping (used by the parity test) is
`LVIT_NAME_MAP`: LViT `X.norm.*` ↔ here `X.bn.*`, `X.nConvs.N.*` ↔ `X.convs.N.*`.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from textseg_cli.models.registry import register_model

# (LViT substring, textseg substring) applied to state_dict keys, LViT → textseg.
LVIT_NAME_MAP: tuple[tuple[str, str], ...] = ((".nConvs.", ".convs."), (".norm.", ".bn."))


def from_lvit_key(key: str) -> str:
    """A key of LViT's `UNet.state_dict()` → the same tensor's key here."""
    for a, b in LVIT_NAME_MAP:
        key = key.replace(a, b)
    return key


class ConvBNReLU(nn.Module):
    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, kernel_size=3, padding=1)
        self.bn = nn.BatchNorm2d(cout)
        self.act = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.bn(self.conv(x)))


def _convs(cin: int, cout: int, n: int = 2) -> nn.Sequential:
    return nn.Sequential(ConvBNReLU(cin, cout), *[ConvBNReLU(cout, cout) for _ in range(n - 1)])


class Down(nn.Module):
    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.pool = nn.MaxPool2d(2)
        self.convs = _convs(cin, cout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.convs(self.pool(x))


class Up(nn.Module):
    """`cin` = channels after concatenation; the deep map (cin/2 channels) is upsampled without changing width."""

    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.up = nn.ConvTranspose2d(cin // 2, cin // 2, 2, stride=2)
        self.convs = _convs(cin, cout)

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        return self.convs(torch.cat([self.up(x), skip], dim=1))


class LViTUNet(nn.Module):
    def __init__(self, in_channels: int = 3, out_channels: int = 1, base: int = 64):
        super().__init__()
        c = base
        self.out_channels = out_channels
        self.inc = ConvBNReLU(in_channels, c)
        self.down1, self.down2 = Down(c, 2 * c), Down(2 * c, 4 * c)
        self.down3, self.down4 = Down(4 * c, 8 * c), Down(8 * c, 8 * c)
        self.up4, self.up3 = Up(16 * c, 4 * c), Up(8 * c, 2 * c)
        self.up2, self.up1 = Up(4 * c, c), Up(2 * c, c)
        self.outc = nn.Conv2d(c, out_channels, kernel_size=1)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        x1 = self.inc(x.float())
        x2 = self.down1(x1)
        x3 = self.down2(x2)
        x4 = self.down3(x3)
        y = self.up4(self.down4(x4), x4)
        y = self.up3(y, x3)
        y = self.up2(y, x2)
        return self.outc(self.up1(y, x1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Sigmoid probabilities for one output channel (LViT's binary head), raw outputs otherwise."""
        y = self.logits(x)
        return torch.sigmoid(y) if self.out_channels == 1 else y


@register_model("lvit-unet", doc="LViT's U-Net baseline exactly (nets/UNet.py; binary: one sigmoid output)")
def build_lvit_unet(in_channels: int = 3, num_classes: int = 2, base: int = 64, **_) -> LViTUNet:
    """`num_classes` counts background: 2 → LViT's one-channel sigmoid head; K > 2 → K raw outputs."""
    return LViTUNet(in_channels, 1 if num_classes == 2 else num_classes, base=base)
