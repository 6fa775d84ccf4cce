"""Multi-scale deformable attention (Zhu et al., Deformable DETR, 2021) in plain PyTorch.

No compiled extension: sampling uses `grid_sample` (bilinear, zero padding, align_corners=False),
which is what the CUDA kernel computes. Shapes follow the reference implementation:
value (B, S, heads, Dh) with S = sum(H_l·W_l), sampling locations (B, Q, heads, L, P, 2) as (x, y)
in [0, 1] of each level, attention weights (B, Q, heads, L, P) summing to 1 over L·P.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F


def ms_deform_attn_core(value: torch.Tensor, spatial_shapes: list[tuple[int, int]], sampling_locations: torch.Tensor,
                        attention_weights: torch.Tensor) -> torch.Tensor:
    """Bilinearly sample every level at the given points and sum with the weights → (B, Q, heads·Dh).

    Sampling runs in float32 whatever the autocast: a bf16 grid moves the points by up to 0.09 px at a
    96² level. The result has the value's dtype.
    """
    with torch.autocast(value.device.type, enabled=False):
        out = _sample_fp32(value.float(), spatial_shapes, sampling_locations.float(), attention_weights.float())
    return out.to(value.dtype)


def _sample_fp32(value: torch.Tensor, spatial_shapes: list[tuple[int, int]], sampling_locations: torch.Tensor,
                 attention_weights: torch.Tensor) -> torch.Tensor:
    b, _, heads, dh = value.shape
    _, q, _, levels, points, _ = sampling_locations.shape
    values = value.split([h * w for h, w in spatial_shapes], dim=1)
    grids = 2 * sampling_locations - 1  # [0, 1] → [-1, 1]
    sampled = []
    for lvl, (h, w) in enumerate(spatial_shapes):
        v = values[lvl].flatten(2).transpose(1, 2).reshape(b * heads, dh, h, w)
        g = grids[:, :, :, lvl].transpose(1, 2).flatten(0, 1)  # (B·heads, Q, P, 2)
        sampled.append(F.grid_sample(v, g, mode="bilinear", padding_mode="zeros", align_corners=False))
    stacked = torch.stack(sampled, dim=-2).flatten(-2)  # (B·heads, Dh, Q, L·P)
    attn = attention_weights.transpose(1, 2).reshape(b * heads, 1, q, levels * points)
    out = (stacked * attn).sum(-1).view(b, heads * dh, q)
    return out.transpose(1, 2).contiguous()


class MSDeformAttn(nn.Module):
    """Each query attends to `points` learned offsets around its reference point on each of `levels`
    feature maps; offsets and weights are predicted from the query."""

    def __init__(self, d_model: int = 256, levels: int = 3, heads: int = 8, points: int = 4):
        super().__init__()
        if d_model % heads:
            raise ValueError(f"d_model {d_model} must be divisible by heads {heads}")
        self.d_model, self.levels, self.heads, self.points = d_model, levels, heads, points
        self.sampling_offsets = nn.Linear(d_model, heads * levels * points * 2)
        self.attention_weights = nn.Linear(d_model, heads * levels * points)
        self.value_proj = nn.Linear(d_model, d_model)
        self.output_proj = nn.Linear(d_model, d_model)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # Deformable DETR's init: offsets start on rays in `heads` directions, growing with the point index.
        nn.init.constant_(self.sampling_offsets.weight, 0.0)
        theta = torch.arange(self.heads, dtype=torch.float32) * (2.0 * math.pi / self.heads)
        grid = torch.stack([theta.cos(), theta.sin()], -1)
        grid = (grid / grid.abs().max(-1, keepdim=True)[0]).view(self.heads, 1, 1, 2).repeat(1, self.levels,
                                                                                           self.points, 1)
        for i in range(self.points):
            grid[:, :, i, :] *= i + 1
        with torch.no_grad():
            self.sampling_offsets.bias.copy_(grid.view(-1))
        nn.init.constant_(self.attention_weights.weight, 0.0)
        nn.init.constant_(self.attention_weights.bias, 0.0)
        nn.init.xavier_uniform_(self.value_proj.weight)
        nn.init.constant_(self.value_proj.bias, 0.0)
        nn.init.xavier_uniform_(self.output_proj.weight)
        nn.init.constant_(self.output_proj.bias, 0.0)

    def forward(self, query: torch.Tensor, reference_points: torch.Tensor, value_in: torch.Tensor,
                spatial_shapes: list[tuple[int, int]], padding_mask: torch.Tensor | None = None) -> torch.Tensor:
        """query (B, Q, D); reference_points (B, Q, L, 2) as (x, y) in [0, 1]; value_in (B, S, D)."""
        b, q, _ = query.shape
        value = self.value_proj(value_in)
        if padding_mask is not None:
            value = value.masked_fill(padding_mask[..., None], 0.0)
        value = value.view(b, value.shape[1], self.heads, self.d_model // self.heads)
        # positions and weights from float32 linears: autocast would round the offsets to bf16
        with torch.autocast(query.device.type, enabled=False):
            offsets = self.sampling_offsets(query.float()).view(b, q, self.heads, self.levels, self.points, 2)
            weights = self.attention_weights(query.float()).view(b, q, self.heads, self.levels * self.points)
        weights = weights.softmax(-1).view(b, q, self.heads, self.levels, self.points)
        # Offsets are in pixels of each level: normalise by that level's (W, H).
        normaliser = torch.tensor([[w, h] for h, w in spatial_shapes], dtype=torch.float32, device=query.device)
        locations = (reference_points.float()[:, :, None, :, None, :]
                     + offsets / normaliser[None, None, None, :, None, :])
        return self.output_proj(ms_deform_attn_core(value, spatial_shapes, locations, weights))


def reference_points(spatial_shapes: list[tuple[int, int]], batch: int, device=None, dtype=None) -> torch.Tensor:
    """Pixel centres of every level as (x, y) in [0, 1], repeated for each level → (B, S, L, 2)."""
    refs = []
    for h, w in spatial_shapes:
        y, x = torch.meshgrid(torch.linspace(0.5, h - 0.5, h, device=device, dtype=dtype) / h,
                              torch.linspace(0.5, w - 0.5, w, device=device, dtype=dtype) / w, indexing="ij")
        refs.append(torch.stack([x.reshape(-1), y.reshape(-1)], -1))
    ref = torch.cat(refs, 0)
    return ref[None, :, None, :].expand(batch, -1, len(spatial_shapes), -1)


def sine_position_2d(h: int, w: int, dim: int, device=None, dtype=None, temperature: float = 10000.0) -> torch.Tensor:
    """DETR's normalised sine embedding of a (h, w) grid → (h·w, dim); half the channels for y, half for x."""
    if dim % 4:
        raise ValueError(f"position embedding dim {dim} must be divisible by 4")
    y, x = torch.meshgrid(torch.arange(1, h + 1, device=device, dtype=torch.float32) / h * 2 * math.pi,
                          torch.arange(1, w + 1, device=device, dtype=torch.float32) / w * 2 * math.pi, indexing="ij")
    n = dim // 2
    freq = temperature ** (2 * (torch.arange(n, device=device) // 2) / n)
    px, py = x.reshape(-1, 1) / freq, y.reshape(-1, 1) / freq
    px = torch.stack([px[:, 0::2].sin(), px[:, 1::2].cos()], -1).flatten(1)
    py = torch.stack([py[:, 0::2].sin(), py[:, 1::2].cos()], -1).flatten(1)
    return torch.cat([py, px], -1).to(dtype or torch.float32)


class DeformableEncoderLayer(nn.Module):
    """Deformable DETR encoder layer: MSDeformAttn over the whole pyramid + FFN, post-norm."""

    def __init__(self, d_model: int = 256, levels: int = 3, heads: int = 8, points: int = 4, ffn: int = 1024,
                 dropout: float = 0.0):
        super().__init__()
        self.attn = MSDeformAttn(d_model, levels, heads, points)
        self.norm1 = nn.LayerNorm(d_model)
        self.ffn = nn.Sequential(nn.Linear(d_model, ffn), nn.ReLU(inplace=True), nn.Dropout(dropout),
                                 nn.Linear(ffn, d_model))
        self.norm2 = nn.LayerNorm(d_model)
        self.drop = nn.Dropout(dropout)

    def forward(self, src: torch.Tensor, pos: torch.Tensor, ref: torch.Tensor,
                spatial_shapes: list[tuple[int, int]]) -> torch.Tensor:
        src = self.norm1(src + self.drop(self.attn(src + pos, ref, src, spatial_shapes)))
        return self.norm2(src + self.drop(self.ffn(src)))
