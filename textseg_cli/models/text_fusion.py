"""Text-fusion modules that act on a 3D bottleneck F_v of shape (B, C, X, Y, Z).

- `TMR` (Text-SemiSeg, Eq. 3): tri-plane tokens re-weighted by text-query attention.
- `RepeatTextFusion`: VCLIPSeg-style replication of text features over the volume (Text-SemiSeg Table 3).
- `VWPM` (VCLIPSeg): vision-semantic map × class embeddings = per-voxel prompt, fused by a conv.
- `TextInjection` (LLM-SegNet): an MLP maps sentence embeddings to C and adds β·z to the bottleneck.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

# Pooling axis of each plane, as (name, axis in (X, Y, Z)): the plane keeps the other two axes.
PLANES = (("coronal", 1), ("sagittal", 0), ("axial", 2))


def sincos_2d(h: int, w: int, dim: int, device=None, dtype=None) -> torch.Tensor:
    """Fixed 2D sine-cosine positional encoding (h*w, dim); sizes vary with the patch, so no table."""
    if dim % 4:
        raise ValueError("positional encoding width must be a multiple of 4")
    d = dim // 4
    omega = 1.0 / (10000 ** (torch.arange(d, device=device, dtype=torch.float32) / d))
    ys, xs = torch.meshgrid(torch.arange(h, device=device, dtype=torch.float32),
                            torch.arange(w, device=device, dtype=torch.float32), indexing="ij")
    oy, ox = ys.reshape(-1, 1) * omega, xs.reshape(-1, 1) * omega
    pe = torch.cat([oy.sin(), oy.cos(), ox.sin(), ox.cos()], dim=1)
    return pe.to(dtype) if dtype is not None else pe


class TMR(nn.Module):
    """Text-guided multi-plane representation (Text-SemiSeg).

    For each plane (coronal, sagittal, axial) the bottleneck is average-pooled along one axis; the plane's
    positions become tokens (projected to the text width `d`, plus positional encoding), pass a
    self-attention A(·), and are re-weighted by text-enhanced attention softmax(Q(F_t) K(A(P))ᵀ/√d):
    token n gets weight N · mean_k attn[k, n] (mean 1), applied to V(A(P)). The planes are projected back to
    C channels, broadcast over their pooled axis and summed with learnable weights w_c, w_s, w_a, plus the
    residual F_v.

    mode="official" reproduces the published code: each plane is pooled to one token, so the softmax over
    one token is 1 and the text has no effect on the forward pass.
    """

    def __init__(self, channels: int = 256, text_dim: int = 512, heads: int = 8, mode: str = "paper"):
        super().__init__()
        if mode not in ("paper", "official"):
            raise ValueError(f"TMR mode must be 'paper' or 'official', got {mode!r}")
        self.mode = mode
        self.d = text_dim
        self.proj_in = nn.Linear(channels, text_dim)
        self.self_attn = nn.MultiheadAttention(text_dim, heads, batch_first=True)
        self.norm = nn.LayerNorm(text_dim)
        self.q = nn.Linear(text_dim, text_dim)
        self.k = nn.Linear(text_dim, text_dim)
        self.v = nn.Linear(text_dim, text_dim)
        self.proj_out = nn.Linear(text_dim, channels)
        self.plane_weights = nn.Parameter(torch.ones(3) / 3)  # w_c, w_s, w_a

    def _plane(self, fv: torch.Tensor, axis: int, text: torch.Tensor) -> torch.Tensor:
        b, c = fv.shape[:2]
        spatial = fv.shape[2:]
        pooled = fv.mean(dim=2 + axis)  # (B, C, a, b)
        if self.mode == "official":
            pooled = pooled.mean(dim=(2, 3), keepdim=True)
        h, w = pooled.shape[2:]
        tokens = self.proj_in(pooled.flatten(2).transpose(1, 2))  # (B, N, d)
        tokens = tokens + sincos_2d(h, w, self.d, tokens.device, tokens.dtype)[None]
        a, _ = self.self_attn(tokens, tokens, tokens, need_weights=False)
        a = self.norm(tokens + a)
        q = self.q(text)  # (B, K, d)
        attn = torch.softmax(q @ self.k(a).transpose(1, 2) / math.sqrt(self.d), dim=-1)  # (B, K, N)
        weight = attn.mean(dim=1) * attn.shape[-1]  # (B, N), mean 1 over tokens
        out = self.proj_out(self.v(a) * weight.unsqueeze(-1))  # (B, N, C)
        out = out.transpose(1, 2).reshape(b, c, h, w).unsqueeze(2 + axis)
        return out.expand(b, c, *spatial)

    def forward(self, fv: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        """fv: (B, C, X, Y, Z); text: (K, d) or (B, K, d) text features F_t."""
        if text.dim() == 2:
            text = text.unsqueeze(0).expand(fv.shape[0], -1, -1)
        text = text.to(fv.dtype)
        out = fv
        for i, (_, axis) in enumerate(PLANES):
            out = out + self.plane_weights[i] * self._plane(fv, axis, text)
        return out


class RepeatTextFusion(nn.Module):
    """Replicate the (flattened) text features over the volume, concatenate, fuse by a 1×1×1 conv."""

    def __init__(self, channels: int = 256, text_dim: int = 512, num_texts: int = 2):
        super().__init__()
        self.reduce = nn.Linear(text_dim * num_texts, channels)
        self.fuse = nn.Sequential(nn.Conv3d(2 * channels, channels, 1), nn.BatchNorm3d(channels), nn.ReLU(inplace=True))

    def forward(self, fv: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        t = text.reshape(-1) if text.dim() == 2 else text.reshape(text.shape[0], -1)
        z = self.reduce(t.to(fv.dtype))
        z = z.expand(fv.shape[0], -1) if z.dim() == 1 else z
        z = z.view(*z.shape, *([1] * (fv.dim() - 2))).expand_as(fv)
        return fv + self.fuse(torch.cat([fv, z], dim=1))


class VWPM(nn.Module):
    """Vision-semantic weighted prompt module (VCLIPSeg).

    map = softmax(MLP_{64→16→K}(conv_{C→64}(F))) per voxel; prompt = Σ_k map_k · Linear_{512→C}(t_k);
    output = conv_{2C→C}([F, prompt]).
    """

    def __init__(self, channels: int = 256, text_dim: int = 512, num_classes: int = 2):
        super().__init__()
        self.reduce = nn.Sequential(nn.Conv3d(channels, 64, 1), nn.BatchNorm3d(64), nn.LeakyReLU(inplace=True))
        # A per-voxel MLP is a pair of 1×1×1 convolutions.
        self.mlp = nn.Sequential(nn.Conv3d(64, 16, 1), nn.GELU(), nn.Conv3d(16, num_classes, 1))
        self.text_proj = nn.Linear(text_dim, channels)
        self.fuse = nn.Sequential(nn.Conv3d(2 * channels, channels, 1), nn.BatchNorm3d(channels),
                                  nn.ReLU(inplace=True))

    def semantic_map(self, fv: torch.Tensor) -> torch.Tensor:
        return torch.softmax(self.mlp(self.reduce(fv)), dim=1)

    def forward(self, fv: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        """fv: (B, C, X, Y, Z); text: (K, 512) frozen CLIP class embeddings."""
        m = self.semantic_map(fv)  # (B, K, X, Y, Z)
        e = self.text_proj(text.to(fv.dtype))  # (K, C)
        prompt = torch.einsum("bk...,kc->bc...", m, e)
        return self.fuse(torch.cat([fv, prompt], dim=1))


class TextInjection(nn.Module):
    """LLM-SegNet: D(E(x) + β·z) with z = MLP(mean of the description embeddings), broadcast over space."""

    def __init__(self, channels: int = 256, text_dim: int = 768, hidden: int = 512, beta: float = 0.1):
        super().__init__()
        self.beta = beta
        self.mlp = nn.Sequential(nn.Linear(text_dim, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, channels))

    def forward(self, fv: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        """text: (N, D) sentence embeddings of the N descriptions (or (B, N, D))."""
        z = self.mlp(text.to(fv.dtype).mean(dim=-2))  # (C,) or (B, C)
        if z.dim() == 1:
            z = z.unsqueeze(0)
        return fv + self.beta * z.view(z.shape[0], -1, *([1] * (fv.dim() - 2)))


def resize_probs(probs: torch.Tensor, size) -> torch.Tensor:
    """Resize class probabilities to a feature grid (average pooling keeps them a distribution)."""
    return F.adaptive_avg_pool3d(probs, size) if probs.dim() == 5 else F.adaptive_avg_pool2d(probs, size)
