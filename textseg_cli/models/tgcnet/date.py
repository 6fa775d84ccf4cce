"""DATE, the Domain-Augmented Text Encoder: the auxiliary prompt calibrates the primary one.

    F_infused = CrossAttn(Q = F_a, K = F_p, V = F_p),    F_T = LayerNorm(F_p + F_infused)

Both prompts are tokenized to the same length L (CLIP's causal text tower makes the first L outputs
exact), so F_a and F_p align position by position. Keys at primary padding positions are masked in
the attention; F_p is zeroed at its padding positions and F_infused at the auxiliary's, so a position
carries primary and/or auxiliary information only where that prompt has a real token; the valid mask
of F_T is the union of both masks.

Modes (ablation `--date`): "injection" (the above), "main-only" (F_T = F_p), "aux-only" (F_T = F_a),
"llm-expanded" (primary and auxiliary joined into one prompt and encoded once; F_T = its features).
The mode only changes which texts the model encodes; this module implements the injection.
"""

from __future__ import annotations

import torch
import torch.nn as nn

DATE_MODES = ("injection", "main-only", "aux-only", "llm-expanded")


class DATE(nn.Module):
    def __init__(self, dim: int, heads: int = 8, dropout: float = 0.0):
        super().__init__()
        self.attn = nn.MultiheadAttention(dim, heads, dropout=dropout, batch_first=True)
        self.norm = nn.LayerNorm(dim)

    def forward(self, f_p: torch.Tensor, valid_p: torch.Tensor, f_a: torch.Tensor,
                valid_a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """f_p, f_a (B, L, D); valid_* (B, L) bool (True = real token) → F_T (B, L, D), valid (B, L)."""
        f_p = f_p * valid_p[..., None].to(f_p.dtype)
        infused, _ = self.attn(f_a, f_p, f_p, key_padding_mask=~valid_p, need_weights=False)
        infused = infused * valid_a[..., None].to(infused.dtype)
        return self.norm(f_p + infused), valid_p | valid_a
