"""`textseg prep slices`: 3D prepared folder → 2D slices with organ prompts; re-stacking and per-volume Dice."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import run_cli

from textseg_cli.data.io import write_nifti
from textseg_cli.data.prep.slices import organ_prompt, prep_slices, remap, restack_labels, select_classes
from textseg_cli.data.prepared import load_prepared
from textseg_cli.errors import ConfigError, DataError
from textseg_cli.evaluation.folders import evaluate_folders


@pytest.fixture(scope="module")
def slices(synthetic_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("slices") / "axial"
    return prep_slices(synthetic_data, out)


def test_slice_count_texts_and_split_integrity(synthetic_data, slices):
    src = load_prepared(synthetic_data)
    assert slices.dim == 2 and len(slices.case_ids) == 10 * 24
    assert slices.class_names == ["background", "liver"]
    assert slices.text(slices.case_ids[0]) == "A computed tomography slice showing the liver."
    for split in ("train", "val", "test"):
        members = slices.split(split)
        entries = {c["id"]: c for c in slices.spec["cases"]}
        vols = {entries[sid]["source_volume"] for sid in members}
        assert vols == set(src.split(split))  # every slice's volume lies in the same split
        assert len(members) == 24 * len(vols)
    # train order: volume by volume in the source's order, slice index ascending
    train = slices.split("train")
    assert train[:2] == [f"{src.split('train')[0]}_s000", f"{src.split('train')[0]}_s001"]
    case = slices.load_case(train[5])
    assert case.meta["slice_index"] == 5 and case.meta["slice_axis"] == "axial"
    full = src.load_case(src.split("train")[0])
    np.testing.assert_allclose(case.image[0], full.image[0][:, :, 5], rtol=1e-6)
    assert case.spacing == pytest.approx(full.spacing[:2])


def test_restacked_volume_equals_original_label(synthetic_data, slices):
    src = load_prepared(synthetic_data)
    for vid in (src.split("train")[0], src.split("val")[0]):
        np.testing.assert_array_equal(restack_labels(slices, vid), src.load_case(vid).label)


def test_per_volume_dice_of_a_perfect_prediction_is_one(slices, tmp_path):
    pred = tmp_path / "pred"
    val = slices.split("val")
    for sid in val:
        case = slices.load_case(sid)
        write_nifti(pred / f"{sid}.nii.gz", case.label, case.spacing)
    df = evaluate_folders(pred, slices.root, tmp_path / "ev", split="val", per_volume=True, show=False)
    vols = sorted({sid.rsplit("_s", 1)[0] for sid in val})
    assert sorted(df["case"]) == vols
    assert np.allclose(df["dice"], 1.0) and np.allclose(df["hd95"], 0.0)
    assert df.attrs["meta"]["per_volume"] is True and df.attrs["meta"]["dim"] == 3

    # a volume whose slices are not all predicted cannot be re-stacked
    (pred / f"{val[3]}.nii.gz").unlink()
    with pytest.raises(DataError, match="no prediction"):
        evaluate_folders(pred, slices.root, split="val", per_volume=True, write=False, show=False)
    with pytest.raises(DataError, match="slice"):
        evaluate_folders(pred, slices.root, split="val", per_volume=True, write=False, show=False, allow_missing=True)


def test_skip_empty_ratio_only_thins_training_volumes(synthetic_data, tmp_path):
    src = load_prepared(synthetic_data)
    ds = prep_slices(synthetic_data, tmp_path / "thin", skip_empty_ratio=1.0, seed=1)
    vols = ds.spec["extra"]["slices"]["volumes"]
    for vid in src.split("train"):
        label = src.load_case(vid).label
        empty = [k for k in range(label.shape[2]) if not label[:, :, k].any()]
        assert vols[vid]["skipped"] == empty
    for vid in src.split("val") + src.split("test"):
        assert vols[vid]["skipped"] == []
    assert len(ds.split("val")) == 2 * 24
    skipped_vol = next(v for v in src.split("train") if vols[v]["skipped"])
    with pytest.raises(DataError, match="skipped"):
        restack_labels(ds, skipped_vol)


def test_class_selection_prompt_and_errors(synthetic_data, tmp_path):
    assert select_classes(["background", "liver", "kidney"], "kidney") == [2]
    lab = np.array([[0, 1, 2], [2, 1, 0]], np.uint8)
    np.testing.assert_array_equal(remap(lab, [2]), (lab == 2).astype(np.uint8))
    np.testing.assert_array_equal(remap(lab, [2, 1]), np.array([[0, 2, 1], [1, 2, 0]]))
    assert organ_prompt(["liver", "kidney", "spleen"], "MR") == \
        "A magnetic resonance slice showing the liver, kidney and spleen."
    with pytest.raises(ConfigError, match="no class 'pancreas'"):
        select_classes(["background", "liver"], ["pancreas"])
    with pytest.raises(ConfigError, match="placeholder"):
        organ_prompt(["liver"], "CT", "An image.")

    code, out = run_cli("prep", "slices", "--src", synthetic_data, "--out", tmp_path / "x", "--classes", "spleen")
    assert code == 2 and "spleen" in out
    code, out = run_cli("prep", "slices", "--src", synthetic_data, "--out", tmp_path / "c", "--axis", "coronal",
                        "--template", "CT of the {classes}.")
    assert code == 0, out
    ds = load_prepared(tmp_path / "c")
    assert len(ds.case_ids) == 10 * 32 and ds.text(ds.case_ids[0]) == "CT of the liver."
    assert ds.load_case(ds.case_ids[0]).image.shape[1:] == (32, 24)
    code, out = run_cli("prep", "slices", "--src", tmp_path / "c", "--out", tmp_path / "again")
    assert code == 2 and "dim 3" in out
