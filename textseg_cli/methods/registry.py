"""Method discovery and construction: every module of this package is imported once, and the classes that
`@register_method` marks are the methods `--method` accepts (no list to keep in step).

A method defined outside the package (a notebook, a plug-in module) registers the same way, as soon as its
module is imported; see the recipe in docs/architecture.md.
"""

from __future__ import annotations

import importlib
import pkgutil
import sys
from pathlib import Path
from typing import Any

import textseg_cli.methods as _package
from textseg_cli.errors import ConfigError
from textseg_cli.methods.base import Method
from textseg_cli.methods.text_addon import with_text_addon

METHODS: dict[str, type[Method]] = {}
_DISCOVERED = False


def register_method(name: str):
    """Class decorator: make `cls` available as `--method name` (sets `cls.name`)."""

    def deco(cls: type[Method]) -> type[Method]:
        other = METHODS.get(name)
        if other is not None and other.__qualname__ != cls.__qualname__:
            raise ConfigError(f"method name '{name}' is taken by {other.__module__}.{other.__qualname__}")
        cls.name = name
        METHODS[name] = cls
        return cls

    return deco


def discover_methods() -> None:
    """Import every module of `textseg_cli.methods` (once), so their `@register_method` classes register."""
    global _DISCOVERED
    if _DISCOVERED:
        return
    for info in pkgutil.iter_modules(_package.__path__, _package.__name__ + "."):
        importlib.import_module(info.name)
    _DISCOVERED = True


def list_methods() -> dict[str, type[Method]]:
    """Registered methods by name, sorted."""
    discover_methods()
    return dict(sorted(METHODS.items()))


def method_class(name: str | None) -> type[Method] | None:
    """The registered class of method `name`, None when no method has that name."""
    return list_methods().get(str(name or "")) if name else None


def display_name(name: str) -> str:
    """A method's name in tables (its class's `display_name`, else the registered name)."""
    cls = method_class(name)
    return (cls.display_name if cls is not None else "") or name


def protocol_lcc(name: str | None) -> str:
    """The official line that makes LCC part of method `name`'s evaluation, "" when it has none."""
    cls = method_class(name)
    return cls.protocol_lcc if cls is not None else ""


def method_config_path(name: str) -> Path | None:
    """The YAML file a method keeps beside its module (its class's `config_path`), None for the packaged configs.

    A relative `config_path` is taken from the directory of the module that defines the class."""
    cls = method_class(name)
    if cls is None or not cls.config_path:
        return None
    path = Path(cls.config_path).expanduser()
    if not path.is_absolute():
        module_file = getattr(sys.modules.get(cls.__module__), "__file__", None)
        path = (Path(module_file).resolve().parent if module_file else Path.cwd()) / path
    return path


def build_method(name: str, cfg: dict[str, Any], in_channels: int, num_classes: int, dim: int = 3,
                 **context: Any) -> Method:
    methods = list_methods()
    if name not in methods:
        raise ConfigError(f"unknown method '{name}'; available: {', '.join(methods)}")
    method = methods[name](cfg, in_channels, num_classes, dim=dim, **context)
    addon = (cfg.get("method") or {}).get("text_addon") if isinstance(cfg, dict) else None
    if addon:  # "+Text" (`textseg train --text tmr+csa`): TMR/CSA around a V-Net method
        method = with_text_addon(method, addon)
    return method
