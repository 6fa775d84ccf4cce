"""Folds end to end (issue 28.3): the fold axis of experiments, ensembles in `predict`, pooled CV in `eval --cv`.

One tiny synthetic set with 2 folds over its 8 non-test cases, one 2-fold experiment of 3-iteration `sup` runs,
shared by the tests of this module."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from conftest import one_line_error, run_cli

from textseg_cli.data.io import read_input_image
from textseg_cli.errors import ConfigError
from textseg_cli.experiments.spec import commands, load_experiment
from textseg_cli.inference.predict import load_member, predict_case

SETS = ["train.batch_labeled=2", "inference.stride=16,16,8", "val.every=3", "train.checkpoint_every=3"]


def _json(path: Path):
    return json.loads(path.read_text(encoding="utf-8"))


def _spec(tmp: Path, data: Path, name: str = "cv", **over) -> Path:
    spec = {"name": name, "data": str(data), "labeled": [2], "seeds": [1], "folds": 2, "iterations": 3,
            "device": "cpu", "threads": 1, "methods": [{"method": "sup", "set": SETS}]}
    spec.update(over)
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(spec), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def folded(tmp_path_factory, synthetic_data):
    """(prepared set with 2 folds, the folds, the experiment folder, [fold-0 run, fold-1 run])."""
    tmp = tmp_path_factory.mktemp("folds")
    data = tmp / "prepared"
    shutil.copytree(synthetic_data, data)
    spec = _json(data / "dataset.json")
    pool = spec["splits"]["train"] + spec["splits"]["val"]
    folds = [{"train": pool[4:], "val": pool[:4]}, {"train": pool[:4], "val": pool[4:]}]
    spec.setdefault("extra", {})["folds"] = folds
    (data / "dataset.json").write_text(json.dumps(spec, indent=1), encoding="utf-8")
    code, text = run_cli("experiment", "run", _spec(tmp, data), "--quiet")
    assert code == 0, text
    exp = load_experiment(tmp / "cv" / "experiment.yaml")
    return data, folds, exp, [r.dir for r in exp.runs()]


def test_experiment_with_folds_runs_one_run_per_fold(folded):
    _, folds, exp, runs = folded
    assert [r.key for r in exp.runs()] == ["sup/2L_s1_f0", "sup/2L_s1_f1"] and [r.fold for r in exp.runs()] == [0, 1]
    for k, (run, run_dir) in enumerate(zip(exp.runs(), runs)):
        assert _json(exp.out / "status" / run.status_name)["state"] == "done"
        cases = _json(run_dir / "cases.json")
        assert cases["val"] == folds[k]["val"] and cases["labeled"] == folds[k]["train"][:2]
        # the experiment's evaluation scored the fold's own validation cases
        assert sorted(pd.read_csv(exp.eval_dir(run) / "per_case.csv")["case"].unique()) == sorted(folds[k]["val"])
        assert "--fold" in commands(exp, run, False)[0]


def test_folds_refused_when_the_set_has_none_or_too_few(folded, synthetic_data, tmp_path):
    data = folded[0]
    code, text = run_cli("experiment", "run", _spec(tmp_path, synthetic_data, name="nofolds"), "--dry-run")
    one_line_error(code, text, "records no folds")
    code, text = run_cli("experiment", "run", _spec(tmp_path, data, name="three", folds=3), "--dry-run")
    one_line_error(code, text, "records 2 fold(s)")
    code, text = run_cli("experiment", "run", _spec(tmp_path, data, name="list", folds=[1]), "--dry-run")
    assert code == 0 and "sup/2L_s1_f1" in text and "_f0" not in text, text


def test_spec_folds_and_inference_presets(tmp_path, synthetic_data):
    assert load_experiment(_spec(tmp_path, synthetic_data, folds=[0, 2])).folds == [0, 2]
    assert load_experiment(_spec(tmp_path, synthetic_data, folds=None)).runs()[0].dir.name == "2L_s1"
    for preset in ("paper", "best", "sliding", "whole"):
        exp = load_experiment(_spec(tmp_path, synthetic_data, eval={"inference": preset}))
        assert exp.eval["inference"] == preset
        assert commands(exp, exp.runs()[0], False)[1].endswith(f"--inference {preset}")
    for bad, msg in [({"folds": [0, 0]}, "repeats a fold"), ({"folds": "five"}, "folds: expected"),
                     ({"folds": 0}, "folds: 0"), ({"eval": {"inference": "fancy"}}, "expected paper, best")]:
        with pytest.raises(ConfigError, match=msg):
            load_experiment(_spec(tmp_path, synthetic_data, name="bad", **bad))


def test_ensemble_prediction_is_the_mean_of_the_members(folded, tmp_path):
    data, _, _, runs = folded
    spec = _json(data / "dataset.json")
    images = tmp_path / "images"
    images.mkdir()
    files = []
    for cid in spec["splits"]["test"]:
        src = data / next(c["image"] for c in spec["cases"] if c["id"] == cid)
        files.append(shutil.copy(src, images / f"{cid}.nii.gz"))
    code, text = run_cli("predict", *runs, "--images", images, "--out", tmp_path / "ens", "--save-probabilities",
                         "--device", "cpu", "--precision", "fp32")  # bf16 on a bf16 CPU: window batches change rounding
    assert code == 0, text
    rec = _json(tmp_path / "ens" / "predict.json")
    assert [m["run_dir"] for m in rec["members"]] == [str(r.resolve()) for r in runs]
    assert rec["ensemble"]["members"] == 2 and rec["run_dir"] == [str(r.resolve()) for r in runs]
    dev = torch.device("cpu")
    members = [load_member(r, "best", dev, precision="fp32") for r in runs]
    for f in files:
        f = Path(f)
        image = read_input_image(f, 3).array
        probs = [predict_case(m.run.method, image, m.settings, dev) for m in members]
        expected = (probs[0] + probs[1]) / 2
        assert (probs[0] - probs[1]).abs().max() > 1e-3  # two different members, so the mean is a real test
        got = np.asarray(nib.load(str(tmp_path / "ens" / f.name.replace(".nii.gz", "_probs.nii.gz"))).dataobj)
        # float32 convolutions of the same weights agree to ~1e-6 from call to call (threads, oneDNN paths)
        np.testing.assert_allclose(np.moveaxis(got, -1, 0), expected.numpy(), atol=1e-5)
        mask = np.asarray(nib.load(str(tmp_path / "ens" / f.name)).dataobj)
        top2 = expected.topk(2, dim=0).values
        clear = (top2[0] - top2[1]).numpy() > 1e-4  # voxels whose argmax such noise cannot flip
        assert clear.mean() > 0.9
        np.testing.assert_array_equal(mask[clear], expected.argmax(0).numpy()[clear])


def test_ensemble_of_mismatched_runs_is_refused(folded, tmp_path):
    _, _, _, runs = folded
    from textseg_cli.data.prep.synthetic import prep_synthetic

    other = tmp_path / "two_classes"
    prep_synthetic(other, n_cases=6, size=(32, 32, 24), n_classes=2, seed=0, n_val=1, n_test=1,
                   patch_size=(32, 32, 16))
    code, text = run_cli("train", "--method", "sup", "--data", other, "--out", tmp_path / "bad", "--iterations", "2",
                         "--threads", "1", "--device", "cpu", *[a for s in SETS for a in ("--set", s)])
    assert code == 0, text
    code, text = run_cli("predict", runs[0], tmp_path / "bad", "--images", other, "--out", tmp_path / "p",
                         "--device", "cpu")
    one_line_error(code, text, "bad", "classes")
    assert not (tmp_path / "p" / "predict.json").exists()


def test_pooled_cross_validation_table(folded, tmp_path):
    _, folds, _, runs = folded
    code, text = run_cli("eval", *runs, "--cv", "--out", tmp_path / "cv", "--device", "cpu")
    assert code == 0, text
    per_case = pd.read_csv(tmp_path / "cv" / "per_case.csv")
    n = sum(len(f["val"]) for f in folds)
    assert per_case["case"].nunique() == n == 8
    assert sorted(per_case["case"].unique()) == sorted(c for f in folds for c in f["val"])
    meta = _json(tmp_path / "cv" / "meta.json")
    assert meta["n_cases"] == n and [f["cases"] for f in meta["cross_validation"]["folds"]] == [4, 4]
    summary = pd.read_csv(tmp_path / "cv" / "summary.csv")
    dice = summary[summary["metric"] == "dice"].iloc[0]
    assert dice["n_cases"] == n and dice["mean"] == pytest.approx(per_case["dice"].mean())
    per_fold = pd.read_csv(tmp_path / "cv" / "per_fold.csv")
    fold_dice = per_fold[per_fold["metric"] == "dice"]
    assert list(fold_dice["fold"]) == [0, 1] and list(fold_dice["n_cases"]) == [4, 4]
    for k, f in enumerate(folds):  # each fold's mean is over its own validation cases
        own = per_case[per_case["case"].isin(f["val"])]["dice"].mean()
        assert fold_dice.iloc[k]["mean"] == pytest.approx(own)


def test_cv_refuses_overlapping_validation_cases(folded, tmp_path):
    _, folds, _, runs = folded
    clash = tmp_path / "clash"
    shutil.copytree(runs[1], clash, ignore=shutil.ignore_patterns("eval", "*.lock"))
    cfg = yaml.safe_load((clash / "config.yaml").read_text(encoding="utf-8"))
    cfg["data"]["fold"] = None  # a run that records no fold: only its validation cases can tell it apart
    (clash / "config.yaml").write_text(yaml.safe_dump(cfg), encoding="utf-8")
    cases = _json(clash / "cases.json")
    cases["val"] = cases["val"] + [folds[0]["val"][0]]
    (clash / "cases.json").write_text(json.dumps(cases), encoding="utf-8")
    code, text = run_cli("eval", runs[0], clash, "--cv", "--out", tmp_path / "cv")
    one_line_error(code, text, folds[0]["val"][0], "also a validation case")
    code, text = run_cli("eval", runs[0], "--cv", "--out", tmp_path / "cv1")
    one_line_error(code, text, "--cv")
