"""Evaluation results on disk (`eval` output folders): loading, paired Wilcoxon, table rows."""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd

from textseg_cli.errors import ConfigError, DataError
from textseg_cli.metrics.table import metric_names
from textseg_cli.reports.summary import case_level, headline, summarize
from textseg_cli.reports.tables import ResultRow
from textseg_cli.storage.files import read_json

PER_CASE = "per_case.csv"


SUMMARY = "summary.csv"


META = "meta.json"


@dataclass
class EvalResult:
    name: str
    summary: pd.DataFrame
    per_case: pd.DataFrame | None
    meta: dict
    source: Path


def _read_csv(path: Path) -> pd.DataFrame:
    try:
        return pd.read_csv(path)
    except Exception as exc:
        raise DataError(f"unreadable CSV ({type(exc).__name__}: {exc})", path) from exc


def normalize_per_case(df: pd.DataFrame, path: Path) -> pd.DataFrame:
    """Check a per-case table; fill what other tools' CSVs lack (one class, no empty flags)."""
    missing = [c for c in ("case", "dice") if c not in df.columns]
    if missing:
        raise DataError(f"per-case CSV lacks column(s) {missing}; found {list(df.columns)}", path)
    df = df.copy()
    df["case"] = df["case"].astype(str)
    for m in metric_names():
        if m not in df.columns:
            df[m] = np.nan
    for flag in ("pred_empty", "ref_empty"):
        df[flag] = df[flag].astype(bool) if flag in df.columns else False
    if "class_name" not in df.columns:
        df["class_name"] = df["class"].astype(str) if "class" in df.columns else "foreground"
    return df


def load_result(path: str | Path) -> EvalResult:
    """Read an evaluation folder or CSV file (and the meta.json beside it, when present)."""
    path = Path(path)
    if not path.exists():
        raise DataError("evaluation result not found", path)
    folder = path if path.is_dir() else path.parent
    per_case_path = summary_path = None
    if path.is_dir():
        per_case_path = path / PER_CASE if (path / PER_CASE).exists() else None
        summary_path = path / SUMMARY if (path / SUMMARY).exists() else None
        if per_case_path is None and summary_path is None:
            raise DataError(f"no {PER_CASE} or {SUMMARY} here; run `textseg eval` first", path)
    elif path.suffix == ".json":
        return load_result(folder)
    elif path.suffix == ".csv":
        columns = list(_read_csv(path).columns)
        if "metric" in columns and "mean" in columns:
            summary_path = path
            sibling = folder / PER_CASE
            per_case_path = sibling if sibling.exists() else None
        else:
            per_case_path = path
    else:
        raise DataError("expected an evaluation folder, a .csv written by `textseg eval`, or its meta.json", path)

    meta: dict = {}
    if (folder / META).exists():
        meta = read_json(folder / META)
    per_case = None
    if per_case_path is not None:
        per_case = normalize_per_case(_read_csv(per_case_path), per_case_path)
        summary = summarize(per_case)
    else:
        summary = _read_csv(summary_path)
        missing = [c for c in ("class", "metric", "mean", "std") if c not in summary.columns]
        if missing:
            raise DataError(f"summary CSV lacks column(s) {missing}", summary_path)
    default_name = folder.name if path.is_dir() or path.name in (PER_CASE, SUMMARY) else path.stem
    return EvalResult(str(meta.get("name") or default_name), summary, per_case, meta, path)


def _named_result(path: str | Path) -> EvalResult:
    """`NAME=PATH` → the result at PATH shown as NAME; a plain path keeps its own name."""
    text = str(path)
    if "=" in text and not Path(text).exists():
        name, _, rest = text.partition("=")
        if name.strip() and rest:
            res = load_result(rest)
            res.name = name.strip()
            return res
    return load_result(path)


def paired_wilcoxon(a: pd.Series, b: pd.Series) -> tuple[float | None, int]:
    """Two-sided Wilcoxon signed-rank p-value of paired values over the common (finite) index.

    None when no case is shared; NaN (tables print "n/a") when only one pair is: a signed-rank test over one
    difference says nothing (scipy would report p = 1 or a meaningless value)."""

    joined = pd.concat([a.rename("a"), b.rename("b")], axis=1, join="inner").dropna()
    n = len(joined)
    if n == 0:
        return None, 0
    if n < 2:
        return float("nan"), n
    diff = joined["a"].to_numpy(float) - joined["b"].to_numpy(float)
    if not np.any(diff != 0):
        return 1.0, n  # identical per-case values: no evidence of a difference
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        from scipy.stats import wilcoxon  # lazy: scipy.stats costs 1-2 s at import; only p-value tables need it

        return float(wilcoxon(joined["a"], joined["b"]).pvalue), n


def _settings(meta: dict) -> dict:
    # `eval --allow-train-cases`: cases the run trained on were scored; every table built from it says so
    n_train_cases = len(meta.get("train_cases_evaluated") or [])
    return {**{k: meta.get(k) for k in ("empty_policy", "lcc", "distance_unit", "checkpoint_rule", "precision",
                                          "train_precision")},
            "n_missing": len(meta.get("missing_predictions") or []),
            **({"n_train_cases_evaluated": n_train_cases} if n_train_cases else {})}


def _n_cases(stats: dict) -> int | None:
    for row in stats.values():
        if "n_cases" in row and pd.notna(row["n_cases"]):
            return int(row["n_cases"])
    return None


def build_rows(results: Sequence[EvalResult], class_name: str | None = None) -> list[ResultRow]:
    rows: list[ResultRow] = []
    seen: dict[str, int] = {}
    first_cases = None
    for i, res in enumerate(results):
        try:
            stats = headline(res.summary, class_name)
        except KeyError:
            raise ConfigError(f"class {class_name!r} not in {sorted(set(res.summary['class'].astype(str)))}",
                              res.source) from None
        name = res.name
        seen[name] = seen.get(name, 0) + 1
        if seen[name] > 1:
            name = f"{name} ({seen[name]})"
        dice_cases = case_level(res.per_case, class_name)["dice"] if res.per_case is not None else None
        p_value = n_common = None
        if i == 0:
            first_cases = dice_cases
        elif dice_cases is not None and first_cases is not None:
            p_value, n_common = paired_wilcoxon(dice_cases, first_cases)
        meta = res.meta
        rows.append(ResultRow(
            method=name, stats=stats, labeled=meta.get("labeled"), unlabeled=meta.get("unlabeled"),
            n_train=meta.get("n_train"), n_cases=_n_cases(stats), p_value=p_value,
            n_common=n_common, settings=_settings(meta)))
    return rows
