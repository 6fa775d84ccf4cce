"""Name → network constructor registry used by methods and by `textseg models`."""

from __future__ import annotations

import importlib
from typing import Callable

import torch.nn as nn

from textseg_cli.errors import ConfigError

MODELS: dict[str, Callable[..., nn.Module]] = {}
MODEL_DOCS: dict[str, str] = {}


def register_model(name: str, doc: str = ""):
    def deco(fn: Callable[..., nn.Module]):
        MODELS[name] = fn
        MODEL_DOCS[name] = doc or ((fn.__doc__ or "").strip().splitlines() or [""])[0]
        return fn

    return deco


def build_model(name: str, in_channels: int = 1, num_classes: int = 2, **kwargs) -> nn.Module:
    _import_all()
    if name not in MODELS:
        raise ConfigError(f"unknown model '{name}'; available: {', '.join(sorted(MODELS))}")
    return MODELS[name](in_channels=in_channels, num_classes=num_classes, **kwargs)


def count_parameters(module: nn.Module, trainable_only: bool = False) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)


def _import_all() -> None:
    """Import the modules that register models (kept explicit so a broken module fails loudly)."""

    for mod in _MODEL_MODULES:
        importlib.import_module(mod)


# Modules that call @register_model; add new ones here.
_MODEL_MODULES: list[str] = [
    "textseg_cli.models.vnet",
    "textseg_cli.models.unet2d",
    "textseg_cli.models.lvit_unet",
    "textseg_cli.models.tgcnet.model",
    "textseg_cli.models.unet3d",
    "textseg_cli.models.resnet3d",
]
