"""Results tables in the field's layout: one row per method/run, columns Labeled, Unlabeled,
Dice (%)↑, Jaccard (%)↑, 95HD↓, ASD↓ (and a Wilcoxon p-value when runs are compared), rendered as
CSV, Markdown or LaTeX (booktabs; best value per column in bold). A footnote states the empty-mask
policy, LCC, distance unit and checkpoint rule."""

from __future__ import annotations

import io
import math
from dataclasses import dataclass, field

import pandas as pd

from textseg_cli.metrics.case import EMPTY_POLICIES
from textseg_cli.metrics.table import DISTANCE, METRIC_TABLE, PERCENT
from textseg_cli.reports.latex import (
    latex_escape,
    latex_table,
    mark_latex,
    mark_markdown,
    rank_marks,
)

TABLE_FORMATS = ("csv", "md", "latex")
TABLE_SUFFIX = {"csv": ".csv", "md": ".md", "latex": ".tex"}
# metric columns (header, scale, direction, unit): metrics.table.METRIC_TABLE, in its order


@dataclass
class ResultRow:
    method: str
    stats: dict[str, dict]  # metric → {"mean", "std", ...} as in reports.summary
    labeled: int | None = None
    unlabeled: int | None = None
    n_train: int | None = None
    n_cases: int | None = None
    p_value: float | None = None  # Wilcoxon vs the first row; None = not computed
    n_common: int | None = None
    settings: dict = field(default_factory=dict)  # empty_policy, lcc, distance_unit, checkpoint_rule


def check_table_format(fmt: str) -> str:
    if fmt not in TABLE_FORMATS:
        raise ValueError(f"unknown table format {fmt!r}; choose one of {', '.join(TABLE_FORMATS)}")
    return fmt


def _count(n: int | None, n_train: int | None) -> str:
    if n is None:
        return "–"
    if n_train:
        return f"{n} ({100.0 * n / n_train:.0f}%)"
    return str(n)


def _value(row: ResultRow, metric: str) -> float:
    s = row.stats.get(metric)
    return float("nan") if s is None else float(s["mean"]) * METRIC_TABLE[metric].scale


def _cell(row: ResultRow, metric: str, std: bool) -> str:
    v = _value(row, metric)
    if not math.isfinite(v):
        return "–"
    text = f"{v:.2f}"
    if std:
        sd = float(row.stats[metric]["std"]) * METRIC_TABLE[metric].scale
        if math.isfinite(sd):
            text += f" ± {sd:.2f}"
    return text


def _p_cell(row: ResultRow, first: bool) -> str:
    if first:
        return "ref."
    if row.p_value is None:
        return "–"
    if not math.isfinite(row.p_value):  # too few common cases for a test (paired_wilcoxon)
        return "n/a"
    return "<0.001" if row.p_value < 0.001 else f"{row.p_value:.3f}"


def _unit(rows: list[ResultRow]) -> str:
    units = {r.settings.get("distance_unit") for r in rows} - {None}
    return units.pop() if len(units) == 1 else "mixed units"


def has_p_values(rows: list[ResultRow]) -> bool:
    return len(rows) > 1 and any(r.p_value is not None for r in rows[1:])


def render_csv(rows: list[ResultRow]) -> str:
    """Full precision, raw fractions for Dice/Jaccard, one settings column per footnote item."""
    records = []
    for r in rows:
        rec = {"method": r.method, "labeled": r.labeled, "unlabeled": r.unlabeled, "n_cases": r.n_cases}
        for m in METRIC_TABLE:
            s = r.stats.get(m, {})
            rec[f"{m}_mean"], rec[f"{m}_std"] = s.get("mean"), s.get("std")
            rec[f"{m}_median"] = s.get("median")
        rec["n_empty"] = r.stats.get("dice", {}).get("n_empty")
        rec["n_both_empty"] = r.stats.get("dice", {}).get("n_both_empty")
        rec["wilcoxon_p_dice_vs_first"] = r.p_value
        rec["n_common_cases"] = r.n_common
        for k in ("empty_policy", "lcc", "distance_unit", "checkpoint_rule", "precision"):
            rec[k] = r.settings.get(k)
        if any(row.settings.get("n_train_cases_evaluated") for row in rows):  # `eval --allow-train-cases`
            rec["n_train_cases_evaluated"] = int(r.settings.get("n_train_cases_evaluated") or 0)
        records.append(rec)
    frame = pd.DataFrame(records).astype({"labeled": "Int64", "unlabeled": "Int64", "n_cases": "Int64",
                                           "n_empty": "Int64", "n_common_cases": "Int64"})
    buf = io.StringIO()
    frame.to_csv(buf, index=False)
    return buf.getvalue()


def _header(rows: list[ResultRow], latex: bool) -> list[str]:
    unit = _unit(rows)
    up, down = (r"$\uparrow$", r"$\downarrow$") if latex else ("↑", "↓")
    heads = ["Method", "Labeled", "Unlabeled"]
    for m in METRIC_TABLE.values():
        title = m.header.replace("%", r"\%") if latex else m.header
        if m.unit == DISTANCE:
            title = f"{title} ({unit})"
        heads.append(f"{title}{up if m.higher_is_better else down}")
    if has_p_values(rows):
        heads.append("$p$ (Wilcoxon)" if latex else "p (Wilcoxon)")
    return heads


def unit_label(m, distance_unit: str, latex: bool = False) -> str:
    """The unit line of a two-line header: "(%)", "(voxel)" / "(mm)" for distances, "" for plain numbers."""
    if m.unit == PERCENT:
        return r"(\%)" if latex else "(%)"
    if m.unit == DISTANCE:
        return f"({latex_escape(distance_unit)})" if latex else f"({distance_unit})"
    return ""


def _method_cell(r: ResultRow) -> str:
    """The method name, marked when its masks were LCC post-processed (a method's protocol can turn it on)."""
    return f"{r.method} +LCC" if r.settings.get("lcc") else r.method


def _body(rows: list[ResultRow], std: bool, mark) -> list[list[str]]:
    """Cells of each row; `mark(text, "best"|"second"|None)` decorates metric cells (best per column)."""
    marks = {m: rank_marks([_value(r, m) for r in rows], spec.higher_is_better) for m, spec in METRIC_TABLE.items()}
    body = []
    for i, r in enumerate(rows):
        cells = [_method_cell(r), _count(r.labeled, r.n_train), _count(r.unlabeled, r.n_train)]
        cells += [mark(_cell(r, m, std), marks[m][i]) for m in METRIC_TABLE]
        if has_p_values(rows):
            cells.append(_p_cell(r, i == 0))
        body.append(cells)
    return body


def render_markdown(rows: list[ResultRow], notes: list[str], std: bool = False) -> str:
    head = _header(rows, latex=False)
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join([" --- "] + [" ---: "] * (len(head) - 1)) + "|"]
    for cells in _body(rows, std, mark_markdown):
        lines.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    return "\n".join(lines) + "\n\n" + "\n".join(f"{n}  " for n in notes).rstrip() + "\n"


def _latex_header(rows: list[ResultRow]) -> list[str]:
    """Two header rows (names with arrows; units below), narrower than one row of "Jaccard (%)↑"."""
    top, units = ["Method", "Labeled", "Unlabeled"], ["", "", ""]
    for m in METRIC_TABLE.values():
        top.append(latex_escape(m.title) + (r"$\uparrow$" if m.higher_is_better else r"$\downarrow$"))
        units.append(unit_label(m, _unit(rows), latex=True))
    if has_p_values(rows):
        top.append("$p$")  # the notes name the test
        units.append("")
    return [" & ".join(top) + r" \\", " & ".join(units) + r" \\"]


def render_latex(rows: list[ResultRow], notes: list[str], std: bool = False, caption: str | None = None,
                 label: str = "tab:results") -> str:
    """A `table` float (caption, label, booktabs, notes wrapped below); needs reports.latex.PREAMBLE.
    SD (with `std`) is set as a subscript to keep the columns narrow."""
    def fmt(text: str, mark=None) -> str:
        value, sep, sd = text.partition(" ± ")
        tex = latex_escape(value) + (rf"$_{{\pm {latex_escape(sd)}}}$" if sep else "")
        return mark_latex(tex, mark)

    body = [[fmt(c) if isinstance(c, str) else fmt(*c) for c in cells]
            for cells in _body(rows, std, lambda t, m: (t, m))]
    caption = caption or ("Segmentation results, " + ("mean ± SD over cases" if std else "mean over cases")
                          + "; best per column in bold" + (", second underlined." if len(rows) > 2 else "."))
    return latex_table(_latex_header(rows), "l" + "c" * (len(body[0]) - 1), body, notes, caption=caption,
                       label=label)


def _count_of(value) -> int:
    try:
        return 0 if value is None or not math.isfinite(float(value)) else int(value)
    except (TypeError, ValueError):
        return 0


def footnotes(rows: list[ResultRow], std: bool = False) -> list[str]:
    """The settings every reader needs to compare numbers across papers, stated once or per row."""
    def describe(key: str, fmt) -> str:
        values = {r.method: r.settings.get(key) for r in rows}
        distinct = list(dict.fromkeys(values.values()))
        if len(distinct) == 1:
            return fmt(distinct[0])
        return "MIXED " + "; ".join(f"{m}: {fmt(v)}" for m, v in values.items())

    def policy(p):
        return f"'{p}' ({EMPTY_POLICIES[p]})" if p in EMPTY_POLICIES else str(p or "unknown")

    notes = [
        "Empty-mask policy: " + describe("empty_policy", policy) + ".",
        "LCC post-processing: " + describe("lcc", lambda v: "unknown" if v is None else ("on" if v else "off"))
        + "; distances in " + describe("distance_unit", lambda v: str(v or "unknown"))
        + "; checkpoint: " + describe("checkpoint_rule", lambda v: str(v or "unknown")) + ".",
    ]
    if any(r.settings.get("precision") for r in rows):  # evaluations of runs record their inference precision
        notes.append("Inference precision: " + describe("precision", lambda v: str(v or "unknown")) + ".")
    if any(r.settings.get("train_precision") for r in rows):  # the run's env.json; every official code trains in fp32
        notes.append("Training precision: " + describe("train_precision", lambda v: str(v or "unknown"))
                     + " (the official codes train in fp32).")
    n_cases = {r.n_cases for r in rows}
    stat = "mean ± SD over cases" if std else "mean over cases"
    runs = [r.settings.get("n_runs") for r in rows if r.settings.get("n_runs")]
    if runs:  # --group-by: one row per method, its runs (seeds) aggregated
        stat = ("mean ± SD over runs (seeds) of each run's mean over cases" if std else
                "mean over runs (seeds) of each run's mean over cases") + " (runs per row: " + ", ".join(
            f"{r.method}: {r.settings.get('n_runs')}" for r in rows) + ")"
    notes.append(f"Values: {stat}" + (f" (n = {n_cases.pop()})." if len(n_cases) == 1 else "; case counts differ: "
                 + ", ".join(f"{r.method}: {r.n_cases}" for r in rows) + "."))
    unscored = [f"{r.method}: {r.settings['n_missing']}" for r in rows if r.settings.get("n_missing")]
    if unscored:
        notes.append("References without a prediction (not scored, not in n): " + ", ".join(unscored) + ".")
    trained = [f"{r.method}: {r.settings['n_train_cases_evaluated']}" for r in rows
               if r.settings.get("n_train_cases_evaluated")]
    if trained:  # `eval --allow-train-cases`
        notes.append("WARNING: cases the run trained on are among the scored cases (optimistic; "
                     "--allow-train-cases): " + ", ".join(trained) + ".")
    empties = [f"{r.method}: {r.stats['dice']['n_empty']}" for r in rows
               if r.stats.get("dice") and r.stats["dice"].get("n_empty")]
    if empties:
        notes.append("Cases with one mask empty (policy applied): " + ", ".join(empties) + ".")
    both = [f"{r.method}: {int(r.stats['dice']['n_both_empty'])}" for r in rows
            if r.stats.get("dice") and _count_of(r.stats["dice"].get("n_both_empty"))]
    if both:
        notes.append("Cases with both masks empty (scored Dice 1, distances 0; not counted as empty): "
                     + ", ".join(both) + ".")
    if has_p_values(rows):
        commons = {r.n_common for r in rows[1:] if r.p_value is not None}
        n_txt = f" over {commons.pop()} common cases" if len(commons) == 1 else " over the cases each shares with it"
        notes.append("p: two-sided Wilcoxon signed-rank test of per-case Dice against the first row (ref.)"
                     + n_txt + "; not corrected for multiple comparisons."
                     + (" n/a: a single common case, too few for a test." if any(
                         r.p_value is not None and not math.isfinite(r.p_value) for r in rows[1:]) else ""))
    return notes


def render_table(rows: list[ResultRow], fmt: str, std: bool = False) -> str:
    check_table_format(fmt)
    if fmt == "csv":
        return render_csv(rows)
    notes = footnotes(rows, std)
    return render_markdown(rows, notes, std) if fmt == "md" else render_latex(rows, notes, std)
