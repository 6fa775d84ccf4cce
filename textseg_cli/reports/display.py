"""The Rich table `textseg eval` prints: per class and metric, mean ± SD, median and range over cases."""

from __future__ import annotations

import math

import pandas as pd
from rich.table import Table

from textseg_cli.metrics.table import metric


def _num(value: float, scale: float) -> str:
    value = float(value) * scale
    return f"{value:.2f}" if math.isfinite(value) else "–"


def summary_table(summary: pd.DataFrame, meta: dict) -> Table:
    unit = meta.get("distance_unit", "voxel")
    n_empty = len(meta.get("cases_with_empty_mask") or [])
    checkpoint = f" · checkpoint {meta['checkpoint_rule']}" if meta.get("checkpoint_rule") else ""
    table = Table(title=f"Evaluation: {meta.get('name', '')}",
                  caption=f"n = finite values / cases · SD over cases · distances in {unit} · "
                          f"LCC {'on' if meta.get('lcc') else 'off'} · empty-mask policy '{meta.get('empty_policy')}'"
                          f" ({n_empty} case(s) with one mask empty, "
                          f"{len(meta.get('cases_with_both_masks_empty') or [])} with both empty){checkpoint}")
    for head in ("class", "metric", "mean ± SD", "median", "min – max", "n"):
        table.add_column(head, justify="left" if head in ("class", "metric") else "right")
    for cls, group in summary.groupby("class", sort=False):
        for i, row in enumerate(group.to_dict("records")):
            m = metric(row["metric"])
            scale = m.scale
            sd = _num(row["std"], scale)
            table.add_row(str(cls) if i == 0 else "", m.header + ("↑" if m.higher_is_better else "↓"),
                          _num(row["mean"], scale) + ("" if sd == "–" else f" ± {sd}"), _num(row["median"], scale),
                          f"{_num(row['min'], scale)} – {_num(row['max'], scale)}",
                          f"{int(row['n'])}/{int(row['n_cases'])}", end_section=i == len(group) - 1)
    return table
