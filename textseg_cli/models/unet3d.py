"""URPC's 3D U-Net with deep supervision at four scales (`unet_3D_dv_semi` of the URPC / SSL4MIS code).

Encoder: two 3×3×3 conv + norm + ReLU per level with 16/32/64/128/256 channels (64…1024 divided by the
feature scale 4; `n_filters` scales them), 2×2×2 max-pooling between levels. Decoder: trilinear ×2
upsampling, concatenation with the skip feature, two conv + norm + ReLU; Dropout3d of 0.5/0.3/0.2/0.1
after the four decoder stages. Each decoder stage has a 1×1×1 output conv; the three coarser ones are
upsampled (trilinear ×8/×4/×2) to the input size. The published code normalises with InstanceNorm3d
without affine parameters (its "batchnorm" switch selects instance norm); that is the default here.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from textseg_cli.models.registry import register_model

DROPOUTS = (0.5, 0.3, 0.2, 0.1)


def _norm(kind: str, ch: int) -> nn.Module:
    if kind == "instance":
        return nn.InstanceNorm3d(ch)
    if kind == "batch":
        return nn.BatchNorm3d(ch)
    if kind == "none":
        return nn.Identity()
    raise ValueError(f"unknown normalisation '{kind}' (instance, batch, none)")


class DoubleConv(nn.Module):
    def __init__(self, cin: int, cout: int, norm: str):
        super().__init__()
        self.block = nn.Sequential(
            nn.Conv3d(cin, cout, 3, padding=1), _norm(norm, cout), nn.ReLU(inplace=True),
            nn.Conv3d(cout, cout, 3, padding=1), _norm(norm, cout), nn.ReLU(inplace=True),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block(x)


class UpConcat(nn.Module):
    """Trilinear ×2 upsampling of the coarse feature, concatenated after the skip, then DoubleConv."""

    def __init__(self, cin: int, cout: int, norm: str):
        super().__init__()
        self.conv = DoubleConv(cin + cout, cout, norm)

    def forward(self, skip: torch.Tensor, coarse: torch.Tensor) -> torch.Tensor:
        up = F.interpolate(coarse, size=skip.shape[2:], mode="trilinear", align_corners=False)
        return self.conv(torch.cat([skip, up], dim=1))


class UNet3DDeepSup(nn.Module):
    """forward(x) → list of 4 logits maps at input resolution, finest first: [dsv1, dsv2, dsv3, dsv4]."""

    def __init__(self, in_channels: int = 1, num_classes: int = 2, norm: str = "instance", n_filters: int = 16,
                 dropout: bool = True):
        super().__init__()
        c = [n_filters * m for m in (1, 2, 4, 8, 16)]
        self.down = nn.ModuleList([DoubleConv(in_channels, c[0], norm)] +
                                  [DoubleConv(c[i], c[i + 1], norm) for i in range(4)])
        self.up = nn.ModuleList([UpConcat(c[i + 1], c[i], norm) for i in reversed(range(4))])  # 4→3 … 1→0
        self.heads = nn.ModuleList([nn.Conv3d(c[i], num_classes, 1) for i in reversed(range(4))])
        self.dropouts = nn.ModuleList([nn.Dropout3d(p) if dropout else nn.Identity() for p in DROPOUTS])
        for m in self.modules():
            if isinstance(m, nn.Conv3d):  # the published init: Kaiming normal, fan-in
                nn.init.kaiming_normal_(m.weight, a=0, mode="fan_in")

    def forward(self, x: torch.Tensor, outputs: int | None = None) -> list[torch.Tensor]:
        """`outputs`: compute only the finest `outputs` heads (a caller that uses one output leaves the
        others out of the graph; under DDP they must then be frozen)."""
        skips = []
        h = x
        for i, block in enumerate(self.down):
            h = block(h if i == 0 else F.max_pool3d(h, 2))
            skips.append(h)
        out_size = x.shape[2:]
        stages = []
        for j, (up, drop) in enumerate(zip(self.up, self.dropouts)):
            h = drop(up(skips[3 - j], h))
            stages.append(h)
        logits = []
        skip = len(self.heads) - (len(self.heads) if outputs is None else int(outputs))
        for head, feat in list(zip(self.heads, stages))[skip:]:  # coarse (up4) … fine (up1)
            y = head(feat)
            if y.shape[2:] != out_size:
                y = F.interpolate(y, size=out_size, mode="trilinear", align_corners=False)
            logits.append(y)
        return logits[::-1]


@register_model("unet3d_ds", doc="URPC's 3D U-Net with deep supervision at 4 scales (16-256 channels)")
def build_unet3d_ds(in_channels: int = 1, num_classes: int = 2, norm: str = "instance", n_filters: int = 16,
                    **_) -> UNet3DDeepSup:
    """URPC's 3D U-Net with deep supervision at 4 scales."""
    return UNet3DDeepSup(in_channels, num_classes, norm=norm, n_filters=n_filters)
