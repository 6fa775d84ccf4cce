"""`textseg eval --compare --group-by method`: the runs (seeds) of one method become one row whose values
are the mean ± SD over runs of each run's mean over cases; the paired Wilcoxon test against the first row
pools (seed, case) pairs."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd
import yaml

from textseg_cli.metrics.table import metric_names
from textseg_cli.reports.results import _n_cases, _settings, paired_wilcoxon
from textseg_cli.reports.summary import case_level, headline
from textseg_cli.reports.tables import ResultRow

GROUP_KEYS = ("method",)


def _seed(res, index: int):
    """The run's seed (its config.yaml beside the evaluated run), else its position in the group."""
    run_dir = res.meta.get("run_dir")
    if run_dir:
        try:
            return int(yaml.safe_load((Path(run_dir) / "config.yaml").read_text(encoding="utf-8"))["seed"])
        except Exception:
            pass
    return f"run{index}"


def grouped_rows(results: Sequence, class_name: str | None = None) -> list[ResultRow]:
    groups: dict[tuple, list] = {}
    for res in results:
        groups.setdefault((res.name, res.meta.get("labeled")), []).append(res)
    rows, first = [], None
    for (name, labeled), members in groups.items():
        per_run = [headline(r.summary, class_name) for r in members]
        stats = {}
        for m in metric_names():
            v = np.array([float(h[m]["mean"]) for h in per_run if m in h], dtype=float)
            v = v[np.isfinite(v)]
            stats[m] = {"mean": float(v.mean()) if v.size else float("nan"),
                        "std": float(v.std(ddof=1)) if v.size > 1 else float("nan"),
                        "n_empty": sum(int(h[m].get("n_empty") or 0) for h in per_run if m in h),
                        "n_both_empty": sum(int(h[m].get("n_both_empty") or 0) for h in per_run if m in h),
                        "n_cases": _n_cases(per_run[0])}
        frames = []
        for i, r in enumerate(members):
            if r.per_case is not None:
                d = case_level(r.per_case, class_name)["dice"]
                d.index = pd.MultiIndex.from_tuples([(_seed(r, i), c) for c in d.index])
                frames.append(d)
        cases = pd.concat(frames) if frames else None
        p = n_common = None
        if first is None:
            first = cases
        elif cases is not None and first is not None:
            p, n_common = paired_wilcoxon(cases, first)
        meta = members[0].meta
        settings = _settings(meta)
        settings["n_runs"] = len(members)
        n_train_cases = sum(_settings(r.meta).get("n_train_cases_evaluated", 0) for r in members)
        if n_train_cases:  # a run of the group scored cases it trained on (`eval --allow-train-cases`)
            settings["n_train_cases_evaluated"] = n_train_cases
        rows.append(ResultRow(method=name, stats=stats, labeled=labeled, unlabeled=meta.get("unlabeled"),
                              n_train=meta.get("n_train"), n_cases=_n_cases(per_run[0]), p_value=p,
                              n_common=n_common, settings=settings))
    return rows
