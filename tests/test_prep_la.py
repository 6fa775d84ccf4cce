"""`textseg prep la`: both source layouts, the standard split, resuming, and bad input."""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import run_cli

from textseg_cli.data.prep.la import LA_TEST_IDS, LA_TRAIN_IDS, build_splits
from textseg_cli.data.prepared import load_prepared

IDS = LA_TRAIN_IDS[:4]


def write_h5_case(src, case_id, shape=(20, 18, 8), seed=0, label=True, label_values=(0, 1)):
    import h5py

    rng = np.random.default_rng(seed)
    (src / case_id).mkdir(parents=True, exist_ok=True)
    image = rng.standard_normal(shape).astype(np.float32)
    lab = np.full(shape, label_values[0], np.uint8)
    lab[5:12, 4:10, 2:6] = label_values[1]
    with h5py.File(src / case_id / "mri_norm2.h5", "w") as f:
        f["image"] = image
        if label:
            f["label"] = lab
    return image, lab


def write_raw_case(src, case_id, shape=(160, 160, 4), seed=0, label_shape=None, label_spacing=None,
                   box=((70, 90), (70, 90)), fill=255):
    import SimpleITK as sitk

    rng = np.random.default_rng(seed)
    (src / case_id).mkdir(parents=True, exist_ok=True)
    image = (rng.random(shape) * 400).astype(np.int16)  # like LGE-MRI intensities
    lab = np.zeros(label_shape or shape, np.uint8)
    (x0, x1), (y0, y1) = box
    lab[x0:x1, y0:y1, :] = fill
    for arr, name, spacing in ((image, "lgemri.nrrd", (0.625,) * 3), (lab, "laendo.nrrd", label_spacing or (0.625,) * 3)):
        img = sitk.GetImageFromArray(np.transpose(arr, (2, 1, 0)))  # (x, y, z) -> sitk (z, y, x)
        img.SetSpacing(spacing)
        sitk.WriteImage(img, str(src / case_id / name))
    return image, lab


def prep(*args):
    code, out = run_cli("prep", "la", *map(str, args))
    assert "Traceback" not in out
    return code, out


def test_build_splits_keeps_the_standard_order_and_protects_the_labeled_head():
    present = list(LA_TRAIN_IDS[:20]) + ["ZZEXTRA"] + list(LA_TEST_IDS[:2])
    splits, facts = build_splits(present, n_val=5, seed=0, keep_labeled=8)
    assert splits["train"][:8] == list(LA_TRAIN_IDS[:8])
    assert len(splits["val"]) == 5 and not set(splits["val"]) & set(LA_TRAIN_IDS[:8])
    order = [c for c in list(LA_TRAIN_IDS[:20]) + ["ZZEXTRA"] if c not in splits["val"]]
    assert splits["train"] == order  # standard order kept, the extra case last
    assert splits["test"] == list(LA_TEST_IDS[:2]) and facts["extra_cases"] == ["ZZEXTRA"]
    assert build_splits(present, 5, 0, 8) == (splits, facts)  # seeded
    assert build_splits(present, 5, 1, 8)[0]["val"] != splits["val"]
    carved, facts = build_splits(present, n_val=2, seed=0, keep_labeled=8, n_test=3)
    assert len(carved["test"]) == 5 and len(facts["carved_test"]) == 3
    assert not set(carved["val"]) & set(carved["test"])


def test_h5_layout_copies_arrays_and_reports_absent_cases(tmp_path):
    src = tmp_path / "src"
    arrays = {cid: write_h5_case(src, cid, seed=i) for i, cid in enumerate(IDS)}
    write_h5_case(src, "ZZEXTRA", seed=9)
    (src / "notes").mkdir()  # a folder that is not a case is ignored
    out = tmp_path / "out"
    code, text = prep("--src", src, "--out", out, "--val", "1", "--keep-labeled", "2")
    assert code == 0, text
    warning = next(line for line in text.splitlines() if "absent" in line)
    assert all(c in warning for c in LA_TEST_IDS) and all(c in warning for c in LA_TRAIN_IDS[4:])
    assert "ZZEXTRA" in text and "appended to train" in text
    ds = load_prepared(out)
    assert ds.split("train")[:2] == list(IDS[:2]) and ds.split("train")[-1] in ("ZZEXTRA", IDS[3])
    assert len(ds.split("val")) == 1 and ds.split("test") == []
    assert ds.patch_size == [112, 112, 80] and ds.spec["labeled"]["default"] == 2
    assert ds.spec["extra"]["absent_cases"]["test"] == list(LA_TEST_IDS)
    for cid, (image, label) in arrays.items():
        case = ds.load_case(cid)
        assert np.array_equal(case.image[0], image) and np.array_equal(case.label, label)
        assert case.spacing == (0.625, 0.625, 0.625)
    qc = (out / "qc.csv").read_text(encoding="utf-8").splitlines()
    assert len(qc) == 6 and "label_voxels" in qc[0]


def test_rerun_resumes_and_force_redoes(tmp_path):
    src, out = tmp_path / "src", tmp_path / "out"
    for i, cid in enumerate(IDS[:2]):
        write_h5_case(src, cid, seed=i)
    assert prep("--src", src, "--out", out, "--val", "0")[0] == 0
    (out / "images" / f"{IDS[1]}.nii.gz").unlink()  # as if interrupted before this case finished
    code, text = prep("--src", src, "--out", out, "--val", "0")
    assert code == 0 and "1 processed, 1 skipped" in text
    code, text = prep("--src", src, "--out", out, "--val", "0", "--force")
    assert code == 0 and "2 processed, 0 skipped" in text
    assert load_prepared(out).case_ids == sorted(IDS[:2])


def test_raw_layout_zscores_then_crops_xy_with_seeded_margins(tmp_path):
    src = tmp_path / "src"
    raw = {cid: write_raw_case(src, cid, seed=i) for i, cid in enumerate(IDS[:2])}
    out = tmp_path / "out"
    code, text = prep("--src", src, "--out", out, "--val", "0", "--seed", "3", "--workers", "2")
    assert code == 0, text
    ds = load_prepared(out)
    assert ds.spec["source"]["layout"] == "raw"
    assert [s["step"] for s in ds.spec["preprocessing"]] == ["label", "zscore", "crop"]
    boxes = {}
    for cid, (image, laendo) in raw.items():
        entry = next(c for c in ds.spec["cases"] if c["id"] == cid)
        (x0, x1), (y0, y1), (z0, z1) = entry["crop_box"]
        boxes[cid] = entry["crop_box"]
        # label box 70..90 grown to 112 voxels = 24..136, then a 10-20 voxel margin on each side
        for lo, hi in ((x0, x1), (y0, y1)):
            assert 10 <= 24 - lo <= 20 and 10 <= hi - 136 <= 20
        assert (z0, z1) == (0, 4)
        z = (image - image.mean()) / image.std()
        case = ds.load_case(cid)
        assert np.allclose(case.image[0], z[x0:x1, y0:y1], atol=1e-5)
        assert np.array_equal(case.label, (laendo == 255)[x0:x1, y0:y1])
    assert boxes[IDS[0]] != boxes[IDS[1]]  # margins drawn per case
    code, _ = prep("--src", src, "--out", tmp_path / "again", "--val", "0", "--seed", "3")
    again = {c["id"]: c["crop_box"] for c in load_prepared(tmp_path / "again").spec["cases"]}
    assert code == 0 and again == boxes  # same seed, same crops (independent of worker count)
    code, text = prep("--src", src, "--out", out, "--val", "0", "--seed", "4")
    assert code == 2 and "different settings" in text  # resuming must not mix crops of two seeds


def test_case_filter(tmp_path):
    src = tmp_path / "src"
    for i, cid in enumerate(IDS):
        write_h5_case(src, cid, seed=i)
    code, text = prep("--src", src, "--out", tmp_path / "out", "--cases", f"{IDS[2]},{IDS[0]}", "--val", "0")
    assert code == 0 and "absent" not in text
    assert load_prepared(tmp_path / "out").split("train") == [IDS[0], IDS[2]]
    code, text = prep("--src", src, "--out", tmp_path / "out2", "--cases", "NOPE")
    assert code == 2 and "NOPE" in text and "not found" in text


def test_case_filter_and_drop_failed_get_past_broken_cases(tmp_path):
    src = tmp_path / "src"
    write_h5_case(src, IDS[0])
    write_h5_case(src, IDS[1], label=False)
    (src / IDS[2]).mkdir()  # a listed case folder without files
    code, text = prep("--src", src, "--out", tmp_path / "one", "--cases", IDS[0], "--val", "0")
    assert code == 0, text
    code, text = prep("--src", src, "--out", tmp_path / "all", "--val", "0")
    assert code == 2 and str(src / IDS[2]) in text
    (src / IDS[2]).rmdir()
    code, text = prep("--src", src, "--out", tmp_path / "all", "--val", "0", "--drop-failed")
    assert code == 0, text
    ds = load_prepared(tmp_path / "all")
    assert ds.split("train") == [IDS[0]] and IDS[1] in ds.spec["extra"]["dropped_cases"]
    assert ds.spec["labeled"]["subsets"]["10%"] == [IDS[0]]


# --- bad input: one line naming the file, exit code 2, no traceback -----------------------------------

def test_missing_source_folder(tmp_path):
    code, text = prep("--src", tmp_path / "missing", "--out", tmp_path / "out")
    assert code == 2 and "missing" in text and "not found" in text
    (tmp_path / "empty").mkdir()
    code, text = prep("--src", tmp_path / "empty", "--out", tmp_path / "out")
    assert code == 2 and "no LA cases found" in text


def _bad_case(tmp_path, make):
    src = tmp_path / "src"
    write_h5_case(src, IDS[0])
    path = make(src)
    code, text = prep("--src", src, "--out", tmp_path / "out", "--val", "0")
    assert code == 2 and str(path) in text, text
    return text


def test_truncated_h5(tmp_path):
    def make(src):
        p = src / IDS[1] / "mri_norm2.h5"
        write_h5_case(src, IDS[1])
        p.write_bytes(p.read_bytes()[:3000])
        return p
    text = _bad_case(tmp_path, make)
    assert "unreadable HDF5" in text and "1 of 2 cases failed" in text


def test_h5_without_label(tmp_path):
    def make(src):
        write_h5_case(src, IDS[1], label=False)
        return src / IDS[1] / "mri_norm2.h5"
    assert "missing dataset(s) ['label']" in _bad_case(tmp_path, make)


def test_h5_label_with_unexpected_values(tmp_path):
    def make(src):
        import h5py

        write_h5_case(src, IDS[1])
        with h5py.File(src / IDS[1] / "mri_norm2.h5", "r+") as f:
            lab = f["label"][()]
            lab[0, 0, 0], lab[1, 1, 1] = 2, 7
            f["label"][...] = lab
        return src / IDS[1] / "mri_norm2.h5"
    assert "unexpected label value(s) [2, 7] (expected [0, 1])" in _bad_case(tmp_path, make)


def test_h5_image_and_label_shapes_differ(tmp_path):
    def make(src):
        import h5py

        write_h5_case(src, IDS[1])
        with h5py.File(src / IDS[1] / "mri_norm2.h5", "r+") as f:
            del f["label"]
            f["label"] = np.zeros((3, 3, 3), np.uint8)
        return src / IDS[1] / "mri_norm2.h5"
    assert "differs from 'image' shape" in _bad_case(tmp_path, make)


def test_truncated_nrrd(tmp_path):
    def make(src):
        write_raw_case(src, IDS[1])
        p = src / IDS[1] / "lgemri.nrrd"
        p.write_bytes(p.read_bytes()[:5000])
        return p
    assert "unreadable" in _bad_case(tmp_path, make)


def test_raw_label_with_unexpected_values(tmp_path):
    def make(src):
        write_raw_case(src, IDS[1], fill=7)
        return src / IDS[1] / "laendo.nrrd"
    assert "unexpected label value(s) [7] (expected [0, 255])" in _bad_case(tmp_path, make)


@pytest.mark.parametrize("kw, expect", [({"label_shape": (160, 150, 4)}, "size (160, 150, 4) vs (160, 160, 4)"),
                                        ({"label_spacing": (0.625, 0.625, 1.25)}, "spacing")])
def test_raw_image_and_label_geometry_differ(tmp_path, kw, expect):
    def make(src):
        write_raw_case(src, IDS[1], **kw)
        return src / IDS[1] / "laendo.nrrd"
    text = _bad_case(tmp_path, make)
    assert expect in text and "label geometry differs" in text


def test_raw_empty_label_and_missing_partner_file(tmp_path):
    def empty(src):
        write_raw_case(src, IDS[1], fill=0)
        return src / IDS[1] / "laendo.nrrd"
    assert "label is empty" in _bad_case(tmp_path, empty)
    src = tmp_path / "src2"
    write_raw_case(src, IDS[0])
    (src / IDS[0] / "laendo.nrrd").unlink()
    code, text = prep("--src", src, "--out", tmp_path / "out2")
    assert code == 2 and str(src / IDS[0] / "laendo.nrrd") in text and "missing" in text
    (src / IDS[0] / "lgemri.nrrd").unlink()  # a listed case folder without any data file
    code, text = prep("--src", src, "--out", tmp_path / "out2")
    assert code == 2 and str(src / IDS[0]) in text and "neither" in text


def test_existing_output_is_refused_and_force_replaces_only_textseg_output(tmp_path):
    src, out = tmp_path / "src", tmp_path / "out"
    write_h5_case(src, IDS[0])
    out.mkdir()
    (out / "thesis.docx").write_text("not ours")
    code, text = prep("--src", src, "--out", out, "--val", "0")
    assert code == 2 and "already exists" in text and str(out) in text
    assert (out / "thesis.docx").exists()
    code, text = prep("--src", src, "--out", out, "--val", "0", "--force")  # --force replaces only textseg's files
    assert code == 2 and "thesis.docx" in text and (out / "thesis.docx").read_text(encoding="utf-8") == "not ours"
    (out / "thesis.docx").unlink()
    assert prep("--src", src, "--out", out, "--val", "0")[0] == 0
    assert prep("--src", src, "--out", out, "--val", "0", "--force")[0] == 0


@pytest.mark.parametrize("where", ["same", "inside", "above"])
def test_output_overlapping_the_source_is_refused_even_with_force(tmp_path, where):
    src = tmp_path / "data" / "src"
    write_h5_case(src, IDS[0])
    out = {"same": src, "inside": src / "prepared", "above": tmp_path / "data"}[where]
    code, text = prep("--src", src, "--out", out, "--val", "0", "--force")
    assert code == 2 and "overlaps the source" in text
    assert (src / IDS[0] / "mri_norm2.h5").exists() and not (src / "prepared").exists()


def test_bad_split_options(tmp_path):
    src = tmp_path / "src"
    for i, cid in enumerate(IDS[:3]):
        write_h5_case(src, cid, seed=i)
    code, text = prep("--src", src, "--out", tmp_path / "out", "--val", "2", "--keep-labeled", "2")
    assert code == 2 and "--val 2" in text and "protected head" in text


# --- the real data (skipped when ../shared/data/la is absent) ----------------------------------------

@pytest.mark.realdata
def test_real_la_cases_equal_the_h5_contents(la_dir, tmp_path):
    import h5py

    src = tmp_path / "src"
    src.mkdir()
    ids = list(LA_TRAIN_IDS[:3])
    for cid in ids:
        (src / cid).symlink_to(la_dir / cid, target_is_directory=True)
    out = tmp_path / "out"
    code, text = prep("--src", src, "--out", out, "--val", "1", "--keep-labeled", "1")
    assert code == 0, text
    assert all(c in text for c in LA_TEST_IDS)
    ds = load_prepared(out)
    assert ds.split("train")[0] == ids[0] and len(ds.split("val")) == 1
    for cid in ids:
        case = ds.load_case(cid)
        with h5py.File(la_dir / cid / "mri_norm2.h5", "r") as f:
            assert np.array_equal(case.image[0], f["image"][()])
            assert np.array_equal(case.label, f["label"][()])
    spec = json.loads((out / "dataset.json").read_text(encoding="utf-8"))
    assert spec["source"]["paths"] == [str(src.resolve())] and spec["spacing"] == [0.625, 0.625, 0.625]
