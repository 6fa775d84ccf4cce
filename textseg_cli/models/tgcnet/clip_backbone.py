"""Frozen CLIP through open_clip: dense patch tokens and per-token text features in the joint space.

Image branch: all patch tokens of the last layer, `ln_post` and the visual projection applied to each
(the same map CLIP applies to its class token), as a (B, D, g, g) grid. Text branch: every token of the
last layer after `ln_final` and the text projection, (B, L, D), with a validity mask (tokens up to and
including the end-of-text token). Text is tokenized to `text_len` tokens; because CLIP's text
transformer is causal, the first L outputs of a length-L run equal those of the full 77-token run.

Fine-tuning (`finetune`): "none" freezes everything (features can then be cached); "qv" adds
zero-initialised trainable deltas to the query and value rows of every attention in both towers
(CAT-Seg's choice), leaving keys, MLPs and norms frozen; "full" trains all of CLIP.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.utils import parametrize

from textseg_cli.errors import ConfigError

OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)
FINETUNE_MODES = ("none", "qv", "full")

# A small CLIP for CPU tests and quick runs (random weights): 32×32 input, 8×8 patches → 4×4 grid.
TINY_CLIP = {"embed_dim": 64,
             "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "head_width": 32, "patch_size": 8},
             "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2}}


class _QVDelta(nn.Module):
    """Parametrization W + [ΔQ; 0; ΔV] of a packed in_proj_weight (rows q, k, v)."""

    def __init__(self, dim: int):
        super().__init__()
        self.dq = nn.Parameter(torch.zeros(dim, dim))
        self.dv = nn.Parameter(torch.zeros(dim, dim))

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        return w + torch.cat([self.dq, torch.zeros_like(self.dq), self.dv], 0).to(w.dtype)


def build_open_clip(model: str | dict[str, Any], pretrained: str | None = None) -> nn.Module:
    """An open_clip CLIP by name (weights: an open_clip tag or a checkpoint path) or from a config dict."""
    import open_clip  # lazy: heavy (open_clip and its timm)

    if isinstance(model, dict):
        clip = open_clip.model.CLIP(**model)
        if pretrained:  # a custom config takes a local checkpoint only (tags name hub models)
            try:
                open_clip.load_checkpoint(clip, str(pretrained))
            except Exception as exc:
                raise ConfigError(f"could not load CLIP weights ({type(exc).__name__}: {exc})", pretrained) from exc
        return clip
    if model not in open_clip.list_models():
        raise ConfigError(f"unknown CLIP model '{model}' (open_clip knows e.g. ViT-L-14-336, ViT-B-16)")
    try:
        # device: the current default device, so that a build under `with torch.device("meta")` (`textseg models`
        # counting parameters) stays on meta instead of open_clip moving it to the CPU, which meta tensors refuse
        return open_clip.create_model(model, pretrained=pretrained, pretrained_text=False,
                                      device=torch.get_default_device())
    except Exception as exc:  # missing tag / unreadable file: say which
        raise ConfigError(f"could not load CLIP weights '{pretrained}' for {model} ({type(exc).__name__}: {exc}); "
                          "pass --clip-weights PATH to a local checkpoint") from exc


class CLIPFeatures(nn.Module):
    def __init__(self, model: str | dict[str, Any] = "ViT-L-14-336", pretrained: str | None = None,
                 finetune: str = "none", text_len: int = 32):
        super().__init__()
        if finetune not in FINETUNE_MODES:
            raise ConfigError(f"clip_finetune '{finetune}': expected one of {', '.join(FINETUNE_MODES)}")
        self.clip = build_open_clip(model, pretrained)
        self.model_key = f"{model if isinstance(model, str) else 'custom:' + repr(sorted(model.items()))}|{pretrained}"
        self.finetune = finetune
        self.text_len = int(text_len)
        visual = self.clip.visual
        self.image_size = int(visual.image_size[0] if isinstance(visual.image_size, (tuple, list)) else visual.image_size)
        patch = visual.patch_size[0] if isinstance(visual.patch_size, (tuple, list)) else visual.patch_size
        self.grid = self.image_size // int(patch)
        self.embed_dim = int(visual.proj.shape[1])
        self.register_buffer("mean", torch.tensor(OPENAI_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(OPENAI_STD).view(1, 3, 1, 1), persistent=False)
        for p in self.clip.parameters():
            p.requires_grad = finetune == "full"
        for name in ("logit_scale", "logit_bias"):  # contrastive-loss scalars: no feature uses them
            if isinstance(getattr(self.clip, name, None), nn.Parameter):
                getattr(self.clip, name).requires_grad = False
        if finetune == "qv":
            for m in self.clip.modules():
                if isinstance(m, nn.MultiheadAttention) and m.in_proj_weight is not None:
                    parametrize.register_parametrization(m, "in_proj_weight", _QVDelta(m.embed_dim))
        if finetune == "none":
            self.clip.eval()

    @property
    def frozen(self) -> bool:
        return self.finetune == "none"

    def train(self, mode: bool = True):
        super().train(mode)
        if self.frozen:
            self.clip.eval()  # a frozen tower stays in eval mode (no dropout, fixed features)
        return self

    def encode_image(self, image: torch.Tensor) -> torch.Tensor:
        """image (B, 3, H, W) in [0, 1] → dense patch features (B, D, g, g) in the joint space."""
        v = self.clip.visual
        x = F.interpolate(image, size=(self.image_size, self.image_size), mode="bilinear", align_corners=False)
        x = (x - self.mean.to(x.dtype)) / self.std.to(x.dtype)
        x = v.transformer(v._embeds(x.to(v.conv1.weight.dtype)))
        x = v.ln_post(x[:, 1:]) @ v.proj
        return x.transpose(1, 2).reshape(x.shape[0], -1, self.grid, self.grid)

    def tokenize(self, texts: list[str]) -> torch.Tensor:
        import open_clip  # lazy: heavy (open_clip and its timm)

        return open_clip.tokenize(list(texts), context_length=self.text_len)

    def encode_text(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """tokens (B, L) → per-token features (B, L, D) and validity mask (B, L) (True = real token)."""
        c = self.clip
        n = tokens.shape[1]
        x = c.token_embedding(tokens).to(c.transformer.get_cast_dtype())
        x = x + c.positional_embedding[:n].to(x.dtype)
        x = c.transformer(x, attn_mask=c.attn_mask[:n, :n])
        x = c.ln_final(x)
        x = c.text_projection(x) if isinstance(c.text_projection, nn.Linear) else x @ c.text_projection
        eot = tokens.argmax(dim=-1)  # the end-of-text id is the largest in CLIP's vocabulary
        valid = torch.arange(n, device=tokens.device)[None] <= eot[:, None]
        return x, valid


_HASH_PRIME = 2147483629  # < 2**31: products of two residues fit in int64
_HASH_WEIGHTS: dict[tuple[int, str], torch.Tensor] = {}


def _hash_weights(n: int, device: torch.device) -> torch.Tensor:
    """4 fixed random weight rows (int32 residues) for inputs of n elements on `device`."""
    key = (n, str(device))
    if key not in _HASH_WEIGHTS:
        if len(_HASH_WEIGHTS) >= 4:  # a few input sizes at a time; each is 16 bytes per element
            _HASH_WEIGHTS.clear()
        g = torch.Generator().manual_seed(0x7E5E6)
        _HASH_WEIGHTS[key] = torch.randint(1, _HASH_PRIME, (4, n), generator=g, dtype=torch.int32).to(device)
    return _HASH_WEIGHTS[key]


_BITS = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


class FeatureCache:
    """LRU of frozen-CLIP outputs keyed by model and the exact input, bounded in items and in bytes.

    Entries are kept in host memory (pinned when CUDA is available, so they go back to the GPU
    asynchronously): a ViT-L-14-336 image entry is 0.9 MB, and 4096 of them on the GPU were 3.6 GB.
    Images are keyed on their own device (`image_keys`: four random linear forms of the raw bits modulo
    a prime, ~124 bits), so a step copies 32 bytes per image to the host, not the image. Valid under any
    augmentation: a changed input has a different key and is recomputed.
    """

    def __init__(self, max_items: int = 4096, dtype: torch.dtype = torch.float16, max_bytes: int = 2 * 2 ** 30):
        self.max_items, self.dtype, self.max_bytes = max_items, dtype, int(max_bytes)
        self._store: OrderedDict[str, Any] = OrderedDict()
        self._sizes: dict[str, int] = {}
        self.nbytes = 0
        self.hits = self.misses = 0

    @staticmethod
    def key(model_key: str, payload: torch.Tensor | str) -> str:
        if not isinstance(payload, str):
            return FeatureCache.image_keys(model_key, payload[None])[0]
        h = hashlib.sha1(model_key.encode())
        h.update(payload.encode())
        return h.hexdigest()

    @staticmethod
    @torch.no_grad()
    def image_keys(model_key: str, images: torch.Tensor) -> list[str]:
        """One key per image of a batch (B, ...), hashed where the images are."""
        x = images.detach().contiguous()
        b = x.shape[0]
        bits = x.view(_BITS[x.element_size()]).reshape(b, -1).long() % _HASH_PRIME
        w = _hash_weights(bits.shape[1], x.device).long()
        sums = torch.stack([((bits * w[j]) % _HASH_PRIME).sum(1) % _HASH_PRIME for j in range(4)], 1)
        head = f"{model_key}|{tuple(x.shape[1:])}|{x.dtype}|"
        return [hashlib.sha1((head + ",".join(map(str, row))).encode()).hexdigest() for row in sums.tolist()]

    def get(self, key: str):
        if key in self._store:
            self._store.move_to_end(key)
            self.hits += 1
            return self._store[key]
        self.misses += 1
        return None

    def put(self, key: str, value) -> None:
        if self.max_items <= 0:
            return
        value = _to_host(value)
        size = sum(t.numel() * t.element_size() for t in (value if isinstance(value, tuple) else (value,)))
        if size > self.max_bytes:
            return
        if key in self._store:
            self.nbytes -= self._sizes[key]
        self._store[key], self._sizes[key] = value, size
        self.nbytes += size
        self._store.move_to_end(key)
        while len(self._store) > self.max_items or self.nbytes > self.max_bytes:
            old, _ = self._store.popitem(last=False)
            self.nbytes -= self._sizes.pop(old)

    def __len__(self) -> int:
        return len(self._store)

    def __deepcopy__(self, memo):
        # Copies of a model (e.g. for inference with folded BatchNorm) share the cache: its entries
        # depend only on the frozen CLIP and the exact input, never on the trainable weights.
        return self


def _to_host(value):
    if isinstance(value, tuple):
        return tuple(_to_host(v) for v in value)
    t = value.detach().to("cpu")
    if torch.cuda.is_available():
        t = t.pin_memory()
    return t
