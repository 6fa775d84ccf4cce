"""Combine evaluation results into one results table (`textseg eval --compare`).

Each input is an evaluation folder written by `textseg eval` (per_case.csv, summary.csv,
meta.json) or one of its CSV files; a per-case CSV from another tool works too if it has a `case`
and a `dice` column. Rows keep the order given; the first row is the reference of the paired test.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from textseg_cli.console import err_console
from textseg_cli.errors import ConfigError
from textseg_cli.reports.grouping import grouped_rows
from textseg_cli.reports.results import _named_result, build_rows
from textseg_cli.reports.table2d import is_2d, render_table_2d
from textseg_cli.reports.tables import TABLE_SUFFIX, check_table_format, render_table
from textseg_cli.storage.files import atomic_write_text
from textseg_cli.storage.outputs import guard_output_file


def table_format_for(out: str | Path | None, table: str | None) -> str:
    """--table wins; otherwise the suffix of --out (.tex/.md/.csv); otherwise Markdown."""
    if table:
        return check_table_format(table)
    if out is not None:
        for fmt, suffix in TABLE_SUFFIX.items():
            if str(out).endswith(suffix):
                return fmt
    return "md"


def compare_results(paths: Sequence[str | Path], table: str | None = None, out: str | Path | None = None, *,
                    force: bool = False, std: bool = False, class_name: str | None = None,
                    layout: str = "auto", group_by: str | None = None) -> str:
    """Render one results table (rows = the given evaluations, in order) and return its text.

    `table` is csv, md or latex; None takes the format from `out`'s suffix (.csv/.md/.tex), else md.

    With `out`, the text is also written there (refused if it exists, unless `force`). With two or
    more results sharing cases, each row after the first gets the Wilcoxon p-value of its per-case
    Dice against the first row's.

    `layout`: "3d" (the semi-supervised papers' columns above), "2d" (TGC-Net/LViT Table 1: method,
    text ✓/✗, Dice and mIoU per data set side by side; `reports.table2d`) or "auto" (2d when every
    result was scored per 2D image, from its meta.json).

    `group_by="method"`: results with the same name (and labeled count) become one row, mean ± SD over
    them (seeds). A path given as `NAME=PATH` shows as NAME (a display name such as "MC-Net").
    """
    if not paths:
        raise ConfigError("--compare needs at least one evaluation folder or CSV")
    try:
        fmt = table_format_for(out, table)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    if out is not None:
        guard_output_file(out, force)
    if layout not in ("auto", "2d", "3d"):
        raise ConfigError(f"--layout {layout!r}: expected auto, 2d or 3d")
    results = [_named_result(p) for p in paths]

    if group_by and layout == "2d":
        raise ConfigError("--group-by applies to the 3D layout (--layout 3d)")
    if not group_by and (layout == "2d" or (layout == "auto" and all(is_2d(r) for r in results))):
        text = render_table_2d(results, fmt, std=std, class_name=class_name)
        if out is not None:
            atomic_write_text(out, text)
        return text
    if group_by not in (None, "method"):
        raise ConfigError(f"--group-by {group_by!r}: expected method")
    if group_by:
        rows = grouped_rows(results, class_name)
    else:
        rows = build_rows(results, class_name)
    for key in ("distance_unit", "empty_policy", "lcc"):
        values = {str(r.settings.get(key)) for r in rows}
        if len(values) > 1:
            err_console.print(f"[bold yellow]warning:[/] the compared results differ in {key} ({', '.join(sorted(values))}); "
                              "their numbers are not comparable", highlight=False, soft_wrap=True)
    text = render_table(rows, fmt, std=std)
    if out is not None:
        atomic_write_text(out, text)
    return text
