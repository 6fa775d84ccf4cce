"""The one table of segmentation metrics: everything the rest of the package knows about a metric.

`METRIC_TABLE` maps a metric's name (its column in per_case.csv, its `metric` in summary.csv) to a
`Metric` record: how to compute it on two non-empty masks, what it is when a mask is empty, and how tables
show it (title, unit, scale, direction). Evaluation (`metrics.case`, `evaluation.folders`), summaries
(`reports.summary`) and every results table (`reports.tables`, `reports.display`, `reports.table2d`,
`reports.grouping`, `experiments.table`) iterate this table, in its order, at call time, so adding a metric
means adding one record here (and its test); no other file lists metrics.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import Callable, Sequence

import numpy as np

from textseg_cli.metrics.overlap import dice, jaccard
from textseg_cli.metrics.surface import SurfaceDistances, surface_distances

PERCENT = "%"          # a fraction in [0, 1], shown × `scale` (100) as a percentage
DISTANCE = "distance"  # a surface distance in the evaluation's distance unit (voxel, or mm with --spacing-mm)


class MaskPair:
    """Two non-empty binary masks of one class and their spacing (None: voxels). What several metrics
    need (the surface distances of HD95 and ASD) is computed once, on first use, and shared."""

    def __init__(self, pred: np.ndarray, ref: np.ndarray, spacing=None):
        self.pred, self.ref, self.spacing = pred, ref, spacing

    @cached_property
    def surfaces(self) -> SurfaceDistances:
        sd = surface_distances(self.pred, self.ref, self.spacing)
        if sd is None:  # callers only build pairs of non-empty masks
            raise ValueError("surface distances of an empty mask")
        return sd


@dataclass(frozen=True)
class Metric:
    name: str                            # per_case.csv column / summary.csv `metric` value
    title: str                           # short display name: "Dice", "95HD"
    unit: str                            # PERCENT, DISTANCE, or "" (a plain number)
    scale: float                         # shown value = stored value × scale (100 for PERCENT)
    higher_is_better: bool               # the ↑/↓ arrow and which value tables mark as best
    compute: Callable[[MaskPair], float]  # the value for two non-empty masks
    both_empty: float                    # the value when prediction and reference are both empty (every policy)
    one_empty: float | None              # the value when exactly one is empty; None: the empty-mask policy decides
    title_2d: str | None = None          # column title in 2D (TGC-Net/LViT) tables; None: not shown there

    @property
    def header(self) -> str:
        """Column header without the distance unit: "Dice (%)", "95HD"."""
        return f"{self.title} (%)" if self.unit == PERCENT else self.title

    @property
    def header_2d(self) -> str | None:
        if self.title_2d is None:
            return None
        return f"{self.title_2d} (%)" if self.unit == PERCENT else self.title_2d


METRIC_TABLE: dict[str, Metric] = {m.name: m for m in (
    Metric("dice", "Dice", PERCENT, 100.0, True, lambda p: dice(p.pred, p.ref), both_empty=1.0, one_empty=0.0,
           title_2d="Dice"),
    Metric("jaccard", "Jaccard", PERCENT, 100.0, True, lambda p: jaccard(p.pred, p.ref), both_empty=1.0,
           one_empty=0.0, title_2d="mIoU"),
    Metric("hd95", "95HD", DISTANCE, 1.0, False, lambda p: p.surfaces.hd95, both_empty=0.0, one_empty=None),
    Metric("asd", "ASD", DISTANCE, 1.0, False, lambda p: p.surfaces.asd, both_empty=0.0, one_empty=None),
)}


def metric_names() -> tuple[str, ...]:
    """The metrics, in table order (read at call time, so a registered metric is seen everywhere)."""
    return tuple(METRIC_TABLE)


def metric(name: str) -> Metric:
    try:
        return METRIC_TABLE[name]
    except KeyError:
        raise KeyError(f"unknown metric {name!r}; known: {', '.join(METRIC_TABLE)}") from None


def check_metrics(names: Sequence[str] | None) -> tuple[str, ...]:
    """`names` in the caller's order (None: all), each checked against the table."""
    if names is None:
        return metric_names()
    return tuple(metric(n).name for n in names)


def metrics_2d() -> tuple[Metric, ...]:
    """The metrics 2D results tables show, in table order."""
    return tuple(m for m in METRIC_TABLE.values() if m.title_2d is not None)
