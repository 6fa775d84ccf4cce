"""Reports: summaries of per-case metrics, results tables (CSV / Markdown / LaTeX) and comparisons
of several evaluations with a paired Wilcoxon test. See docs/evaluation.md."""

from textseg_cli.reports.compare import compare_results
from textseg_cli.reports.results import EvalResult, load_result, paired_wilcoxon
from textseg_cli.reports.summary import case_level, headline, summarize
from textseg_cli.reports.tables import TABLE_FORMATS, ResultRow, render_table

__all__ = ["EvalResult", "ResultRow", "TABLE_FORMATS", "case_level", "compare_results", "headline",
           "load_result", "paired_wilcoxon", "render_table", "summarize"]
