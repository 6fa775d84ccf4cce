"""`tgcnet`: TGC-Net trained fully supervised on 2D images with one description per image.

Loss: BCE + soft Dice on the sigmoid map of the referring text (the paper does not name its loss;
this is the usual pair for binary text-referring segmentation). With more than two classes the
prompts are the class names and the loss is CE + Dice on a softmax over them.

Texts come from the batch (`Batch.text_l`, filled from each case's `text` in dataset.json); DATE's
auxiliary prompts from `aux_texts.json` in the data folder (`textseg describe --per-case`), looked up
by case id. At inference the caller names the case's text with `set_case_text(text, aux)` before
`predict_logits` (one case per call; sliding windows of that case share it).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn.functional as F

from textseg_cli.console import err_console
from textseg_cli.data.batch import Batch
from textseg_cli.errors import ConfigError
from textseg_cli.methods.base import Method, StepContext
from textseg_cli.methods.clip_weights import is_random, require_clip_weights
from textseg_cli.methods.losses import ce_dice_loss, dice_loss
from textseg_cli.methods.registry import register_method
from textseg_cli.models.registry import build_model
from textseg_cli.models.tgcnet.clip_backbone import FINETUNE_MODES, TINY_CLIP
from textseg_cli.models.tgcnet.date import DATE_MODES
from textseg_cli.models.tgcnet.sse import SSE_MODES
from textseg_cli.models.tgcnet.vlcm import VLCM_MODES
from textseg_cli.text.describe import load_aux_texts

CLIP_PRESETS = {"tiny": TINY_CLIP}


def _switch(hp: dict[str, Any], key: str, default: str) -> str:
    """An ablation switch as a string: `--set method.sse=off` arrives from YAML as False, `vlcm=none` as None."""
    if key not in hp:
        return default
    value = hp[key]
    return {True: "on", False: "off", None: "none"}.get(value, str(value)) if not isinstance(value, str) else value


def _load_aux(data_root: str | None, path: str | None) -> dict[str, str]:
    p = Path(path) if path else (Path(data_root) / "aux_texts.json" if data_root else None)
    if p is None or not p.exists():
        if path:
            raise ConfigError("auxiliary prompts file not found", path)
        return {}

    return load_aux_texts(p)


class _SharedSlot:
    """Holds the current case's text. Shared, not copied, by `copy.deepcopy`: inference may predict with
    a deep copy of the method (e.g. BatchNorm folded into convs) made before the text was set."""
    def __init__(self):
        self.value: tuple[str, str | None] | None = None

    def __deepcopy__(self, memo):
        return self


@register_method("tgcnet")
class TGCNetMethod(Method):
    paper = "TGC-Net (Wuhan University, 2025): frozen CLIP + SSE + DATE + VLCM + cost-aggregation decoder"
    display_name = "TGC-Net"
    official_code = "none published (paper only)"
    official_commit = ""
    ledger = "docs/fidelity.md#tgc-net-tgcnet--no-official-code"
    cli_flags = {"sse": SSE_MODES, "clip_finetune": FINETUNE_MODES, "date": DATE_MODES + ("auto",), "vlcm": VLCM_MODES,
                 "clip_weights": None}
    needs_unlabeled = False
    dims = (2,)
    dims_note = "turn a 3D folder into 2D slices first: `textseg prep slices`"

    def __init__(self, cfg: dict[str, Any], in_channels: int, num_classes: int, dim: int = 2, **context: Any):
        super().__init__(cfg, in_channels, num_classes, dim=dim, **context)
        hp = self.hparams
        self.aux = _load_aux(context.get("data_root"), hp.get("aux_texts"))
        date = _switch(hp, "date", "auto")
        if date == "auto":  # the full model when auxiliary prompts exist, else the primary text alone
            date = "injection" if self.aux else "main-only"
            if not self.aux and not context.get("quiet_warnings"):
                err_console.print("[yellow]warning:[/] tgcnet: no aux_texts.json in the data folder "
                                  "(`textseg describe --per-case`); DATE runs as main-only")
        self.date_mode = date
        clip = hp.get("clip_model", "ViT-L-14-336")
        net_kw = dict(hp.get("net") or {})
        weights = hp.get("clip_weights")
        # A run on a data set (train, eval, predict) must name its CLIP weights or ask for a random CLIP;
        # counting parameters or timing steps (`textseg models`, `bench`) builds it with random weights.
        weights = require_clip_weights(weights, "tgcnet") if context.get("data_root") else (
            None if is_random(weights) else str(weights))
        self.net = build_model("tgcnet", in_channels, num_classes, clip_model=CLIP_PRESETS.get(clip, clip),
                               clip_weights=weights, clip_finetune=_switch(hp, "clip_finetune", "none"),
                               sse=_switch(hp, "sse", "on"), date=date, vlcm=_switch(hp, "vlcm", "gated"), **net_kw)
        self.referring = num_classes == 2
        names = list(context.get("class_names") or [])
        template = hp.get("class_template", "a photo of the {}.")
        self.class_prompts = ([template.format(n.replace("_", " ")) for n in names]  # "left_atrium" → "left atrium"
                              if not self.referring else [])
        if not self.referring and len(self.class_prompts) != num_classes:
            raise ConfigError("tgcnet with more than two classes needs the data set's class names")
        self._case_text = _SharedSlot()

    # --- texts ------------------------------------------------------------------------------
    def _texts(self, texts: Sequence[str | None] | None, ids: Sequence[str]) -> tuple[list, list | None]:
        if not self.referring:
            prompts = [self.class_prompts] * len(ids)
            return prompts, prompts if self.date_mode != "main-only" else None
        if texts is None or any(t is None for t in texts):
            raise ConfigError("tgcnet needs a text for every training case (dataset.json cases[].text)")
        if self.date_mode == "main-only":
            return list(texts), None
        missing = [i for i in ids if i not in self.aux]
        if missing:
            raise ConfigError(f"no auxiliary prompt for case(s) {missing[:3]} in aux_texts.json; "
                              "rerun `textseg describe --per-case` or set method.date=main-only")
        return list(texts), [self.aux[i] for i in ids]

    def set_case_text(self, text: str | None, aux: str | None = None, case_id: str | None = None) -> None:
        """The text of the case the next `predict_logits` calls belong to (aux looked up by case_id if not given)."""
        if aux is None and case_id is not None:
            aux = self.aux.get(case_id)
        self._case_text.value = None if text is None else (text, aux)

    # --- training and inference ---------------------------------------------------------------
    def _loss(self, logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        hp = self.hparams
        wb, wd = float(hp.get("bce_weight", 1.0)), float(hp.get("dice_weight", 1.0))
        logits = logits.float()
        if self.referring:
            z = logits[:, 0]
            bce = F.binary_cross_entropy_with_logits(z, labels.float())
            p = torch.sigmoid(z)[:, None]
            dice = dice_loss(torch.cat([1 - p, p], 1), labels)
            return wb * bce + wd * dice, {"loss_bce": bce.detach(), "loss_dice": dice.detach()}
        total, ce, dice = ce_dice_loss(logits, labels, ce_weight=wb, dice_weight=wd)
        return total, {"loss_ce": ce.detach(), "loss_dice": dice.detach()}

    def training_step(self, batch: Batch, ctx: StepContext) -> dict[str, torch.Tensor]:
        texts, aux = self._texts(batch.text_l, list(batch.ids_l))
        logits = self.net(batch.image_l, texts, aux)
        loss, parts = self._loss(logits, batch.label_l)
        return {"loss": loss, **parts}

    def forward_texts(self, x: torch.Tensor, texts: Sequence[str], aux: Sequence[str] | None = None) -> torch.Tensor:
        """Logits (B, K, H, W) for images with explicit texts (referring: K = 2, softmax = sigmoid)."""
        if not self.referring:
            texts = [self.class_prompts] * x.shape[0]
            aux = texts if self.date_mode != "main-only" else None
        z = self.net(x, list(texts), None if aux is None else list(aux))
        if self.referring:
            return torch.cat([torch.zeros_like(z), z], 1)
        return z

    def predict_logits(self, x: torch.Tensor, decoder: int | str | None = None) -> torch.Tensor:
        if not self.referring:
            return self.forward_texts(x, [""] * x.shape[0])
        if self._case_text.value is None:
            raise ConfigError("tgcnet predicts from an image and its text: call set_case_text(text, aux) "
                              "for the case before predicting")
        text, aux = self._case_text.value
        if self.date_mode != "main-only" and aux is None:
            raise ConfigError("tgcnet: this case has no auxiliary prompt (aux_texts.json)")
        n = x.shape[0]
        return self.forward_texts(x, [text] * n, None if self.date_mode == "main-only" else [aux] * n)

    def param_groups(self) -> list[dict[str, Any]]:
        """CLIP's fine-tuned weights (`--clip-finetune qv|full`) train at `clip_lr_scale` (0.01, as CAT-Seg's
        backbone multiplier) × the lr of the other modules."""
        clip_params = [p for p in self.net.clip.parameters() if p.requires_grad]
        ids = {id(p) for p in clip_params}
        rest = [p for p in self.parameters() if p.requires_grad and id(p) not in ids]
        groups: list[dict[str, Any]] = [{"params": rest}]
        if clip_params:
            lr = float((self.cfg.get("optim") or {}).get("lr", 1e-4))
            groups.append({"params": clip_params, "lr": lr * float(self.hparams.get("clip_lr_scale", 0.01))})
        return groups

    def networks(self):
        return {"tgcnet": self.net}
