"""Summaries, results tables (csv/md/latex), loading results and the paired Wilcoxon test."""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest
from scipy.stats import wilcoxon

from textseg_cli.errors import DataError, OutputExistsError
from textseg_cli.reports import compare_results, load_result, summarize
from textseg_cli.reports.latex import latex_escape
from textseg_cli.reports.results import paired_wilcoxon
from textseg_cli.reports.tables import ResultRow, render_table


def _per_case(values: dict[str, list[float]], classes=("foreground",), empty=()) -> pd.DataFrame:
    """Values are listed class by class: for two classes and n cases, the first n belong to the first class."""
    n = len(next(iter(values.values()))) // len(classes)
    rows = []
    for ci, cls in enumerate(classes):
        for i in range(n):
            rows.append({"case": f"c{i}", "class": ci + 1, "class_name": cls,
                         **{m: v[ci * n + i] for m, v in values.items()},
                         "pred_empty": (f"c{i}", cls) in empty, "ref_empty": False})
    return pd.DataFrame(rows)


def test_summary_statistics_and_nan_exclusion():
    df = _per_case({"dice": [0.9, 0.8, 0.0, 0.7], "jaccard": [0.8, 0.7, 0.0, 0.6],
                    "hd95": [1.0, 2.0, float("nan"), 6.0], "asd": [0.5, 1.0, float("nan"), 1.5]},
                   empty={("c2", "foreground")})
    s = summarize(df).set_index("metric")
    assert s.loc["dice", "mean"] == pytest.approx(0.6)
    assert s.loc["dice", "std"] == pytest.approx(np.std([0.9, 0.8, 0.0, 0.7], ddof=1))
    assert s.loc["dice", "median"] == pytest.approx(0.75)
    assert s.loc["hd95", "mean"] == pytest.approx(3.0) and s.loc["hd95", "median"] == pytest.approx(2.0)
    assert s.loc["hd95", "n"] == 3 and s.loc["hd95", "n_cases"] == 4 and s.loc["hd95", "n_empty"] == 1
    assert s.loc["dice", "n"] == 4


def test_summary_adds_mean_class_over_foreground_classes():
    df = _per_case({"dice": [0.9, 0.7, 0.5, 0.3], "jaccard": [0.8, 0.6, 0.4, 0.2],
                    "hd95": [1.0, 3.0, float("nan"), 5.0], "asd": [1.0, 1.0, 1.0, 1.0]}, classes=("LV", "RV"))
    s = summarize(df)
    assert list(dict.fromkeys(s["class"])) == ["LV", "RV", "mean"]
    mean = s[s["class"] == "mean"].set_index("metric")
    # per case: c0 = (0.9 + 0.5) / 2, c1 = (0.7 + 0.3) / 2
    assert mean.loc["dice", "mean"] == pytest.approx(0.6)
    # c0's RV HD95 is NaN, so its case mean is LV's 1.0; c1 = (3 + 5) / 2
    assert mean.loc["hd95", "mean"] == pytest.approx((1.0 + 4.0) / 2)


def _row(name, dice, hd, **kw):
    stats = {"dice": {"mean": dice, "std": 0.01, "n_empty": 0}, "jaccard": {"mean": dice - 0.1, "std": 0.02},
             "hd95": {"mean": hd, "std": 1.0}, "asd": {"mean": hd / 4, "std": 0.5}}
    settings = {"empty_policy": "nan", "lcc": False, "distance_unit": "voxel", "checkpoint_rule": "best (val Dice)"}
    return ResultRow(method=name, stats=stats, labeled=kw.get("labeled", 8), unlabeled=kw.get("unlabeled", 72),
                     n_train=kw.get("n_train"), n_cases=20, p_value=kw.get("p"), n_common=kw.get("n_common"),
                     settings=kw.get("settings", settings))


def test_latex_bolds_best_per_column_and_has_arrows_and_footnotes():
    rows = [_row("V_Net", 0.80, 9.0), _row("UA-MT", 0.87, 8.0, p=0.004, n_common=20),
            _row("MC_Net", 0.86, 7.5, p=0.0004, n_common=20)]
    tex = render_table(rows, "latex")
    assert r"\toprule" in tex and r"\bottomrule" in tex
    assert r"Dice$\uparrow$ & Jaccard$\uparrow$ & 95HD$\downarrow$ & ASD$\downarrow$ & $p$ \\" in tex
    assert r" &  &  & (\%) & (\%) & (voxel) & (voxel) &  \\" in tex  # units on a second header row
    assert r"V\_Net" in tex and r"MC\_Net" in tex  # names escaped
    ua = next(line for line in tex.splitlines() if line.startswith("UA-MT"))
    mc = next(line for line in tex.splitlines() if line.startswith(r"MC\_Net"))
    assert r"\textbf{87.00}" in ua and r"\textbf{77.00}" in ua and "0.004" in ua
    assert r"\textbf{7.50}" in mc and r"\textbf{1.88}" in mc and r"\textless{}0.001" in mc
    assert r"\underline{86.00}" in mc and r"\underline{8.00}" in ua  # second best underlined
    assert "textbf" not in next(line for line in tex.splitlines() if line.startswith(r"V\_Net"))
    assert r"\caption{" in tex and r"\label{tab:results}" in tex and r"\begin{tablenotes}" in tex
    assert r"\multicolumn" not in tex  # notes wrap below the tabular instead of widening it
    assert "Empty-mask policy: 'nan'" in tex and "LCC post-processing: off" in tex
    assert "distances in voxel" in tex and "checkpoint: best (val Dice)" in tex
    assert "Wilcoxon signed-rank" in tex and "over 20 common cases" in tex


def test_markdown_and_csv_layout():
    rows = [_row("sup", 0.80, 9.0, labeled=8, unlabeled=0, n_train=80), _row("semi", 0.88, 7.0, n_train=80, p=0.03,
                                                                             n_common=20)]
    md = render_table(rows, "md", std=True)
    lines = md.splitlines()
    assert lines[0].startswith("| Method | Labeled | Unlabeled | Dice (%)↑ | Jaccard (%)↑ | 95HD (voxel)↓ | ASD (voxel)↓")
    assert "p (Wilcoxon)" in lines[0]
    assert "| sup | 8 (10%) | 0 (0%) | 80.00 ± 1.00 |" in md
    assert "**88.00 ± 1.00**" in md and "**7.00 ± 1.00**" in md and "| ref. |" in md
    assert "mean ± SD over cases" in md
    csv = pd.read_csv(__import__("io").StringIO(render_table(rows, "csv")))
    assert list(csv["method"]) == ["sup", "semi"]
    assert csv.loc[1, "dice_mean"] == pytest.approx(0.88)  # raw fraction, full precision
    assert csv.loc[1, "wilcoxon_p_dice_vs_first"] == pytest.approx(0.03) and math.isnan(csv.loc[0, "wilcoxon_p_dice_vs_first"])
    assert set(csv["distance_unit"]) == {"voxel"} and csv.loc[0, "labeled"] == 8


def test_footnote_flags_mixed_settings():
    other = {"empty_policy": "penalty", "lcc": True, "distance_unit": "mm", "checkpoint_rule": "last"}
    md = render_table([_row("a", 0.8, 5.0), _row("b", 0.8, 5.0, settings=other)], "md")
    assert "MIXED a: 'nan'" in md and "b: on" in md and "95HD (mixed units)" in md


def test_latex_escape():
    assert latex_escape("a_b & 50% #1") == r"a\_b \& 50\% \#1"
    # `->` and `<` print as "¿" / "¡" under OT1; unknown Unicode would stop pdflatex
    assert latex_escape("best -> last, p < 0.05, 1 ± 2 – 3 ✓") == \
        r"best $\rightarrow$ last, p \textless{} 0.05, 1 $\pm$ 2 -- 3 \checkmark{}"
    assert latex_escape("a\u4e2db") == "a?b"


def test_paired_wilcoxon_uses_common_cases_only():
    a = pd.Series([0.9, 0.8, 0.85, 0.7, 0.95, 0.6, 0.5], index=[f"c{i}" for i in range(7)])
    b = pd.Series([0.8, 0.7, 0.86, 0.6, 0.9, 0.55, 0.1], index=[f"c{i}" for i in range(6)] + ["other"])
    p, n = paired_wilcoxon(a, b)
    assert n == 6
    assert p == pytest.approx(wilcoxon(a.iloc[:6].to_numpy(), b.iloc[:6].to_numpy()).pvalue)
    assert paired_wilcoxon(a, a) == (1.0, 7)
    assert paired_wilcoxon(a, pd.Series([0.5], index=["zz"])) == (None, 0)


def _write_eval(folder, name, dice, policy="nan", unit="voxel"):
    folder.mkdir(parents=True)
    df = pd.DataFrame({"case": [f"c{i}" for i in range(len(dice))], "class": 1, "class_name": "foreground",
                       "dice": dice, "jaccard": [d * 0.9 for d in dice], "hd95": [3.0] * len(dice),
                       "asd": [1.0] * len(dice), "pred_empty": False, "ref_empty": False})
    df.to_csv(folder / "per_case.csv", index=False)
    summarize(df).to_csv(folder / "summary.csv", index=False)
    (folder / "meta.json").write_text(json.dumps({"name": name, "empty_policy": policy, "lcc": False,
                                                  "distance_unit": unit, "checkpoint_rule": "best",
                                                  "labeled": 4, "unlabeled": 12}))
    return folder


def test_compare_results_from_folders_and_csvs(tmp_path):
    a = _write_eval(tmp_path / "a", "baseline", [0.70, 0.72, 0.65, 0.80, 0.60, 0.75])
    b = _write_eval(tmp_path / "b", "ours", [0.80, 0.79, 0.70, 0.85, 0.71, 0.83])
    md = compare_results([a, b / "per_case.csv"], table="md")
    assert "| baseline | 4 | 12 | 70.33 |" in md and "| ours |" in md
    p = wilcoxon([0.80, 0.79, 0.70, 0.85, 0.71, 0.83], [0.70, 0.72, 0.65, 0.80, 0.60, 0.75]).pvalue
    assert f"{p:.3f}" in md
    # a summary.csv alone still gives a row; its sibling per_case.csv gives the paired test
    md2 = compare_results([b / "summary.csv", a / "meta.json"], table="md")
    assert md2.index("| ours |") < md2.index("| baseline |")
    out = tmp_path / "table.tex"
    text = compare_results([a, b], out=out)  # format from the suffix
    assert out.read_text(encoding="utf-8") == text and r"\begin{tabular}" in text
    with pytest.raises(OutputExistsError):
        compare_results([a, b], out=out)
    compare_results([a, b], out=out, force=True, table="latex")


def test_load_result_errors(tmp_path):
    with pytest.raises(DataError, match="not found"):
        load_result(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="per_case.csv"):
        load_result(tmp_path / "empty")
    bad = tmp_path / "bad.csv"
    bad.write_text("patient,score\n1,0.5\n")
    with pytest.raises(DataError, match="lacks column"):
        load_result(bad)
    # a per-case CSV from another tool: case + dice are enough
    other = tmp_path / "other.csv"
    other.write_text("case,dice\nx,0.5\ny,0.7\n")
    res = load_result(other)
    assert res.name == "other" and res.summary.set_index("metric").loc["dice", "mean"] == pytest.approx(0.6)


def test_both_empty_cases_are_reported_apart_from_one_mask_empty(tmp_path):
    """Issue 20: a case with both masks empty (Dice 1, distances 0) is not an "empty" case; the summary,
    meta.json and table notes count it separately (fails if one_mask_empty counted both-empty cases)."""
    from textseg_cli.evaluation.folders import build_meta, write_evaluation

    df = _per_case({"dice": [1.0, 0.0, 0.9], "jaccard": [1.0, 0.0, 0.8], "hd95": [0.0, float("nan"), 2.0],
                    "asd": [0.0, float("nan"), 1.0]}, empty={("c1", "foreground")})
    df.loc[df["case"] == "c0", ["pred_empty", "ref_empty"]] = True  # c0: nothing to find, nothing predicted
    df["pred_voxels"], df["ref_voxels"] = 0, 0
    df.attrs.update(empty_policy="nan", lcc=False, distance_unit="voxel")
    s = summarize(df).set_index("metric")
    assert s.loc["dice", "n_empty"] == 1 and s.loc["dice", "n_both_empty"] == 1
    meta = build_meta(df, {"name": "m"})
    assert meta["cases_with_empty_mask"] == ["c1"] and meta["cases_with_both_masks_empty"] == ["c0"]
    paths = write_evaluation(df, tmp_path / "ev", {"name": "m"}, table="md", show=False)
    md = paths["table"].read_text(encoding="utf-8")
    assert "Cases with one mask empty (policy applied): m: 1." in md
    assert "Cases with both masks empty (scored Dice 1, distances 0; not counted as empty): m: 1." in md
