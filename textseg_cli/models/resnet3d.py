"""MCF's second network: a 3D ResNet-34 encoder with the V-Net decoder (the "ResVNet" of the MCF code).

Encoder (`ResNet3DEncoder`): a 7×7×7 stride-1 stem conv (no bias) to 16 channels + BatchNorm + ReLU (x1,
full resolution), then four stages of 3D BasicBlocks ([3, 4, 6, 3] blocks, two 3×3×3 convs each) with 32, 64,
128 and 256 channels, each stage halving the resolution with a stride-2 first block (1×1×1 stride-2
projection shortcut). It returns `[x1, …, x5]` with the V-Net's channel widths (16…256), so the V-Net decoder
(`models.vnet.VNetDecoder`, transposed-conv upsampling, additive skips, dropout on its last feature) turns it
into a segmentation network. Initialisation as the published code ends up with: Kaiming-normal convs and
transposed convs, BatchNorm weight 1 and bias 0 (the encoder's zero-γ init is overwritten there too). Unlike
the V-Net encoder, the ResNet encoder has no bottleneck dropout.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from textseg_cli.models.registry import register_model
from textseg_cli.models.vnet import VNetDecoder

BLOCKS = (3, 4, 6, 3)  # ResNet-34


class BasicBlock3D(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv3d(cin, cout, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm3d(cout)
        self.conv2 = nn.Conv3d(cout, cout, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm3d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.shortcut = None
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv3d(cin, cout, 1, stride=stride, bias=False), nn.BatchNorm3d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        identity = x if self.shortcut is None else self.shortcut(x)
        return self.relu(out + identity)


class ResNet3DEncoder(nn.Module):
    """forward(x) → [x1 (16 ch, full res), x2 (32, /2), x3 (64, /4), x4 (128, /8), x5 (256, /16)]."""

    def __init__(self, in_channels: int = 1, base: int = 16, blocks: tuple[int, ...] = BLOCKS):
        super().__init__()
        self.channels = [base, 2 * base, 4 * base, 8 * base, 16 * base]
        self.stem = nn.Sequential(nn.Conv3d(in_channels, base, 7, stride=1, padding=3, bias=False),
                                  nn.BatchNorm3d(base), nn.ReLU(inplace=True))
        stages = []
        cin = base
        for n, cout in zip(blocks, self.channels[1:]):
            stages.append(nn.Sequential(BasicBlock3D(cin, cout, stride=2),
                                        *[BasicBlock3D(cout, cout) for _ in range(n - 1)]))
            cin = cout
        self.stages = nn.ModuleList(stages)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        feats = [self.stem(x)]
        for stage in self.stages:
            feats.append(stage(feats[-1]))
        return feats


class ResVNet(nn.Module):
    """ResNet-34 encoder + V-Net decoder; forward(x) → logits (B, K, *spatial), sizes multiples of 16."""

    def __init__(self, in_channels: int = 1, num_classes: int = 2, normalization: str = "batchnorm",
                 has_dropout: bool = True, n_filters: int = 16):
        super().__init__()
        self.encoder = ResNet3DEncoder(in_channels, base=n_filters)
        self.decoder = VNetDecoder(num_classes, n_filters, normalization, has_dropout, up_mode=0)
        for m in self.modules():
            if isinstance(m, (nn.Conv3d, nn.ConvTranspose3d)):
                nn.init.kaiming_normal_(m.weight)
            elif isinstance(m, nn.BatchNorm3d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.encoder(x))


@register_model("resvnet34", "MCF's 3D ResNet-34 encoder with the V-Net decoder")
def build_resvnet34(in_channels: int = 1, num_classes: int = 2, normalization: str = "batchnorm",
                    has_dropout: bool = True, n_filters: int = 16, **_) -> ResVNet:
    """MCF's 3D ResNet-34 encoder with the V-Net decoder."""
    return ResVNet(in_channels, num_classes, normalization, has_dropout, n_filters)
