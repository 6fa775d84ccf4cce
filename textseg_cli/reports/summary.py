"""Summaries of a per-case evaluation table: mean ± SD, median, min, max per class and metric.

`per_case` has one row per (case, class) with a column per metric of `metrics.table.METRIC_TABLE`
(dice, jaccard, hd95, asd), pred_empty and ref_empty. `n_empty` counts cases with exactly one mask empty
(where the empty-mask policy applies); `n_both_empty` those with both empty (Dice 1, distances 0 under every
policy), kept apart. With two or more foreground classes a `mean` class is added whose per-case value is the
mean over that case's classes (NaN distances left out; NaN only if all are NaN).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import pandas as pd

from textseg_cli.metrics.table import check_metrics

MEAN_CLASS = "mean"
SUMMARY_COLUMNS = ["class", "metric", "mean", "std", "median", "min", "max", "n", "n_cases", "n_empty",
                   "n_both_empty"]


def one_mask_empty(per_case: pd.DataFrame) -> pd.Series:
    """Rows where exactly one of prediction and reference is empty (where the empty policy applies)."""
    return per_case["pred_empty"].astype(bool) ^ per_case["ref_empty"].astype(bool)


def both_masks_empty(per_case: pd.DataFrame) -> pd.Series:
    """Rows where prediction and reference are both empty (scored Dice 1, distances 0; not "empty")."""
    return per_case["pred_empty"].astype(bool) & per_case["ref_empty"].astype(bool)


def case_level(per_case: pd.DataFrame, class_name: str | None = None,
               metrics: Sequence[str] | None = None) -> pd.DataFrame:
    """One row per case (index = case id): the given class, or the mean over classes when None.
    `metrics`: the columns to keep (default: every metric of the table)."""
    names = list(check_metrics(metrics))
    df = per_case.assign(_empty=one_mask_empty(per_case), _both=both_masks_empty(per_case))
    if class_name is not None and class_name != MEAN_CLASS:
        sel = df[df["class_name"].astype(str) == str(class_name)]
        if sel.empty:
            raise KeyError(class_name)
        return sel.set_index("case")[names + ["_empty", "_both"]].rename(
            columns={"_empty": "empty", "_both": "both_empty"})
    with np.errstate(all="ignore"):
        grouped = df.groupby("case", sort=False)
        out = grouped[names].mean()  # pandas skips NaN: the mean of the finite class values
        out["empty"] = grouped["_empty"].any()
        out["both_empty"] = grouped["_both"].any()
    return out


def classes_of(per_case: pd.DataFrame) -> list[str]:
    return list(dict.fromkeys(per_case["class_name"].astype(str)))


def _stats(values: pd.Series, n_cases: int, n_empty: int, n_both_empty: int = 0) -> dict:
    v = values.to_numpy(dtype=float)
    v = v[np.isfinite(v)]
    return {
        "mean": float(v.mean()) if v.size else float("nan"),
        "std": float(v.std(ddof=1)) if v.size > 1 else float("nan"),
        "median": float(np.median(v)) if v.size else float("nan"),
        "min": float(v.min()) if v.size else float("nan"),
        "max": float(v.max()) if v.size else float("nan"),
        "n": int(v.size), "n_cases": n_cases, "n_empty": n_empty, "n_both_empty": n_both_empty,
    }


def summarize(per_case: pd.DataFrame, metrics: Sequence[str] | None = None) -> pd.DataFrame:
    """Long table: one row per (class, metric) with SUMMARY_COLUMNS. SD is the sample SD over cases.
    `metrics`: the metrics to summarize, in table order by default (validation asks for Dice only)."""
    names, which = classes_of(per_case), check_metrics(metrics)
    groups = [(n, case_level(per_case, n, which)) for n in names]
    if len(names) > 1:
        groups.append((MEAN_CLASS, case_level(per_case, None, which)))
    rows = []
    for name, cases in groups:
        n_empty, n_both = int(cases["empty"].sum()), int(cases["both_empty"].sum())
        for metric in which:
            rows.append({"class": name, "metric": metric, **_stats(cases[metric], len(cases), n_empty, n_both)})
    return pd.DataFrame(rows, columns=SUMMARY_COLUMNS)


def headline(summary: pd.DataFrame, class_name: str | None = None) -> dict[str, dict]:
    """metric → stats row for the class a results table reports (given, else `mean`, else the only class)."""
    classes = list(dict.fromkeys(summary["class"].astype(str)))
    if class_name is None:
        class_name = MEAN_CLASS if MEAN_CLASS in classes else classes[0]
    sel = summary[summary["class"].astype(str) == str(class_name)]
    if sel.empty:
        raise KeyError(class_name)
    return {r["metric"]: r for r in sel.to_dict("records")}
