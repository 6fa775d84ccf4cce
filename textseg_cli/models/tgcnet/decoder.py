"""CAT-Seg cost-aggregation decoder (Cho et al., CVPR 2024), adapted to per-token text.

Follows CAT-Seg's ViT-L configuration (cvlab-kaist/CAT-Seg configs/vitl_336.yaml: NUM_LAYERS 2, HIDDEN_DIMS 128,
NUM_HEADS 4, POOLING_SIZES [2, 2], WINDOW_SIZES 12, linear class attention; cat_seg/modeling/transformer/model.py
`Aggregator`), which the TGC-Net paper says its decoder follows:

1. Cost volume: cosine similarity of every calibrated visual token F'_V (g×g) with every text token of
   every prompt F'_T → (B, T prompts, L tokens, g, g); padded tokens give 0.
2. Embedding: a 7×7 conv maps the L token channels of each prompt to 128 channels.
3. Guidance: appearance = conv 3×3 (d → 128) + ReLU of F'_V, LayerNorm-ed inside each Swin pair; text =
   Linear + ReLU of each prompt's L2-normalised mean token.
4. Two aggregation layers, each [Swin block pair (window attention, the second shifted by half a window; the
   appearance guidance concatenated to queries/keys) → class aggregation (2×2 average pooling, linear
   attention across the T prompts at each pooled pixel with the text guidance, MLP, bilinear upsampling back,
   residual)]. With a single referring text (T = 1) class attention reduces to its value path.
5. Two upsampling steps as CAT-Seg's `Up`: ×2 transposed conv to (c_in − c_guide) channels, concatenated with
   the decoder guidance (conv 3×3 + ReLU of F_V^1/16 resp. F_V^1/8), then (conv 3×3 → GroupNorm → ReLU) × 2;
   a 3×3 head gives one logit per prompt, bilinearly resized to the input size.

Not adopted: CAT-Seg's padding of the class axis to 256 learnable tokens (TGC-Net has one prompt per image).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from textseg_cli.models.tgcnet.vlcm import masked_mean


class WindowBlock(nn.Module):
    """Swin block with guidance concatenated to the query/key input, as CAT-Seg's `SwinTransformerBlock`.

    CAT-Seg's `WindowAttention` (cat_seg/modeling/transformer/model.py) has no relative position bias, although its
    docstring, copied from Swin, mentions one; `rel_pos_bias=True` adds Swin's learned bias table (textseg's
    former default, an addition to what the paper says the decoder follows)."""

    def __init__(self, dim: int = 128, guide_dim: int = 128, heads: int = 4, window: int = 12, shifted: bool = False,
                 mlp_ratio: float = 4.0, rel_pos_bias: bool = False):
        super().__init__()
        self.dim, self.heads, self.window, self.shifted = dim, heads, window, shifted
        self.norm1 = nn.LayerNorm(dim)
        self.qk = nn.Linear(dim + guide_dim, 2 * dim)
        self.v = nn.Linear(dim, dim)
        self.proj = nn.Linear(dim, dim)
        self.bias_table = nn.Parameter(torch.zeros((2 * window - 1) ** 2, heads)) if rel_pos_bias else None
        if self.bias_table is not None:
            nn.init.trunc_normal_(self.bias_table, std=0.02)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, int(dim * mlp_ratio)), nn.GELU(), nn.Linear(int(dim * mlp_ratio), dim))

    def _rel_bias(self, ws: int, device) -> torch.Tensor:
        coords = torch.stack(torch.meshgrid(torch.arange(ws, device=device), torch.arange(ws, device=device),
                                            indexing="ij")).flatten(1)
        rel = coords[:, :, None] - coords[:, None, :] + self.window - 1
        idx = rel[0] * (2 * self.window - 1) + rel[1]
        return self.bias_table[idx].permute(2, 0, 1)  # (heads, ws², ws²)

    @staticmethod
    def _partition(x: torch.Tensor, ws: int) -> torch.Tensor:
        b, h, w, c = x.shape
        x = x.view(b, h // ws, ws, w // ws, ws, c).permute(0, 1, 3, 2, 4, 5)
        return x.reshape(-1, ws * ws, c)

    def forward(self, x: torch.Tensor, guide: torch.Tensor) -> torch.Tensor:
        """x (B, H, W, C), guide (B, H, W, Cg) → (B, H, W, C)."""
        b, h, w, c = x.shape
        ws = min(self.window, h, w)
        shift = ws // 2 if self.shifted and ws < max(h, w) else 0
        ph, pw = (-h) % ws, (-w) % ws
        y = torch.cat([self.norm1(x), guide], -1)
        y = F.pad(y, (0, 0, 0, pw, 0, ph))
        hp, wp = h + ph, w + pw
        if shift:
            y = torch.roll(y, (-shift, -shift), (1, 2))
        win = self._partition(y, ws)  # (B·nW, ws², C + Cg)
        n = ws * ws
        q, k = self.qk(win).view(-1, n, 2, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        v = self.v(win[..., :c]).view(-1, n, self.heads, c // self.heads).transpose(1, 2)
        bias = self._rel_bias(ws, x.device)[None].to(q.dtype) if self.bias_table is not None else None
        if shift:  # tokens from different regions of the rolled map must not attend to each other
            region = torch.zeros(1, hp, wp, 1, device=x.device)
            cnt = 0
            for hs in (slice(0, -ws), slice(-ws, -shift), slice(-shift, None)):
                for wsl in (slice(0, -ws), slice(-ws, -shift), slice(-shift, None)):
                    region[:, hs, wsl] = cnt
                    cnt += 1
            rw = self._partition(region, ws)[..., 0]
            mask = (rw[:, :, None] != rw[:, None, :]).to(q.dtype) * -100.0  # (nW, n, n)
            bias = (mask[:, None] if bias is None else bias + mask[:, None]).repeat(b, 1, 1, 1)  # batch-major windows
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
        out = out.transpose(1, 2).reshape(-1, n, c)
        out = out.view(b, hp // ws, wp // ws, ws, ws, c).permute(0, 1, 3, 2, 4, 5).reshape(b, hp, wp, c)
        if shift:
            out = torch.roll(out, (shift, shift), (1, 2))
        x = x + self.proj(out[:, :h, :w])
        return x + self.mlp(self.norm2(x))


class SwinPair(nn.Module):
    """CAT-Seg's Swin block pair: unshifted then shifted window block, guidance LayerNorm-ed once."""

    def __init__(self, dim: int = 128, guide_dim: int = 128, heads: int = 4, window: int = 12,
                 rel_pos_bias: bool = False):
        super().__init__()
        self.block_1 = WindowBlock(dim, guide_dim, heads, window, shifted=False, rel_pos_bias=rel_pos_bias)
        self.block_2 = WindowBlock(dim, guide_dim, heads, window, shifted=True, rel_pos_bias=rel_pos_bias)
        self.guidance_norm = nn.LayerNorm(guide_dim)

    def forward(self, x: torch.Tensor, guide: torch.Tensor) -> torch.Tensor:
        """x (B·T, H, W, C), guide (B·T, H, W, Cg)."""
        g = self.guidance_norm(guide)
        return self.block_2(self.block_1(x, g), g)


class ClassBlock(nn.Module):
    """Class aggregation: linear attention across the T prompts at each (pooled) pixel, text-guided queries/keys.

    As CAT-Seg's ClassTransformerLayer: average pooling (`pool`×`pool`) of the map, x + Attn(LN(x), guide),
    x + MLP_ReLU(LN(x)), bilinear upsampling (align_corners) to the map size, and a residual to the input."""

    def __init__(self, dim: int = 128, guide_dim: int = 128, heads: int = 4, mlp_ratio: float = 4.0, pool: int = 2):
        super().__init__()
        self.dim, self.heads, self.pool = dim, heads, pool
        self.norm1 = nn.LayerNorm(dim)
        self.q = nn.Linear(dim + guide_dim, dim)
        self.k = nn.Linear(dim + guide_dim, dim)
        self.v = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, int(dim * mlp_ratio)), nn.ReLU(), nn.Linear(int(dim * mlp_ratio), dim))

    def attend(self, x: torch.Tensor, guide: torch.Tensor) -> torch.Tensor:
        """x (B, T, N, C); guide (B, T, Cg) → (B, T, N, C), attention over T at each of the N positions."""
        b, t, n, c = x.shape
        y = torch.cat([x, guide[:, :, None].expand(-1, -1, n, -1)], -1)
        q = F.elu(self.q(y).view(b, t, n, self.heads, -1)) + 1
        k = F.elu(self.k(y).view(b, t, n, self.heads, -1)) + 1
        v = self.v(x).view(b, t, n, self.heads, -1)
        kv = torch.einsum("btnhd,btnhe->bnhde", k, v)
        z = 1.0 / (torch.einsum("btnhd,bnhd->btnh", q, k.sum(1)) + 1e-6)
        return torch.einsum("btnhd,bnhde,btnh->btnhe", q, kv, z).reshape(b, t, n, c)

    def forward(self, x: torch.Tensor, guide: torch.Tensor) -> torch.Tensor:
        """x (B, T, H, W, C); guide (B, T, Cg) → (B, T, H, W, C)."""
        b, t, h, w, c = x.shape
        maps = x.reshape(b * t, h, w, c).permute(0, 3, 1, 2)
        pooled = F.avg_pool2d(maps, self.pool) if self.pool > 1 and min(h, w) >= self.pool else maps
        ph, pw = pooled.shape[-2:]
        tokens = pooled.permute(0, 2, 3, 1).reshape(b, t, ph * pw, c)
        tokens = tokens + self.attend(self.norm1(tokens), guide)
        tokens = tokens + self.mlp(self.norm2(tokens))
        up = tokens.reshape(b * t, ph, pw, c).permute(0, 3, 1, 2)
        if (ph, pw) != (h, w):
            up = F.interpolate(up, size=(h, w), mode="bilinear", align_corners=True)
        return x + up.permute(0, 2, 3, 1).reshape(b, t, h, w, c)


class GuidedUp(nn.Module):
    """CAT-Seg's `Up`: transposed conv to (c_in − c_guide), concat the guidance, two conv-GN-ReLU."""

    def __init__(self, cin: int, cout: int, guide_ch: int):
        super().__init__()
        if guide_ch >= cin:
            raise ValueError(f"decoder guidance ({guide_ch}) must be narrower than its input ({cin})")
        self.up = nn.ConvTranspose2d(cin, cin - guide_ch, 2, 2)
        groups = max(1, cout // 16)
        self.conv = nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.GroupNorm(groups, cout),
                                  nn.ReLU(inplace=True), nn.Conv2d(cout, cout, 3, padding=1, bias=False),
                                  nn.GroupNorm(groups, cout), nn.ReLU(inplace=True))

    def forward(self, x: torch.Tensor, guide: torch.Tensor, repeats: int) -> torch.Tensor:
        g = guide.repeat_interleave(repeats, 0)
        x = self.up(x)
        if x.shape[-2:] != g.shape[-2:]:
            x = F.interpolate(x, size=g.shape[-2:], mode="bilinear", align_corners=False)
        return self.conv(torch.cat([x, g], 1))


class AggregatorLayer(nn.Module):
    """[Swin block pair → class aggregation], one of CAT-Seg's NUM_LAYERS."""

    def __init__(self, hidden: int, heads: int, window: int, pool: int, rel_pos_bias: bool = False):
        super().__init__()
        self.swin = SwinPair(hidden, hidden, heads, window, rel_pos_bias)
        self.classes = ClassBlock(hidden, hidden, heads, pool=pool)

    def forward(self, x: torch.Tensor, app: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        """x (B, T, H, W, C); app (B·T, H, W, C); text (B, T, C)."""
        b, t, h, w, c = x.shape
        x = self.swin(x.reshape(b * t, h, w, c), app).reshape(b, t, h, w, c)
        return self.classes(x, text)


class CostAggregationDecoder(nn.Module):
    def __init__(self, d_model: int = 256, text_len: int = 32, hidden: int = 128, layers: int = 2, heads: int = 4,
                 window: int = 12, pool: int = 2, up_channels=(64, 32), guide_channels=(32, 16),
                 rel_pos_bias: bool = False):
        super().__init__()
        self.embed = nn.Conv2d(text_len, hidden, 7, padding=3)
        self.app_guide = nn.Sequential(nn.Conv2d(d_model, hidden, 3, padding=1), nn.ReLU())
        self.text_guide = nn.Sequential(nn.Linear(d_model, hidden), nn.ReLU())
        self.layers = nn.ModuleList(AggregatorLayer(hidden, heads, window, pool, rel_pos_bias) for _ in range(layers))
        self.dec_guide = nn.ModuleList(nn.Sequential(nn.Conv2d(d_model, g, 3, padding=1), nn.ReLU())
                                       for g in guide_channels)
        self.up1 = GuidedUp(hidden, up_channels[0], guide_channels[0])
        self.up2 = GuidedUp(up_channels[0], up_channels[1], guide_channels[1])
        self.head = nn.Conv2d(up_channels[1], 1, 3, padding=1)

    def forward(self, f_v: torch.Tensor, f_t: torch.Tensor, valid_t: torch.Tensor, f16: torch.Tensor,
                f8: torch.Tensor, out_size: tuple[int, int]) -> torch.Tensor:
        """f_v (B, d, g, g); f_t (B, T, L, d), valid_t (B, T, L); f16/f8 the finer SSE maps → (B, T, H, W) logits."""
        b, d, h, w = f_v.shape
        t = f_t.shape[1]
        cost = torch.einsum("bdhw,btld->btlhw", F.normalize(f_v, dim=1), F.normalize(f_t, dim=-1))
        cost = cost * valid_t[..., None, None].to(cost.dtype)
        x = self.embed(cost.flatten(0, 1))  # (B·T, hidden, h, w)
        x = x.permute(0, 2, 3, 1).reshape(b, t, h, w, -1)
        app = self.app_guide(f_v).permute(0, 2, 3, 1).repeat_interleave(t, 0)
        pooled_text = F.normalize(masked_mean(f_t.flatten(0, 1), valid_t.flatten(0, 1)), dim=-1)
        tg = self.text_guide(pooled_text).view(b, t, -1)
        for layer in self.layers:
            x = layer(x, app, tg)
        x = x.reshape(b * t, h, w, -1).permute(0, 3, 1, 2)
        x = self.up2(self.up1(x, self.dec_guide[0](f16), t), self.dec_guide[1](f8), t)
        logits = self.head(x).view(b, t, x.shape[-2], x.shape[-1])
        return F.interpolate(logits, size=out_size, mode="bilinear", align_corners=False)
