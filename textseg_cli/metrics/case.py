"""Per-case, per-class metrics with an explicit empty-mask policy.

Empty-mask policies (the same names everywhere: API, `--empty-policy`, tables, meta.json):

Each metric's values for empty masks are fields of its record in `metrics.table.METRIC_TABLE`
(`both_empty`, `one_empty`; `one_empty` None = the policy decides). For the packaged metrics:

- both masks empty (nothing to find, nothing predicted) under every policy:
  Dice = Jaccard = 1, HD95 = ASD = 0.
- exactly one mask empty (a missed or a hallucinated structure), Dice = Jaccard = 0 and
    * ``nan``     HD95 = ASD = NaN; the case is left out of the distance means and counted in `n_empty`.
    * ``penalty`` HD95 = ASD = the image diagonal, sqrt(sum((shape_i * spacing_i)^2)), in the
                  distance unit in use (voxels: spacing 1).
    * ``zero``    HD95 = ASD = 0, what several published evaluation scripts return; it rewards an
                  empty prediction and is offered only to reproduce such numbers.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import numpy as np

from textseg_cli.metrics.surface import normalize_spacing
from textseg_cli.metrics.table import METRIC_TABLE, MaskPair, check_metrics

DEFAULT_EMPTY_POLICY = "nan"  # `textseg eval --empty-policy` and the run config's `val.empty_policy`
EMPTY_POLICIES: dict[str, str] = {
    "nan": "one mask empty -> Dice 0, HD95/ASD NaN, left out of the distance means and counted as empty",
    "penalty": "one mask empty -> Dice 0, HD95/ASD = the image diagonal",
    "zero": "one mask empty -> Dice 0, HD95/ASD 0 (legacy; rewards empty predictions)",
}


def check_empty_policy(policy: str) -> str:
    if policy not in EMPTY_POLICIES:
        raise ValueError(f"unknown empty-mask policy {policy!r}; choose one of {', '.join(EMPTY_POLICIES)}")
    return policy


def image_diagonal(shape: Sequence[int], spacing=None) -> float:
    """Length of the image diagonal, sqrt(sum((n_i * s_i)^2)), the `penalty` distance."""
    sp = normalize_spacing(spacing, len(shape))
    ext = np.asarray(shape, dtype=np.float64) * (1.0 if sp is None else sp)
    return float(math.sqrt(float(np.sum(ext**2))))


def binary_metrics(pred: np.ndarray, ref: np.ndarray, spacing=None, empty_policy: str = DEFAULT_EMPTY_POLICY,
                   metrics: Sequence[str] | None = None) -> dict[str, Any]:
    """The metrics of `metrics.table.METRIC_TABLE` (all, or the named ones) of two binary masks, then the
    empty flags and voxel counts. A metric's `both_empty` / `one_empty` value applies when a mask is empty;
    `one_empty` None means `empty_policy` decides (nan: NaN, penalty: the image diagonal, zero: 0)."""
    check_empty_policy(empty_policy)
    p = np.asarray(pred).astype(bool, copy=False)
    r = np.asarray(ref).astype(bool, copy=False)
    n_pred, n_ref = int(np.count_nonzero(p)), int(np.count_nonzero(r))
    pair = MaskPair(p, r, spacing)
    row: dict[str, Any] = {}
    for name in check_metrics(metrics):
        m = METRIC_TABLE[name]
        if n_pred == 0 and n_ref == 0:
            row[name] = m.both_empty
        elif n_pred == 0 or n_ref == 0:
            row[name] = m.one_empty if m.one_empty is not None else _policy_value(empty_policy, p.shape, spacing)
        else:
            row[name] = m.compute(pair)
    row.update(pred_empty=n_pred == 0, ref_empty=n_ref == 0, pred_voxels=n_pred, ref_voxels=n_ref)
    return row


def _policy_value(policy: str, shape: Sequence[int], spacing) -> float:
    """A policy-governed metric's value when exactly one mask is empty."""
    if policy == "nan":
        return float("nan")
    return image_diagonal(shape, spacing) if policy == "penalty" else 0.0


def evaluate_case(pred: np.ndarray, ref: np.ndarray, num_classes: int, spacing=None,
                  empty_policy: str = DEFAULT_EMPTY_POLICY,
                  metrics: Sequence[str] | None = None) -> list[dict[str, Any]]:
    """One row per foreground class 1..num_classes-1 of two label maps.

    Keys: class, the metrics of `METRIC_TABLE` (all, or `metrics`) in table order, pred_empty, ref_empty,
    pred_voxels, ref_voxels.
    Distances are in the unit of `spacing` (None: voxels).
    """
    pred, ref = np.asarray(pred), np.asarray(ref)
    if pred.shape != ref.shape:
        raise ValueError(f"prediction shape {pred.shape} differs from reference shape {ref.shape}")
    if num_classes < 2:
        raise ValueError(f"num_classes must be >= 2 (background + one class), got {num_classes}")
    rows = []
    for c in range(1, num_classes):
        row = binary_metrics(pred == c, ref == c, spacing, empty_policy, metrics)
        rows.append({"class": c, **row})
    return rows
