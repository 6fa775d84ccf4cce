"""CAT-Seg style cost-aggregation decoder (Cho et al., CVPR 2024), adapted to per-token text.

1. Cost volume: cosine similarity of every calibrated visual token F'_V (g×g) with every text token of
   every prompt F'_T → (B, T prompts, L tokens, g, g); padded tokens give 0.
2. Embedding: a 7×7 conv maps the L token channels of each prompt to 128 channels.
3. Spatial aggregation: Swin blocks (window attention, every second block shifted by half a window)
   over each prompt's g×g map; queries/keys also see appearance guidance (F'_V projected to 128).
4. Class aggregation: linear attention (elu+1 kernels) across the T prompts at each pixel, with the
   prompts' pooled text as guidance; with a single referring text (T = 1) it reduces to its value path.
5. Two ×2 transposed-conv upsamplings, each concatenated with projected F_V^1/16 resp. F_V^1/8,
   then a 3×3 head to one logit per prompt, bilinearly resized to the input size.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from textseg_cli.models.tgcnet.vlcm import masked_mean


class WindowBlock(nn.Module):
    """Swin block with guidance concatenated to the query/key input; relative position bias."""

    def __init__(self, dim: int = 128, guide_dim: int = 128, heads: int = 4, window: int = 12, shifted: bool = False,
                 mlp_ratio: float = 4.0):
        super().__init__()
        self.dim, self.heads, self.window, self.shifted = dim, heads, window, shifted
        self.norm1 = nn.LayerNorm(dim)
        self.qk = nn.Linear(dim + guide_dim, 2 * dim)
        self.v = nn.Linear(dim, dim)
        self.proj = nn.Linear(dim, dim)
        self.bias_table = nn.Parameter(torch.zeros((2 * window - 1) ** 2, heads))
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
        bias = self._rel_bias(ws, x.device)[None].to(q.dtype)
        if shift:  # tokens from different regions of the rolled map must not attend to each other
            region = torch.zeros(1, hp, wp, 1, device=x.device)
            cnt = 0
            for hs in (slice(0, -ws), slice(-ws, -shift), slice(-shift, None)):
                for wsl in (slice(0, -ws), slice(-ws, -shift), slice(-shift, None)):
                    region[:, hs, wsl] = cnt
                    cnt += 1
            rw = self._partition(region, ws)[..., 0]
            mask = (rw[:, :, None] != rw[:, None, :]).to(q.dtype) * -100.0  # (nW, n, n)
            bias = (bias + mask[:, None]).repeat(b, 1, 1, 1)  # windows are ordered batch-major
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
        out = out.transpose(1, 2).reshape(-1, n, c)
        out = out.view(b, hp // ws, wp // ws, ws, ws, c).permute(0, 1, 3, 2, 4, 5).reshape(b, hp, wp, c)
        if shift:
            out = torch.roll(out, (shift, shift), (1, 2))
        x = x + self.proj(out[:, :h, :w])
        return x + self.mlp(self.norm2(x))


class ClassBlock(nn.Module):
    """Linear attention across prompts at each pixel, guided by the pooled prompt features."""

    def __init__(self, dim: int = 128, guide_dim: int = 128, heads: int = 4, mlp_ratio: float = 4.0):
        super().__init__()
        self.dim, self.heads = dim, heads
        self.norm1 = nn.LayerNorm(dim)
        self.qk = nn.Linear(dim + guide_dim, 2 * dim)
        self.v = nn.Linear(dim, dim)
        self.proj = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, int(dim * mlp_ratio)), nn.GELU(), nn.Linear(int(dim * mlp_ratio), dim))

    def forward(self, x: torch.Tensor, guide: torch.Tensor) -> torch.Tensor:
        """x (B, T, N, C); guide (B, T, Cg) → (B, T, N, C)."""
        b, t, n, c = x.shape
        y = self.norm1(x)
        qk = self.qk(torch.cat([y, guide[:, :, None].expand(-1, -1, n, -1)], -1))
        q, k = (F.elu(z) + 1 for z in qk.view(b, t, n, 2, self.heads, c // self.heads).unbind(3))
        v = self.v(y).view(b, t, n, self.heads, c // self.heads)
        kv = torch.einsum("btnhd,btnhe->bnhde", k, v)
        z = 1.0 / (torch.einsum("btnhd,bnhd->btnh", q, k.sum(1)) + 1e-6)
        out = torch.einsum("btnhd,bnhde,btnh->btnhe", q, kv, z).reshape(b, t, n, c)
        x = x + self.proj(out)
        return x + self.mlp(self.norm2(x))


class GuidedUp(nn.Module):
    def __init__(self, cin: int, cout: int, guide_in: int, guide_ch: int):
        super().__init__()
        self.up = nn.ConvTranspose2d(cin, cout, 2, 2)
        self.guide = nn.Sequential(nn.Conv2d(guide_in, guide_ch, 1), nn.GroupNorm(min(8, guide_ch), guide_ch),
                                   nn.ReLU(inplace=True))
        self.fuse = nn.Sequential(nn.Conv2d(cout + guide_ch, cout, 3, padding=1), nn.GroupNorm(min(8, cout), cout),
                                  nn.ReLU(inplace=True))

    def forward(self, x: torch.Tensor, guide: torch.Tensor, repeats: int) -> torch.Tensor:
        g = self.guide(guide).repeat_interleave(repeats, 0)
        x = self.up(x)
        if x.shape[-2:] != g.shape[-2:]:
            x = F.interpolate(x, size=g.shape[-2:], mode="bilinear", align_corners=False)
        return self.fuse(torch.cat([x, g], 1))


class CostAggregationDecoder(nn.Module):
    def __init__(self, d_model: int = 256, text_len: int = 32, hidden: int = 128, spatial_blocks: int = 2,
                 class_blocks: int = 2, heads: int = 4, window: int = 12, up_channels=(64, 32), guide_channels=(32, 16)):
        super().__init__()
        self.embed = nn.Conv2d(text_len, hidden, 7, padding=3)
        self.app_guide = nn.Linear(d_model, hidden)
        self.text_guide = nn.Linear(d_model, hidden)
        self.spatial = nn.ModuleList(WindowBlock(hidden, hidden, heads, window, shifted=i % 2 == 1)
                                     for i in range(spatial_blocks))
        self.classes = nn.ModuleList(ClassBlock(hidden, hidden, heads) for _ in range(class_blocks))
        self.up1 = GuidedUp(hidden, up_channels[0], d_model, guide_channels[0])
        self.up2 = GuidedUp(up_channels[0], up_channels[1], d_model, guide_channels[1])
        self.head = nn.Conv2d(up_channels[1], 1, 3, padding=1)

    def forward(self, f_v: torch.Tensor, f_t: torch.Tensor, valid_t: torch.Tensor, f16: torch.Tensor,
                f8: torch.Tensor, out_size: tuple[int, int]) -> torch.Tensor:
        """f_v (B, d, g, g); f_t (B, T, L, d), valid_t (B, T, L); f16/f8 the finer SSE maps → (B, T, H, W) logits."""
        b, d, h, w = f_v.shape
        t = f_t.shape[1]
        cost = torch.einsum("bdhw,btld->btlhw", F.normalize(f_v, dim=1), F.normalize(f_t, dim=-1))
        cost = cost * valid_t[..., None, None].to(cost.dtype)
        x = self.embed(cost.flatten(0, 1))  # (B·T, hidden, h, w)
        x = x.permute(0, 2, 3, 1)
        app = self.app_guide(f_v.permute(0, 2, 3, 1)).repeat_interleave(t, 0)
        for blk in self.spatial:
            x = blk(x, app)
        x = x.reshape(b, t, h * w, -1)
        tg = self.text_guide(masked_mean(f_t.flatten(0, 1), valid_t.flatten(0, 1))).view(b, t, -1)
        for blk in self.classes:
            x = blk(x, tg)
        x = x.reshape(b * t, h, w, -1).permute(0, 3, 1, 2)
        x = self.up2(self.up1(x, f16, t), f8, t)
        logits = self.head(x).view(b, t, x.shape[-2], x.shape[-1])
        return F.interpolate(logits, size=out_size, mode="bilinear", align_corners=False)
