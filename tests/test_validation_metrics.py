"""Validation during training scores like `textseg eval` (issue "one home per concern", fix 1), and the one
metric table in `textseg_cli/metrics/table.py` is all a new metric needs (point 2)."""

from __future__ import annotations

import io
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from rich.console import Console
from test_eval_2d import Sign2D, _folder  # a tiny 2D run: prepared folder + a fixed-weight method

from textseg_cli.data.prepared import load_prepared
from textseg_cli.errors import ConfigError
from textseg_cli.evaluation import validation
from textseg_cli.evaluation.folders import evaluate_pairs, per_case_columns, run_empty_policy
from textseg_cli.evaluation.run import evaluate_run
from textseg_cli.methods import registry
from textseg_cli.metrics.table import METRIC_TABLE, PERCENT, Metric, metric_names
from textseg_cli.reports.display import summary_table
from textseg_cli.reports.results import EvalResult, build_rows
from textseg_cli.reports.summary import headline, summarize
from textseg_cli.reports.table2d import render_table_2d
from textseg_cli.reports.tables import render_table
from textseg_cli.runs.checkpoint import save_checkpoint
from textseg_cli.runs.config import build_config, save_config


def _disc(shape, center, radius, value=1):
    yy, xx = np.indices(shape)
    return (((yy - center[0]) ** 2 + (xx - center[1]) ** 2) <= radius ** 2).astype(np.uint8) * value


def _cases_binary():
    """c0: partial overlap; c1: foreground absent from prediction AND label (both empty)."""
    shape = (16, 16)
    ref0, pred0 = _disc(shape, (7, 7), 4), _disc(shape, (7, 9), 4)
    empty = np.zeros(shape, np.uint8)
    return [("c0", pred0, ref0), ("c1", empty, empty.copy())]


def _cases_multiclass():
    """Three classes (background + a + b): class a is absent from both masks of c1 and missed in c2."""
    shape = (20, 20)
    a_ref, a_pred = _disc(shape, (6, 6), 3, 1), _disc(shape, (6, 7), 3, 1)
    b_ref, b_pred = _disc(shape, (14, 14), 4, 2), _disc(shape, (13, 14), 3, 2)
    c0 = ("c0", np.maximum(a_pred, b_pred), np.maximum(a_ref, b_ref))
    c1 = ("c1", b_pred.copy(), b_ref.copy())  # class a: both empty
    c2 = ("c2", np.maximum(b_ref, 0), np.maximum(a_ref, b_ref))  # class a: prediction empty; b perfect
    return [c0, c1, c2]


def _validate(monkeypatch, cases, num_classes, class_names, policy="nan"):
    """The real `validate` on a resolved run config; `predict_case` returns the fixed prediction of each case
    (one-hot probabilities), standing in for a method's forward pass."""
    images = [np.zeros((1, *pred.shape), np.float32) for _, pred, _ in cases]
    preds = {id(img): pred for img, (_, pred, _) in zip(images, cases)}

    def fixed_probs(method, image, settings, device=None):
        pred = torch.from_numpy(preds[id(image)].astype(np.int64))
        return torch.nn.functional.one_hot(pred, num_classes).movedim(-1, 0).float()

    monkeypatch.setattr(validation, "predict_case", fixed_probs)
    cfg = build_config("sup", dataset_dim=2, dataset_patch=[16, 16], sets=[f"val.empty_policy={policy}"])
    val_cases = [(cid, img, ref) for (cid, _, ref), img in zip(cases, images)]
    return validation.validate(object(), val_cases, cfg, torch.device("cpu"), num_classes, class_names)


def _eval_numbers(cases, num_classes, class_names, policy="nan"):
    """What `textseg eval` reports for the same masks: evaluate_pairs → summarize → headline."""
    df = evaluate_pairs([(cid, p, r, None) for cid, p, r in cases], num_classes, class_names, empty_policy=policy,
                        show_progress=False)
    summary = summarize(df)
    per_class = {n: float(headline(summary, n)["dice"]["mean"]) for n in df.attrs["class_names"]}
    return float(headline(summary)["dice"]["mean"]), per_class


def _old_validation_dice(cases, num_classes):
    """The formula validation used before this fix: NaN for a class empty in both masks, dropped from the means
    (nanmean per class over cases, then nanmean over classes)."""
    per_case = []
    for _, p, r in cases:
        row = []
        for c in range(1, num_classes):
            denom = int((p == c).sum()) + int((r == c).sum())
            row.append(float("nan") if denom == 0 else 2.0 * int(((p == c) & (r == c)).sum()) / denom)
        per_case.append(row)
    per_class = np.nanmean(np.array(per_case, dtype=float), axis=0)
    return float(np.nanmean(per_class)), per_class


def test_binary_both_empty_case_counts_as_eval_scores_it(monkeypatch):
    cases = _cases_binary()
    res = _validate(monkeypatch, cases, 2, ["background", "foreground"])
    expected, _ = _eval_numbers(cases, 2, ["background", "foreground"])
    assert res["val_dice"] == pytest.approx(expected, abs=1e-12)
    dice0 = float(evaluate_pairs([(cid, p, r, None) for cid, p, r in cases[:1]], 2, show_progress=False)["dice"][0])
    assert expected == pytest.approx((dice0 + 1.0) / 2)  # the both-empty case scores Dice 1 (eval's rule)
    old, _ = _old_validation_dice(cases, 2)
    assert old == pytest.approx(dice0)  # the old formula dropped c1: best.pt was chosen on another number
    assert not math.isclose(res["val_dice"], old)
    assert set(res) == {"val_dice"}


def test_multiclass_mean_and_per_class_equal_eval_summary(monkeypatch):
    cases = _cases_multiclass()
    names = ["background", "a", "b"]
    res = _validate(monkeypatch, cases, 3, names)
    expected, per_class = _eval_numbers(cases, 3, names)
    assert res["val_dice"] == pytest.approx(expected, abs=1e-12)
    assert res["val_dice_a"] == pytest.approx(per_class["a"], abs=1e-12)
    assert res["val_dice_b"] == pytest.approx(per_class["b"], abs=1e-12)
    old_mean, old_per_class = _old_validation_dice(cases, 3)
    assert not math.isclose(res["val_dice"], old_mean) and not math.isclose(res["val_dice_a"], old_per_class[0])
    assert set(res) == {"val_dice", "val_dice_a", "val_dice_b"}


def test_policy_comes_from_the_run_config(monkeypatch):
    seen = []
    real = validation.evaluate_case

    def spy(*args, **kwargs):
        seen.append(kwargs["empty_policy"])
        return real(*args, **kwargs)

    monkeypatch.setattr(validation, "evaluate_case", spy)
    cases = _cases_multiclass()
    names = ["background", "a", "b"]
    for policy in ("penalty", "zero", "nan"):
        seen.clear()
        res = _validate(monkeypatch, cases, 3, names, policy=policy)
        assert seen == [policy] * len(cases)
        # Dice is policy-independent (both empty → 1, one empty → 0 under every policy): still eval's number
        assert res["val_dice"] == pytest.approx(_eval_numbers(cases, 3, names, policy)[0], abs=1e-12)
    cfg = build_config("sup", dataset_dim=2, dataset_patch=[16, 16])
    assert cfg["val"]["empty_policy"] == "nan" == run_empty_policy(cfg)  # eval's default
    assert run_empty_policy(build_config("sup", dataset_dim=2, dataset_patch=[16, 16],
                                         sets=["val.empty_policy=penalty"])) == "penalty"
    del cfg["val"]["empty_policy"]  # a run configured before the key existed
    assert run_empty_policy(cfg) == "nan"
    with pytest.raises(ConfigError, match="val.empty_policy"):
        build_config("sup", dataset_dim=2, dataset_patch=[16, 16], sets=["val.empty_policy=drop"])
    cfg["val"]["empty_policy"] = "drop"  # hand-edited config.yaml: refused by validation too
    with pytest.raises(ConfigError, match="val.empty_policy"):
        run_empty_policy(cfg)


def test_eval_of_a_run_defaults_to_the_run_policy(tmp_path, monkeypatch):
    registry.list_methods()
    monkeypatch.setitem(registry.METHODS, "sign2d", Sign2D)
    ds = load_prepared(_folder(tmp_path, "tiny2d", 0))
    cfg = build_config("sign2d", ds.name, 2, ds.patch_size, sets=["val.empty_policy=penalty"])
    cfg["data"]["root"] = str(ds.root)
    run_dir = tmp_path / "run"
    save_config(cfg, run_dir / "config.yaml")
    save_checkpoint(run_dir / "checkpoints" / "best.pt", {"method": Sign2D().state_dict(), "iteration": 1})
    df = evaluate_run(run_dir, split="val", inference="whole", out=tmp_path / "ev_run")
    assert df.attrs["empty_policy"] == "penalty"  # the policy best.pt was selected under
    df = evaluate_run(run_dir, split="val", inference="whole", out=tmp_path / "ev_zero", empty_policy="zero")
    assert df.attrs["empty_policy"] == "zero"  # an explicit --empty-policy wins


def test_a_metric_registered_in_the_table_reaches_every_output(monkeypatch):
    def precision(pair):
        p, r = pair.pred, pair.ref
        return float(np.count_nonzero(p & r)) / float(np.count_nonzero(p))

    toy = Metric("precision", "Precision", PERCENT, 100.0, True, precision, both_empty=1.0, one_empty=0.0,
                 title_2d="Prec")
    monkeypatch.setitem(METRIC_TABLE, "precision", toy)
    assert metric_names()[-1] == "precision" and "precision" in per_case_columns()

    cases = _cases_multiclass()
    df = evaluate_pairs([(cid, p, r, None) for cid, p, r in cases], 3, ["background", "a", "b"], show_progress=False)
    assert list(df.columns) == per_case_columns()
    assert list(df.columns).index("precision") == list(df.columns).index("asd") + 1
    row = df[(df["case"] == "c0") & (df["class_name"] == "b")].iloc[0]
    assert row["precision"] == pytest.approx(1.0)  # b_pred lies inside b_ref
    assert df[(df["case"] == "c1") & (df["class_name"] == "a")].iloc[0]["precision"] == 1.0  # both empty
    assert df[(df["case"] == "c2") & (df["class_name"] == "a")].iloc[0]["precision"] == 0.0  # one empty

    summary = summarize(df)
    assert set(summary[summary["class"] == "mean"]["metric"]) == set(metric_names())
    meta = {"name": "toy", "empty_policy": "nan", "lcc": False, "distance_unit": "voxel", "dim": 2,
            "num_classes": 3}
    result = EvalResult("toy", summary, df, meta, Path("toy"))
    md = render_table(build_rows([result]), "md")
    assert "Precision (%)↑" in md.splitlines()[0]
    assert "precision_mean" in render_table(build_rows([result]), "csv").splitlines()[0]
    assert r"Precision$\uparrow$" in render_table(build_rows([result]), "latex")
    assert "toy Prec (%)↑" in render_table_2d([result], "md").splitlines()[0]
    assert r"\multicolumn{3}{c}{toy}" in render_table_2d([result], "latex")  # three 2D columns per data set
    console = Console(file=io.StringIO(), width=200, color_system=None)
    console.print(summary_table(summary, meta))
    assert "Precision (%)↑" in console.file.getvalue()


def test_packaged_metric_table():
    assert metric_names() == ("dice", "jaccard", "hd95", "asd")
    assert [m.header for m in METRIC_TABLE.values()] == ["Dice (%)", "Jaccard (%)", "95HD", "ASD"]
    assert [m.higher_is_better for m in METRIC_TABLE.values()] == [True, True, False, False]
    assert [m.one_empty for m in METRIC_TABLE.values()] == [0.0, 0.0, None, None]  # None: the policy decides
    assert [m.both_empty for m in METRIC_TABLE.values()] == [1.0, 1.0, 0.0, 0.0]
    assert [m.header_2d for m in METRIC_TABLE.values() if m.header_2d] == ["Dice (%)", "mIoU (%)"]
