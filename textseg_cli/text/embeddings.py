"""The embedding file format written by `textseg encode` and read at training time.

`X.safetensors` holds the tensors: always `embeddings` (rows × D; CLIP class prompts: K × D with
background first, BERT descriptions: N × D), optionally `token_embeddings` (rows × L × D) and
`attention_mask` (rows × L). `X.json` (the sidecar) holds the metadata: format, encoder, model,
pretrained, dim, pooling, normalisation, the exact texts, template, LLM provenance, tool version and
tensor shapes. The same metadata is embedded in the safetensors header, so a file copied without its
sidecar still loads. Training needs only these files, no text model.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from textseg_cli.errors import DataError
from textseg_cli.storage.files import atomic_path, atomic_write_json

FORMAT = "textseg-embeddings/1"
META_KEY = "textseg_meta"


def sidecar_path(path: str | Path) -> Path:
    return Path(path).with_suffix(".json")


def tensor_path(path: str | Path) -> Path:
    path = Path(path)
    return path if path.suffix == ".safetensors" else path.with_suffix(".safetensors")


def save_embeddings(path: str | Path, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> Path:
    """Write the tensors and the sidecar atomically; `meta` gains format, tensor shapes and dtypes."""

    path = tensor_path(path)
    meta = dict(meta)
    meta["format"] = FORMAT
    meta["tensors"] = {k: {"shape": list(v.shape), "dtype": str(v.dtype).replace("torch.", "")}
                       for k, v in tensors.items()}
    meta["shape"] = list(tensors["embeddings"].shape)
    meta["dim"] = int(tensors["embeddings"].shape[-1])
    blob = json.dumps(meta, ensure_ascii=False, default=str)
    with atomic_path(path, suffix=".safetensors") as tmp:
        save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(tmp), metadata={META_KEY: blob})
    atomic_write_json(sidecar_path(path), json.loads(blob))
    return path


def read_meta(path: str | Path) -> dict[str, Any]:
    """The metadata of an embedding file: the sidecar, else the copy in the safetensors header."""

    tpath = tensor_path(path)
    side = sidecar_path(tpath)
    if side.is_file():
        try:
            return json.loads(side.read_text(encoding="utf-8"))
        except json.JSONDecodeError as exc:
            raise DataError(f"invalid JSON sidecar ({exc})", side) from exc
    if not tpath.is_file():
        raise DataError("embedding file not found; create it with `textseg encode`", tpath)
    with safe_open(str(tpath), framework="pt") as f:
        header = (f.metadata() or {}).get(META_KEY)
    if not header:
        raise DataError(f"no sidecar {side.name} and no textseg metadata in the file", tpath)
    return json.loads(header)


def load_embeddings(path: str | Path, name: str = "embeddings", *, encoder: str | None = None,
                    dim: int | None = None, rows: int | None = None) -> tuple[torch.Tensor, dict[str, Any]]:
    """Load one tensor (default `embeddings`) and the metadata of a `textseg encode` output.

    `path` may name the `.safetensors` file or its `.json` sidecar. Validates the format, that the
    stored shapes match the metadata and the number of texts, that values are finite, and optionally
    the encoder ("bert"/"clip"), embedding width `dim` and number of rows (classes or texts).
    """

    tpath = tensor_path(path)
    meta = read_meta(tpath)
    if meta.get("format") != FORMAT:
        raise DataError(f"not a textseg embedding file (format {meta.get('format')!r}, expected {FORMAT!r})", tpath)
    if not tpath.is_file():
        raise DataError("embedding tensors missing (the sidecar exists)", tpath)
    try:
        tensors = load_file(str(tpath))
    except (SafetensorError, OSError) as exc:
        raise DataError(f"unreadable safetensors file ({exc})", tpath) from exc
    if name not in tensors:
        raise DataError(f"no tensor '{name}' (have {sorted(tensors)})", tpath)
    for key, spec in meta.get("tensors", {}).items():
        if key not in tensors or list(tensors[key].shape) != list(spec["shape"]):
            got = list(tensors[key].shape) if key in tensors else "missing"
            raise DataError(f"tensor '{key}' has shape {got}, the sidecar says {spec['shape']}", tpath)
    emb = tensors["embeddings"]
    texts = meta.get("texts")
    if isinstance(texts, list) and len(texts) != emb.shape[0]:
        raise DataError(f"{emb.shape[0]} embedding rows but {len(texts)} texts in the sidecar", tpath)
    out = tensors[name]
    if out.is_floating_point() and not torch.isfinite(out).all():
        raise DataError(f"tensor '{name}' holds NaN or infinite values", tpath)
    if encoder is not None and meta.get("encoder") != encoder:
        raise DataError(f"encoder is {meta.get('encoder')!r}, expected {encoder!r} (re-run `textseg encode "
                        f"--encoder {encoder}`)", tpath)
    if dim is not None and int(emb.shape[-1]) != int(dim):
        raise DataError(f"embedding width is {emb.shape[-1]}, expected {dim}", tpath)
    if rows is not None and int(emb.shape[0]) != int(rows):
        raise DataError(f"{emb.shape[0]} embedding rows, expected {rows} (classes or texts)", tpath)
    return out, meta
