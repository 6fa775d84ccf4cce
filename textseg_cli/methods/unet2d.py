"""`unet2d`: the standard 2D U-Net, fully supervised (CE + Dice) — the text-free baseline of the
text-guided 2D tables (LViT's U-Net row)."""

from __future__ import annotations

from textseg_cli.methods.base import register_method
from textseg_cli.methods.sup import SupervisedOnly


@register_method("unet2d")
class UNet2DMethod(SupervisedOnly):
    paper = "U-Net (Ronneberger et al., MICCAI 2015) as LViT's 2D baseline (loss = CE + Dice)"
