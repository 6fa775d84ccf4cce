"""Results tables for 2D text-guided segmentation in the layout of TGC-Net's / LViT's Table 1:
one row per method, a Text column (✓ the method reads text, ✗ it does not, – unknown), then
Dice (%) and mIoU (%) for each data set side by side.

Dice and mIoU are per-image values averaged over images (mDice, mIoU = mean Jaccard), as
`textseg eval` computes them for 2D folders. Results are grouped into columns by the data set in
their meta.json (`dataset`, else the evaluation folder's name) and into rows by method name, both in
the order first seen. LaTeX needs `booktabs` and `amssymb` (for `\\checkmark`).
"""

from __future__ import annotations

import io
import math
from typing import Sequence

import pandas as pd

from textseg_cli.metrics.table import metrics_2d
from textseg_cli.reports.latex import latex_table
from textseg_cli.reports.results import EvalResult, build_rows
from textseg_cli.reports.tables import (
    ResultRow,
    check_table_format,
    footnotes,
    latex_escape,
)


def dataset_of(result: EvalResult) -> str:
    return str(result.meta.get("dataset") or result.source.name)


def _arrow(metric, latex: bool) -> str:
    if metric.higher_is_better:
        return r"$\uparrow$" if latex else "↑"
    return r"$\downarrow$" if latex else "↓"


def _text_mark(value, latex: bool) -> str:
    if value is None:
        return "–" if not latex else "--"
    if latex:
        return r"\checkmark" if value else r"$\times$"
    return "✓" if value else "✗"


def grid(results: Sequence[EvalResult], class_name: str | None = None):
    """(methods in order, data sets in order, {(method, dataset): ResultRow}, {method: uses_text})."""
    rows = build_rows(list(results), class_name)
    methods: list[str] = []
    datasets: list[str] = []
    cells: dict[tuple[str, str], ResultRow] = {}
    text: dict[str, bool | None] = {}
    for res, row in zip(results, rows):
        method, ds = res.name, dataset_of(res)
        n = 2
        while (method, ds) in cells:  # the same method twice on one data set: keep both rows
            method = f"{res.name} ({n})"
            n += 1
        if method not in methods:
            methods.append(method)
        if ds not in datasets:
            datasets.append(ds)
        cells[(method, ds)] = row
        if res.meta.get("uses_text") is not None or method not in text:
            text[method] = res.meta.get("uses_text")
    return methods, datasets, cells, text


def _value(row: ResultRow | None, metric) -> float:
    if row is None or row.stats.get(metric.name) is None:
        return float("nan")
    return metric.scale * float(row.stats[metric.name]["mean"])


def _cell(row: ResultRow | None, metric, std: bool) -> str:
    v = _value(row, metric)
    if not math.isfinite(v):
        return "–"
    text = f"{v:.2f}"
    if std:
        sd = metric.scale * float(row.stats[metric.name].get("std", float("nan")))
        if math.isfinite(sd):
            text += f" ± {sd:.2f}"
    return text


def _notes(results: Sequence[EvalResult], cells: dict, std: bool) -> list[str]:
    rows = list(cells.values())
    notes = [n for n in footnotes(rows, std) if not n.startswith("Values:")]
    sizes = {r.meta.get("eval_size") for r in results}
    size_txt = ("resized to {0}×{0} (nearest neighbour, LViT's convention)".format(sizes.pop()) if len(sizes) == 1
                and None not in sizes else "at native resolution" if sizes == {None} else "MIXED resolutions")
    stat = "mean ± SD over images" if std else "mean over images"
    notes.insert(0, f"Dice and mIoU: per-image values, {stat} (mDice, mIoU), masks {size_txt}.")
    return notes


def render_table_2d(results: Sequence[EvalResult], fmt: str, std: bool = False, class_name: str | None = None) -> str:
    """The 2D results table as CSV, Markdown or LaTeX (best value per data-set column in bold)."""
    check_table_format(fmt)
    methods, datasets, cells, text = grid(results, class_name)
    if fmt == "csv":
        records = []
        for m in methods:
            for ds in datasets:
                row = cells.get((m, ds))
                if row is None:
                    continue
                rec = {"method": m, "uses_text": text.get(m), "dataset": ds, "n_images": row.n_cases}
                for metric in metrics_2d():
                    s = row.stats.get(metric.name, {})
                    rec[f"{metric.name}_mean"], rec[f"{metric.name}_std"] = s.get("mean"), s.get("std")
                rec.update(row.settings)
                records.append(rec)
        buf = io.StringIO()
        pd.DataFrame(records).to_csv(buf, index=False)
        return buf.getvalue()

    best = {}
    for ds in datasets:
        for metric in metrics_2d():
            vals = [v for v in (_value(cells.get((m, ds)), metric) for m in methods) if math.isfinite(v)]
            best[(ds, metric.name)] = (max(vals) if metric.higher_is_better else min(vals)) if len(methods) > 1 \
                and vals else None

    def body(bold):
        out = []
        for m in methods:
            line = [m, _text_mark(text.get(m), fmt == "latex")]
            for ds in datasets:
                for metric in metrics_2d():
                    c = _cell(cells.get((m, ds)), metric, std)
                    v, b = _value(cells.get((m, ds)), metric), best[(ds, metric.name)]
                    line.append(bold(c) if b is not None and math.isfinite(v) and round(v, 2) == round(b, 2) else c)
            out.append(line)
        return out

    notes = _notes(results, cells, std)
    if fmt == "md":
        head = ["Method", "Text"] + [f"{ds} {m.header_2d}{_arrow(m, False)}" for ds in datasets for m in metrics_2d()]
        lines = ["| " + " | ".join(head) + " |", "| --- | :---: |" + " ---: |" * (len(head) - 2)]
        for cells_ in body(lambda t: f"**{t}**"):
            lines.append("| " + " | ".join(c.replace("|", "\\|") for c in cells_) + " |")
        return "\n".join(lines) + "\n\n" + "\n".join(f"{n}  " for n in notes).rstrip() + "\n"

    def tex(t: str) -> str:
        if t.startswith("\\checkmark") or t.startswith("$\\times"):
            return t
        if t.startswith("\x00"):
            return r"\textbf{" + latex_escape(t[1:-1]) + "}"
        return latex_escape(t)

    k = len(metrics_2d())  # columns per data set
    head = [" & & " + " & ".join(rf"\multicolumn{{{k}}}{{c}}{{{latex_escape(ds)}}}" for ds in datasets) + r" \\",
            " ".join(rf"\cmidrule(lr){{{3 + k * i}-{2 + k * (i + 1)}}}" for i in range(len(datasets))),
            "Method & Text & " + " & ".join(latex_escape(m.header_2d) + _arrow(m, True)
                                            for _ in datasets for m in metrics_2d()) + r" \\"]
    rows_tex = [[tex(c) for c in cells_] for cells_ in body(lambda t: "\x00" + t + "\x01")]
    caption = ("Results on " + ", ".join(datasets) + " (" + ("mean ± SD" if std else "mean")
               + " over images); best per column in bold.")
    return latex_table(head, "lc" + "c" * k * len(datasets), rows_tex, notes, caption=caption, label="tab:results-2d")


def is_2d(result: EvalResult) -> bool:
    """A result scored per 2D image (meta dim 2, or resized with --eval-size)."""
    return result.meta.get("dim") == 2 or result.meta.get("eval_size") is not None
