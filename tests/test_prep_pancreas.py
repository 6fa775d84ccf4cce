"""`prep pancreas` on tiny generated DICOM / NIfTI / h5 downloads: geometry, ranges, crops, splits, bad input."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
from conftest import run_cli
from raw_fakes import phantom_ct, write_dicom_series, write_h5, write_image

from textseg_cli.data.prep.pancreas import PANCREAS_TEST, PANCREAS_TRAIN, prep_pancreas, standard_split
from textseg_cli.data.prep.runner import PrepFailed
from textseg_cli.errors import ConfigError, DataError

SPACING = (0.8, 0.8, 2.0)
ORIGIN = (-10.0, -20.0, 30.0)
SHAPE = (24, 20, 6)
NUMBERS = ("0057", "0018", "0001")  # first two training cases in standard order, one test case
SMALL = dict(crop_min_size=8, crop_margin=2, n_val=0)


def make_dicom_download(root: Path, numbers=NUMBERS) -> tuple[Path, Path]:
    """TCIA layout: Pancreas-CT/PANCREAS_NNNN/<study>/<series>/*.dcm plus a separate label folder."""
    src, labels = root / "Pancreas-CT", root / "TCIA_pancreas_labels-02-05-2017"
    for i, n in enumerate(numbers):
        hu, lab = phantom_ct(SHAPE, seed=i, blob_center=(8 + 2 * i, 9, 3), blob_radius=2)
        write_dicom_series(src / f"PANCREAS_{n}" / f"11-24-2015-PANCREAS{n}-Pancreas-{i}" / f"Pancreas-{i}", hu,
                           SPACING, ORIGIN, uid=str(i + 1))
        write_image(labels / f"label{n}.nii.gz", lab, SPACING, ORIGIN)
    return src, labels


def tree_digest(root: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(root.rglob("*")):
        if p.is_file():
            h.update(str(p.relative_to(root)).encode() + p.read_bytes())
    return h.hexdigest()


@pytest.fixture(scope="module")
def download(tmp_path_factory):
    return make_dicom_download(tmp_path_factory.mktemp("pancreas_raw"))


def test_standard_split_is_exact():
    assert len(PANCREAS_TRAIN) == 62 and len(PANCREAS_TEST) == 20
    assert sorted(PANCREAS_TRAIN + PANCREAS_TEST) == [f"{i:04d}" for i in range(1, 83)]
    s = standard_split()
    assert s["train"][:6] == ["PANCREAS_0057", "PANCREAS_0018", "PANCREAS_0062", "PANCREAS_0031", "PANCREAS_0020",
                              "PANCREAS_0017"]
    assert s["train"][6:12] == [f"PANCREAS_{n}" for n in ("0032", "0079", "0061", "0064", "0070", "0019")]
    assert s["train"][-1] == "PANCREAS_0003"
    assert s["test"][:3] == ["PANCREAS_0050", "PANCREAS_0059", "PANCREAS_0037"] and s["test"][-1] == "PANCREAS_0009"


def test_dicom_layout_standard_processing(download, tmp_path):
    src, labels = download
    before = tree_digest(src.parent)
    ds = prep_pancreas(src, tmp_path / "out", labels=labels, normalize="none", **SMALL)
    assert tree_digest(src.parent) == before  # the source is never modified
    assert ds.split("train") == ["PANCREAS_0057", "PANCREAS_0018"]  # standard order kept
    assert ds.split("test") == ["PANCREAS_0001"] and ds.split("val") == []
    expected_z = int(round(SHAPE[2] * SPACING[2]))  # 12 slices at 1 mm, z never cropped
    for cid in ds.case_ids:
        case = ds.load_case(cid)
        assert case.spacing == (1.0, 1.0, 1.0)
        img, lab = case.image[0], case.label
        assert img.min() >= 0.0 and img.max() <= 1.0  # window [-125, 275] HU -> [0, 1], no z-score
        assert img.shape[2] == expected_z
        # x/y crop: label box enlarged to >= 8 voxels plus 2 on each side (inside a 19x16 grid)
        xs, ys = np.nonzero(lab.any(axis=2))[0], np.nonzero(lab.any(axis=1))[0]
        assert img.shape[0] == 12 and img.shape[1] == 12
        assert xs.min() >= 2 and img.shape[0] - 1 - xs.max() >= 2 and ys.min() >= 2
        # HU were read in slice order: the blob (120 HU) maps to (120 + 125) / 400, air to 0
        assert abs(float(np.median(img[lab > 0])) - 245 / 400) < 0.05
        assert float(img.min()) == 0.0
    entry = next(c for c in ds.spec["cases"] if c["id"] == "PANCREAS_0001")
    assert entry["orig_shape"] == list(SHAPE) and entry["orig_spacing"] == pytest.approx(list(SPACING))
    steps = [s["step"] for s in ds.spec["preprocessing"]]
    assert steps == ["read", "resample", "crop", "window"]
    window = ds.spec["preprocessing"][3]["params"]
    assert window["range"] == [-125.0, 275.0]
    crop = ds.spec["preprocessing"][2]["params"]
    assert crop["axes"] == "xy" and crop["margin"] == [2, 2, 0] and crop["min_size"] == [8, 8, 0]
    qc = (tmp_path / "out" / "qc.csv").read_text(encoding="utf-8")
    assert "orig_shape" in qc and "label_ml" in qc and "prenorm_max" in qc


def test_defaults_zscore_and_recorded(download, tmp_path):
    src, labels = download
    ds = prep_pancreas(src, tmp_path / "out", labels=labels, n_val=0)
    rec = {s["step"]: s["params"] for s in ds.spec["preprocessing"]}
    assert rec["resample"]["spacing_mm"] == [1.0, 1.0, 1.0]
    assert rec["window"]["level"] == 75.0 and rec["window"]["width"] == 400.0
    assert rec["crop"]["min_size"] == [96, 96, 0] and rec["crop"]["margin"] == [25, 25, 0]
    assert "zscore" in rec
    import pandas as pd

    qc = pd.read_csv(tmp_path / "out" / "qc.csv")
    assert (qc["prenorm_min"] >= 0).all() and (qc["prenorm_max"] <= 1).all()  # [0, 1] before the z-score
    case = ds.load_case("PANCREAS_0057")
    assert abs(case.image.mean()) < 1e-4 and abs(case.image.std() - 1) < 1e-3
    assert case.image.shape[1:3] == (19, 16)  # 96 + 2*25 is larger than the tiny volume: crop clipped to it


def test_rerun_skips_force_redoes_and_settings_guard(download, tmp_path):
    src, labels = download
    out = tmp_path / "out"
    prep_pancreas(src, out, labels=labels, **SMALL)
    mtime = (out / "images" / "PANCREAS_0001.nii.gz").stat().st_mtime_ns
    code, text = run_cli("prep", "pancreas", "--src", src, "--labels", labels, "--out", out, "--crop-min-size", "8",
                         "--crop-margin", "2", "--val", "0")
    assert code == 0, text
    assert "3 skipped" in text
    assert (out / "images" / "PANCREAS_0001.nii.gz").stat().st_mtime_ns == mtime
    with pytest.raises(ConfigError, match="different settings"):
        prep_pancreas(src, out, labels=labels, crop_min_size=10, crop_margin=2, n_val=0)
    prep_pancreas(src, out, labels=labels, crop_min_size=10, crop_margin=2, n_val=0, force=True)
    assert (out / "images" / "PANCREAS_0001.nii.gz").stat().st_mtime_ns != mtime


def test_validation_carved_outside_labeled_head(download, tmp_path):
    src, labels = download
    with pytest.raises(ConfigError, match="--val 1"):
        prep_pancreas(src, tmp_path / "a", labels=labels, crop_min_size=8, crop_margin=2, n_val=1)
    ds = prep_pancreas(src, tmp_path / "b", labels=labels, crop_min_size=8, crop_margin=2, n_val=1, keep_labeled=1)
    assert ds.split("train") == ["PANCREAS_0057"] and ds.split("val") == ["PANCREAS_0018"]
    assert ds.spec["extra"]["standard_split"]["train"] == ["PANCREAS_0057", "PANCREAS_0018"]


def test_nifti_and_h5_layouts(tmp_path):
    src = tmp_path / "raw"
    hu, lab = phantom_ct(SHAPE, seed=3, blob_center=(10, 9, 3), blob_radius=2)
    write_image(src / "PANCREAS_0050.nii.gz", hu, SPACING)
    write_image(src / "label0050.nii.gz", lab, SPACING)
    ds = prep_pancreas(src, tmp_path / "nii", normalize="none", **SMALL)
    assert ds.case_ids == ["PANCREAS_0050"] and ds.split("test") == ["PANCREAS_0050"]
    case = ds.load_case("PANCREAS_0050")
    assert case.spacing == (1.0, 1.0, 1.0) and 0 <= case.image.min() and case.image.max() <= 1

    h5 = tmp_path / "h5src" / "Pancreas_h5"
    rng = np.random.RandomState(0)
    img = rng.normal(3.0, 2.0, (20, 18, 10)).astype(np.float32)
    lbl = np.zeros((20, 18, 10), np.uint8)
    lbl[5:9, 5:9, 3:6] = 1
    write_h5(h5 / "image0057_norm.h5", img, lbl)
    ds = prep_pancreas(h5.parent, tmp_path / "h5out", n_val=0)
    case = ds.load_case("PANCREAS_0057")
    assert case.image.shape == (1, 20, 18, 10) and np.array_equal(case.label, lbl)
    assert abs(case.image.mean()) < 1e-4 and abs(case.image.std() - 1) < 1e-3
    assert [s["step"] for s in ds.spec["preprocessing"]] == ["from_h5", "zscore"]


def test_corrupt_dicom_slice_fails_that_case_only(tmp_path):
    src, labels = make_dicom_download(tmp_path / "raw")
    bad = sorted((src / "PANCREAS_0018").rglob("*.dcm"))[2]
    bad.write_bytes(b"\x00" * 64 + b"not a dicom file")
    out = tmp_path / "out"
    code, text = run_cli("prep", "pancreas", "--src", src, "--labels", labels, "--out", out, "--crop-min-size", "8",
                         "--crop-margin", "2", "--val", "0")
    assert code == 2
    assert "PANCREAS_0018" in text and "1 of 3 cases failed" in text
    assert not (out / "dataset.json").exists()  # never a data set that silently lacks a case
    from textseg_cli.data.io import read_nifti

    assert read_nifti(out / "images" / "PANCREAS_0057.nii.gz").array.shape[2] == 12  # finished cases are valid
    assert "failed" in (out / "qc.csv").read_text(encoding="utf-8")
    ds = prep_pancreas(src, out, labels=labels, drop_failed=True, **SMALL)
    assert ds.case_ids == ["PANCREAS_0001", "PANCREAS_0057"] and ds.split("train") == ["PANCREAS_0057"]
    assert "PANCREAS_0018" in ds.spec["extra"]["dropped_cases"]


def test_missing_slice_truncated_slice_missing_label(tmp_path):
    src, labels = make_dicom_download(tmp_path / "raw")
    files = sorted((src / "PANCREAS_0057").rglob("*.dcm"))
    import pydicom

    middle = next(f for f in files if int(pydicom.dcmread(f, stop_before_pixels=True).InstanceNumber) == 3)
    middle.unlink()  # a gap in the slice positions
    data = sorted((src / "PANCREAS_0001").rglob("*.dcm"))[0]
    data.write_bytes(data.read_bytes()[:-300])  # truncated pixel data
    (labels / "label0018.nii.gz").unlink()
    with pytest.raises(PrepFailed) as err:
        prep_pancreas(src, tmp_path / "out", labels=labels, **SMALL)
    msg = str(err.value)
    assert "3 of 3 cases failed" in msg
    qc = (tmp_path / "out" / "qc.csv").read_text(encoding="utf-8")
    assert "PANCREAS_0057" in qc and "missing" in qc  # uneven spacing: a slice is missing
    assert "label0018.nii.gz" in qc
    assert "PANCREAS_0001" in qc


def test_label_geometry_mismatch_and_values(tmp_path):
    src = tmp_path / "raw"
    hu, lab = phantom_ct(SHAPE, seed=1, blob_center=(10, 9, 3), blob_radius=2)
    write_image(src / "image0050.nii.gz", hu, SPACING, ORIGIN)
    write_image(src / "label0050.nii.gz", lab, SPACING, (0.0, 0.0, 0.0))  # wrong origin
    lab2 = lab.copy()
    lab2[0, 0, 0] = 2  # unexpected value
    write_image(src / "image0001.nii.gz", hu, SPACING, ORIGIN)
    write_image(src / "label0001.nii.gz", lab2, SPACING, ORIGIN)
    with pytest.raises(PrepFailed):
        prep_pancreas(src, tmp_path / "out", **SMALL)
    qc = (tmp_path / "out" / "qc.csv").read_text(encoding="utf-8")
    assert "case 'PANCREAS_0050': label geometry differs from the image: origin" in qc
    assert "unexpected label value(s) [2]" in qc
    # an explicit choice accepts a label whose header is wrong but whose voxels match; it is reported
    (src / "image0001.nii.gz").unlink()
    (src / "label0001.nii.gz").unlink()
    ds = prep_pancreas(src, tmp_path / "out2", label_geometry="image", **SMALL)
    assert any("label header replaced" in w for w in ds.spec["extra"]["warnings"])
    assert ds.load_case("PANCREAS_0050").label.sum() > 0


def test_errors_name_the_problem(tmp_path):
    with pytest.raises(DataError, match="no Pancreas-CT cases"):
        prep_pancreas(tmp_path, tmp_path / "out")
    src, labels = make_dicom_download(tmp_path / "raw", numbers=("0001",))
    with pytest.raises(ConfigError, match="overlaps"):
        prep_pancreas(src, src / "out", labels=labels, **SMALL)
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("mine")
    code, text = run_cli("prep", "pancreas", "--src", src, "--labels", labels, "--out", tmp_path / "busy", "--val", "0")
    assert code == 2 and "already exists" in text
    assert json.loads(json.dumps(standard_split()))["test"][0] == "PANCREAS_0050"
