"""Text encoders: BERT-family models through `transformers` and CLIP text towers through `open_clip`.

Both load from a local path or a hub name and fail with a one-line `ConfigError` naming what was
missing. Nothing here downloads unless the name is a hub id and the hub is reachable; with
`HF_HUB_OFFLINE=1` only local folders and the local hub cache are used.
"""

from __future__ import annotations

import contextlib
import difflib
import logging
import os
import pickle
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from textseg_cli.errors import ConfigError
from textseg_cli.runtime.device import resolve_device

DEFAULT_BERT = "bert-base-uncased"
DEFAULT_CLIP = "ViT-B-32"
DEFAULT_CLIP_PRETRAINED = "openai"
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


def _is_path_like(name: str) -> bool:
    """A local path (existing, or spelled like one) rather than a hub id such as `org/model`."""
    return os.path.exists(os.path.expanduser(name)) or name.startswith((".", "/", "~")) or not _HUB_ID.match(name)


@contextlib.contextmanager
def _quiet_logging(enabled: bool = True, level: int = logging.ERROR):
    root = logging.getLogger()
    old = root.level
    if enabled:
        root.setLevel(level)
    try:
        yield
    finally:
        root.setLevel(old)


@contextlib.contextmanager
def _quiet_transformers():
    """No weight-loading progress bars on the console (our own output says what was loaded)."""
    from transformers.utils import logging as hf_logging  # lazy: heavy (transformers)

    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()


# --- BERT ---------------------------------------------------------------------------------------

class BertTextEncoder:
    """Sentence (CLS or masked-mean) and optional token embeddings from a BERT-family model."""

    def __init__(self, model: str = DEFAULT_BERT, device: str | torch.device | None = None,
                 batch_size: int = 16, max_length: int | None = None):
        from transformers import AutoModel, AutoTokenizer  # lazy: heavy (transformers)

        self.device = resolve_device(device)
        self.batch_size = max(1, int(batch_size))
        if _is_path_like(model):
            path = Path(model).expanduser()
            if not path.is_dir():
                raise ConfigError("BERT model folder not found", path)
            if not (path / "config.json").is_file():
                raise ConfigError("not a transformers model folder (no config.json)", path)
            self.source, self.model_id, load_from, local_only = "local", str(path.resolve()), str(path), True
        else:
            self.source, self.model_id, load_from = "hub", model, model
            local_only = os.environ.get("HF_HUB_OFFLINE", "0") not in ("", "0", "false", "False")
        try:
            with _quiet_transformers():
                self.tokenizer = AutoTokenizer.from_pretrained(load_from, local_files_only=local_only)
                self.model = AutoModel.from_pretrained(load_from, local_files_only=local_only)
        except (OSError, ValueError, KeyError) as exc:
            detail = " ".join(str(exc).split())[:300]
            where = ("a local folder" if self.source == "local" else
                     "the Hugging Face hub cache (offline)" if local_only else "the Hugging Face hub")
            raise ConfigError(f"cannot load BERT model '{model}' from {where}: {detail}",
                              hint="pass --model with a local model folder, or a valid hub name") from None
        self.model.eval().to(self.device)
        self.dim = int(getattr(self.model.config, "hidden_size", 0)) or None
        limit = getattr(self.tokenizer, "model_max_length", 512)
        self.max_length = int(max_length or (limit if isinstance(limit, int) and limit < 100_000 else 512))

    @torch.inference_mode()
    def encode(self, texts: list[str], pooling: str = "cls", tokens: bool = False,
               normalize: bool = False) -> dict[str, torch.Tensor]:
        """{"embeddings": (N, D)} plus, with tokens, "token_embeddings" (N, L, D) and "attention_mask" (N, L)."""
        if pooling not in ("cls", "mean"):
            raise ConfigError(f"--pooling must be 'cls' or 'mean', got {pooling!r}")
        pooled, token_rows, masks = [], [], []
        for i in range(0, len(texts), self.batch_size):
            batch = self.tokenizer(texts[i:i + self.batch_size], padding=True, truncation=True,
                                   max_length=self.max_length, return_tensors="pt").to(self.device)
            hidden = self.model(**batch).last_hidden_state.float()  # (B, L, D)
            mask = batch["attention_mask"]
            if pooling == "cls":
                vec = hidden[:, 0]
            else:
                m = mask.unsqueeze(-1).to(hidden.dtype)
                vec = (hidden * m).sum(1) / m.sum(1).clamp_min(1.0)
            pooled.append(F.normalize(vec, dim=-1) if normalize else vec)
            if tokens:
                token_rows.extend(hidden.cpu())
                masks.extend(mask.cpu())
        out = {"embeddings": torch.cat(pooled).cpu().contiguous()}
        if tokens:
            length = max(t.shape[0] for t in token_rows)
            out["token_embeddings"] = torch.stack([F.pad(t, (0, 0, 0, length - t.shape[0])) for t in token_rows])
            out["attention_mask"] = torch.stack([F.pad(m, (0, length - m.shape[0])) for m in masks]).to(torch.int64)
        return out

    def info(self) -> dict[str, Any]:
        return {"model": self.model_id, "model_source": self.source,
                "architecture": type(self.model).__name__, "max_length": self.max_length}


# --- CLIP ---------------------------------------------------------------------------------------

@dataclass
class ClipLoadInfo:
    model: str
    pretrained: str | None  # tag, resolved file path, or None for random weights
    pretrained_kind: str  # "tag" | "file" | "none"
    quick_gelu: bool = False  # the text tower's activation is QuickGELU (OpenAI's CLIP), not nn.GELU


def tag_needs_quick_gelu(model: str, pretrained: str | None) -> bool:
    """Whether open_clip tag `pretrained` was trained with QuickGELU while `model`'s config says GELU.

    open_clip 3 builds `ViT-B-32` with nn.GELU even for the `openai` tag (it only warns "QuickGELU mismatch"),
    which is not the network OpenAI's `clip.load('ViT-B/32')` runs; the official scripts use the latter."""
    import open_clip  # lazy: heavy (open_clip and its timm)

    if pretrained is None or str(pretrained).strip().lower() in ("", "none", "random"):
        return False
    tag_cfg = open_clip.get_pretrained_cfg(model, str(pretrained)) or {}
    model_cfg = open_clip.get_model_config(model) or {}
    return bool(tag_cfg.get("quick_gelu", False)) and not bool(model_cfg.get("quick_gelu", False))


def load_open_clip(model: str = DEFAULT_CLIP, pretrained: str | None = DEFAULT_CLIP_PRETRAINED,
                   device: str | torch.device | None = "cpu"):
    """(clip model in eval mode and fp32, tokenizer, ClipLoadInfo); `pretrained` is a tag, a file or None/'none'."""
    import open_clip  # lazy: heavy (open_clip and its timm)

    known = open_clip.list_models()
    if model not in known:
        close = difflib.get_close_matches(model, known, n=4)
        raise ConfigError(f"unknown open_clip model '{model}'",
                          hint=f"did you mean {', '.join(close)}?" if close else "see open_clip.list_models()")
    kind, resolved = "none", None
    if pretrained is not None and str(pretrained).strip().lower() not in ("", "none", "random"):
        p = str(pretrained)
        tags = open_clip.list_pretrained_tags_by_model(model)
        if p in tags:
            kind, resolved = "tag", p
        elif _is_path_like(p) or os.path.splitext(p)[1] in (".pt", ".pth", ".bin", ".safetensors"):
            path = Path(p).expanduser()
            if not path.is_file():
                raise ConfigError("CLIP checkpoint file not found", path)
            kind, resolved = "file", str(path.resolve())
        else:
            raise ConfigError(f"unknown pretrained tag '{p}' for {model}",
                              hint=f"known tags: {', '.join(tags) or 'none'}; or pass a checkpoint file or 'none'")
    dev = resolve_device(device)
    quick_gelu = kind == "tag" and tag_needs_quick_gelu(model, resolved)  # the weights' own activation
    try:
        with _quiet_logging(level=logging.CRITICAL):  # its warnings/errors repeat what we report ourselves
            clip = open_clip.create_model(model, pretrained=resolved, precision="fp32", device=dev,
                                          force_quick_gelu=quick_gelu)
    except pickle.UnpicklingError:  # torch.load(weights_only=True) refused a pickle that runs code
        raise ConfigError("not a plain weights file: it holds pickled Python objects (which could run code), so it "
                          "cannot be loaded safely; pass a state_dict saved with torch.save or a .safetensors file",
                          resolved) from None
    except (RuntimeError, OSError, ValueError, KeyError) as exc:
        if "weights_only" in str(exc):  # never relay torch's advice to load with weights_only=False
            raise ConfigError("not a plain weights file: it cannot be loaded safely; pass a state_dict saved with "
                              "torch.save or a .safetensors file", resolved) from None
        detail = " ".join(str(exc).split())[:300]
        if kind == "tag":
            raise ConfigError(f"cannot load pretrained weights '{resolved}' for {model}: {detail}",
                              hint="offline? download the checkpoint once and pass --pretrained PATH") from None
        raise ConfigError(f"cannot load CLIP model {model} from {resolved or 'random init'}: {detail}") from None
    clip.eval()
    tokenizer = open_clip.get_tokenizer(model)
    return clip, tokenizer, ClipLoadInfo(model, resolved, kind, quick_gelu)


class ClipTextTower:
    """The text half of an open_clip CLIP model (token embedding → transformer → projection).

    Shared by `ClipTextEncoder` (fixed prompts) and `coop.CoOpTextEncoder` (learned context
    vectors fed in as embeddings). Only the standard CLIP text tower layout is supported.
    """

    def __init__(self, clip: torch.nn.Module):
        needed = ("token_embedding", "positional_embedding", "transformer", "ln_final", "text_projection")
        if not all(hasattr(clip, a) for a in needed):
            raise ConfigError(f"{type(clip).__name__} has no standard CLIP text tower (custom text towers "
                              "such as HF text encoders are not supported here)")
        self.token_embedding = clip.token_embedding
        self.positional_embedding = clip.positional_embedding
        self.transformer = clip.transformer
        self.ln_final = clip.ln_final
        self.text_projection = clip.text_projection
        self.attn_mask = getattr(clip, "attn_mask", None)
        self.pool_type = getattr(clip, "text_pool_type", "argmax")
        self.eos_id = getattr(clip, "text_eos_id", None)

    def modules(self) -> list[torch.nn.Module]:
        return [m for m in (self.token_embedding, self.transformer, self.ln_final) if isinstance(m, torch.nn.Module)] + \
            ([self.text_projection] if isinstance(self.text_projection, torch.nn.Module) else [])

    def tensors(self) -> list[torch.Tensor]:
        out = [self.positional_embedding]
        if isinstance(self.text_projection, torch.Tensor):
            out.append(self.text_projection)
        return out

    @property
    def width(self) -> int:
        return int(self.token_embedding.weight.shape[1])

    @property
    def embed_dim(self) -> int:
        proj = self.text_projection
        return int(proj.out_features if isinstance(proj, torch.nn.Linear) else proj.shape[1])

    def embed(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.token_embedding(tokens)

    def project(self, x: torch.Tensor) -> torch.Tensor:
        proj = self.text_projection
        return proj(x) if isinstance(proj, torch.nn.Linear) else x @ proj

    def forward_embeddings(self, x: torch.Tensor, tokens: torch.Tensor,
                           return_tokens: bool = False) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Run token embeddings `x` (B, L, W) through the tower; pool at the EOT position of `tokens`."""
        from open_clip.transformer import text_global_pool  # lazy: heavy (open_clip and its timm)

        pos, mask = self.positional_embedding, self.attn_mask
        if not return_tokens and isinstance(mask, torch.Tensor) and self.pool_type in ("argmax", "eos"):
            # Causal attention: nothing after the last end-of-text token can change the pooled
            # feature, so drop the padding (77 → ~10 positions; same result, several times faster).
            if self.pool_type == "argmax":
                end = int(tokens.argmax(dim=-1).max()) + 1
            else:
                end = int((tokens == self.eos_id).int().argmax(dim=-1).max()) + 1
            x, tokens, pos, mask = x[:, :end], tokens[:, :end], pos[:end], mask[:end, :end]
        x = x + pos.to(x.dtype)
        mask = mask.to(x.device) if isinstance(mask, torch.Tensor) else mask
        x = self.transformer(x, attn_mask=mask)
        x = self.ln_final(x)
        pooled = text_global_pool(x, tokens, self.pool_type, eos_token_id=self.eos_id)
        pooled = self.project(pooled)
        if return_tokens:
            return pooled, self.project(x)
        return pooled


class ClipTextEncoder:
    """CLIP text embeddings of fixed prompts, e.g. "A pixel of a pancreas." per class → (K, D)."""

    def __init__(self, model: str = DEFAULT_CLIP, pretrained: str | None = DEFAULT_CLIP_PRETRAINED,
                 device: str | torch.device | None = None):
        self.device = resolve_device(device)
        self.clip, self.tokenizer, self.load_info = load_open_clip(model, pretrained, self.device)
        self.tower = ClipTextTower(self.clip)
        self.dim = self.tower.embed_dim

    @torch.inference_mode()
    def encode(self, texts: list[str], tokens: bool = False, normalize: bool = True) -> dict[str, torch.Tensor]:
        """{"embeddings": (K, D)} plus, with tokens, projected per-token features (K, L, D) and the mask."""
        ids = self.tokenizer(texts).to(self.device)
        result = self.tower.forward_embeddings(self.tower.embed(ids), ids, return_tokens=tokens)
        pooled, per_token = result if tokens else (result, None)
        pooled = pooled.float()
        out = {"embeddings": (F.normalize(pooled, dim=-1) if normalize else pooled).cpu().contiguous()}
        if tokens:
            out["token_embeddings"] = per_token.float().cpu().contiguous()
            eot = ids.argmax(dim=-1)  # tokens after the end-of-text token are padding
            positions = torch.arange(ids.shape[1], device=ids.device)
            out["attention_mask"] = (positions[None, :] <= eot[:, None]).to(torch.int64).cpu()
        return out

    def info(self) -> dict[str, Any]:
        return {"model": self.load_info.model, "pretrained": self.load_info.pretrained,
                "pretrained_kind": self.load_info.pretrained_kind, "quick_gelu": self.load_info.quick_gelu,
                "context_length": int(self.tower.positional_embedding.shape[0])}
