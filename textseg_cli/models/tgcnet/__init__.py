"""TGC-Net (text-guided 2D segmentation on a frozen CLIP): see model.py for the data flow."""

from textseg_cli.models.tgcnet.model import TGCNet, build_tgcnet

__all__ = ["TGCNet", "build_tgcnet"]
