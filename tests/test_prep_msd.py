"""`prep msd` and `prep lung` on tiny generated Medical Segmentation Decathlon task folders."""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import run_cli
from raw_fakes import make_msd_task, phantom_ct, write_image

from textseg_cli.data.io import read_nifti
from textseg_cli.data.prep.msd import prep_lung, prep_msd
from textseg_cli.data.prep.runner import PrepFailed
from textseg_cli.errors import ConfigError, DataError


@pytest.fixture(scope="module")
def lung(tmp_path_factory):
    return make_msd_task(tmp_path_factory.mktemp("msd"), n=4)


def test_lung_window_body_crop_resample(lung, tmp_path):
    ds = prep_lung(lung, tmp_path / "out", split="3,1", spacing=1, normalize="none")
    assert ds.name == "lung" and ds.class_names == ["background", "cancer"] and ds.spec["modality"] == "CT"
    assert len(ds.split("train")) == 3 and len(ds.split("test")) == 1
    src = read_nifti(lung / "imagesTr" / "lung_001.nii.gz").array
    case = ds.load_case("lung_001")
    assert case.spacing == (1.0, 1.0, 1.0)
    assert 0 <= case.image.min() and case.image.max() <= 1  # lung window [-1350, 150] HU -> [0, 1]
    # body crop: the phantom's body spans about 80% of x/y; the 19x16 grid at 1 mm shrinks, z (20 mm) stays
    entry = next(c for c in ds.spec["cases"] if c["id"] == "lung_001")
    assert entry["orig_shape"] == list(src.shape)
    assert case.image.shape[1] < 19 and case.image.shape[2] < 16 and case.image.shape[3] == 20
    assert case.label.sum() > 0
    win = next(s for s in ds.spec["preprocessing"] if s["step"] == "window")["params"]
    assert win["preset"] == "lung" and win["range"] == [-1350.0, 150.0]
    assert [s["step"] for s in ds.spec["preprocessing"]] == ["read", "resample", "crop", "window"]


def test_lung_default_split_and_cli(lung, tmp_path):
    with pytest.raises(ConfigError, match="48"):
        prep_lung(lung, tmp_path / "a")
    code, text = run_cli("prep", "lung", "--src", lung, "--out", tmp_path / "b", "--split", "2,1,1",
                         "--window", "-500", "1400")
    assert code == 0, text
    spec = json.loads((tmp_path / "b" / "dataset.json").read_text(encoding="utf-8"))
    win = next(s for s in spec["preprocessing"] if s["step"] == "window")["params"]
    assert win["level"] == -500 and win["width"] == 1400 and win["preset"] is None
    assert spec["seed"] == 1337 and {k: len(v) for k, v in spec["splits"].items()} == {"train": 2, "val": 1, "test": 1}


def test_msd_multimodal_channels_and_classes(tmp_path):
    task = make_msd_task(tmp_path, name="Task01_BrainTumour", n=3, channels=3, prefix="BRATS",
                         labels={"0": "background", "1": "edema", "2": "non-enhancing tumor"},
                         modality={"0": "FLAIR", "1": "T1w", "2": "t1gd"})
    ds = prep_msd(task, tmp_path / "out", channels=["T1GD", "0"], split="2,1")
    assert ds.spec["channel_names"] == ["t1gd", "FLAIR"] and ds.spec["modality"] == "MR"
    assert ds.class_names == ["background", "edema", "non-enhancing tumor"]
    assert ds.case_ids == ["BRATS_001", "BRATS_002", "BRATS_003"]  # '._' junk ignored: cases come from the json
    case = ds.load_case("BRATS_002")
    assert case.image.shape == (2, 24, 20, 8)
    raw = read_nifti(task / "imagesTr" / "BRATS_002.nii.gz").array  # (x, y, z, C)
    z = (raw[..., 2] - raw[..., 2].mean()) / raw[..., 2].std()
    assert np.allclose(case.image[0], z, atol=1e-4)  # channel t1gd first, z-scored per channel
    with pytest.raises(ConfigError, match="--channels 'T2'"):
        prep_msd(task, tmp_path / "bad", channels=["T2"], split="2,1")


def test_msd_geometry_and_label_errors(tmp_path):
    task = make_msd_task(tmp_path, name="Task09_Spleen", n=3, prefix="spleen", labels={"0": "background", "1": "spleen"})
    hu, lab = phantom_ct((24, 20, 8), seed=1)
    write_image(task / "labelsTr" / "spleen_002.nii.gz", lab, (0.8, 0.8, 5.0))  # spacing differs from the image
    lab[0, 0, 0] = 3
    write_image(task / "labelsTr" / "spleen_003.nii.gz", lab, (0.8, 0.8, 2.5))
    with pytest.raises(PrepFailed, match="2 of 3 cases failed"):
        prep_msd(task, tmp_path / "out", split="2,1")
    qc = (tmp_path / "out" / "qc.csv").read_text(encoding="utf-8")
    assert "case 'spleen_002': label geometry differs from the image: spacing (0.8, 0.8, 5) vs (0.8, 0.8, 2.5)" in qc
    assert "case 'spleen_003': unexpected label value(s) [3]" in qc
    with pytest.raises(DataError, match="dataset.json"):
        prep_msd(tmp_path, tmp_path / "out2")


def test_workers_give_identical_results(tmp_path):
    task = make_msd_task(tmp_path, name="Task06_Lung", n=3)
    one = prep_lung(task, tmp_path / "w1", split="2,1")
    two = prep_lung(task, tmp_path / "w2", split="2,1", workers=2)
    for cid in one.case_ids:
        a, b = one.load_case(cid), two.load_case(cid)
        assert np.array_equal(a.image, b.image) and np.array_equal(a.label, b.label)
    assert one.spec["splits"] == two.spec["splits"]
