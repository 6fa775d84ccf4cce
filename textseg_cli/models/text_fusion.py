"""Text-fusion modules that act on a 3D bottleneck F_v of shape (B, C, X, Y, Z).

- `TMR` (Text-SemiSeg, Eq. 3): tri-plane tokens re-weighted by text-query attention (the paper's reading);
  `TMROfficial`: the published layer (one token per plane).
- `RepeatTextFusion`: VCLIPSeg-style replication of text features over the volume (Text-SemiSeg Table 3).
- `VWPM` (VCLIPSeg): vision-semantic map × class embeddings = per-voxel prompt, fused by a conv.
- `TextInjection` (LLM-SegNet): an MLP maps the description embeddings to the bottleneck's shape; adds β·z.
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
    residual F_v. The published layer is `TMROfficial` (`--tmr official`).
    """

    def __init__(self, channels: int = 256, text_dim: int = 512, heads: int = 8):
        super().__init__()
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


class TMROfficial(nn.Module):
    """Text-SemiSeg's published TMR layer (taozh2017/Text-SemiSeg model/MC_CLIP.py:382-503 and the call at
    :216), restated from its description; `--tmr official`.

    The bottleneck grid (X, Y, Z) is fixed at construction (patch / 16), as the official layer sizes its
    patch embedding to the whole plane. Per plane (axial: mean over X; sagittal: over Y; coronal: over Z) the
    whole plane is flattened in (a, b, C) order into ONE token, linearly embedded to `d_model`, plus a learnable
    position vector. Then: t = LN1(t); t = LN2(t + SelfAttn(t)); x = t + TextAttn(F_t → t) with output
    v_j · Σ_i attn_ij (one image token, so the text only enters as the count K); x = x + Drop(MLP(LN3(x)));
    a linear layer maps x back to the whole plane (so the output varies across the plane). The planes are
    broadcast along their pooled axis and summed with weights initialised to 1; the layer adds F_v inside and
    the decoder adds F_v again: output = (F_v + Σ w·plane) + F_v.
    """

    VIEWS = ("axial", "sagittal", "coronal")  # pooled axis 0, 1, 2 of (X, Y, Z)

    def __init__(self, channels: int, grid, text_dim: int = 512, d_model: int = 512, heads: int = 8,
                 dim_head: int = 64, dropout: float = 0.1):
        super().__init__()
        x, y, z = (int(g) for g in grid)
        self.grid = (x, y, z)
        self.heads, self.dim_head = heads, dim_head
        planes = {"axial": (y, z), "sagittal": (x, z), "coronal": (x, y)}
        self.plane_shape = planes
        self.embed = nn.ModuleDict({v: nn.Linear(channels * a * b, d_model) for v, (a, b) in planes.items()})
        self.pos = nn.ParameterDict({v: nn.Parameter(torch.randn(1, 1, d_model)) for v in self.VIEWS})
        self.view_weights = nn.Parameter(torch.ones(3))
        # image self-attention: q/k/v without bias, output projection with bias
        self.self_q = nn.Linear(d_model, d_model, bias=False)
        self.self_k = nn.Linear(d_model, d_model, bias=False)
        self.self_v = nn.Linear(d_model, d_model, bias=False)
        self.self_out = nn.Linear(d_model, d_model)
        # text → image attention (queries from F_t)
        inner = heads * dim_head
        self.txt_q = nn.Linear(text_dim, inner)
        self.txt_k = nn.Linear(d_model, inner)
        self.txt_v = nn.Linear(d_model, inner)
        self.txt_out = nn.Linear(inner, d_model)
        self.norm1, self.norm2, self.norm3 = nn.LayerNorm(d_model), nn.LayerNorm(d_model), nn.LayerNorm(d_model)
        self.mlp = nn.Sequential(nn.Linear(d_model, 4 * d_model), nn.GELU(), nn.Dropout(dropout),
                                 nn.Linear(4 * d_model, d_model))
        self.unembed = nn.ModuleDict({v: nn.Linear(d_model, channels * a * b) for v, (a, b) in planes.items()})
        # Dropouts in the order the published forward applies them (same random draws in train mode).
        self.drop_self, self.drop_txt = nn.Dropout(dropout), nn.Dropout(dropout)
        self.drop_mlp, self.drop_out = nn.Dropout(dropout), nn.Dropout(dropout)

    def _heads(self, t: torch.Tensor) -> torch.Tensor:
        return t.reshape(t.shape[0], t.shape[1], self.heads, -1)

    def _view(self, plane: torch.Tensor, text: torch.Tensor, view: str) -> torch.Tensor:
        b, c, a, w = plane.shape
        t = self.embed[view](plane.permute(0, 2, 3, 1).reshape(b, 1, -1)) + self.pos[view]
        t = self.norm1(t)
        q, k, v = self._heads(self.self_q(t)), self._heads(self.self_k(t)), self._heads(self.self_v(t))
        attn = torch.softmax(torch.einsum("bnhc,bmhc->bhnm", q, k) * (q.shape[-1] ** -0.5), dim=-1)
        sa = torch.einsum("bhnm,bmhc->bnhc", attn, v).reshape(t.shape)
        t = self.norm2(t + self.drop_self(self.self_out(sa)))
        tq = self._heads(self.txt_q(text)).transpose(1, 2)  # (B, h, K, dh)
        tk, tv = self._heads(self.txt_k(t)).transpose(1, 2), self._heads(self.txt_v(t)).transpose(1, 2)
        ta = torch.softmax(tq @ tk.transpose(-1, -2) * (self.dim_head ** -0.5), dim=-1)  # (B, h, K, N)
        to = ta.sum(dim=2).unsqueeze(-1) * tv  # v_j · Σ_i attn_ij
        x = t + self.drop_txt(self.txt_out(to.transpose(1, 2).reshape(b, t.shape[1], -1)))
        x = x + self.drop_mlp(self.mlp(self.norm3(x)))
        x = self.drop_out(self.unembed[view](x))
        return x.reshape(b, a, w, c).permute(0, 3, 1, 2)

    def forward(self, fv: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        """fv: (B, C, X, Y, Z) with (X, Y, Z) = `grid`; text: (K, d) or (B, K, d)."""
        if tuple(fv.shape[2:]) != self.grid:
            raise ValueError(f"official TMR was built for a {list(self.grid)} bottleneck (patch/16), "
                             f"got {list(fv.shape[2:])}")
        if text.dim() == 2:
            text = text.unsqueeze(0)
        if text.shape[0] != fv.shape[0]:
            text = text.expand(fv.shape[0], -1, -1)
        text = text.to(fv.dtype)
        axial = self._view(fv.mean(dim=2), text, "axial")
        sagittal = self._view(fv.mean(dim=3), text, "sagittal")
        coronal = self._view(fv.mean(dim=4), text, "coronal")
        view = (self.view_weights[0] * axial.unsqueeze(2) + self.view_weights[1] * sagittal.unsqueeze(3)
                + self.view_weights[2] * coronal.unsqueeze(4))
        return (fv + view) + fv


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
    """Vision-semantic weighted prompt module (VCLIPSeg; SmileJET/VCLIPSeg code/networks/VNet_clip.py:291-331).

    map = softmax_K(MLP_{64→16→K}(LeakyReLU(BN(conv3³_{C→64}(F))))) per voxel (MLP: Linear, GELU, Linear);
    prompt = Σ_k map_k · Linear_{512→C}(t_k); output = LeakyReLU(BN(conv3³_{2C→C}([F, prompt]))), no residual.
    """

    def __init__(self, channels: int = 256, text_dim: int = 512, num_classes: int = 2):
        super().__init__()
        self.img_conv = nn.Conv3d(channels, 64, 3, padding=1)
        self.img_bn = nn.BatchNorm3d(64)
        self.mlp1 = nn.Linear(64, 16)
        self.mlp2 = nn.Linear(16, num_classes)
        self.text_proj = nn.Linear(text_dim, channels)
        self.fuse_conv = nn.Conv3d(2 * channels, channels, 3, padding=1)
        self.fuse_bn = nn.BatchNorm3d(channels)

    def _weights(self, fv: torch.Tensor) -> torch.Tensor:
        img = F.leaky_relu(self.img_bn(self.img_conv(fv)))
        return torch.softmax(self.mlp2(F.gelu(self.mlp1(img.movedim(1, -1)))), dim=-1)  # (B, *s, K)

    def semantic_map(self, fv: torch.Tensor) -> torch.Tensor:
        return self._weights(fv).movedim(-1, 1)

    def forward(self, fv: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        """fv: (B, C, X, Y, Z); text: (K, 512) frozen CLIP class embeddings (not normalised, as published)."""
        m = self._weights(fv)  # (B, *s, K)
        e = self.text_proj(text.to(fv.dtype)).t()  # (C, K)
        # Σ_k as an elementwise product summed over K, the published order of operations (VNet_clip.py:322-327)
        prompt = (e.view(1, e.shape[0], *([1] * (fv.dim() - 2)), e.shape[1]) * m.unsqueeze(1)).sum(-1)
        return F.leaky_relu(self.fuse_bn(self.fuse_conv(torch.cat([fv, prompt], dim=1))))


class TextInjection(nn.Module):
    """LLM-SegNet: D(E(x) + β·z), z the description embeddings mapped by an MLP to the bottleneck's size.

    mode="spatial" (default; textseg's reading of the paper, which has no code): each of the N description
    embeddings passes an MLP D→hidden→C, and a linear layer over the description axis maps the N rows to the
    bottleneck grid (N → X·Y·Z), so z has the image features' shape (C, X, Y, Z), varies over space and depends
    on which description is which (their order is fixed by the descriptions file). A bottleneck of another size
    (whole-volume inference) gets z resized trilinearly. mode="pooled": the former reading, z = MLP(mean of the
    embeddings) broadcast over space (one learned constant per channel). `learnable_beta` makes β a parameter
    (initialised to `beta`).
    """

    MODES = ("spatial", "pooled")

    def __init__(self, channels: int = 256, text_dim: int = 768, hidden: int = 512, beta: float = 0.1,
                 mode: str = "spatial", num_texts: int | None = None, grid=None, learnable_beta: bool = False):
        super().__init__()
        if mode not in self.MODES:
            raise ValueError(f"text injection mode must be one of {self.MODES}, got {mode!r}")
        self.mode = mode
        if learnable_beta:
            self.beta = nn.Parameter(torch.tensor(float(beta)))
        else:
            self.beta = float(beta)
        self.mlp = nn.Sequential(nn.Linear(text_dim, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, channels))
        if mode == "spatial":
            if not num_texts or not grid:
                raise ValueError("spatial text injection needs the number of descriptions and the bottleneck grid")
            self.grid = tuple(int(g) for g in grid)
            self.to_grid = nn.Linear(int(num_texts), math.prod(self.grid))

    def text_map(self, text: torch.Tensor, dtype=None) -> torch.Tensor:
        """z: (C, X, Y, Z) in spatial mode, (C,) in pooled mode, for text (N, D)."""
        text = text.to(dtype) if dtype is not None else text
        if self.mode == "pooled":
            return self.mlp(text.mean(dim=-2))
        per_text = self.mlp(text)  # (N, C)
        return self.to_grid(per_text.transpose(0, 1)).reshape(-1, *self.grid)  # (C, X, Y, Z)

    def forward(self, fv: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        """text: (N, D) embeddings of the N descriptions."""
        z = self.text_map(text, fv.dtype)
        if self.mode == "pooled":
            return fv + self.beta * z.view(1, -1, *([1] * (fv.dim() - 2)))
        if tuple(z.shape[1:]) != tuple(fv.shape[2:]):
            mode = "trilinear" if fv.dim() == 5 else "bilinear"
            z = F.interpolate(z.unsqueeze(0), size=tuple(fv.shape[2:]), mode=mode, align_corners=False)[0]
        return fv + self.beta * z.unsqueeze(0)


def resize_probs(probs: torch.Tensor, size) -> torch.Tensor:
    """Resize class probabilities to a feature grid (average pooling keeps them a distribution)."""
    return F.adaptive_avg_pool3d(probs, size) if probs.dim() == 5 else F.adaptive_avg_pool2d(probs, size)
