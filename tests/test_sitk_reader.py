"""One SimpleITK reader (data/io.py): `read_sitk` (a Volume) and `read_sitk_image` (prep's loader) count the NaN/Inf
voxels of a file the same way, whatever its format (SimpleITK reads NIfTI NaNs as 0, NRRD keeps them)."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk

from textseg_cli.data.io import nonfinite_in, read_sitk, read_sitk_image
from textseg_cli.data.prep.steps import load_files
from textseg_cli.errors import DataError


def _image_with_one_nan() -> np.ndarray:
    arr = np.ones((6, 5, 4), np.float32)
    arr[2, 3, 1] = np.nan
    return arr


@pytest.mark.parametrize("suffix", [".nii.gz", ".nrrd"])
def test_a_nan_voxel_is_reported_identically_through_both_readers(tmp_path, suffix):
    arr = _image_with_one_nan()
    path = tmp_path / f"c0{suffix}"
    if suffix == ".nrrd":
        sitk.WriteImage(sitk.GetImageFromArray(np.transpose(arr, (2, 1, 0))), str(path))
    else:
        nib.save(nib.Nifti1Image(arr, np.eye(4)), str(path))

    vol = read_sitk(path, "c0")
    assert vol.nonfinite == nonfinite_in(read_sitk_image(path, "c0")) == 1
    assert vol.array.shape == arr.shape
    with pytest.raises(DataError, match=r"case 'c0': 1 NaN/Inf voxel\(s\)"):
        load_files("c0", [path], None)  # prep's path refuses it by default
    loaded = load_files("c0", [path], None, nan_policy="zero")
    assert loaded.warnings == ["case 'c0': 1 NaN/Inf voxel(s) replaced by 0 (--nan-policy zero)"]
    assert np.isfinite(loaded.image).all()


def test_reader_errors_name_the_case(tmp_path):
    with pytest.raises(DataError, match="case 'c9': file not found"):
        read_sitk(tmp_path / "missing.nrrd", "c9")
    bad = tmp_path / "bad.nrrd"
    bad.write_text("not an image")
    with pytest.raises(DataError, match="case 'c9': unreadable image"):
        read_sitk_image(bad, "c9")
