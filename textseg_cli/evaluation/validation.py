"""Validation during training: the run's inference settings and the metrics module's Dice."""

from __future__ import annotations

import contextlib
import warnings
from typing import Any

import numpy as np
import torch

from textseg_cli.inference.predict import predict_case
from textseg_cli.methods.base import Method
from textseg_cli.runtime.precision import inference_request


def dice_per_class(pred: torch.Tensor, ref: torch.Tensor, num_classes: int) -> list[float]:
    """Hard Dice of foreground classes 1..K-1 (NaN when both masks are empty)."""
    out = []
    for c in range(1, num_classes):
        p, r = pred == c, ref == c
        denom = int(p.sum()) + int(r.sum())
        out.append(float("nan") if denom == 0 else 2.0 * int((p & r).sum()) / denom)
    return out


def validate(method: Method, cases: list[tuple[str, np.ndarray, np.ndarray]], cfg: dict[str, Any],
             device: torch.device, num_classes: int, class_names: list[str],
             texts: dict[str, str | None] | None = None) -> dict[str, float]:
    """Mean Dice over validation cases, predicted exactly as `textseg eval` does (`predict_case` with the
    run's inference settings); methods that read a per-case text get it through `set_case_text`."""
    inf, val = dict(cfg["inference"]), cfg["val"]
    inf["mode"] = val.get("mode") or inf["mode"]
    inf["stride"] = val.get("stride") or inf["stride"]
    inf["precision"] = inference_request(cfg)  # auto follows training: train.amp=false validates in fp32
    set_text = getattr(method, "set_case_text", None)

    per_case = []
    for cid, image, label in cases:
        if callable(set_text):
            set_text((texts or {}).get(cid), case_id=cid)
        pred = predict_case(method, image, inf, device).argmax(0).cpu()
        per_case.append(dice_per_class(pred, torch.from_numpy(label.astype(np.int64)), num_classes))
    arr = np.array(per_case, dtype=float)  # (cases, K-1)
    with np.errstate(all="ignore"), _warnings_off():
        per_class = np.nanmean(arr, axis=0) if arr.size else np.array([])
    res = {"val_dice": float(np.nanmean(per_class)) if per_class.size and not np.all(np.isnan(per_class)) else 0.0}
    if num_classes > 2:
        for c, v in enumerate(per_class, start=1):
            res[f"val_dice_{class_names[c]}"] = float(v)
    return res


@contextlib.contextmanager
def _warnings_off():

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        yield
