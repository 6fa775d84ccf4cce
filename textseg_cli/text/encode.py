"""`textseg encode`: turn class prompts (CLIP) or task descriptions (BERT) into an embedding file.

* ``encoder="clip"``: one prompt per class from the data set's CLIP template
  ("A pixel of a {class}.", background included) → ``embeddings`` (K, D), raw ``encode_text`` rows by default
  (what VCLIPSeg's official clip_embedding_LA.py saves and its VWPM's Linear expects; ~9× the norm of unit rows);
  ``normalize=True`` (``--normalize``) writes unit rows. The sidecar's ``normalized`` records which.
* ``encoder="bert"``: the descriptions (a `describe` JSON, a text file with one per line, or the
  prompt file's bundled set) → ``embeddings`` (N, D) with CLS or masked-mean pooling; optionally
  ``token_embeddings`` (N, L, D) and ``attention_mask`` (N, L).

Without ``out`` the file goes to ``text_embeddings/<dataset>_<encoder>_<key>.safetensors`` where
``key`` hashes the encoder, model, weights, options and texts: an existing file with that name is
reused instead of recomputed. An explicit ``out`` that exists needs ``force``.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from textseg_cli import __version__
from textseg_cli.data.prepared import load_prepared
from textseg_cli.errors import ConfigError, OutputExistsError
from textseg_cli.storage.outputs import check_out_path
from textseg_cli.text.describe import load_descriptions
from textseg_cli.text.embeddings import (
    load_embeddings,
    save_embeddings,
    sidecar_path,
    tensor_path,
)
from textseg_cli.text.encoders import (
    DEFAULT_BERT,
    DEFAULT_CLIP,
    DEFAULT_CLIP_PRETRAINED,
    BertTextEncoder,
    ClipTextEncoder,
    tag_needs_quick_gelu,
)
from textseg_cli.text.prompts import GENERIC, list_datasets, load_prompts

ENCODERS = ("bert", "clip")
RANDOM_CLIP_SEED = 0  # `--pretrained none`: the random CLIP is built from this seed (recorded in the sidecar)
DEFAULT_OUT_DIR = Path("text_embeddings")


@dataclass
class EncodeResult:
    path: Path
    meta: dict[str, Any]
    reused: bool  # an identical default-named file existed and was kept


def _file_sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def encode(encoder: str = "clip", dataset: str | None = None, *, model: str | None = None,
           pretrained: str | None = None, descriptions: str | Path | None = None, texts: list[str] | None = None,
           class_names: list[str] | None = None, data: str | Path | None = None, template: str | None = None,
           pooling: str = "cls", tokens: bool = False, normalize: bool | None = None,
           out: str | Path | None = None, force: bool = False, device: str | None = None, batch_size: int = 16,
           prompts_dir: str | Path | None = None) -> EncodeResult:
    """Encode texts of `dataset` with a BERT or CLIP text encoder and write `.safetensors` + `.json`.

    dataset: prompt file name or path; default: the `data` folder's name when a prompt file of that
    name exists, else `generic` with `data`, else `synthetic`.
    model: BERT hub name or local folder (default bert-base-uncased); open_clip architecture for
    CLIP (default ViT-B-32). pretrained (CLIP only): open_clip tag (default "openai"), a checkpoint
    file, or "none" for random weights. class_names / data (a prepared folder whose dataset.json
    class names are used) override the prompt file's classes for CLIP. texts overrides everything
    (Python API). normalize: L2-normalise the rows; default False for both encoders (raw CLIP `encode_text`
    rows, as VCLIPSeg's official embedding script saves them; consumers that want unit rows normalise on load).
    """
    encoder = encoder.lower()
    if encoder not in ENCODERS:
        raise ConfigError(f"--encoder must be one of {ENCODERS}, got {encoder!r}")
    if pooling not in ("cls", "mean"):
        raise ConfigError(f"--pooling must be 'cls' or 'mean', got {pooling!r}")
    if pretrained is not None and encoder == "bert":
        raise ConfigError("--pretrained applies to --encoder clip only (BERT weights come with --model)")
    data_name = None
    typed_names = class_names is not None  # --classes: used exactly as typed (VCLIPSeg's "Background,Left Atrial")
    if data is not None:
        prepared = load_prepared(data, check_files=False)
        data_name = prepared.name
        if class_names is None:
            class_names = prepared.class_names
    if dataset is None:  # the prepared folder's own prompt file when there is one, else generic
        dataset = data_name if data_name in list_datasets(prompts_dir) else (GENERIC if data_name else "synthetic")
    ps = load_prompts(dataset, prompts_dir)
    normalize = False if normalize is None else bool(normalize)
    provenance: dict[str, Any] = {}
    if encoder == "clip":
        model = model or DEFAULT_CLIP
        pretrained = DEFAULT_CLIP_PRETRAINED if pretrained is None else pretrained
        template = template or ps.clip_templates[0]
        names = list(class_names) if class_names is not None else ps.class_names
        # names from dataset.json or a prompt file are often identifiers ("left_atrium"): a prompt reads words
        spoken = names if typed_names else [n.replace("_", " ") for n in names]
        texts = list(texts) if texts is not None else ps.class_prompts(template, spoken)
        source = {"kind": "class_prompts", "class_names": names, "prompt_template": template}
    else:
        model = model or DEFAULT_BERT
        if texts is not None:
            texts, source = list(texts), {"kind": "given"}
        elif descriptions is not None:
            dpath = Path(descriptions)
            texts, provenance = load_descriptions(dpath)
            source = {"kind": "descriptions_file", "path": str(dpath.resolve()), "sha256": _file_sha256(dpath)}
        else:
            texts = list(ps.descriptions)
            source = {"kind": "bundled_descriptions", "path": str(ps.path), "sha256": ps.sha256}
        source["prompt_template"] = provenance.get("prompt") or ps.llm_messages(15, 60)
    if not texts or any(not isinstance(t, str) or not t.strip() for t in texts):
        raise ConfigError("no texts to encode (empty list or empty text)",
                          hint="check --descriptions, the prompt file's descriptions or class names")

    settings = {"encoder": encoder, "model": model, "pretrained": pretrained if encoder == "clip" else None,
                "pooling": pooling if encoder == "bert" else "eot", "tokens": bool(tokens), "normalized": normalize,
                "texts": texts}
    if encoder == "clip":  # part of the cache key: files written before the QuickGELU fix are not reused
        settings["quick_gelu"] = tag_needs_quick_gelu(model, pretrained)
    key = hashlib.sha256(json.dumps({**settings, "model": _model_identity(model)}, sort_keys=True,
                                    ensure_ascii=False).encode()).hexdigest()[:12]
    if out is None:
        path = tensor_path(DEFAULT_OUT_DIR / f"{ps.name}_{encoder}_{key}.safetensors")
        if path.exists() and not force:
            try:
                _, meta = load_embeddings(path)
                if meta.get("key") == key:
                    return EncodeResult(path, meta, reused=True)
            except Exception:  # noqa: BLE001 - a broken cache file is simply recomputed
                pass
    else:
        if Path(out).is_dir():  # 'DIR' would become DIR.safetensors beside it, outside the folder named
            raise ConfigError(f"--out {out} is a folder; give the file to write, e.g. {Path(out) / 'embeddings.safetensors'}")
        path = tensor_path(check_out_path(out))
        for p in (path, sidecar_path(path)):
            if p.exists() and not force:
                raise OutputExistsError(p)

    if encoder == "clip":


        random_init = str(pretrained).strip().lower() in ("", "none", "random")
        # random weights from a fixed seed: the same texts give the same embeddings on every run
        with torch.random.fork_rng(devices=[]):
            if random_init:
                torch.manual_seed(RANDOM_CLIP_SEED)
            enc = ClipTextEncoder(model, pretrained, device)
        tensors = enc.encode(texts, tokens=tokens, normalize=normalize)
        if random_init:
            settings["random_init_seed"] = RANDOM_CLIP_SEED
    else:
        enc = BertTextEncoder(model, device, batch_size=batch_size)
        tensors = enc.encode(texts, pooling=pooling, tokens=tokens, normalize=normalize)
    meta = {**settings, **enc.info(), "dataset": ps.name, "prompt_file": str(ps.path), "source": source,
            "llm_provenance": provenance or None, "key": key, "device": str(enc.device),
            "tool_version": __version__, "versions": _versions(encoder),
            "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")}
    if encoder == "clip":
        meta["class_names"] = source["class_names"]
    save_embeddings(path, tensors, meta)
    _, meta = load_embeddings(path)  # validate what was written
    return EncodeResult(path, meta, reused=False)


def _model_identity(model: str) -> str:
    """Local models are identified by their resolved path (so a moved folder is a different model)."""
    p = Path(model).expanduser()
    return str(p.resolve()) if p.exists() else model


def _versions(encoder: str) -> dict[str, str]:

    out = {"torch": torch.__version__}
    try:
        if encoder == "clip":
            import open_clip  # lazy: heavy (open_clip and its timm)

            out["open_clip"] = open_clip.__version__
        else:
            import transformers  # lazy: heavy (transformers)

            out["transformers"] = transformers.__version__
    except ImportError:  # pragma: no cover - both are dependencies
        pass
    return out
