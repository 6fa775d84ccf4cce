"""The contract between a training method and the engine.

The engine owns data loading, the optimiser and schedule, the loop, AMP, checkpoints, logging and
validation. A method owns its networks (as sub-modules, so `state_dict()` checkpoints all of them,
EMA teachers included), its training step and its losses, and how it predicts at inference.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
import torch.nn as nn

from textseg_cli.data.batch import Batch
from textseg_cli.errors import ConfigError


@dataclass
class StepContext:
    iteration: int  # 0-based index of the step being computed
    max_iterations: int
    device: torch.device
    extra: dict[str, Any] = field(default_factory=dict)


class Method(nn.Module):
    """Base class. Subclasses set `name` (by `@register_method`), `paper` and the class attributes that describe
    them (display name, fidelity-ledger row, protocol LCC, CLI flags, config file: each has one home, here), and
    implement `training_step` and `predict_logits`.

    `cfg` is the fully resolved run config (see `textseg_cli/configs/defaults.yaml`); a method reads its own
    hyper-parameters from `cfg["method"]` (also available as `self.hparams`), which comes from
    `textseg_cli/configs/<name>.yaml` plus per-dataset overrides and `--set method.KEY=VALUE`.
    `training_step` runs under the engine's autocast (bf16 on CUDA): compute losses in float32.
    `ctx.iteration` is 0-based; the field's ramp-ups use the 1-based step number `ctx.iteration + 1`.
    `decoder` in `predict_logits` selects one output of a multi-decoder network (an index, or a name such
    as "mean"); None means the method's default (`cfg["inference"]["decoder"]` or the method's own choice).
    """

    name: ClassVar[str] = ""
    paper: ClassVar[str] = ""
    needs_unlabeled: ClassVar[bool] = True
    dims: ClassVar[tuple[int, ...]] = (3, 2)  # image dimensionalities the method can train on
    dims_note: ClassVar[str] = ""  # why, when it is only one
    # What the method says about itself (read by `textseg models --fidelity`, presets, tables, eval, `train`):
    display_name: ClassVar[str] = ""  # its name in tables ("MC-Net+"); empty: the registered name
    official_code: ClassVar[str] = ""  # official repository (and file), or why there is none; empty: not in the ledger
    official_commit: ClassVar[str] = ""  # the commit of it that the parity tests (tests/parity) were written against
    ledger: ClassVar[str] = ""  # its section of the fidelity ledger, e.g. "docs/fidelity.md#dtc-dtc"
    protocol_lcc: ClassVar[str] = ""  # the official line that makes LCC part of its evaluation; empty: no LCC
    has_text: ClassVar[bool] = False  # text-guided itself (the "+Text" add-on refuses it)
    # method-specific `textseg train` flags it accepts (key as in `--set method.KEY`) → allowed values (None: any)
    cli_flags: ClassVar[dict[str, tuple[str, ...] | None]] = {}
    # its YAML config when it does not ship in textseg_cli/configs/ (a plug-in method): absolute, or relative to
    # the directory of the module that defines the class
    config_path: ClassVar[str | None] = None

    def __init__(self, cfg: dict[str, Any], in_channels: int, num_classes: int, dim: int = 3, **context: Any):
        super().__init__()
        self.cfg = cfg
        self.in_channels = in_channels
        self.num_classes = num_classes
        if dim not in self.dims:
            raise ConfigError(f"{self.name or type(self).__name__} trains on "
                              f"{' or '.join(f'{d}D' for d in self.dims)} images; this data set has dim {dim}"
                              + (f" ({self.dims_note})" if self.dims_note else ""))
        self.dim = dim
        self.context = context  # e.g. text embeddings, dataset class names

    @property
    def hparams(self) -> dict[str, Any]:
        """This method's hyper-parameters: `cfg["method"]` (empty when the config has none)."""
        return dict(self.cfg.get("method") or {}) if isinstance(self.cfg, dict) else {}

    def patch_size(self) -> list[int] | None:
        """The training patch: the run context's, else the config's `data.patch_size` (bench, models)."""
        patch = self.context.get("patch_size") or ((self.cfg.get("data") or {}).get("patch_size")
                                                   if isinstance(self.cfg, dict) else None)
        return list(patch) if patch else None

    def training_step(self, batch: Batch, ctx: StepContext) -> dict[str, torch.Tensor]:
        """Return a dict with 'loss' (the total to back-propagate) and any scalars to log."""
        raise NotImplementedError

    def on_after_optimizer_step(self, ctx: StepContext) -> None:
        """Hook for EMA teachers and the like."""
    def label_targets(self, label: Any) -> dict[str, Any] | None:
        """Maps derived from one labeled patch's label (numpy, (*spatial)), made by the sampler when the
        patch is drawn instead of inside the step (e.g. DTC's signed distance, a CPU transform that would
        otherwise copy labels off the GPU each step). Each key arrives stacked in `batch.extra[key]`."""
        return None

    def predict_logits(self, x: torch.Tensor, decoder: int | str | None = None) -> torch.Tensor:
        """Network output at inference, (B, K, *spatial), as logits."""
        raise NotImplementedError

    def predict_proba(self, x: torch.Tensor, decoder: int | str | None = None) -> torch.Tensor:
        return torch.softmax(self.predict_logits(x, decoder).float(), dim=1)

    def param_groups(self) -> list[dict[str, Any]]:
        """Parameters the optimiser updates (frozen towers and EMA teachers excluded)."""
        return [{"params": [p for p in self.parameters() if p.requires_grad]}]

    def networks(self) -> dict[str, nn.Module]:
        """The networks that `textseg models` counts (name → module)."""
        return {n: m for n, m in self.named_children()}


def decoder_index(decoder: int | str | None, default: Any, n: int) -> int | str:
    """An index 0..n-1 or "mean"; strings of digits accepted (shared by the multi-decoder methods)."""
    decoder = default if decoder is None else decoder
    if isinstance(decoder, str):
        if decoder == "mean":
            return "mean"
        if not decoder.isdigit():
            raise ConfigError(f"decoder {decoder!r}: expected an index 0..{n - 1} or 'mean'")
        decoder = int(decoder)
    if not 0 <= int(decoder) < n:
        raise ConfigError(f"decoder {decoder}: this network has decoders 0..{n - 1}")
    return int(decoder)
