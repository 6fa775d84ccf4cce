"""Whether a run's CLIP had real weights: a random CLIP must be an explicit choice and visible in results.

TGC-Net (`method.clip_weights`), Text-SemiSeg's CoOp tower (`method.text.clip_pretrained`) and methods that
read a `textseg encode --encoder clip` file (its recorded `pretrained`) all say where their CLIP came from.
`none` means random weights: allowed only when asked for, recorded in the run's config.yaml, and every
evaluation of the run says "random CLIP" in meta.json and in its table rows.
"""

from __future__ import annotations

from typing import Any

from textseg_cli.errors import ConfigError, DataError
from textseg_cli.text.embeddings import read_meta

RANDOM_WORDS = ("none", "random")
RANDOM_LABEL = "random CLIP"


def is_random(value: Any) -> bool:
    return value is None or str(value).strip().lower() in RANDOM_WORDS + ("", "null")


def require_clip_weights(value: Any, method: str) -> str | None:
    """The CLIP weights to load (tag or path), or None when the user asked for a random CLIP (`none`).

    Unset is an error: training a CLIP-based method on random weights must be an explicit choice."""
    if value is None or str(value).strip() == "":
        raise ConfigError(f"{method} needs CLIP weights: pass --clip-weights TAG|PATH (e.g. openai, or a local "
                          "checkpoint), or --clip-weights none to train with a random CLIP on purpose")
    return None if is_random(value) else str(value)


def run_uses_random_clip(cfg: dict[str, Any]) -> bool:
    """From a run's resolved config: did any CLIP of this run have random weights?"""
    hp = cfg.get("method") or {}
    name = hp.get("name")
    if name == "tgcnet" and "clip_weights" in hp and is_random(hp.get("clip_weights")):
        return True
    text = hp.get("text") or {}
    if text.get("embeddings"):
        try:
            meta = read_meta(text["embeddings"])
        except (OSError, ValueError, DataError):  # a moved file: the run config alone cannot tell
            return False
        return meta.get("encoder") == "clip" and "pretrained" in meta and is_random(meta["pretrained"])
    if name == "text-semiseg" or hp.get("text_addon"):
        return "clip_pretrained" in text and is_random(text.get("clip_pretrained"))
    return False
