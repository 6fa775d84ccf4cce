"""`textseg eval`: folders of masks, prepared label folders, --compare, RUN_DIR wiring, bad input."""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest
from conftest import run_cli
from medpy.metric import binary as mb

from textseg_cli.data.io import write_nifti
from textseg_cli.evaluation.folders import evaluate_folders, evaluate_pairs

SPACING = (0.8, 0.8, 2.0)
SHAPE = (16, 16, 10)


def _ball(center, radii):
    x, y, z = np.mgrid[: SHAPE[0], : SHAPE[1], : SHAPE[2]]
    return (((x - center[0]) / radii[0]) ** 2 + ((y - center[1]) / radii[1]) ** 2
            + ((z - center[2]) / radii[2]) ** 2 < 1).astype(np.uint8)


@pytest.fixture
def folders(tmp_path):
    """labels/ with 4 cases; pred/ with 3 of them (c2 predicted empty) plus one without reference."""
    labels, pred = tmp_path / "labels", tmp_path / "pred"
    refs, preds = {}, {}
    for i in range(4):
        refs[f"c{i}"] = _ball((8, 8, 5), (5, 4, 3))
        write_nifti(labels / f"c{i}.nii.gz", refs[f"c{i}"], SPACING)
    preds["c0"] = _ball((9, 8, 5), (5, 4, 3))
    preds["c1"] = _ball((8, 8, 5), (4, 5, 3)) | _ball((1, 1, 1), (1.2, 1.2, 1.2))  # a stray blob for --lcc
    preds["c2"] = np.zeros(SHAPE, np.uint8)
    for cid, arr in preds.items():
        write_nifti(pred / f"{cid}.nii.gz", arr, SPACING)
    write_nifti(pred / "stray.nii.gz", preds["c0"], SPACING)
    return tmp_path, refs, preds


def test_eval_folders_writes_outputs_equal_to_medpy(folders):
    root, refs, preds = folders
    code, out = run_cli("eval", "--pred", root / "pred", "--labels", root / "labels", "--allow-missing",
                        "--spacing-mm", "--table", "md")
    assert code == 0, out
    assert "c3" in out and "stray" in out  # missing and extra cases reported by name
    assert "Dice" in out and "95HD" in out
    ev = root / "eval_pred"
    per_case = pd.read_csv(ev / "per_case.csv").set_index("case")
    assert list(per_case.index) == ["c0", "c1", "c2"]
    for cid in ("c0", "c1"):
        p, r = preds[cid], refs[cid]
        assert per_case.loc[cid, "dice"] == pytest.approx(mb.dc(p, r), abs=1e-6)
        assert per_case.loc[cid, "jaccard"] == pytest.approx(mb.jc(p, r), abs=1e-6)
        # NIfTI stores spacing as float32; medpy gets the same header values
        sp = tuple(float(np.float32(s)) for s in SPACING)
        assert per_case.loc[cid, "hd95"] == pytest.approx(mb.hd95(p, r, voxelspacing=sp), abs=1e-6)
        assert per_case.loc[cid, "asd"] == pytest.approx(mb.asd(p, r, voxelspacing=sp), abs=1e-6)
    assert per_case.loc["c2", "pred_empty"] and not per_case.loc["c2", "ref_empty"]
    assert per_case.loc["c2", "dice"] == 0 and math.isnan(per_case.loc["c2", "hd95"])
    summary = pd.read_csv(ev / "summary.csv").set_index("metric")
    assert summary.loc["hd95", "n"] == 2 and summary.loc["hd95", "n_empty"] == 1 and summary.loc["dice", "n"] == 3
    meta = json.loads((ev / "meta.json").read_text(encoding="utf-8"))
    assert meta["empty_policy"] == "nan" and meta["distance_unit"] == "mm" and meta["lcc"] is False
    assert meta["missing_predictions"] == ["c3"] and meta["predictions_without_reference"] == ["stray"]
    assert meta["cases_with_empty_mask"] == ["c2"]
    table = (ev / "table.md").read_text(encoding="utf-8")
    assert "95HD (mm)↓" in table and "Empty-mask policy: 'nan'" in table


def test_eval_voxels_by_default_lcc_and_policy(folders):
    root, refs, preds = folders
    code, out = run_cli("eval", "--pred", root / "pred", "--labels", root / "labels", "--allow-missing", "--lcc",
                        "--empty-policy", "penalty", "--out", root / "ev", "--name", "mine")
    assert code == 0, out
    per_case = pd.read_csv(root / "ev" / "per_case.csv").set_index("case")
    lcc_pred = _ball((8, 8, 5), (4, 5, 3))  # the stray blob is gone
    assert per_case.loc["c1", "hd95"] == pytest.approx(mb.hd95(lcc_pred, refs["c1"]), abs=1e-6)
    assert per_case.loc["c2", "hd95"] == pytest.approx(math.sqrt(16**2 + 16**2 + 10**2))  # voxel diagonal
    meta = json.loads((root / "ev" / "meta.json").read_text(encoding="utf-8"))
    assert meta["lcc"] is True and meta["empty_policy"] == "penalty" and meta["distance_unit"] == "voxel"
    assert meta["name"] == "mine"


def test_existing_output_needs_force(folders):
    root, _, _ = folders
    args = ["eval", "--pred", root / "pred", "--labels", root / "labels", "--allow-missing", "--out", root / "ev"]
    assert run_cli(*args, "--table", "latex")[0] == 0
    code, out = run_cli(*args)
    assert code == 2 and "already exists" in out and "--force" in out
    code, out = run_cli(*args, "--force")
    assert code == 0
    assert not (root / "ev" / "table.tex").exists()  # no stale table from the previous evaluation


def test_compare_cli(folders):
    root, _, _ = folders
    base = ["--pred", root / "pred", "--labels", root / "labels", "--allow-missing"]
    assert run_cli("eval", *base, "--out", root / "a", "--name", "plain")[0] == 0
    assert run_cli("eval", *base, "--out", root / "b", "--name", "with_lcc", "--lcc")[0] == 0
    code, out = run_cli("eval", "--compare", root / "a", root / "b" / "per_case.csv", "--table", "latex",
                        "--out", root / "t.tex")
    assert code == 0, out
    tex = (root / "t.tex").read_text(encoding="utf-8")
    assert r"with\_lcc" in tex and r"& $p$ \\" in tex and "Wilcoxon signed-rank" in tex
    assert "LCC post-processing: MIXED" in tex
    assert "differ in lcc" in out
    code, out = run_cli("eval", root / "a", root / "b")
    assert code == 2 and "--compare" in out


def _prepared(tmp_path):
    from textseg_cli.data.prep.writer import PreparedWriter

    w = PreparedWriter(tmp_path / "prepared", name="toy", dim=3, modality="CT", channel_names=["CT"],
                       class_names=["background", "organ", "lesion"])
    rng = np.random.default_rng(0)
    labels = {}
    for i in range(4):
        lab = _ball((8, 8, 5), (5, 4, 3))
        lab[_ball((8, 8, 5), (2, 2, 2)) > 0] = 2
        labels[f"p{i}"] = lab
        w.add_case(f"p{i}", rng.standard_normal(SHAPE).astype(np.float32), lab, SPACING)
    w.finish(splits={"train": ["p0", "p1"], "val": ["p2"], "test": ["p3"]}, preprocessing=[], source={})
    return tmp_path / "prepared", labels


def test_labels_from_prepared_folder_with_split(tmp_path):
    prepared, labels = _prepared(tmp_path)
    pred = tmp_path / "pred"
    for cid, lab in labels.items():
        write_nifti(pred / f"{cid}.nii.gz", np.where(lab == 2, 1, lab).astype(np.uint8), SPACING)
    code, out = run_cli("eval", "--pred", pred, "--labels", prepared, "--split", "test", "--out", tmp_path / "ev")
    assert code == 0, out
    assert "WARNING" in out and "model selection" in out
    per_case = pd.read_csv(tmp_path / "ev" / "per_case.csv")
    assert list(per_case["case"].unique()) == ["p3"]
    assert list(per_case["class_name"]) == ["organ", "lesion"]
    assert per_case.loc[1, "dice"] == 0.0 and per_case.loc[1, "pred_empty"]
    summary = pd.read_csv(tmp_path / "ev" / "summary.csv")
    assert list(dict.fromkeys(summary["class"])) == ["organ", "lesion", "mean"]
    code, out = run_cli("eval", "--pred", pred, "--labels", prepared, "--num-classes", "2", "--out", tmp_path / "e2")
    assert code == 2 and "--num-classes 2" in out


# --- bad input: one line, exit code 2, naming the file ------------------------------------------
def _one_line_error(code, out, *needles):
    assert code == 2, out
    lines = [line for line in out.splitlines() if line.strip()]
    err = [line for line in lines if line.startswith("error:")]
    assert len(err) == 1 and "Traceback" not in out, out
    for needle in needles:
        assert str(needle) in err[0], err[0]


def test_missing_folders(folders):
    root, _, _ = folders
    _one_line_error(*run_cli("eval", "--pred", root / "nope", "--labels", root / "labels", "--allow-missing"),
                    "nope", "not found")
    _one_line_error(*run_cli("eval", "--pred", root / "pred", "--labels", root / "nolabels"), "nolabels", "not found")


def test_truncated_nifti(folders):
    root, _, _ = folders
    f = root / "pred" / "c1.nii.gz"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2])
    _one_line_error(*run_cli("eval", "--pred", root / "pred", "--labels", root / "labels", "--allow-missing"),
                    "c1.nii.gz", "unreadable")


def test_shape_and_spacing_mismatch(folders):
    root, _, _ = folders
    write_nifti(root / "pred" / "c0.nii.gz", np.zeros((16, 16, 9), np.uint8), SPACING)
    _one_line_error(*run_cli("eval", "--pred", root / "pred", "--labels", root / "labels", "--allow-missing"),
                    "c0.nii.gz", "shape")
    write_nifti(root / "pred" / "c0.nii.gz", np.zeros(SHAPE, np.uint8), (1.0, 1.0, 1.0))
    _one_line_error(*run_cli("eval", "--pred", root / "pred", "--labels", root / "labels", "--allow-missing"),
                    "c0.nii.gz", "spacing")


def test_unexpected_label_values(folders):
    root, refs, _ = folders
    write_nifti(root / "pred" / "c0.nii.gz", refs["c0"] * 255, SPACING)
    _one_line_error(*run_cli("eval", "--pred", root / "pred", "--labels", root / "labels", "--allow-missing"),
                    "c0.nii.gz", "[255]", "outside 0..1")
    write_nifti(root / "labels" / "c1.nii.gz", refs["c1"] * 3, SPACING)
    write_nifti(root / "pred" / "c0.nii.gz", refs["c0"], SPACING)
    _one_line_error(*run_cli("eval", "--pred", root / "pred", "--labels", root / "labels", "--allow-missing"),
                    "labels/c1.nii.gz", "[3]")
    # the same reference is fine once the number of classes is given
    assert run_cli("eval", "--pred", root / "pred", "--labels", root / "labels", "--allow-missing",
                   "--num-classes", "4")[0] == 0
    write_nifti(root / "pred" / "c0.nii.gz", refs["c0"] * 0.5, SPACING)
    _one_line_error(*run_cli("eval", "--pred", root / "pred", "--labels", root / "labels", "--allow-missing",
                             "--num-classes", "4",
                             "--force"), "c0.nii.gz", "non-integer")


def test_bad_options(folders):
    root, _, _ = folders
    base = ["eval", "--pred", root / "pred", "--labels", root / "labels", "--allow-missing"]
    _one_line_error(*run_cli(*base, "--empty-policy", "drop"), "--empty-policy", "nan, penalty, zero")
    _one_line_error(*run_cli(*base, "--table", "xlsx"), "--table", "csv, md, latex")
    _one_line_error(*run_cli(*base, "--split", "val"), "--split", "prepared")
    _one_line_error(*run_cli("eval", "--pred", root / "pred"), "--pred and --labels")
    _one_line_error(*run_cli("eval"), "nothing to evaluate")
    (root / "nifti_free").mkdir()
    _one_line_error(*run_cli("eval", "--pred", root / "nifti_free", "--labels", root / "labels", "--allow-missing"),
                    "no prediction")


def test_evaluate_pairs_api_checks_and_attrs():
    ref = _ball((8, 8, 5), (5, 4, 3))
    df = evaluate_pairs([("a", ref, ref, SPACING)], 2, ["background", "organ"], spacing_mm=True, show_progress=False)
    assert df.loc[0, "class_name"] == "organ" and df.loc[0, "dice"] == 1.0 and df.loc[0, "hd95"] == 0.0
    assert df.attrs["distance_unit"] == "mm" and df.attrs["empty_policy"] == "nan"
    from textseg_cli.errors import DataError

    with pytest.raises(DataError, match="case 'b'.*shape"):
        evaluate_pairs([("b", ref, ref[:, :, :5], None)], 2, show_progress=False)
    with pytest.raises(DataError, match="case 'c'.*mm"):
        evaluate_pairs([("c", ref, ref, None)], 2, spacing_mm=True, show_progress=False)


def test_evaluate_folders_api_without_writing(folders):
    root, _, _ = folders
    df = evaluate_folders(root / "pred", root / "labels", write=False, show=False, allow_missing=True)
    assert sorted(df["case"]) == ["c0", "c1", "c2"] and df.attrs["paths"] is None
    assert df.attrs["meta"]["missing_predictions"] == ["c3"]
    assert not (root / "eval_pred").exists()


# --- RUN_DIR: wiring to textseg_cli.evaluation.run.evaluate_run ----------------------------
def test_run_dir_calls_evaluate_run_and_warns_on_test(tmp_path, monkeypatch):
    import inspect

    from textseg_cli.evaluation import run as run_eval

    calls = []
    real = inspect.signature(run_eval.evaluate_run)

    def spy(run_dir, **kw):  # every keyword the CLI passes must exist on the real function
        real.bind(run_dir, **kw)
        calls.append((run_dir, kw))

    monkeypatch.setattr(run_eval, "evaluate_run", spy)
    code, out = run_cli("eval", tmp_path, "--checkpoint", "last", "--lcc", "--table", "latex")
    assert code == 0, out
    run_dir, kw = calls[-1]
    assert run_dir == tmp_path and kw["split"] == "val" and kw["checkpoint"] == "last" and kw["lcc"] is True
    assert kw["inference"] is None and kw["table"] == "latex" and kw["empty_policy"] is None  # None: the run's mode / val.empty_policy
    assert "WARNING" not in out
    code, out = run_cli("eval", tmp_path, "--split", "test", "--inference", "whole", "--decoder", "1")
    assert code == 0 and calls[-1][1]["split"] == "test" and calls[-1][1]["decoder"] == 1
    assert "WARNING" in out and "TEST split" in out and "model selection" in out
    _one_line_error(*run_cli("eval", tmp_path, "--split", "train"), "--split", "val, test")
    code, out = run_cli("eval", tmp_path, "--name", "MC-Net")  # a display name for tables (issue 16)
    assert code == 0 and calls[-1][1]["name"] == "MC-Net"
    assert "name" not in run_cli("eval", tmp_path)[1] and "name" not in calls[-1][1]


def test_help_reads_well():
    code, out = run_cli("eval", "--help")
    assert code == 0
    for opt in ("--pred", "--labels", "--compare", "--table", "--lcc", "--spacing-mm", "--empty-policy", "--split",
                "--checkpoint", "--force"):
        assert opt in out
