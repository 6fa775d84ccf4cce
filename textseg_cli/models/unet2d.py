"""The standard 2D U-Net (Ronneberger et al. 2015): 64-128-256-512-1024 double-conv blocks with BatchNorm
and ReLU, max-pool down, bilinear or transposed-convolution up (LViT's own, smaller U-Net is
`models/lvit_unet.py`). `base` scales every width (64 → the paper's net; 8-16 for
CPU tests)."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from textseg_cli.models.registry import register_model


class DoubleConv(nn.Sequential):
    def __init__(self, cin: int, cout: int, mid: int | None = None):
        mid = mid or cout
        super().__init__(
            nn.Conv2d(cin, mid, 3, padding=1, bias=False), nn.BatchNorm2d(mid), nn.ReLU(inplace=True),
            nn.Conv2d(mid, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True),
        )


class Up(nn.Module):
    """Upsample ×2, pad to the skip's size (odd inputs), concatenate, double conv.

    `cin` is the channel count after concatenation: bilinear keeps the deep map's cin/2 channels,
    the transposed conv maps cin → cin/2, and the skip brings the other cin/2.
    """

    def __init__(self, cin: int, cout: int, bilinear: bool):
        super().__init__()
        if bilinear:
            self.up = nn.Upsample(scale_factor=2, mode="bilinear", align_corners=True)
            self.conv = DoubleConv(cin, cout, cin // 2)
        else:
            self.up = nn.ConvTranspose2d(cin, cin // 2, 2, stride=2)
            self.conv = DoubleConv(cin, cout)

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        x = self.up(x)
        dy, dx = skip.shape[-2] - x.shape[-2], skip.shape[-1] - x.shape[-1]
        if dy or dx:
            x = F.pad(x, [dx // 2, dx - dx // 2, dy // 2, dy - dy // 2])
        return self.conv(torch.cat([skip, x], dim=1))


class UNet2D(nn.Module):
    """Encoder widths base·(1, 2, 4, 8, 16); with bilinear=True the bottleneck is base·8 (as in the
    widely used PyTorch U-Net), with transposed convs base·16."""

    def __init__(self, in_channels: int = 1, num_classes: int = 2, base: int = 64, bilinear: bool = True):
        super().__init__()
        c = [base * m for m in (1, 2, 4, 8, 16)]
        factor = 2 if bilinear else 1
        self.inc = DoubleConv(in_channels, c[0])
        self.downs = nn.ModuleList([nn.Sequential(nn.MaxPool2d(2), DoubleConv(c[i], c[i + 1] // (factor if i == 3 else 1)))
                                    for i in range(4)])
        # Bilinear: outputs are halved (except the last) so the next concatenation has c[i-1] channels.
        self.ups = nn.ModuleList([Up(c[i], c[i - 1] // factor if i > 1 else c[0], bilinear) for i in range(4, 0, -1)])
        self.outc = nn.Conv2d(c[0], num_classes, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skips = [self.inc(x)]
        for down in self.downs:
            skips.append(down(skips[-1]))
        y = skips.pop()
        for up in self.ups:
            y = up(y, skips.pop())
        return self.outc(y)


@register_model("unet2d", doc="standard 2D U-Net (64-1024 channels, bilinear or transposed up; LViT's: lvit-unet)")
def build_unet2d(in_channels: int = 1, num_classes: int = 2, base: int = 64, bilinear: bool = True, **_) -> UNet2D:
    """The standard 2D U-Net; `base` sets the first width (64 = the published net)."""
    return UNet2D(in_channels, num_classes, base=base, bilinear=bilinear)
