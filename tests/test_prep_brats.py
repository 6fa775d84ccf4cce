"""`prep brats` on a tiny generated BraTS-2019 training folder (HGG/ LGG/ case folders)."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import run_cli
from raw_fakes import make_brats, write_image

from textseg_cli.data.io import read_nifti
from textseg_cli.data.prep.brats import prep_brats
from textseg_cli.data.prep.runner import PrepFailed
from textseg_cli.errors import ConfigError


@pytest.fixture(scope="module")
def brats(tmp_path_factory):
    return make_brats(tmp_path_factory.mktemp("brats_raw"))


def test_standard_processing(brats, tmp_path):
    root, ids = brats
    ds = prep_brats(root, tmp_path / "out", split="3,1,1")
    assert ds.spec["channel_names"] == ["FLAIR"] and ds.class_names == ["background", "whole tumour"]
    assert sorted(ds.case_ids) == sorted(ids)
    cid = ids[0]
    src = read_nifti(root / "HGG" / cid / f"{cid}_flair.nii.gz").array
    seg = read_nifti(root / "HGG" / cid / f"{cid}_seg.nii.gz").array
    case = ds.load_case(cid)
    box = [(int(i.min()), int(i.max()) + 1) for i in np.nonzero(src)]
    assert case.image.shape[1:] == tuple(hi - lo for lo, hi in box)  # cropped to the brain's bounding box
    assert set(np.unique(case.label)) == {0, 1} and case.label.sum() == (seg > 0).sum()  # whole tumour
    img = case.image[0]
    brain = img != 0
    assert abs(img[brain].mean()) < 1e-4 and abs(img[brain].std() - 1) < 1e-3  # z-score over brain voxels
    assert brain.sum() == (src != 0).sum()  # background stays 0
    entry = next(c for c in ds.spec["cases"] if c["id"] == cid)
    assert entry["grade"] == "HGG"
    steps = {s["step"]: s["params"] for s in ds.spec["preprocessing"]}
    assert steps["clip_percentile"] == {"lower": None, "upper": 99.9, "over": "nonzero"}
    assert steps["crop"]["around"] == "nonzero"


def test_clip_before_zscore(brats, tmp_path):
    root, ids = brats
    ds = prep_brats(root, tmp_path / "out", split="3,1,1", normalize="none")
    cid = ids[1]
    src = read_nifti(root / "HGG" / cid / f"{cid}_flair.nii.gz").array
    p999 = np.percentile(src[src != 0], 99.9)
    img = ds.load_case(cid).image[0]
    assert img.max() == pytest.approx(p999, rel=1e-5) and img.max() < src.max()


def test_modalities_and_splits(brats, tmp_path):
    root, ids = brats
    ds = prep_brats(root, tmp_path / "a", modalities=["flair", "t1ce"], split="3,1,1", seed=7)
    assert ds.spec["channel_names"] == ["FLAIR", "T1CE"] and ds.load_case(ids[0]).image.shape[0] == 2
    again = prep_brats(root, tmp_path / "b", split="3,1,1", seed=7)
    other = prep_brats(root, tmp_path / "c", split="3,1,1", seed=8)
    assert ds.spec["splits"] == again.spec["splits"]  # seeded, independent of modalities
    assert {k: len(v) for k, v in ds.spec["splits"].items()} == {"train": 3, "val": 1, "test": 1}
    assert other.spec["splits"] != ds.spec["splits"]
    lists = tmp_path / "lists"
    lists.mkdir()
    (lists / "train.txt").write_text("\n".join(ids[:4]) + "\n")
    (lists / "test.txt").write_text(ids[4] + "\n")
    code, text = run_cli("prep", "brats", "--src", root, "--out", tmp_path / "d", "--split-file", lists)
    assert code == 0, text
    from textseg_cli.data.prepared import load_prepared

    assert load_prepared(tmp_path / "d").spec["splits"] == {"train": ids[:4], "val": [], "test": [ids[4]]}
    code, text = run_cli("prep", "brats", "--src", root, "--out", tmp_path / "e")
    assert code == 2 and "250,25,60" in text and "5 were found" in text
    with pytest.raises(ConfigError, match="modalities"):
        prep_brats(root, tmp_path / "f", modalities=["dwi"], split="3,1,1")


def test_missing_modality_and_odd_label_values(tmp_path):
    root, ids = make_brats(tmp_path / "raw", n_hgg=2, n_lgg=1)
    (root / "LGG" / ids[2] / f"{ids[2]}_flair.nii.gz").unlink()
    seg_path = root / "HGG" / ids[0] / f"{ids[0]}_seg.nii.gz"
    seg = read_nifti(seg_path).array
    seg[12, 11, 7] = 3  # a label value BraTS-2019 does not use
    write_image(seg_path, seg, (1, 1, 1), (0.0, -239.0, 0.0), (-1, 0, 0, 0, -1, 0, 0, 0, 1))
    with pytest.raises(PrepFailed, match=ids[2]):
        prep_brats(root, tmp_path / "out", split="2,0,1")
    assert f"no flair image ({ids[2]}_flair.nii.gz)" in (tmp_path / "out" / "qc.csv").read_text(encoding="utf-8")
    ds = prep_brats(root, tmp_path / "out", split="2,0,1", drop_failed=True)
    assert ids[2] not in ds.case_ids
    assert any("unexpected label value(s) [3]" in w for w in ds.spec["extra"]["warnings"])
    assert ds.load_case(ids[0]).label.sum() == (seg > 0).sum()  # value 3 still counts as tumour
