"""Validation during training: the run's inference settings and the metrics module's Dice, scored and
averaged exactly as `textseg eval` does (the run's `val.empty_policy`; `reports.summary` means)."""

from __future__ import annotations

import contextlib
import math
import warnings
from typing import Any, Sequence

import numpy as np
import pandas as pd
import torch

from textseg_cli.evaluation.folders import foreground_names, run_empty_policy
from textseg_cli.inference.predict import predict_case
from textseg_cli.inference.settings import InferenceSettings
from textseg_cli.methods.base import Method
from textseg_cli.metrics.case import evaluate_case
from textseg_cli.reports.summary import headline, summarize
from textseg_cli.runtime.precision import Precision

VAL_METRICS = ("dice",)  # validation selects checkpoints on Dice; the surface distances would cost time


def validation_scores(per_case: pd.DataFrame, class_names: Sequence[str]) -> dict[str, float]:
    """`val_dice` (+ `val_dice_<class>` with two or more foreground classes) from per-case, per-class rows
    (columns case, class_name, dice, pred_empty, ref_empty), averaged as `textseg eval`'s summary and tables
    (`reports.summary.summarize` / `headline`: per case over classes, then over cases). No case: val_dice 0."""
    if per_case.empty:
        return {"val_dice": 0.0}
    summary = summarize(per_case, metrics=VAL_METRICS)
    mean = float(headline(summary)["dice"]["mean"])
    res = {"val_dice": mean if math.isfinite(mean) else 0.0}
    if len(class_names) > 1:
        for name in class_names:
            res[f"val_dice_{name}"] = float(headline(summary, name)["dice"]["mean"])
    return res


def validation_settings(cfg: dict[str, Any], precision: Precision | torch.device | str) -> InferenceSettings:
    """The run's inference settings with `val.mode`/`val.stride` applied, built once per run by the trainer.
    precision: the run's inference precision resolved once by `textseg train` (auto follows training, so
    train.amp=false validates in fp32), or the device to resolve it on. Validation scores the raw argmax of the
    papers' protocol (preset "paper": no mirroring, constant window weights), whatever the config's preset, so
    checkpoints are selected as the official codes select them and validation does not cost 8 passes per window."""
    val, resolved = cfg["val"], isinstance(precision, Precision)
    return InferenceSettings.from_config(cfg, mode=val.get("mode"), stride=val.get("stride"), preset="paper",
                                         precision=precision if resolved else None,
                                         device=None if resolved else precision,
                                         lcc=False, lcc_source="validation scores the raw argmax")


def validate(method: Method, cases: list[tuple[str, np.ndarray, np.ndarray]], cfg: dict[str, Any],
             device: torch.device, num_classes: int, class_names: list[str],
             texts: dict[str, str | None] | None = None,
             settings: InferenceSettings | None = None) -> dict[str, float]:
    """Mean Dice over validation cases, predicted exactly as `textseg eval` does (`predict_case` with the
    run's inference settings: `settings` as the trainer built them once, else `validation_settings(cfg, device)`);
    methods that read a per-case text get it through `set_case_text`. Scored with the metrics module under the
    run's `val.empty_policy` and averaged as eval's summary (`validation_scores`)."""
    inf = settings if settings is not None else validation_settings(cfg, device)
    set_text = getattr(method, "set_case_text", None)

    policy, names = run_empty_policy(cfg), foreground_names(class_names, num_classes)
    rows: list[dict[str, Any]] = []
    for cid, image, label in cases:
        if callable(set_text):
            set_text((texts or {}).get(cid), case_id=cid)
        pred = predict_case(method, image, inf, device).argmax(0).cpu().numpy()
        for row in evaluate_case(pred, np.asarray(label), num_classes, empty_policy=policy, metrics=VAL_METRICS):
            rows.append({"case": str(cid), "class_name": names[row["class"] - 1], **row})
    with np.errstate(all="ignore"), _warnings_off():
        return validation_scores(pd.DataFrame(rows), names)


@contextlib.contextmanager
def _warnings_off():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        yield
