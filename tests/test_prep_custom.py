"""`prep custom` on generated NIfTI / NRRD / MHA folders matched by case id."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import run_cli
from raw_fakes import phantom_ct, write_image

from textseg_cli.data.prep.custom import match_cases, prep_custom
from textseg_cli.data.prep.runner import PrepFailed
from textseg_cli.errors import ConfigError, DataError

SP = (0.7, 0.7, 2.0)


def make_folders(root, n=4, ext=(".nii.gz", ".nrrd", ".mha", ".nii.gz")):
    images, labels = root / "imgs", root / "labs"
    for i in range(n):
        hu, lab = phantom_ct((20, 20, 6), seed=i)
        write_image(images / f"case{i}{ext[i % len(ext)]}", hu, SP, (1.0, 2.0, 3.0))
        write_image(labels / f"case{i}_seg{ext[i % len(ext)]}", lab, SP, (1.0, 2.0, 3.0))
    return images, labels


def test_mixed_formats_matched_and_processed(tmp_path):
    images, labels = make_folders(tmp_path)
    hu, _ = phantom_ct((20, 20, 6), seed=9)
    write_image(images / "extra.nii.gz", hu, SP)  # image-only case
    write_image(labels / "ghost_seg.nii.gz", np.zeros((4, 4, 4), np.uint8))  # label without an image
    write_image(labels / "case3_seg.nii.gz", np.zeros((20, 20, 6), np.uint8), SP, (1.0, 2.0, 3.0))  # empty label
    ds = prep_custom(images, tmp_path / "out", labels=labels, classes=["organ"], window_preset="abdomen",
                     spacing="1", crop="body", normalize="none", split="3,1")
    assert ds.class_names == ["background", "organ"] and ds.spec["modality"] == "CT"
    assert len(ds.split("test")) == 1 and ds.split("train")[-1] == "extra"  # unlabeled last
    assert not ds.has_label("extra") and ds.has_label("case1")
    case = ds.load_case("case1")  # from .nrrd
    assert case.spacing == (1.0, 1.0, 1.0) and 0 <= case.image.min() and case.image.max() <= 1
    assert case.image.shape[3] == 12  # 6 slices x 2 mm at 1 mm; body crop keeps z
    warnings = " ".join(ds.spec["extra"]["warnings"])
    assert "ghost" in warnings and "extra" in warnings and "case 'case3': empty label" in warnings
    import pandas as pd

    qc = pd.read_csv(tmp_path / "out" / "qc.csv").set_index("case")
    assert bool(qc.loc["case3", "label_empty"]) and not bool(qc.loc["case1", "label_empty"])
    assert qc.loc["case1", "orig_shape"] == "20x20x6" and qc.loc["case1", "label_ml"] > 0
    assert ds.spec["preprocessing"][-1]["params"]["preset"] == "abdomen"


def test_channels_split_file_and_cli(tmp_path):
    images, labels = tmp_path / "i", tmp_path / "l"
    for i in range(3):
        hu, lab = phantom_ct((16, 16, 6), seed=i)
        write_image(images / f"p{i}_0000.nii.gz", hu, SP)
        write_image(images / f"p{i}_0001.nii.gz", hu * 0.5, SP)
        write_image(labels / f"p{i}.nii.gz", lab, SP)
    (tmp_path / "split.yaml").write_text("train: [p2, p0]\ntest: [p1]\n")
    code, text = run_cli("prep", "custom", "--images", images, "--labels", labels, "--out", tmp_path / "out",
                         "--modality", "MR", "--split-file", tmp_path / "split.yaml", "--workers", "1")
    assert code == 0, text
    from textseg_cli.data.prepared import load_prepared

    ds = load_prepared(tmp_path / "out")
    assert ds.in_channels == 2 and ds.spec["channel_names"] == ["MR0", "MR1"]
    assert ds.spec["splits"] == {"train": ["p2", "p0"], "val": [], "test": ["p1"]}


def test_bad_inputs(tmp_path):
    images, labels = make_folders(tmp_path, n=3, ext=(".nii.gz",))
    hu, lab = phantom_ct((20, 20, 6), seed=0)
    write_image(labels / "case1_seg.nii.gz", lab, SP, (9.0, 2.0, 3.0))  # origin differs
    lab2 = lab.copy()
    lab2[lab2 > 0] = 2  # a second class that --classes does not name
    write_image(labels / "case2_seg.nii.gz", lab2, SP, (1.0, 2.0, 3.0))
    with pytest.raises(PrepFailed) as err:
        prep_custom(images, tmp_path / "out", labels=labels, split="2,1")
    assert "case1" in str(err.value) and "case2" in str(err.value)
    qc = (tmp_path / "out" / "qc.csv").read_text(encoding="utf-8")
    assert "case 'case1': label geometry differs from the image: origin (9, 2, 3) vs (1, 2, 3)" in qc
    assert "unexpected label value(s) [2]" in qc
    # a label saved with a shifted header can be mapped through physical space when asked to
    ds = prep_custom(images, tmp_path / "out2", labels=labels, classes=["a", "b"], split="2,1",
                     label_geometry="resample")
    assert ds.load_case("case1").label.sum() < lab.sum()  # shifted by 8 mm: part of it falls outside
    assert any("resampled onto the image grid" in w for w in ds.spec["extra"]["warnings"])
    (labels / "case0_seg.nii.gz").unlink()
    with pytest.raises(DataError, match="have no label"):
        prep_custom(images, tmp_path / "out3", labels=labels, require_labels=True)
    with pytest.raises(ConfigError, match="--modality"):
        prep_custom(images, tmp_path / "out4", modality="PET")


def test_matching_rules(tmp_path):
    (tmp_path / "i").mkdir()
    (tmp_path / "l").mkdir()
    for n in ("a.nii.gz", "b_0000.mha", "b_0001.mha", ".hidden.nii.gz", "notes.txt"):
        (tmp_path / "i" / n).write_bytes(b"")
    for n in ("a_mask.nii.gz", "b_label.nrrd"):
        (tmp_path / "l" / n).write_bytes(b"")
    imgs, labs, orphans = match_cases(tmp_path / "i", tmp_path / "l")
    assert sorted(imgs) == ["a", "b"] and [p.name for p in imgs["b"]] == ["b_0000.mha", "b_0001.mha"]
    assert {k: v.name for k, v in labs.items()} == {"a": "a_mask.nii.gz", "b": "b_label.nrrd"} and orphans == []
    (tmp_path / "i" / "b_0003.mha").write_bytes(b"")
    with pytest.raises(DataError, match="without gaps"):
        match_cases(tmp_path / "i", tmp_path / "l")
