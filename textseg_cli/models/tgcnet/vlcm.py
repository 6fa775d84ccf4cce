"""VLCM, the Vision–Language Calibration Module.

The paper gives no formula for its gated network G; textseg uses a mutual, content-conditioned gate
that fuses both token sets and damps what the other modality does not support:

    t̄ = masked mean of F_T,  v̄ = mean of F_V
    g_V = σ(W_V [F_V ; t̄]),  g_T = σ(W_T [F_T ; v̄])               (per token and channel)
    F_ctx = concat_tokens(g_V ⊙ F_V, g_T ⊙ F_T)                    (text padding stays masked)
    F'_V = LayerNorm(F_V + CrossAttn(Q = F_V + pos, K = F_ctx + pos_ctx, V = F_ctx))
    F'_T = LayerNorm(F_T + CrossAttn(Q = F_T, K = F_ctx + pos_ctx, V = F_ctx))

`pos` is the 2D sine embedding of the visual grid (zero for text tokens), so text tokens such as
"upper left" can bind to places. Gates start near 0.5 (zero-initialised weights).

Modes (ablation `--vlcm`): "gated" (above); "none" (F'_V = F_V, F'_T = F_T); "single" (one
ungated cross attention, visual queries on text: only F_V is calibrated); "bi" (two ungated cross
attentions, visual→text and text→visual).
"""

from __future__ import annotations

import torch
import torch.nn as nn

from textseg_cli.errors import ConfigError
from textseg_cli.models.tgcnet.msdeform_attn import sine_position_2d

VLCM_MODES = ("gated", "none", "single", "bi")


def masked_mean(x: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    w = valid[..., None].to(x.dtype)
    return (x * w).sum(1) / w.sum(1).clamp_min(1.0)


class VLCM(nn.Module):
    def __init__(self, dim: int = 256, heads: int = 8, mode: str = "gated", dropout: float = 0.0):
        super().__init__()
        if mode not in VLCM_MODES:
            raise ConfigError(f"vlcm '{mode}': expected one of {', '.join(VLCM_MODES)}")
        self.mode, self.dim = mode, dim
        if mode == "none":
            return
        self.attn_v = nn.MultiheadAttention(dim, heads, dropout=dropout, batch_first=True)
        self.norm_v = nn.LayerNorm(dim)
        if mode in ("gated", "bi"):
            self.attn_t = nn.MultiheadAttention(dim, heads, dropout=dropout, batch_first=True)
            self.norm_t = nn.LayerNorm(dim)
        if mode == "gated":
            self.gate_v = nn.Linear(2 * dim, dim)
            self.gate_t = nn.Linear(2 * dim, dim)
            for lin in (self.gate_v, self.gate_t):
                nn.init.zeros_(lin.weight)
                nn.init.zeros_(lin.bias)

    def forward(self, f_v: torch.Tensor, grid: tuple[int, int], f_t: torch.Tensor,
                valid_t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """f_v (B, N, d) visual tokens on `grid`; f_t (B, L, d) text tokens with valid_t (B, L)."""
        if self.mode == "none":
            return f_v, f_t
        pos = sine_position_2d(*grid, self.dim, f_v.device, f_v.dtype)[None]
        pad_t = ~valid_t
        if self.mode in ("single", "bi"):
            out_v = self.norm_v(f_v + self.attn_v(f_v + pos, f_t, f_t, key_padding_mask=pad_t, need_weights=False)[0])
            if self.mode == "single":
                return out_v, f_t
            out_t = self.norm_t(f_t + self.attn_t(f_t, f_v + pos, f_v, need_weights=False)[0])
            return out_v, out_t
        t_bar = masked_mean(f_t, valid_t)[:, None].expand(-1, f_v.shape[1], -1)
        v_bar = f_v.mean(1, keepdim=True).expand(-1, f_t.shape[1], -1)
        g_v = torch.sigmoid(self.gate_v(torch.cat([f_v, t_bar], -1)))
        g_t = torch.sigmoid(self.gate_t(torch.cat([f_t, v_bar], -1)))
        ctx = torch.cat([g_v * f_v, g_t * f_t], 1)
        ctx_pos = torch.cat([pos.expand(f_v.shape[0], -1, -1), torch.zeros_like(f_t)], 1)
        ctx_pad = torch.cat([torch.zeros_like(pad_t[:, :1]).expand(-1, f_v.shape[1]), pad_t], 1)
        out_v = self.norm_v(f_v + self.attn_v(f_v + pos, ctx + ctx_pos, ctx, key_padding_mask=ctx_pad,
                                              need_weights=False)[0])
        out_t = self.norm_t(f_t + self.attn_t(f_t, ctx + ctx_pos, ctx, key_padding_mask=ctx_pad,
                                              need_weights=False)[0])
        return out_v, out_t
