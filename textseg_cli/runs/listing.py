"""Parameter listing behind `textseg models`: every registered backbone and method, built on the fly."""

from __future__ import annotations

import logging
import shutil
import tempfile
from pathlib import Path
from typing import Any, Sequence

import torch

from textseg_cli.errors import ConfigError
from textseg_cli.methods.registry import list_methods
from textseg_cli.models.registry import (
    MODEL_DOCS,
    MODELS,
    _import_all,
    build_model,
    count_parameters,
)
from textseg_cli.runs.config import build_config
from textseg_cli.text.embeddings import save_embeddings

# Widths of the placeholder text embeddings used only to count parameters (CLIP ViT-B/32, BERT-base).
_LISTING_TEXT = {"clip": (None, 512), "bert": (15, 768)}


def _parts(module) -> dict[str, int]:
    """Parameter counts of the module's direct children (encoder/decoder, student/teacher, ...)."""
    out = {}
    for name, child in module.named_children():
        n = count_parameters(child)
        if n:
            out[name] = n
    return out


def _flatten_parts(method) -> dict[str, int]:
    """A method's networks, one level down when a method wraps a single network (e.g. net.encoder)."""
    nets = {n: m for n, m in method.networks().items() if sum(p.numel() for p in m.parameters())}
    if len(nets) == 1:
        (name, net), = nets.items()
        inner = _parts(net)
        return {f"{name}.{k}": v for k, v in inner.items()} if inner else {name: sum(p.numel() for p in net.parameters())}
    return {n: sum(p.numel() for p in m.parameters()) for n, m in nets.items()}


DEFAULT_PATCH = {3: [112, 112, 80], 2: [224, 224]}


def list_models(in_channels: int = 1, num_classes: int = 2,
                patch_size: str | Sequence[int] | None = None) -> dict[str, Any]:
    """Build every registered model and method with default settings and count parameters.

    Returns {"dim", "patch_size", "models": [...], "methods": [...]}, each row {name, description, total,
    trainable, parts} or {name, error} when it cannot be built here (e.g. it needs text embeddings).
    """
    if isinstance(patch_size, str):
        try:
            patch_size = [int(v) for v in patch_size.replace("x", ",").split(",") if v.strip()]
        except ValueError:
            raise ConfigError(f"--patch {patch_size!r}: expected sizes such as 112,112,80") from None
    dim = len(patch_size) if patch_size else 3
    if dim not in (2, 3):
        raise ConfigError(f"--patch {patch_size}: expected 2 or 3 sizes")
    patch_size = list(patch_size) if patch_size else DEFAULT_PATCH[dim]
    _import_all()
    models = []
    for name in sorted(MODELS):
        try:
            kw = {"dim": dim} if dim != 3 else {}
            m = _build_for_counting(lambda: build_model(name, in_channels, num_classes, **kw))
            models.append({"name": name, "description": MODEL_DOCS.get(name, ""), "total": count_parameters(m),
                           "trainable": count_parameters(m, trainable_only=True), "parts": _parts(m)})
        except Exception as exc:  # a model that needs extra arguments is still listed
            models.append({"name": name, "error": f"{type(exc).__name__}: {exc}"})
    methods = []
    tmp = Path(tempfile.mkdtemp(prefix="textseg-models-"))
    for name, cls in list_methods().items():
        try:
            m_dim = dim if dim in cls.dims else cls.dims[0]  # e.g. tgcnet, 2D only, in a 3D listing
            m_patch = patch_size if m_dim == dim else DEFAULT_PATCH[m_dim]
            cfg = build_config(name, None, m_dim, m_patch)
            _listing_text(cfg, cls, num_classes, tmp)
            # a 2D-only method in a 3D listing is counted as published (LViT's U-Net: RGB input)
            ch = getattr(cls, "listing_in_channels", in_channels) if m_dim != dim else in_channels
            meth = _build_for_counting(lambda: cls(
                cfg, ch, num_classes, dim=m_dim, class_names=[f"class{i}" for i in range(num_classes)],
                dataset_name=None, data_root=None, patch_size=cfg["data"]["patch_size"], quiet_warnings=True))
            methods.append({"name": name, "dim": m_dim, "in_channels": ch, "description": cls.paper, "total": count_parameters(meth),
                            "trainable": count_parameters(meth, trainable_only=True), "parts": _flatten_parts(meth)})
        except Exception as exc:
            methods.append({"name": name, "error": f"{type(exc).__name__}: {exc}"})

    shutil.rmtree(tmp, ignore_errors=True)
    return {"dim": dim, "patch_size": patch_size, "models": models, "methods": methods}


def _build_for_counting(build):
    """Build on the meta device (shapes, so parameter counts, without allocating or initialising weights);
    modules that move tensors between devices while building are built normally."""

    # open_clip logs "No pretrained weights loaded ... initialized randomly" for every random CLIP it builds: here
    # random weights are the point (only shapes count), so the warning would only alarm the reader
    previous = logging.root.manager.disable
    logging.disable(logging.WARNING)
    try:
        with torch.device("meta"):
            return build()
    except Exception:  # e.g. a frozen tower copied between devices: build for real; its errors are reported
        return build()
    finally:
        logging.disable(previous)


def _listing_text(cfg: dict[str, Any], cls, num_classes: int, tmp: Path) -> None:
    """Counts do not depend on text values: give text methods random-weight CLIP and placeholder embeddings."""


    text = cfg.get("method", {}).get("text")
    if not isinstance(text, dict):
        return
    if "clip_pretrained" in text:
        text["clip_pretrained"] = "none"
    encoder = getattr(cls, "embedding_encoder", None)
    if encoder in _LISTING_TEXT and not text.get("embeddings"):
        rows, width = _LISTING_TEXT[encoder]
        rows = rows or num_classes
        path = tmp / f"{encoder}_{rows}x{width}.safetensors"
        if not path.exists():
            save_embeddings(path, {"embeddings": torch.zeros(rows, width)},
                            {"encoder": encoder, "texts": [f"placeholder {i}" for i in range(rows)],
                             "note": "placeholder for `textseg models` parameter counts"})
        text["embeddings"] = str(path)
