"""The method-specific flags of `textseg train` (`--no-csa`, `--unsup-loss`, `--vlcm`, ...) → config overrides.

Each method class declares the flags it accepts in `cli_flags` (config key → allowed values, None for any), so
which methods a flag applies to is read from the registered classes, not kept here. Text-guided methods say so
with `has_text` (the "+Text" add-on refuses them).
"""

from __future__ import annotations

import json
from typing import Any

from textseg_cli.errors import ConfigError
from textseg_cli.methods.registry import list_methods, method_class
from textseg_cli.methods.text_addon import parse_addon


def flag_methods(key: str) -> tuple[str, ...]:
    """The registered methods whose class accepts flag `key` (as in `--set method.KEY`), sorted by name."""
    return tuple(name for name, cls in list_methods().items() if key in cls.cli_flags)


def _choices(key: str, method: str | None, allowed: tuple[str, ...]) -> tuple[str, ...] | None:
    """The values `method` accepts for `key` (the first accepting method's when `method` does not accept it)."""
    owner = method if method in allowed else allowed[0]
    return list_methods()[owner].cli_flags.get(key)


def text_flag_sets(method: str | None, *, text_embeddings: str | None = None, text: str | None = None,
                   clip_pretrained: str | None = None, **flags: Any) -> list[str]:
    """`--set` items for the method-specific flags of `textseg train` (None = flag not given).

    flags: keys of the methods' `cli_flags`, e.g. tmr ("paper"|"official"|"off"), text_fusion, csa/dca/vwpm/vtcm
    (bool), unsup_loss, t1, t2, beta; tgcnet's ablations sse, clip_finetune, date, vlcm and its clip_weights.
    A flag given for a method it does not apply to is an error naming the methods it applies to.
    """
    sets: list[str] = []
    if text_embeddings is not None:
        sets.append(f"method.text.embeddings={text_embeddings}")
    if clip_pretrained is not None:
        sets.append(f"method.text.clip_pretrained={clip_pretrained}")
    if text is not None:
        cls = method_class(method)
        if cls is not None and cls.has_text:
            raise ConfigError(f"--text {text}: method '{method}' is already text-guided (use it on e.g. uamt, dtc)")
        parse_addon(text)
        sets.append(f"method.text_addon={text}")
    for key, value in flags.items():
        if value is None:
            continue
        flag = "--" + key.replace("_", "-")
        allowed = flag_methods(key)
        if not allowed:
            raise ConfigError(f"{flag}: no registered method accepts it")
        # --tmr also sets the "+Text" add-on's TMR (`--text tmr+csa --tmr official` on a V-Net method)
        if method is not None and method not in allowed and not (key == "tmr" and text is not None):
            raise ConfigError(f"{flag} applies to {', '.join(allowed)}, not to '{method}'")
        choices = _choices(key, method, allowed)
        if choices and str(value) not in choices:
            raise ConfigError(f"{flag} {value!r}: expected one of {', '.join(choices)}")
        if isinstance(value, bool):
            value = "true" if value else "false"
        elif key == "tmr" and value == "off":
            value = "false"
        elif isinstance(value, str):
            value = json.dumps(value)  # a YAML string: on/off/none/numbers must not become booleans, null or numbers
        sets.append(f"method.{key}={value}")
    return sets
