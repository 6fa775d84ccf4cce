"""`sup`: one V-Net trained on the labeled cases only — the lower bound of every semi-supervised table."""

from __future__ import annotations

from typing import Any

import torch

from textseg_cli.data.batch import Batch
from textseg_cli.methods.base import Method, StepContext
from textseg_cli.methods.losses import ce_dice_loss
from textseg_cli.methods.registry import register_method
from textseg_cli.models.registry import build_model


@register_method("sup")
class SupervisedOnly(Method):
    paper = "supervised baseline: V-Net on the labeled cases only (loss = CE + Dice)"
    display_name = "V-Net (sup.)"
    official_code = "yulequan/UA-MT (code/train_LA.py)"
    official_commit = "88ed29a"
    ledger = "docs/fidelity.md#supervised-only-sup"
    needs_unlabeled = False

    def __init__(self, cfg: dict[str, Any], in_channels: int, num_classes: int, dim: int = 3, **context: Any):
        super().__init__(cfg, in_channels, num_classes, dim=dim, **context)
        hp = self.hparams
        self.net = build_model(hp.get("model", "vnet"), in_channels, num_classes, dim=dim,
                               **(hp.get("backbone") or {}))

    def training_step(self, batch: Batch, ctx: StepContext) -> dict[str, torch.Tensor]:
        hp = self.hparams
        loss, ce, dice = ce_dice_loss(self.net(batch.image_l), batch.label_l, ce_weight=hp.get("ce_weight", 0.5),
                                      dice_weight=hp.get("dice_weight", 0.5), **(hp.get("dice") or {}))
        return {"loss": loss, "loss_ce": ce.detach(), "loss_dice": dice.detach()}

    def predict_logits(self, x: torch.Tensor, decoder: int | str | None = None) -> torch.Tensor:
        return self.net(x)
