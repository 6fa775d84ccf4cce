"""The prepared-data format: writing, loading, and validation errors that name the file or case."""

from __future__ import annotations

import gzip
import json
import shutil

import numpy as np
import pytest
from conftest import run_cli

from textseg_cli.data.prep.writer import PreparedWriter
from textseg_cli.data.prepared import FORMAT, load_prepared
from textseg_cli.errors import DataError


def _write_small(out, with_unlabeled=True):
    rng = np.random.default_rng(0)
    w = PreparedWriter(out, name="tiny", dim=3, modality="CT", channel_names=["CT"],
                       class_names=["background", "organ"])
    for i in range(3):
        label = np.zeros((8, 8, 4), np.uint8)
        label[2:5, 2:6, 1:3] = 1
        w.add_case(f"c{i}", rng.standard_normal((8, 8, 4)).astype(np.float32), label, (1.0, 1.0, 2.5))
    if with_unlabeled:
        w.add_case("u0", rng.standard_normal((8, 8, 4)).astype(np.float32), None, (1.0, 1.0, 2.5))
    train = ["c1", "c0", "u0"] if with_unlabeled else ["c1", "c0"]
    return w.finish(splits={"train": train, "val": ["c2"], "test": []},
                    preprocessing=[{"step": "none", "params": {}}], source={"layout": "test", "paths": []},
                    patch_size=[8, 8, 4], seed=0)


def test_round_trip_keeps_arrays_spacing_order_and_metadata(tmp_path):
    ds = _write_small(tmp_path / "p")
    spec = json.loads((tmp_path / "p" / "dataset.json").read_text(encoding="utf-8"))
    for key in ("format", "name", "modality", "class_names", "channel_names", "spacing", "cases", "splits",
                "labeled", "preprocessing", "source", "tool_version", "created"):
        assert key in spec
    assert spec["format"] == FORMAT and spec["spacing"] == [1.0, 1.0, 2.5]
    assert ds.split("train") == ["c1", "c0", "u0"]  # the standard order is kept, not sorted
    assert ds.num_classes == 2 and ds.in_channels == 1 and ds.patch_size == [8, 8, 4]
    case = ds.load_case("c0")
    assert case.image.shape == (1, 8, 8, 4) and case.image.dtype == np.float32
    assert case.label.dtype == np.uint8 and case.label.sum() == 24 and case.spacing == (1.0, 1.0, 2.5)
    assert not ds.has_label("u0") and ds.load_case("u0", with_label=False).label is None
    with pytest.raises(DataError, match="no label"):
        ds.load_case("u0")


def test_unlabeled_load_never_opens_the_label_file(tmp_path):
    ds = _write_small(tmp_path / "p", with_unlabeled=False)
    ds.label_path("c0").unlink()  # a label that is not needed must not be read
    assert ds.load_case("c0", with_label=False).label is None
    with pytest.raises(DataError, match="c0.nii.gz"):
        ds.load_case("c0")


@pytest.fixture
def prepared(tmp_path):
    root = tmp_path / "p"
    _write_small(root)
    return root


def _check(root, *extra):
    code, out = run_cli("prep", "check", root, *extra)
    assert "Traceback" not in out
    return code, out


def test_check_accepts_a_good_folder(prepared):
    code, out = _check(prepared, "--contents")
    assert code == 0 and "ok" in out and "4 cases" in out


def test_missing_folder_and_missing_dataset_json(tmp_path):
    code, out = _check(tmp_path / "nope")
    assert code == 2 and "nope" in out and "not found" in out
    (tmp_path / "empty").mkdir()
    code, out = _check(tmp_path / "empty")
    assert code == 2 and "no dataset.json" in out


@pytest.mark.parametrize("content, expect", [
    ("{not json", "invalid JSON"),
    ("[1, 2]", "JSON object"),
    ('{"format": "textseg-prepared/1"}', "missing field"),
])
def test_corrupt_dataset_json(prepared, content, expect):
    (prepared / "dataset.json").write_text(content)
    code, out = _check(prepared)
    assert code == 2 and expect in out and "dataset.json" in out
    assert len(out.strip().splitlines()) == 1


@pytest.mark.parametrize("edit, expect", [
    (lambda s: s.update(format="other/9"), "expected 'textseg-prepared/1'"),
    (lambda s: s["splits"].update(val=["ghost"]), "unknown case(s) ['ghost']"),
    (lambda s: s["cases"].append(dict(s["cases"][0])), "listed twice"),
    (lambda s: s.update(splits=["c0"]), "'splits' must map"),
    (lambda s: s.update(dim=4), "expected 2 or 3"),
])
def test_inconsistent_dataset_json(prepared, edit, expect):
    spec = json.loads((prepared / "dataset.json").read_text(encoding="utf-8"))
    edit(spec)
    (prepared / "dataset.json").write_text(json.dumps(spec))
    code, out = _check(prepared)
    assert code == 2 and expect in out and "dataset.json" in out


def test_missing_file_referenced_by_dataset_json(prepared):
    (prepared / "images" / "c2.nii.gz").unlink()
    code, out = _check(prepared)
    assert code == 2 and "case 'c2'" in out and "images/c2.nii.gz" in out and "missing" in out
    with pytest.raises(DataError, match="c2"):
        load_prepared(prepared)


def test_truncated_nifti_is_named_when_contents_are_checked(prepared):
    path = prepared / "labels" / "c1.nii.gz"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    assert _check(prepared)[0] == 0  # file presence only
    code, out = _check(prepared, "--contents")
    assert code == 2 and "labels/c1.nii.gz" in out and "unreadable" in out


def test_label_values_and_shape_are_checked(prepared):
    import nibabel as nib

    bad = np.zeros((8, 8, 4), np.uint8)
    bad[0, 0, 0], bad[1, 1, 1] = 2, 7
    nib.save(nib.Nifti1Image(bad, np.eye(4)), str(prepared / "labels" / "c0.nii.gz"))
    code, out = _check(prepared, "--contents")
    assert code == 2 and "labels/c0.nii.gz" in out and "[2, 7]" in out
    nib.save(nib.Nifti1Image(np.zeros((8, 8, 5), np.uint8), np.eye(4)), str(prepared / "labels" / "c0.nii.gz"))
    code, out = _check(prepared, "--contents")
    assert code == 2 and "labels/c0.nii.gz" in out and "shape" in out


def test_gzip_garbage_instead_of_nifti(prepared):
    with gzip.open(prepared / "images" / "c0.nii.gz", "wb") as f:
        f.write(b"not a nifti header" * 10)
    code, out = _check(prepared, "--contents")
    assert code == 2 and "images/c0.nii.gz" in out


def test_writer_never_overwrites_without_force_and_never_writes_into_its_source(tmp_path):
    from textseg_cli.errors import ConfigError, OutputExistsError

    root = tmp_path / "p"
    _write_small(root)
    with pytest.raises(OutputExistsError):
        _write_small(root)
    src = tmp_path / "src"
    (src / "case").mkdir(parents=True)
    (src / "case" / "keep.txt").write_text("data")
    for out in (src, src / "sub", tmp_path):  # equal to, inside, or above the source
        with pytest.raises(ConfigError, match="overlaps the source"):
            PreparedWriter(out, name="x", dim=3, modality="CT", channel_names=["CT"],
                           class_names=["background", "a"], force=True, src=src)
    assert (src / "case" / "keep.txt").read_text(encoding="utf-8") == "data"
    shutil.rmtree(root)
