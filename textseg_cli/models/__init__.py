"""Networks: backbones (V-Net family, U-Nets) and text-fusion modules, built by name."""

from textseg_cli.models.registry import (
    MODELS,
    build_model,
    count_parameters,
    register_model,
)

__all__ = ["MODELS", "build_model", "count_parameters", "register_model"]
