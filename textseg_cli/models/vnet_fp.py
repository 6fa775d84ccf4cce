"""The V-Net with CrossMatch's feature perturbation (AiEson/CrossMatch LA/code/networks/vnet.py).

The layers are the shared V-Net's (`models.vnet.VNet`, same blocks, same order). `forward(x, need_fp=True)` splits
the encoder features of a batch into a first part (`n_first` samples, default half) and the rest, perturbs every
feature map of the rest with two dropouts of rates ½ − gap/2 ("weak") and ½ + gap/2 ("strong"), and decodes
[first, rest, weak(rest), strong(rest)] in one decoder pass without the decoder's own dropout; it returns the four
logit tensors. The encoder's bottleneck dropout acts as usual (train mode only).

The perturbation dropouts act in train and eval mode alike: the official `PertDropout` keeps them in a plain list,
so they are not sub-modules and `net.eval()` never reaches them (vnet.py:346-349). Their draws come from the global
torch RNG, in the official order (weak on the five feature maps, then strong), like the V-Net's own dropout.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from textseg_cli.errors import ConfigError
from textseg_cli.models.vnet import VNet

# vnet.py:340-344: the `pert_type` names and their torch dropouts
PERTURBATIONS = {"dropout": F.dropout3d, "alpha": F.alpha_dropout, "feature": F.feature_alpha_dropout}


class PerturbedVNet(VNet):
    """V-Net whose `forward(x, need_fp=True)` also decodes dropout-perturbed copies of the second part's features."""

    def __init__(self, in_channels: int = 1, num_classes: int = 2, n_filters: int = 16,
                 normalization: str = "batchnorm", has_dropout: bool = True, up_mode: int = 0, dim: int = 3,
                 pert_gap: float = 0.5, pert_type: str = "dropout"):
        if dim != 3:
            raise ConfigError("CrossMatch's perturbed V-Net is 3D (its dropouts are Dropout3d)")
        if pert_type not in PERTURBATIONS:
            raise ConfigError(f"method.pert_type {pert_type!r}: expected one of {', '.join(PERTURBATIONS)}")
        if not 0.0 <= float(pert_gap) <= 1.0:
            raise ConfigError(f"method.pert_gap {pert_gap}: the two dropout rates ½ ∓ gap/2 need 0 ≤ gap ≤ 1")
        super().__init__(in_channels, num_classes, n_filters, normalization, has_dropout, up_mode, dim)
        self.pert_type = pert_type
        # vnet.py:335-349: weak = 0.5 − gap/2 (bottom), strong = 0.5 + gap/2 (top)
        self.pert_rates = (0.5 - float(pert_gap) / 2, 0.5 + float(pert_gap) / 2)

    def perturb(self, features: Sequence[torch.Tensor]) -> list[list[torch.Tensor]]:
        """[[weak(f) for f in features], [strong(f) for f in features]], always in training mode."""
        drop = PERTURBATIONS[self.pert_type]
        return [[drop(f, p, True) for f in features] for p in self.pert_rates]

    def forward(self, x: torch.Tensor, need_fp: bool = False, n_first: int | None = None):
        if not need_fp:
            return super().forward(x)
        n = x.shape[0] // 2 + x.shape[0] % 2 if n_first is None else int(n_first)  # torch.chunk(2)'s split
        feats = self.encoder(x)
        first, rest = [f[:n] for f in feats], [f[n:] for f in feats]
        perturbed = self.perturb(rest)
        joined = [torch.cat([a, b, *(p[i] for p in perturbed)]) for i, (a, b) in enumerate(zip(first, rest))]
        has = self.decoder.has_dropout
        self.decoder.has_dropout = False  # decoder(..., no_drop=True), vnet.py:320-322
        try:
            out = self.decoder(joined)
        finally:
            self.decoder.has_dropout = has
        m = x.shape[0] - n
        return out.split([n, m] + [m] * len(self.pert_rates))
