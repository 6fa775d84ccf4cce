"""`unet2d`: the standard 2D U-Net, fully supervised (CE + Dice) — a text-free 2D baseline. LViT's U-Net
row is reproduced exactly (its network, loss and protocol) by `lvit-unet` (methods/lvit_unet.py)."""

from __future__ import annotations

from textseg_cli.methods.registry import register_method
from textseg_cli.methods.sup import SupervisedOnly


@register_method("unet2d")
class UNet2DMethod(SupervisedOnly):
    paper = "U-Net (Ronneberger et al., MICCAI 2015) as LViT's 2D baseline (loss = CE + Dice)"
    display_name = "U-Net"
    official_code = "none (textseg's standard 2D U-Net; LViT's is lvit-unet)"
    official_commit = ""
    ledger = "docs/methods.md"
