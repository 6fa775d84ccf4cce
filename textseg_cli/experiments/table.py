"""`textseg experiment table`: rows = method × labeled count; cells = mean ± SD over seeds of the per-run
means over cases; paired Wilcoxon over (seed, case) pairs against a reference row of the same labeled count;
published numbers (the method config's `published:` block) beside the measured ones."""

from __future__ import annotations

import io
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from textseg_cli.errors import ConfigError, DataError
from textseg_cli.experiments.runner import read_status
from textseg_cli.experiments.spec import Experiment, MethodEntry, load_experiment
from textseg_cli.metrics.case import EMPTY_POLICIES
from textseg_cli.metrics.table import METRIC_TABLE
from textseg_cli.reports.latex import (
    latex_escape,
    latex_table,
    mark_latex,
    mark_markdown,
    rank_marks,
)
from textseg_cli.reports.results import load_result, paired_wilcoxon
from textseg_cli.reports.summary import case_level, headline
from textseg_cli.reports.tables import check_table_format, unit_label
from textseg_cli.runs.config import load_config, packaged_config
from textseg_cli.storage.files import atomic_write_text
from textseg_cli.storage.outputs import guard_output_file
from textseg_cli.text.embeddings import load_embeddings


@dataclass
class GridRow:
    entry: MethodEntry
    labeled: str
    seeds: list[int] = field(default_factory=list)
    per_seed: dict[str, list[float]] = field(default_factory=dict)  # metric → per-run means (raw units)
    cases: pd.DataFrame | None = None  # (seed, case) → dice
    metas: list[dict] = field(default_factory=list)
    missing: list[int] = field(default_factory=list)
    p_value: float | None = None
    n_pairs: int | None = None
    published: dict | None = None

    def mean(self, m: str) -> float:
        v = [x for x in self.per_seed.get(m, []) if math.isfinite(x)]
        return float(np.mean(v)) if v else float("nan")

    def sd(self, m: str) -> float:
        v = [x for x in self.per_seed.get(m, []) if math.isfinite(x)]
        return float(np.std(v, ddof=1)) if len(v) > 1 else float("nan")


def published_numbers(entry: MethodEntry, profile: str | None, labeled: str) -> dict | None:
    """The published Dice/Jaccard/95HD/ASD of `entry` on `profile` at `labeled` (the method config's `published:`
    block, with its source), or None. An entry that adds the "+Text" add-on (`method.text_addon=...`) is not the
    published method, so it has none."""
    if any(s.split("=", 1)[0].strip() == "method.text_addon" for s in entry.sets):
        return None
    block = (packaged_config(entry.method).get("published") or {}).get(str(profile or "").lower()) or {}
    numbers = block.get(str(labeled)) or block.get(labeled.rstrip("%") + "%") if isinstance(block, dict) else None
    if not isinstance(numbers, dict) or numbers.get("dice") is None:
        return None
    out = {k: float(numbers[k]) for k in ("dice", "jaccard", "hd95", "asd") if numbers.get(k) is not None}
    return {**out, "source": numbers.get("source") or block.get("source") or "config"}


def collect(exp: Experiment, published: bool = False) -> list[GridRow]:
    rows = []
    for lab in exp.labeled:  # grouped by labeled count, as the papers' tables
        for m in exp.methods:
            row = GridRow(m, lab)
            frames = []
            for run in [r for r in exp.runs() if r.entry is m and r.labeled == lab]:
                ev = exp.eval_dir(run)
                if not (ev / "meta.json").exists():
                    row.missing.append(run.seed)
                    continue
                res = load_result(ev)
                stats = headline(res.summary)
                for metric in METRIC_TABLE:
                    row.per_seed.setdefault(metric, []).append(float(stats[metric]["mean"]) if metric in stats
                                                               else float("nan"))
                row.seeds.append(run.seed)
                meta = dict(res.meta)
                meta["n_both_empty"] = int(stats["dice"].get("n_both_empty") or 0) if "dice" in stats else 0
                meta["n_one_empty"] = int(stats["dice"].get("n_empty") or 0) if "dice" in stats else 0
                meta["status"] = read_status(exp, run)
                row.metas.append(meta)
                if res.per_case is not None:
                    d = case_level(res.per_case)["dice"]
                    d.index = pd.MultiIndex.from_tuples([(run.seed, c) for c in d.index])
                    frames.append(d)
            row.cases = pd.concat(frames) if frames else None
            if published:
                profile = exp.dataset or (row.metas[0].get("dataset") if row.metas else None)
                row.published = published_numbers(m, profile, lab)
            rows.append(row)
    ref = exp.reference_entry()
    for lab in exp.labeled:
        base = next(r for r in rows if r.entry is ref and r.labeled == lab)
        for r in rows:
            if r.labeled == lab and r is not base and r.cases is not None and base.cases is not None:
                r.p_value, r.n_pairs = paired_wilcoxon(r.cases, base.cases)
    return rows


def _fmt(v: float, sd: float, latex: bool) -> str:
    if not math.isfinite(v):
        return "--" if latex else "–"
    if not math.isfinite(sd):
        return f"{v:.2f}"
    return rf"{v:.2f}$_{{\pm {sd:.2f}}}$" if latex else f"{v:.2f} ± {sd:.2f}"


def _settings_note(rows: list[GridRow], key: str, fmt) -> str:
    values = {}
    for r in rows:
        for meta in r.metas:
            values.setdefault(r.entry.name, set()).add(fmt(meta.get(key)))
    distinct = {v for vs in values.values() for v in vs}
    if len(distinct) <= 1:
        return distinct.pop() if distinct else "unknown"
    return "per method: " + "; ".join(f"{n}: {'/'.join(sorted(v))}" for n, v in values.items())


def _text_encoder(cfg: dict) -> str:
    """real / random weights of a run's text encoder, from its config.yaml (no text encoder → none)."""
    m = cfg.get("method") or {}
    text = m.get("text") if isinstance(m.get("text"), dict) else {}
    if "clip_model" in m:  # TGC-Net: a random tiny CLIP, or open_clip weights
        return "random" if m.get("clip_model") == "tiny" or m.get("clip_weights") in ("none",) else "real"
    emb = text.get("embeddings") or m.get("text_embeddings")
    if emb:
        try:
            info = load_embeddings(emb)
            settings = getattr(info, "settings", None) or (info.get("settings") if isinstance(info, dict) else {})
            return "random" if str((settings or {}).get("pretrained")).lower() == "none" else "real"
        except Exception:
            return "real (embedding file, unchecked)"
    if text:
        return "random" if str(text.get("clip_pretrained")).lower() in ("none", "null") else "real"
    return "none"


def notes(exp: Experiment, rows: list[GridRow]) -> list[str]:

    n_seeds = sorted({len(r.seeds) for r in rows})
    its, enc = {}, {}
    for r in rows:
        for meta in r.metas:
            run_dir = Path(str(meta.get("run_dir") or ""))
            try:
                cfg = load_config(run_dir / "config.yaml")
            except Exception:
                continue
            its.setdefault(r.entry.name, set()).add(int(cfg["train"]["iterations"]))
            enc.setdefault(r.entry.name, set()).add(_text_encoder(cfg))

    def per_method(d: dict) -> str:
        distinct = {v for vs in d.values() for v in vs}
        if len(distinct) == 1:
            return str(distinct.pop())
        return "; ".join(f"{n}: {'/'.join(map(str, sorted(v)))}" for n, v in d.items()) or "unknown"

    out = [
        f"Cells: mean ± SD over seeds of each run's mean over cases (n = {'/'.join(map(str, n_seeds))} seed(s) "
        f"per row; seeds {', '.join(map(str, exp.seeds))}); Dice and Jaccard in %.",
        f"Split: {exp.eval['split']}; checkpoint: "
        + _settings_note(rows, "checkpoint_rule", lambda v: str(v or exp.eval["checkpoint"])) + "; LCC: "
        + _settings_note(rows, "lcc", lambda v: "unknown" if v is None else ("on" if v else "off"))
        + "; 95HD/ASD in " + _settings_note(rows, "distance_unit", lambda v: str(v or "unknown")) + ".",
        "Empty-mask policy: " + _settings_note(rows, "empty_policy", lambda p: f"'{p}' ({EMPTY_POLICIES.get(p, '?')})")
        + ".",
        f"Iterations: {per_method(its)}; text encoder weights: {per_method(enc)}; training precision: "
        + _settings_note(rows, "train_precision", lambda v: str(v or "unknown")) + " (the official codes train in fp32).",
    ]
    one = sum(m["n_one_empty"] for r in rows for m in r.metas)
    both = sum(m["n_both_empty"] for r in rows for m in r.metas)
    out.append(f"Case-runs with exactly one mask empty (policy applied): {one}; with both masks empty (scored "
               f"Dice 1, distances 0, not counted as empty): {both}.")
    if any(r.p_value is not None for r in rows):
        ref = exp.reference_entry().name
        out.append(f"p: two-sided Wilcoxon signed-rank test of per-case Dice against {ref} (ref.) at the same labeled "
                   "count, over (seed, case) pairs pooled over seeds; not corrected for multiple comparisons.")
    pubs = {(r.entry.name, r.published["source"]) for r in rows if r.published}
    if pubs:
        out.append("Published Dice from the method configs' published blocks; Δ = measured − published. Sources: "
                   + "; ".join(f"{n}: {s}" for n, s in sorted(pubs)) + ".")
    partial = [f"{r.entry.name} {r.labeled} {METRIC_TABLE[m].title}: {n} of {len(r.seeds)}"
               for r in rows for m in METRIC_TABLE
               for n in [sum(1 for v in r.per_seed.get(m, []) if math.isfinite(v))] if r.seeds and n < len(r.seeds)]
    if partial:
        out.append("Fewer seeds than the row's (runs whose cases all lacked a finite value, e.g. every case with "
                   "one mask empty under 'nan'): " + "; ".join(partial) + ".")
    missing = [f"{r.entry.name} {r.labeled}: seed(s) {', '.join(map(str, r.missing))}" for r in rows if r.missing]
    if missing:
        out.append("Not finished (left out): " + "; ".join(missing) + ".")
    return out


def _cells(exp: Experiment, rows: list[GridRow], latex: bool, published: bool):
    """(header rows, body rows, group breaks). LaTeX is kept narrow enough for 8 methods x 2 labeled counts
    on a page: units on a second header line, SD as a subscript, seed counts in the caption when uniform."""
    ref = exp.reference_entry()
    show_p = any(r.p_value is not None for r in rows)
    seeds_col = not latex or len({len(r.seeds) for r in rows}) > 1
    arrows = {True: r"$\uparrow$" if latex else "↑", False: r"$\downarrow$" if latex else "↓"}
    unit = _unit(rows)
    # LaTeX: the labeled count titles each group of rows instead of taking a column
    top = ["Method"] + ([] if latex else ["Labeled"]) + (["Seeds"] if seeds_col else [])
    second = [""] * len(top)
    for m in METRIC_TABLE.values():
        top.append(m.title + arrows[m.higher_is_better])
        second.append(unit_label(m, unit, latex))
    if published:
        top += ["Publ.", r"$\Delta$" if latex else "Δ"]
        second += ["Dice", "Dice"]
    if show_p:
        top.append("$p$" if latex else "p")
        second.append("(Wilcoxon)")
    marks = {}
    for lab in exp.labeled:
        group = [r for r in rows if r.labeled == lab]
        for m, spec in METRIC_TABLE.items():
            for r, mk in zip(group, rank_marks([r.mean(m) * spec.scale for r in group], spec.higher_is_better)):
                marks[(id(r), m)] = mk
    esc = latex_escape if latex else (lambda s: str(s).replace("|", "\\|"))
    mark = mark_latex if latex else mark_markdown
    dash = "--" if latex else "–"
    body, breaks = [], []
    for i, r in enumerate(rows):
        if i and r.labeled != rows[i - 1].labeled:
            breaks.append(i)
        cells = [esc(r.entry.name)] + ([] if latex else [esc(r.labeled)]) + ([str(len(r.seeds))] if seeds_col else [])
        for m, spec in METRIC_TABLE.items():
            cells.append(mark(_fmt(r.mean(m) * spec.scale, r.sd(m) * spec.scale, latex), marks[(id(r), m)]))
        if published:
            pub = r.published
            diff = r.mean("dice") * 100 - pub["dice"] if pub else float("nan")
            cells += [f"{pub['dice']:.2f}" if pub else dash, f"{diff:+.2f}" if math.isfinite(diff) else dash]
        if show_p:
            p = r.p_value
            cells.append("ref." if r.entry is ref else dash if p is None else "n/a" if not math.isfinite(p) else
                         (esc("<0.001") if p < 0.001 else f"{p:.3f}"))  # n/a: one pair, no test (paired_wilcoxon)
        body.append(cells)
    if latex:
        head = [" & ".join(top) + r" \\", " & ".join(second) + r" \\"]
    else:
        head = [f"{t} {u}".strip() for t, u in zip(top, second)]
    return head, body, breaks


def _unit(rows: list[GridRow]) -> str:
    units = {m.get("distance_unit") for r in rows for m in r.metas} - {None}
    return units.pop() if len(units) == 1 else "mixed units"


def _csv(exp: Experiment, rows: list[GridRow]) -> str:
    records = []
    for r in rows:
        base = {"method": r.entry.method, "name": r.entry.name, "id": r.entry.id, "labeled": r.labeled}
        for i, seed in enumerate(r.seeds):
            rec = dict(base, seed=seed, n_seeds=1)
            for m in METRIC_TABLE:
                rec[m] = r.per_seed[m][i]
            meta = r.metas[i]
            rec.update(n_cases=meta.get("n_cases"), lcc=meta.get("lcc"), empty_policy=meta.get("empty_policy"),
                       distance_unit=meta.get("distance_unit"), checkpoint_rule=meta.get("checkpoint_rule"),
                       split=meta.get("split"), n_both_empty=meta.get("n_both_empty"),
                       n_one_empty=meta.get("n_one_empty"))
            records.append(rec)
        agg = dict(base, seed="mean", n_seeds=len(r.seeds))
        for m in METRIC_TABLE:
            agg[m], agg[f"{m}_sd_over_seeds"] = r.mean(m), r.sd(m)
        agg["wilcoxon_p_dice_vs_reference"], agg["wilcoxon_pairs"] = r.p_value, r.n_pairs
        if r.published:
            agg["published_dice_pct"], agg["published_source"] = r.published["dice"], r.published["source"]
        records.append(agg)
    buf = io.StringIO()
    pd.DataFrame(records).to_csv(buf, index=False)
    return buf.getvalue()


def experiment_table(spec: str | Path, table: str = "md", published: bool = False, out: str | Path | None = None,
                     force: bool = False, reference: str | None = None) -> str:
    """The results table of an experiment (its file or its folder): md, csv (one row per seed plus one
    mean row per method × labeled) or latex (paste-ready). `reference`: the Wilcoxon reference method (name
    or id; default the file's `reference:`, else its first method)."""
    try:
        check_table_format(table)
    except ValueError as exc:
        raise ConfigError(f"--table: {exc}") from None
    exp = load_experiment(spec)
    if reference is not None:
        exp.reference = reference
        exp.reference_entry()  # names a method, else ConfigError
    if out is not None:
        guard_output_file(out, force)
    rows = collect(exp, published)
    if not any(r.seeds for r in rows):
        raise DataError("no finished run to tabulate yet; run `textseg experiment run` first", exp.out)
    if table == "csv":
        text = _csv(exp, rows)
    else:
        latex = table == "latex"
        head, body, breaks = _cells(exp, rows, latex, published)
        nts = notes(exp, rows)
        n_seeds = sorted({len(r.seeds) for r in rows})
        caption = (f"{exp.name}: mean ± SD over {'/'.join(map(str, n_seeds))} seeds of the per-run mean over cases "
                   f"({exp.eval['split']} split); best per labeled count in bold, second "
                   + ("underlined." if latex else "in italics."))
        if latex:
            ncol = len(body[0])
            starts = [0] + breaks
            groups = {i: f"{rows[i].labeled} labeled" for i in starts}
            text = latex_table(head, "l" + "c" * (ncol - 1), body, nts, caption=caption, label=f"tab:{exp.name}",
                               groups=groups)
        else:
            lines = [f"**{caption}**", "", "| " + " | ".join(head) + " |",
                     "| --- | --- |" + " ---: |" * (len(head) - 2)]
            lines += ["| " + " | ".join(c) + " |" for c in body]
            text = "\n".join(lines) + "\n\n" + "\n".join(f"{n}  " for n in nts).rstrip() + "\n"
    if out is not None:
        atomic_write_text(out, text)
    return text
