"""Issue 15: from a trained run to use — predict replays preprocessing, relocatable runs, export, splits, curves."""

from __future__ import annotations

import json
import shutil

import nibabel as nib
import numpy as np
import pytest
from conftest import run_cli
from raw_fakes import phantom_ct, write_image

SP = (0.7, 0.7, 2.0)
FLIP = (-1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)
TRAIN = ["--iterations", "3", "--set", "train.batch_labeled=2",
         "--set", "inference.stride=16,16,8", "--threads", "1"]


def _raw_folder(root, n=10, shape=(26, 24, 8)):
    images, labels = root / "imgs", root / "labs"
    for i in range(n):
        hu, lab = phantom_ct(shape, seed=i, blob_radius=4)
        write_image(images / f"case{i}.nii.gz", hu, SP, (5.0, -3.0, 1.0), FLIP)
        write_image(labels / f"case{i}.nii.gz", lab, SP, (5.0, -3.0, 1.0), FLIP)
    return images, labels


def _dice(a, b):
    a, b = np.asarray(a) > 0, np.asarray(b) > 0
    return 1.0 if not (a.any() or b.any()) else 2 * (a & b).sum() / (a.sum() + b.sum())


@pytest.fixture(scope="module")
def custom_run(tmp_path_factory):
    """prep custom with resampling, a body crop and a CT window (default split), then 3 iterations of sup."""
    root = tmp_path_factory.mktemp("use")
    images, labels = _raw_folder(root)
    prepared, run_dir = root / "prepared", root / "run"
    code, text = run_cli("prep", "custom", "--images", images, "--labels", labels, "--out", prepared,
                         "--spacing", "1", "--window-preset", "abdomen", "--crop", "body", "--classes", "blob")
    assert code == 0, text
    code, text = run_cli("train", "--method", "sup", "--data", prepared, "--out", run_dir, *TRAIN)
    assert code == 0, text
    return root, images, prepared, run_dir


def test_predict_replays_preprocessing_and_matches_eval(custom_run, tmp_path):
    import SimpleITK as sitk

    root, images, prepared, run_dir = custom_run
    ds = json.loads((prepared / "dataset.json").read_text(encoding="utf-8"))
    cid = ds["splits"]["val"][0]
    code, text = run_cli("eval", run_dir, "--split", "val", "--out", tmp_path / "ev")
    assert code == 0, text
    out = tmp_path / "pred"
    code, text = run_cli("predict", run_dir, "--images", images / f"{cid}.nii.gz", "--out", out,
                         "--save-probabilities")
    assert code == 0, text
    raw = nib.load(str(images / f"{cid}.nii.gz"))
    mine = nib.load(str(out / f"{cid}.nii.gz"))
    assert mine.shape == raw.shape and np.allclose(mine.affine, raw.affine, atol=1e-6)
    # eval's mask lives on the prepared (resampled, cropped) grid; bring it onto the raw grid by physical
    # coordinates with SimpleITK, independently of predict's own mapping
    ev = sitk.ReadImage(str(tmp_path / "ev" / "predictions" / f"{cid}.nii.gz"))
    ref = sitk.ReadImage(str(images / f"{cid}.nii.gz"))
    back = sitk.Resample(ev, ref, sitk.Transform(), sitk.sitkNearestNeighbor, 0, ev.GetPixelID())
    ev_raw = np.transpose(sitk.GetArrayFromImage(back), (2, 1, 0))
    mask = np.asarray(mine.dataobj)
    assert ev_raw.any() or mask.any()
    assert _dice(mask, ev_raw) >= 0.99
    probs = nib.load(str(out / f"{cid}_probs.nii.gz"))
    assert probs.shape == raw.shape + (2,) and np.allclose(probs.affine, raw.affine, atol=1e-6)
    meta = json.loads((out / "predict.json").read_text(encoding="utf-8"))
    assert [s["step"] for s in meta["preprocessing"]] == ["resample", "crop", "window", "zscore"]


def test_predict_refuses_unreplayable_chain():
    from textseg_cli.errors import ConfigError
    from textseg_cli.inference.replay import replay_processing

    with pytest.raises(ConfigError, match="around the label"):
        replay_processing([{"step": "crop", "params": {"around": "label"}}])
    with pytest.raises(ConfigError, match="'from_h5' cannot be replayed"):
        replay_processing([{"step": "from_h5", "params": {}}])
    proc = replay_processing([{"step": "read"}, {"step": "resample", "params": {"spacing_mm": [1, None, 2]}},
                              {"step": "zscore", "params": {"over": "non-zero voxels"}}])
    assert proc.target_spacing == (1.0, None, 2.0) and proc.normalize == "zscore-nonzero"


def test_predict_nrrd_and_mha_keep_format_and_geometry(custom_run, tmp_path):
    import SimpleITK as sitk

    _, _, _, run_dir = custom_run
    hu, _ = phantom_ct((22, 20, 7), seed=42, blob_radius=4)
    folder = tmp_path / "new"
    write_image(folder / "a.nrrd", hu, (0.8, 0.6, 2.5), (1.0, 2.0, 3.0))
    write_image(folder / "b.mha", hu, (0.9, 0.9, 1.5), (0.0, 0.0, 0.0), FLIP)
    code, text = run_cli("predict", run_dir, "--images", folder, "--out", tmp_path / "p")
    assert code == 0, text
    for name in ("a.nrrd", "b.mha"):
        src, res = sitk.ReadImage(str(folder / name)), sitk.ReadImage(str(tmp_path / "p" / name))
        assert res.GetSize() == src.GetSize() and np.allclose(res.GetSpacing(), src.GetSpacing())
        assert np.allclose(res.GetOrigin(), src.GetOrigin()) and np.allclose(res.GetDirection(), src.GetDirection())


def test_moved_run_predicts_without_its_data_folder(custom_run, tmp_path, monkeypatch):
    """sup and vclipseg (offline CLIP embeddings given by a relative path) still predict after the run folder
    moved, the prepared folder and the embedding file were deleted, from another working directory."""
    import torch

    from textseg_cli.text.embeddings import save_embeddings

    root, images, prepared, run_dir = custom_run
    work = tmp_path / "work"
    shutil.copytree(prepared, work / "prepared")
    monkeypatch.chdir(work)
    save_embeddings("emb/clip.safetensors", {"embeddings": torch.randn(2, 512)},
                    {"encoder": "clip", "texts": ["A pixel of background.", "A pixel of blob."]})
    code, text = run_cli("train", "--method", "vclipseg", "--data", "prepared", "--out", "vrun", "--labeled", "4",
                         "--text-embeddings", "emb/clip.safetensors", *TRAIN, "--set", "train.batch_unlabeled=2")
    assert code == 0, text
    ref_out = tmp_path / "ref"
    code, text = run_cli("predict", "vrun", "--images", images / "case1.nii.gz", "--out", ref_out)
    assert code == 0, text
    shutil.copytree(run_dir, tmp_path / "moved" / "sup")
    shutil.move(str(work / "vrun"), str(tmp_path / "moved" / "vclipseg"))
    shutil.rmtree(work)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    for name in ("sup", "vclipseg"):
        code, text = run_cli("predict", tmp_path / "moved" / name, "--images", images / "case1.nii.gz",
                             "--out", tmp_path / f"p_{name}")
        assert code == 0, text
    np.testing.assert_array_equal(np.asarray(nib.load(str(tmp_path / "p_vclipseg" / "case1.nii.gz")).dataobj),
                                  np.asarray(nib.load(str(ref_out / "case1.nii.gz")).dataobj))


def test_default_split_has_validation_and_best_checkpoint(custom_run):
    _, _, prepared, run_dir = custom_run
    ds = json.loads((prepared / "dataset.json").read_text(encoding="utf-8"))
    assert {k: len(v) for k, v in ds["splits"].items()} == {"train": 7, "val": 1, "test": 2}
    assert (run_dir / "checkpoints" / "best.pt").exists()
    assert json.loads((run_dir / "cases.json").read_text(encoding="utf-8"))["val"] == ds["splits"]["val"]


def test_folds_and_train_fold(custom_run, tmp_path):
    root, images, _, _ = custom_run
    labels = images.parent / "labs"
    code, text = run_cli("prep", "custom", "--images", images, "--labels", labels, "--out", tmp_path / "p",
                         "--folds", "5")
    assert code == 0, text
    ds = json.loads((tmp_path / "p" / "dataset.json").read_text(encoding="utf-8"))
    folds = ds["extra"]["folds"]
    assert len(folds) == 5 and sorted(c for f in folds for c in f["val"]) == sorted(folds[0]["train"] + folds[0]["val"])
    assert not set(ds["splits"]["test"]) & {c for f in folds for c in f["val"]}
    code, text = run_cli("train", "--method", "sup", "--data", tmp_path / "p", "--out", tmp_path / "r", "--fold", "2",
                         *TRAIN)
    assert code == 0, text
    cases = json.loads((tmp_path / "r" / "cases.json").read_text(encoding="utf-8"))
    assert cases["val"] == folds[2]["val"] and cases["labeled"] == folds[2]["train"]
    code, text = run_cli("eval", tmp_path / "r", "--out", tmp_path / "ev")
    assert code == 0, text
    import pandas as pd

    assert sorted(pd.read_csv(tmp_path / "ev" / "per_case.csv")["case"].unique()) == folds[2]["val"]
    code, text = run_cli("train", "--method", "sup", "--data", tmp_path / "p", "--out", tmp_path / "r7", "--fold", "7",
                         *TRAIN)
    assert code == 2 and "expected 0 to 4" in text


def test_curves_piped_lines_plot_and_export(tmp_path, synthetic_data):
    import torch

    run_dir = tmp_path / "r"
    code, text = run_cli("train", "--method", "sup", "--data", synthetic_data, "--out", run_dir, "--iterations", "4",
                         "--set", "train.log_every=2", "--set", "train.batch_labeled=2", "--val-every", "2",
                         "--threads", "1")
    assert code == 0, text
    lines = [ln for ln in text.splitlines() if ln.startswith("it ")]  # run_cli's output is not a terminal
    assert [ln.split()[1] for ln in lines] == ["2/4", "4/4"] and all("ETA" in ln and "loss" in ln for ln in lines)
    assert (run_dir / "curves.png").stat().st_size > 1000
    env = json.loads((run_dir / "env.json").read_text(encoding="utf-8"))
    assert env["packages"]["SimpleITK"] and env["packages"]["scipy"] and env["cpu"]
    code, text = run_cli("plot", run_dir, run_dir, "--out", tmp_path / "both.png")
    assert code == 0 and (tmp_path / "both.png").exists(), text
    code, text = run_cli("export", run_dir, "--format", "torchscript", "--out", tmp_path / "exp")
    assert code == 0, text
    rec = json.loads((tmp_path / "exp" / "export.json").read_text(encoding="utf-8"))
    with pytest.warns(FutureWarning):  # torch deprecates TorchScript; the file still loads
        model = torch.jit.load(str(tmp_path / "exp" / "model.torchscript.pt"))
    x = torch.zeros(rec["input"])
    assert model(x).shape == tuple(rec["output"]) and rec["load_back_check"]["max_abs_diff"] < 1e-4
    assert set(torch.load(tmp_path / "exp" / "weights.pt")) and rec["class_names"][0] == "background"
    code, text = run_cli("export", run_dir, "--format", "torch-export", "--out", tmp_path / "exp2")
    assert code == 0, text
    prog = torch.export.load(str(tmp_path / "exp2" / "model.pt2")).module()
    torch.testing.assert_close(prog(x), model(x), atol=1e-4, rtol=0)
    code, text = run_cli("export", run_dir, "--format", "tflite", "--out", tmp_path / "exp3")
    assert code == 2 and "--format" in text
