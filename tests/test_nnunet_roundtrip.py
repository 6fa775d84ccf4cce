"""The nnU-Net round trip of `textseg export-data` (issue 28.4): splits_final.json lands where nnU-Net's trainer
reads it (nnUNet_preprocessed/DatasetXXX_Name/) and nnU-Net's own planning keeps it; `--images raw` exports the
source scans voxel for voxel with their affine."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk
from conftest import one_line_error, run_cli
from raw_fakes import make_msd_task, phantom_ct, write_image

SP = (0.8, 0.9, 2.0)
ORIGIN = (10.0, -5.0, 3.0)
FLIP = (-1.0, 0.0, 0.0, 0.0, -1.0, 0.0, 0.0, 0.0, 1.0)  # LPS -> RAS-like flips: a non-trivial affine
IDS = ["c0", "c1", "c2", "c3", "c4"]


@pytest.fixture(autouse=True)
def _no_nnunet_env(monkeypatch):
    for var in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
        monkeypatch.delenv(var, raising=False)


def _raw_custom(root: Path, ext: str = ".nii.gz") -> tuple[Path, Path]:
    """Five tiny scans with a non-trivial geometry, and labels; prepared with resampling (so prepared != raw) and
    2 folds over c0..c3 (c4 is the test case)."""
    for i, cid in enumerate(IDS):
        hu, lab = phantom_ct((20, 18, 12), seed=i, blob_radius=3)
        write_image(root / "src" / "images" / f"{cid}{ext}", hu, SP, ORIGIN, FLIP)
        write_image(root / "src" / "labels" / f"{cid}{ext}", lab, SP, ORIGIN, FLIP)
    (root / "split.json").write_text(json.dumps({"train": IDS[:3], "val": IDS[3:4], "test": IDS[4:]}))
    prepared = root / "prepared"
    code, text = run_cli("prep", "custom", "--images", root / "src" / "images", "--labels", root / "src" / "labels",
                         "--out", prepared, "--split-file", root / "split.json", "--spacing", "1.6,1.8,2",
                         "--folds", "2")
    assert code == 0, text
    return root / "src", prepared


def _json(path: Path):
    return json.loads(path.read_text(encoding="utf-8"))


def _same_image(exported: Path, source: Path) -> None:
    a, b = nib.load(str(exported)), nib.load(str(source))
    assert a.shape == b.shape
    np.testing.assert_array_equal(np.asarray(a.dataobj), np.asarray(b.dataobj))
    np.testing.assert_allclose(a.affine, b.affine, atol=1e-6)


# --- the round trip through nnU-Net's own planning and preprocessing --------------------------------------------

def test_nnunet_plans_on_textseg_split_and_keeps_it(tmp_path):
    """export-data writes nnUNet_preprocessed/Dataset9xx/splits_final.json itself; nnU-Net's plan_and_preprocess
    (integrity check included) runs on the export and leaves that file as it is, so its trainer uses textseg's
    folds, not a 5-fold split of its own. Fails on the old export, which wrote the file only beside the raw data."""
    try:
        import nnunetv2  # noqa: F401
    except ImportError:
        pytest.skip("nnunetv2 is not installed: pip install 'textseg-cli[nnunet]' for the nnU-Net round trip")
    exe = Path(sys.executable).parent / "nnUNetv2_plan_and_preprocess"
    if not exe.exists():
        pytest.skip(f"{exe.name} not found beside {sys.executable} (pip install 'textseg-cli[nnunet]')")
    _, prepared = _raw_custom(tmp_path)
    raw, pre, res = tmp_path / "nnUNet_raw", tmp_path / "nnUNet_preprocessed", tmp_path / "nnUNet_results"
    out = raw / "Dataset917_Tiny"
    code, text = run_cli("export-data", prepared, "--out", out, "--images", "raw", "--preprocessed", pre)
    assert code == 0, text
    ours = pre / "Dataset917_Tiny" / "splits_final.json"
    folds = _json(prepared / "dataset.json")["extra"]["folds"]
    assert _json(ours) == _json(out / "splits_final.json") == folds and len(folds) == 2
    before = (ours.read_bytes(), ours.stat().st_mtime_ns)
    env = {**os.environ, "nnUNet_raw": str(raw), "nnUNet_preprocessed": str(pre), "nnUNet_results": str(res),
           "OMP_NUM_THREADS": "1", "nnUNet_n_proc_DA": "1"}
    proc = subprocess.run([str(exe), "-d", "917", "--verify_dataset_integrity", "-c", "3d_fullres", "-np", "1",
                           "-npfp", "1"], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert (pre / "Dataset917_Tiny" / "nnUNetPlans.json").is_file()  # nnU-Net really planned here
    assert (ours.read_bytes(), ours.stat().st_mtime_ns) == before  # ... and did not rewrite the split
    assert _json(ours) == folds
    record = _json(pre / "Dataset917_Tiny" / ".textseg-splits_final.json")
    assert record["sha256"] == hashlib.sha256(before[0]).hexdigest()
    code, text = run_cli("prep", "check", out, "--nnunet-preprocessed", pre)
    assert code == 0 and "holds the export's folds" in text, text


# --- where splits_final.json goes, and what --force may replace -----------------------------------------------

def test_splits_go_where_nnunet_reads_them(tmp_path, synthetic_data, monkeypatch):
    src = _json(synthetic_data / "dataset.json")
    want = [{"train": src["splits"]["train"], "val": src["splits"]["val"]}]
    # no preprocessed folder known: the copy beside the raw data, and one shell line that puts it in place
    out = tmp_path / "raw" / "Dataset931_Syn"
    code, text = run_cli("export-data", synthetic_data, "--out", out)
    assert code == 0, text
    assert _json(out / "splits_final.json") == want
    cmd = [line for line in text.splitlines() if line.startswith("mkdir -p ")]
    assert len(cmd) == 1 and "nnUNet_preprocessed" in text, text
    pre = tmp_path / "pre"
    subprocess.run(["bash", "-c", cmd[0]], env={**os.environ, "nnUNet_preprocessed": str(pre)}, check=True)
    assert _json(pre / "Dataset931_Syn" / "splits_final.json") == want
    code, text = run_cli("prep", "check", out, "--nnunet-preprocessed", pre)
    assert code == 0, text
    # unset variable: the copy line stops instead of writing to /Dataset931_Syn
    env = {k: v for k, v in os.environ.items() if k != "nnUNet_preprocessed"}
    assert subprocess.run(["bash", "-c", cmd[0]], env=env, capture_output=True).returncode != 0
    # $nnUNet_preprocessed is the default of --preprocessed
    monkeypatch.setenv("nnUNet_preprocessed", str(tmp_path / "pre_env"))
    out2 = tmp_path / "raw" / "Dataset932_Syn"
    code, text = run_cli("export-data", synthetic_data, "--out", out2, "--labeled", "2")
    assert code == 0, text
    assert _json(tmp_path / "pre_env" / "Dataset932_Syn" / "splits_final.json") == [
        {"train": src["splits"]["train"][:2], "val": src["splits"]["val"]}]
    assert "mkdir -p" not in text


def test_force_replaces_only_a_split_textseg_wrote(tmp_path, synthetic_data):
    src = _json(synthetic_data / "dataset.json")
    pre, out = tmp_path / "pre", tmp_path / "raw" / "Dataset933_Syn"
    target = pre / "Dataset933_Syn" / "splits_final.json"
    code, text = run_cli("export-data", synthetic_data, "--out", out, "--preprocessed", pre)
    assert code == 0, text
    # other folds without --force: refused before anything is written (the export is unchanged too)
    old = target.read_bytes()
    code, text = run_cli("export-data", synthetic_data, "--out", tmp_path / "raw" / "x" / "Dataset933_Syn",
                         "--preprocessed", pre, "--labeled", "2")
    one_line_error(code, text, "splits_final.json", "--force")
    assert target.read_bytes() == old and not (tmp_path / "raw" / "x" / "Dataset933_Syn").exists()
    # --force: textseg's own file is replaced
    code, text = run_cli("export-data", synthetic_data, "--out", out, "--preprocessed", pre, "--labeled", "2",
                         "--force")
    assert code == 0, text
    assert _json(target) == [{"train": src["splits"]["train"][:2], "val": src["splits"]["val"]}]
    # a split nnU-Net (or the user) wrote is never replaced, even with --force; the same folds are simply accepted
    nnunet_own = [{"train": src["splits"]["val"], "val": src["splits"]["train"][:2]}]
    target.write_text(json.dumps(nnunet_own))
    code, text = run_cli("export-data", synthetic_data, "--out", out, "--preprocessed", pre, "--force")
    one_line_error(code, text, "not written by textseg")
    assert _json(target) == nnunet_own
    code, text = run_cli("prep", "check", out, "--nnunet-preprocessed", pre)
    one_line_error(code, text, "fold 0 train differs")
    target.write_text(json.dumps([{"val": src["splits"]["val"], "train": src["splits"]["train"][::-1]}]))
    mtime = target.stat().st_mtime_ns
    code, text = run_cli("export-data", synthetic_data, "--out", out, "--preprocessed", pre, "--force")
    assert code == 0, text
    assert target.stat().st_mtime_ns == mtime  # same folds (order aside): left as it is


def test_preprocessed_folder_is_checked_before_writing(tmp_path, synthetic_data):
    pre = tmp_path / "pre"
    # nnU-Net needs the DatasetXXX_Name folder name to find the split
    code, text = run_cli("export-data", synthetic_data, "--out", tmp_path / "mine", "--preprocessed", pre)
    one_line_error(code, text, "DatasetXXX_Name")
    assert not (tmp_path / "mine").exists() and not pre.exists()
    # a DatasetXXX_Name in the preprocessed root that links elsewhere: nothing is written through it
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    pre.mkdir()
    (pre / "Dataset934_Syn").symlink_to(elsewhere, target_is_directory=True)
    code, text = run_cli("export-data", synthetic_data, "--out", tmp_path / "raw" / "Dataset934_Syn",
                         "--preprocessed", pre)
    one_line_error(code, text, "symbolic link")
    assert not any(elsewhere.iterdir()) and not (tmp_path / "raw" / "Dataset934_Syn").exists()
    # the preprocessed data set folder may not be --out itself
    code, text = run_cli("export-data", synthetic_data, "--out", pre / "Dataset935_Syn", "--preprocessed", pre)
    one_line_error(code, text, "separate folders")
    code, text = run_cli("export-data", synthetic_data, "--format", "msd", "--out", tmp_path / "Task01_X",
                         "--preprocessed", pre)
    one_line_error(code, text, "--format nnunet")


# --- --images raw -----------------------------------------------------------------------------------------

def test_raw_images_are_the_source_scans(tmp_path):
    """Every exported image and label equals its source file voxel for voxel, with the same affine, though the
    prepared set was resampled; the nnU-Net data set lists the same cases and split as the prepared one."""
    srcdir, prepared = _raw_custom(tmp_path)
    spec = _json(prepared / "dataset.json")
    assert spec["cases"][0]["shape"] != [20, 18, 12]  # prepared != raw, so equality below means "raw"
    out = tmp_path / "Dataset936_Raw"
    code, text = run_cli("export-data", prepared, "--out", out, "--images", "raw")
    assert code == 0, text
    for cid in IDS[:4]:
        _same_image(out / "imagesTr" / f"{cid}_0000.nii.gz", srcdir / "images" / f"{cid}.nii.gz")
        _same_image(out / "labelsTr" / f"{cid}.nii.gz", srcdir / "labels" / f"{cid}.nii.gz")
    _same_image(out / "imagesTs" / "c4_0000.nii.gz", srcdir / "images" / "c4.nii.gz")
    _same_image(out / "labelsTs" / "c4.nii.gz", srcdir / "labels" / "c4.nii.gz")
    assert _json(out / "dataset.json")["numTraining"] == 4
    assert _json(out / "splits_final.json") == spec["extra"]["folds"]
    # the prepared default is unchanged: preprocessed arrays on the prepared grid
    code, text = run_cli("export-data", prepared, "--out", tmp_path / "Dataset937_Prep")
    assert code == 0, text
    assert nib.load(str(tmp_path / "Dataset937_Prep" / "imagesTr" / "c0_0000.nii.gz")).shape == tuple(
        spec["cases"][0]["shape"])


def test_raw_images_from_other_formats_and_4d_tasks(tmp_path):
    """NRRD sources become .nii.gz with the same voxels and geometry; an MSD 4D scan gives one file per kept
    channel (prep msd --channels), each equal to that volume of the source."""
    srcdir, prepared = _raw_custom(tmp_path / "nrrd", ext=".nrrd")
    out = tmp_path / "Dataset938_Nrrd"
    code, text = run_cli("export-data", prepared, "--out", out, "--images", "raw")
    assert code == 0, text
    for sub, name in (("imagesTr", "c1_0000.nii.gz"), ("labelsTr", "c1.nii.gz")):
        a = sitk.ReadImage(str(out / sub / name))
        b = sitk.ReadImage(str(srcdir / ("images" if sub == "imagesTr" else "labels") / "c1.nrrd"))
        np.testing.assert_array_equal(sitk.GetArrayFromImage(a), sitk.GetArrayFromImage(b))
        for f in ("GetSpacing", "GetOrigin", "GetDirection"):
            np.testing.assert_allclose(getattr(a, f)(), getattr(b, f)(), atol=1e-5)
    task = make_msd_task(tmp_path, name="Task05_Multi", n=4, channels=3, shape=(16, 14, 8), prefix="mm")
    code, text = run_cli("prep", "msd", "--src", task, "--out", tmp_path / "mm", "--channels", "MR2,MR0",
                         "--split", "2,1,1")
    assert code == 0, text
    out = tmp_path / "Dataset939_Multi"
    code, text = run_cli("export-data", tmp_path / "mm", "--out", out, "--images", "raw")
    assert code == 0, text
    cid = _json(tmp_path / "mm" / "dataset.json")["splits"]["train"][0]
    source = nib.load(str(task / "imagesTr" / f"{cid}.nii.gz"))
    for i, ch in enumerate((2, 0)):
        got = nib.load(str(out / "imagesTr" / f"{cid}_{i:04d}.nii.gz"))
        np.testing.assert_array_equal(np.asarray(got.dataobj), np.asarray(source.dataobj)[..., ch])
        np.testing.assert_allclose(got.affine, source.affine, atol=1e-5)
    assert not (out / "imagesTr" / f"{cid}_0002.nii.gz").exists()
    _same_image(out / "labelsTr" / f"{cid}.nii.gz", task / "labelsTr" / f"{cid}.nii.gz")


def test_raw_is_refused_without_sources(tmp_path, synthetic_data):
    code, text = run_cli("export-data", synthetic_data, "--out", tmp_path / "Dataset940_S", "--images", "raw")
    one_line_error(code, text, "prep synthetic", "--images prepared")
    srcdir, prepared = _raw_custom(tmp_path)
    (srcdir / "images" / "c2.nii.gz").unlink()
    code, text = run_cli("export-data", prepared, "--out", tmp_path / "Dataset941_M", "--images", "raw")
    one_line_error(code, text, "c2.nii.gz", "missing")
    assert not (tmp_path / "Dataset941_M").exists()
    shutil.rmtree(srcdir / "labels")
    code, text = run_cli("export-data", prepared, "--out", tmp_path / "Dataset942_M", "--images", "raw")
    one_line_error(code, text, "labels", "missing")
    code, text = run_cli("export-data", prepared, "--out", tmp_path / "Dataset943_M", "--images", "scans")
    one_line_error(code, text, "--images 'scans'")
