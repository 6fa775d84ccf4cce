"""Learnable CoOp-style class prompts over a frozen CLIP text tower (Text-SemiSeg).

Each class k gets `n_ctx` (default 4) context vectors of the text width, initialised N(0, 0.02),
placed in front of its name: ``[SOT] v_1^k … v_4^k  <class name> . [EOT]``. The tower (token
embedding, transformer, final norm, projection) is frozen and always runs in fp32, also under
autocast; only the context vectors train. `forward()` returns the text features F_t (K, D), D = 512
for ViT-B/32.

The frozen tower is deliberately *not* registered as a sub-module: `parameters()` and
`state_dict()` hold only the context vectors (and the fixed prompt token buffers), so optimisers
cannot touch the tower and checkpoints stay small. `.to()` / `.cuda()` still move it (see `_apply`).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from textseg_cli.errors import ConfigError
from textseg_cli.text.encoders import ClipTextTower, load_open_clip


class CoOpTextEncoder(nn.Module):
    """Class-specific learnable prompts → CLIP text features (K, D)."""

    def __init__(self, clip_model: nn.Module, tokenizer, class_names: list[str], n_ctx: int = 4,
                 init_std: float = 0.02, normalize: bool = False):
        super().__init__()
        if not class_names:
            raise ConfigError("CoOp prompts need at least one class name")
        if n_ctx < 1:
            raise ConfigError(f"n_ctx must be ≥ 1, got {n_ctx}")
        tower = ClipTextTower(clip_model)
        for m in tower.modules():
            m.float().requires_grad_(False).eval()
        for t in tower.tensors():
            t.data = t.data.float()
            t.requires_grad_(False)
        self._tower = [tower]  # a list hides it from nn.Module registration (see module doc)
        self.class_names = list(class_names)
        self.n_ctx = int(n_ctx)
        self.normalize = normalize

        # "X X X X name." tokenises to [SOT, X×n_ctx, name…, '.', EOT, pad…]; the X embeddings are
        # replaced by the learned context, everything else stays the frozen word embedding.
        placeholder = " ".join(["X"] * self.n_ctx)
        tokens = tokenizer([f"{placeholder} {name}." for name in self.class_names])
        if int(tokens.argmax(dim=-1).min()) <= self.n_ctx + 1:
            raise ConfigError("a class name does not fit the CLIP context length")
        with torch.no_grad():
            emb = tower.embed(tokens.to(tower.token_embedding.weight.device)).float()
        self.register_buffer("tokens", tokens, persistent=False)
        self.register_buffer("prefix", emb[:, :1].clone(), persistent=False)  # SOT
        self.register_buffer("suffix", emb[:, 1 + self.n_ctx:].clone(), persistent=False)  # name . EOT pad
        self.ctx = nn.Parameter(torch.randn(len(self.class_names), self.n_ctx, tower.width) * init_std)

    @classmethod
    def from_pretrained(cls, class_names: list[str], model: str = "ViT-B-32", pretrained: str | None = "openai",
                        n_ctx: int = 4, init_std: float = 0.02, device: str | torch.device | None = "cpu",
                        normalize: bool = False) -> "CoOpTextEncoder":
        """Build on an open_clip model: `pretrained` is a tag, a checkpoint file or None for random weights."""
        clip, tokenizer, _ = load_open_clip(model, pretrained, device)
        return cls(clip, tokenizer, class_names, n_ctx=n_ctx, init_std=init_std, normalize=normalize)

    @property
    def tower(self) -> ClipTextTower:
        return self._tower[0]

    @property
    def embed_dim(self) -> int:
        return self.tower.embed_dim

    def _apply(self, fn, recurse: bool = True):
        # Move the hidden tower with the module, but keep it in fp32 whatever dtype is requested.
        super()._apply(fn, recurse)
        for m in self.tower.modules():
            m._apply(fn)
            m.float()
        for t in self.tower.tensors():
            t.data = fn(t.data).float()
        if isinstance(self.tower.attn_mask, torch.Tensor):
            self.tower.attn_mask = fn(self.tower.attn_mask).float()
        return self

    def prompt_embeddings(self) -> torch.Tensor:
        """(K, L, W): SOT, the context vectors, then the frozen class-name/EOT embeddings."""
        return torch.cat([self.prefix, self.ctx.float(), self.suffix], dim=1)

    def forward(self, return_tokens: bool = False) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Text features (K, D) (and per-token features (K, L, D) with return_tokens), in fp32."""
        device_type = self.ctx.device.type
        with torch.autocast(device_type=device_type, enabled=False):
            out = self.tower.forward_embeddings(self.prompt_embeddings(), self.tokens, return_tokens=return_tokens)
        if return_tokens:
            pooled, per_token = out
            return (F.normalize(pooled, dim=-1) if self.normalize else pooled), per_token
        return F.normalize(out, dim=-1) if self.normalize else out
