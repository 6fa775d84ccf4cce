"""Value checks a type system does not make: devices, learning rates, numeric method settings, patch sizes.

Each failure is a ConfigError naming the option or config key and what is allowed, raised before a run
folder is created (issue 14.11).
"""

from __future__ import annotations

from typing import Any

from textseg_cli.errors import ConfigError

MIN_PATCH = 16  # the 3D/2D backbones downsample 4 times; a smaller side cannot pass the bottleneck


def check_run_config(cfg: dict[str, Any], reference: dict[str, Any]) -> None:
    """Refuse values of the right type but impossible, and numeric settings given as words.

    reference: the same method's config without the user's overrides (its types are the expected ones).
    """
    optim = cfg.get("optim", {})
    if not optim.get("lr", 1) > 0:
        raise ConfigError(f"optim.lr {optim.get('lr')!r}: expected a positive number")
    if optim.get("weight_decay", 0) < 0:
        raise ConfigError(f"optim.weight_decay {optim.get('weight_decay')!r}: expected ≥ 0")
    if not 0 <= optim.get("momentum", 0) < 1:
        raise ConfigError(f"optim.momentum {optim.get('momentum')!r}: expected 0 ≤ momentum < 1")
    _same_types(cfg.get("method", {}), reference.get("method", {}), "method")
    patch = (cfg.get("data") or {}).get("patch_size") or []
    if patch and min(patch) < MIN_PATCH:
        raise ConfigError(f"data.patch_size {list(patch)}: each side must be at least {MIN_PATCH} voxels "
                          "(the network downsamples 4 times)")


def _same_types(node: Any, ref: Any, where: str) -> None:
    if isinstance(ref, dict) and isinstance(node, dict):
        for k, v in node.items():
            if k in ref:
                _same_types(v, ref[k], f"{where}.{k}")
        return
    if isinstance(ref, bool) or ref is None:
        if isinstance(ref, bool) and not isinstance(node, bool):
            raise ConfigError(f"{where} {node!r}: expected true or false")
        return
    if isinstance(ref, (int, float)) and not (isinstance(node, (int, float)) and not isinstance(node, bool)):
        raise ConfigError(f"{where} {node!r}: expected {'an integer' if isinstance(ref, int) else 'a number'}")
