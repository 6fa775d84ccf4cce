"""TGC-Net: frozen CLIP + SSE + DATE + VLCM + cost-aggregation decoder (text-guided 2D segmentation).

Data flow for an image x and its primary text p (and auxiliary text a):

    F_clip  = CLIP dense patch tokens of x (g×g, joint space D)          frozen, cacheable
    F_p,F_a = CLIP per-token text features (L×D)                          frozen, cacheable
    F_V     = SSE(F_clip, x)            → {F_V^1/8, F_V^1/16, F_V^1/32} in d_model
    F_T     = P_T(DATE(F_p, F_a))       → (L×d_model)
    F'_V, F'_T = VLCM(F_V^1/32, F_T)
    logits  = Decoder(F'_V, F'_T, F_V^1/16, F_V^1/8)  → one map per prompt at the input size

Every module has the paper's ablation switch: sse on|off|cnn-only|no-deform, clip_finetune none|qv|full,
date injection|main-only|aux-only|llm-expanded, vlcm gated|none|single|bi.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
import torch.nn as nn

from textseg_cli.errors import ConfigError
from textseg_cli.models.registry import register_model
from textseg_cli.models.tgcnet.clip_backbone import CLIPFeatures, FeatureCache
from textseg_cli.models.tgcnet.date import DATE, DATE_MODES
from textseg_cli.models.tgcnet.decoder import CostAggregationDecoder
from textseg_cli.models.tgcnet.sse import SSE, USES_CLIP_IMAGE
from textseg_cli.models.tgcnet.vlcm import VLCM

Texts = Sequence[str] | Sequence[Sequence[str]]


def _as_prompt_lists(texts: Texts, batch: int, what: str) -> list[list[str]]:
    if len(texts) != batch:
        raise ConfigError(f"{what}: got {len(texts)} entries for a batch of {batch} images")
    out = [[t] if isinstance(t, str) else list(t) for t in texts]
    if len({len(t) for t in out}) != 1:
        raise ConfigError(f"{what}: every image needs the same number of prompts")
    return out


class TGCNet(nn.Module):
    def __init__(self, in_channels: int = 3, clip_model: str | dict[str, Any] = "ViT-L-14-336",
                 clip_weights: str | None = None, clip_finetune: str = "none", sse: str = "on",
                 date: str = "injection", vlcm: str = "gated", d_model: int = 256, text_len: int = 32,
                 sse_layers: int = 3, cnn_channels: Sequence[int] = (32, 64, 128, 256, 352), date_heads: int = 8,
                 decoder_hidden: int = 128, window: int = 12, rel_pos_bias: bool = False, cache_size: int = 4096,
                 cache_bytes: int = 2 * 2 ** 30):
        super().__init__()
        if in_channels not in (1, 3):
            raise ConfigError(f"tgcnet takes 1- or 3-channel images (got {in_channels})")
        if date not in DATE_MODES:
            raise ConfigError(f"date '{date}': expected one of {', '.join(DATE_MODES)}")
        self.in_channels, self.date_mode = in_channels, date
        self.clip = CLIPFeatures(clip_model, clip_weights, clip_finetune, text_len)
        dim = self.clip.embed_dim
        self.sse = SSE(dim, d_model, sse, tuple(cnn_channels), layers=sse_layers)
        self.date = DATE(dim, date_heads) if date == "injection" else None
        self.text_proj = nn.Linear(dim, d_model)  # P_T: joint space → model width
        self.vlcm = VLCM(d_model, 8, vlcm)
        h = int(decoder_hidden)  # CAT-Seg ViT-L: hidden 128, decoder (64, 32), guidance (32, 16), in that ratio
        self.decoder = CostAggregationDecoder(d_model, text_len, h, window=window, up_channels=(h // 2, h // 4),
                                              guide_channels=(max(1, h // 4), max(1, h // 8)), rel_pos_bias=rel_pos_bias)
        self.cache = FeatureCache(cache_size if self.clip.frozen else 0, max_bytes=cache_bytes)  # host memory
        self.use_cache = True

    # --- frozen CLIP features, cached --------------------------------------------
    def _image_features(self, image: torch.Tensor) -> torch.Tensor:
        if not (self.clip.frozen and self.use_cache):
            with torch.set_grad_enabled(torch.is_grad_enabled() and not self.clip.frozen):
                return self.clip.encode_image(image)
        keys = FeatureCache.image_keys(self.clip.model_key, image)
        feats: list[torch.Tensor | None] = [self.cache.get(k) for k in keys]
        todo = [i for i, f in enumerate(feats) if f is None]
        if todo:
            with torch.no_grad():
                new = self.clip.encode_image(image[todo])
            for j, i in enumerate(todo):
                feats[i] = new[j].to(self.cache.dtype)
                self.cache.put(keys[i], feats[i])
        return torch.stack([f.to(image.device, non_blocking=True) for f in feats]).to(image.dtype)  # type: ignore

    def _text_features(self, texts: list[str], device) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-token features (N, L, D) and validity (N, L) for N strings (duplicates encoded once)."""
        uniq = list(dict.fromkeys(texts))
        cached = {}
        if self.clip.frozen and self.use_cache:
            for t in uniq:
                hit = self.cache.get(FeatureCache.key(self.clip.model_key + f"|text{self.clip.text_len}", t))
                if hit is not None:
                    cached[t] = hit
        todo = [t for t in uniq if t not in cached]
        if todo:
            with torch.set_grad_enabled(torch.is_grad_enabled() and not self.clip.frozen):
                feats, valid = self.clip.encode_text(self.clip.tokenize(todo).to(device))
            caching = self.clip.frozen and self.use_cache
            for j, t in enumerate(todo):
                # Cached entries are stored rounded; use the rounded value on the first pass too, so a
                # run gives the same features whether or not they came from the cache.
                cached[t] = (feats[j].detach().to(self.cache.dtype), valid[j]) if caching else (feats[j], valid[j])
                if caching:
                    self.cache.put(FeatureCache.key(self.clip.model_key + f"|text{self.clip.text_len}", t), cached[t])
        f = torch.stack([cached[t][0].to(device, non_blocking=True) for t in texts])
        v = torch.stack([cached[t][1].to(device, non_blocking=True) for t in texts])
        return f, v

    # --- forward --------------------------------------------------------------------
    def forward(self, image: torch.Tensor, texts: Texts, aux_texts: Texts | None = None) -> torch.Tensor:
        """image (B, C, H, W) in [0, 1]; texts: one string per image (referring) or a list of prompts per
        image (classes); aux_texts likewise (DATE's auxiliary prompts). Returns logits (B, T, H, W)."""
        b = image.shape[0]
        if image.shape[1] == 1:
            image = image.expand(-1, 3, -1, -1)
        prim = _as_prompt_lists(texts, b, "texts")
        t = len(prim[0])
        needs_aux = self.date_mode in ("injection", "aux-only", "llm-expanded")
        if needs_aux and aux_texts is None:
            raise ConfigError(f"date '{self.date_mode}' needs auxiliary prompts (run `textseg describe --per-case`); "
                              "use date 'main-only' without them")
        aux = _as_prompt_lists(aux_texts, b, "aux_texts") if needs_aux else None
        flat_p = [s for ps in prim for s in ps]
        flat_a = [s for ps in aux for s in ps] if aux else None
        if self.date_mode == "llm-expanded":
            f_t, valid = self._text_features([f"{p} {a}" for p, a in zip(flat_p, flat_a)], image.device)
        elif self.date_mode == "aux-only":
            f_t, valid = self._text_features(flat_a, image.device)
        else:
            f_t, valid = self._text_features(flat_p, image.device)
            if self.date_mode == "injection":
                f_a, valid_a = self._text_features(flat_a, image.device)
                f_t, valid = self.date(f_t.to(image.dtype), valid, f_a.to(image.dtype), valid_a)
        f_t = self.text_proj(f_t.to(image.dtype))  # (B·T, L, d)
        n_tok = f_t.shape[1]

        if self.sse.mode in USES_CLIP_IMAGE:
            f8, f16, f32 = self.sse(self._image_features(image), image)
        else:  # CNN-only (no CLIP): CLIP's image tower is not run
            f8, f16, f32 = self.sse(None, image, grid=self.clip.grid)
        g = f32.shape[-2:]
        f_v, f_tc = self.vlcm(f32.flatten(2).transpose(1, 2), tuple(g), f_t.reshape(b, t * n_tok, -1),
                              valid.reshape(b, t * n_tok))
        f_v = f_v.transpose(1, 2).reshape(b, -1, *g)
        return self.decoder(f_v, f_tc.reshape(b, t, n_tok, -1), valid.reshape(b, t, n_tok), f16, f8,
                            tuple(image.shape[-2:]))

    # --- facts --------------------------------------------------------------------------
    def parameter_shares(self) -> dict[str, int]:
        """Trainable parameters per module (CLIP counts only what fine-tuning unfreezes)."""
        parts: dict[str, nn.Module] = {"clip": self.clip, "sse": self.sse, "date": self.date or nn.Module(),
                                       "text_proj": self.text_proj, "vlcm": self.vlcm, "decoder": self.decoder}
        shares = {k: sum(p.numel() for p in m.parameters() if p.requires_grad) for k, m in parts.items()}
        if getattr(self.sse, "cnn", None) is not None:
            shares["sse.cnn"] = sum(p.numel() for p in self.sse.cnn.parameters())
        return shares


@register_model("tgcnet", doc="TGC-Net: frozen CLIP + SSE + DATE + VLCM + cost-aggregation decoder (2D, text-guided)")
def build_tgcnet(in_channels: int = 3, num_classes: int = 2, dim: int = 2, **kwargs: Any) -> TGCNet:
    """TGC-Net (always 2D; `dim` is accepted for the registry's uniform call); forward(image, texts,
    aux_texts) gives one logit map per prompt (see TGCNet)."""
    return TGCNet(in_channels=in_channels, **kwargs)
