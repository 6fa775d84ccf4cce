"""The two-stream batch a sampler yields and a method's `training_step` takes."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

import torch


@dataclass
class Batch:
    """One two-stream batch. Spatial dims are (x, y, z) for 3D and (x, y) for 2D."""

    image_l: torch.Tensor  # (Bl, C, *spatial) float
    label_l: torch.Tensor  # (Bl, *spatial) long class indices
    image_u: torch.Tensor  # (Bu, C, *spatial) float; Bu may be 0
    ids_l: Sequence[str] = ()
    ids_u: Sequence[str] = ()
    text_l: Sequence[str] | None = None  # per-case texts (2D referring data sets)
    text_u: Sequence[str] | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def to(self, device: torch.device, non_blocking: bool = True) -> "Batch":
        mv = lambda t: t.to(device, non_blocking=non_blocking) if isinstance(t, torch.Tensor) else t  # noqa: E731
        return Batch(mv(self.image_l), mv(self.label_l), mv(self.image_u), self.ids_l, self.ids_u, self.text_l,
                     self.text_u, {k: mv(v) for k, v in self.extra.items()})
