"""Reading and writing volumes.

Arrays are kept in (x, y, z) order as the h5 files of the semi-supervised literature store them;
NIfTI files carry the spacing in their affine (diagonal, origin 0 unless a source gives one).
Multi-channel images are stored as 4D NIfTI with channels last and returned channels first.
"""

from __future__ import annotations

import gzip
import zlib
from dataclasses import dataclass
from pathlib import Path

import h5py
import nibabel as nib
import numpy as np
import SimpleITK as sitk

from textseg_cli.errors import ConfigError, DataError
from textseg_cli.storage.files import atomic_path


@dataclass
class Volume:
    array: np.ndarray  # (x, y, z) or (C, x, y, z) for images read with channels
    spacing: tuple[float, ...]
    origin: tuple[float, ...] = (0.0, 0.0, 0.0)
    direction: tuple[float, ...] | None = None  # flattened 3x3, row-major, LPS as SimpleITK gives
    nonfinite: int = 0  # NaN/Inf voxels in the file (`read_sitk`; SimpleITK reads NIfTI NaNs as 0)


def affine_from(spacing, origin=(0.0, 0.0, 0.0), direction=None) -> np.ndarray:
    aff = np.eye(4)
    d = np.eye(3) if direction is None else np.asarray(direction, dtype=float).reshape(3, 3)
    aff[:3, :3] = d * np.asarray(spacing[:3], dtype=float)[None, :]
    aff[:3, 3] = np.asarray(origin[:3], dtype=float)
    return aff


def write_nifti(path: str | Path, array: np.ndarray, spacing, origin=(0.0, 0.0, 0.0), direction=None) -> None:
    """Write atomically; `array` is (x, y, z[, C]) for 3D or (x, y[, C]) for 2D."""

    sp = list(spacing) + [1.0] * (3 - len(spacing))
    img = nib.Nifti1Image(np.asarray(array), affine_from(sp, origin, direction))
    img.header.set_zooms(tuple(sp[: min(3, array.ndim)]) + (1.0,) * max(0, array.ndim - 3))
    with atomic_path(path, suffix=".nii.gz") as tmp:
        nib.save(img, str(tmp))


def check_complete(path: str | Path) -> int:
    """Read a file to its end: refuse a NIfTI whose data block, or any gzip stream, is shorter than declared.

    SimpleITK fills the missing part of a truncated file with a constant and reads NIfTI NaNs as 0, so NIfTI
    files are read here with nibabel. Returns the number of NaN/Inf voxels found (NIfTI; else 0).
    """

    path = Path(path)
    name = path.name.lower()
    if name.endswith((".nii", ".nii.gz")):
        try:
            arr = np.asanyarray(nib.load(str(path)).dataobj)
        except Exception as exc:  # EOFError, zlib.error, "Expected N bytes, got M"
            raise DataError(f"truncated or corrupt NIfTI, the file is incomplete ({type(exc).__name__}: "
                            f"{' '.join(str(exc).split())[:160]})", path) from None
        return count_nonfinite(arr)
    if name.endswith(".gz"):
        try:
            with gzip.open(path, "rb") as f:
                while f.read(1 << 22):
                    pass
        except (EOFError, gzip.BadGzipFile, zlib.error) as exc:
            raise DataError(f"truncated or corrupt gzip stream ({exc}); the file is incomplete", path) from None
    return 0


def count_nonfinite(array: np.ndarray) -> int:
    """NaN/Inf voxels (0 for integer arrays)."""
    a = np.asarray(array)
    return 0 if not np.issubdtype(a.dtype, np.floating) else int(a.size - np.count_nonzero(np.isfinite(a)))


NAN_POLICIES = ("refuse", "zero")


def apply_nan_policy(array: np.ndarray, policy: str, case_id: str, path: str | Path | None = None,
                     option: str = "--nan-policy", known: int = 0) -> tuple[np.ndarray, str | None]:
    """(array, warning): 'refuse' raises DataError naming the case and count; 'zero' replaces them by 0.

    known: NaN/Inf voxels counted in the file itself (a reader may already have turned them into 0)."""
    if policy not in NAN_POLICIES:
        raise ConfigError(f"{option} {policy!r}: expected refuse or zero")
    n = max(count_nonfinite(array), int(known))
    if not n:
        return array, None
    if policy == "refuse":
        raise DataError(f"case '{case_id}': {n} NaN/Inf voxel(s) in the image; fix the file or pass "
                        f"{option} zero to replace them by 0", path)
    return np.nan_to_num(array, nan=0.0, posinf=0.0, neginf=0.0), \
        f"case '{case_id}': {n} NaN/Inf voxel(s) replaced by 0 ({option} zero)"


def read_nifti(path: str | Path, dtype=None) -> Volume:
    """Read a NIfTI file fully into memory; a truncated or corrupt file raises DataError naming it."""

    path = Path(path)
    if not path.exists():
        raise DataError("file not found", path)
    try:
        img = nib.load(str(path))
        arr = np.asarray(img.dataobj)
        if dtype is not None:
            arr = arr.astype(dtype, copy=False)
    except Exception as exc:  # nibabel raises several types for truncated gzip / bad headers
        raise DataError(f"unreadable NIfTI ({type(exc).__name__}: {exc})", path) from exc
    zooms = tuple(float(z) for z in img.header.get_zooms()[:3])
    aff = img.affine
    origin = tuple(float(v) for v in aff[:3, 3])
    return Volume(arr, zooms, origin)


def read_h5(path: str | Path, keys=("image", "label")) -> dict[str, np.ndarray]:

    path = Path(path)
    if not path.exists():
        raise DataError("file not found", path)
    try:
        with h5py.File(path, "r") as f:
            missing = [k for k in keys if k not in f]
            if missing:
                raise DataError(f"missing dataset(s) {missing}; found {sorted(f.keys())}", path)
            return {k: f[k][()] for k in keys}
    except DataError:
        raise
    except Exception as exc:
        raise DataError(f"unreadable HDF5 ({type(exc).__name__}: {exc})", path) from exc


NONFINITE_KEY = "textseg_nonfinite"  # metadata key of `read_sitk_image`'s NaN/Inf count


def read_sitk_image(path: str | Path, case_id: str | None = None):
    """The one SimpleITK reader (NIfTI, NRRD, MHA, single DICOM): a `SimpleITK.Image`, the file checked complete.

    The NaN/Inf voxels of the file are counted once here and kept in the image's metadata (`nonfinite_in`):
    nibabel's count for NIfTI (SimpleITK reads NIfTI NaNs as 0), the pixels' count for the other formats
    (they keep NaN/Inf). `apply_nan_policy(..., known=nonfinite_in(img))` then decides what happens to them.
    Errors name `case_id` when given.
    """

    path = Path(path)
    where = f"case {case_id!r}: " if case_id else ""
    if not path.exists():
        raise DataError(f"{where}file not found", path)
    try:
        nonfinite = check_complete(path)
    except DataError as exc:
        raise DataError(f"{where}{exc.args[0]}", path) from None
    try:
        img = sitk.ReadImage(str(path))
    except Exception as exc:
        last = str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__
        raise DataError(f"{where}unreadable image ({last})", path) from exc
    if not path.name.lower().endswith((".nii", ".nii.gz")):
        nonfinite = count_nonfinite(sitk.GetArrayViewFromImage(img))
    if nonfinite:
        img.SetMetaData(NONFINITE_KEY, str(nonfinite))
    return img


def nonfinite_in(img) -> int:
    """The NaN/Inf count `read_sitk_image` recorded for the file (0 when none)."""
    return int(img.GetMetaData(NONFINITE_KEY)) if img.HasMetaDataKey(NONFINITE_KEY) else 0


def read_sitk(path: str | Path, case_id: str | None = None) -> Volume:
    """`read_sitk_image` as a Volume in (x, y, z) order; `Volume.nonfinite` carries the file's NaN/Inf count."""
    img = read_sitk_image(path, case_id)
    vol = sitk_to_volume(img)
    vol.nonfinite = nonfinite_in(img)
    return vol


def sitk_to_volume(img) -> Volume:

    arr = sitk.GetArrayFromImage(img)  # (z, y, x[, C])
    if img.GetNumberOfComponentsPerPixel() > 1:
        arr = np.moveaxis(arr, -1, 0)  # (C, z, y, x)
        arr = np.ascontiguousarray(np.transpose(arr, (0,) + tuple(range(arr.ndim - 1, 0, -1))))
    else:
        arr = np.ascontiguousarray(np.transpose(arr, tuple(range(arr.ndim - 1, -1, -1))))
    return Volume(arr, tuple(img.GetSpacing()), tuple(img.GetOrigin()), tuple(img.GetDirection()))



@dataclass
class InputImage:
    name: str  # output file stem
    array: np.ndarray  # float32 (C, *spatial)
    spacing: tuple[float, ...]  # from the affine's column norms, so the input affine is reproduced exactly
    origin: tuple[float, ...]
    direction: tuple[float, ...]


def read_input_image(path: Path, dim: int, name: str | None = None) -> InputImage:
    """Read a NIfTI image (channels last when 4D/3D-for-2D) with the geometry to write its mask back."""
    vol = read_nifti(path, dtype=np.float32)
    arr = vol.array
    if arr.ndim == dim:
        arr = arr[None]
    elif arr.ndim == dim + 1:
        arr = np.moveaxis(arr, -1, 0)
    else:
        raise DataError(f"image has shape {arr.shape}; expected {dim}D (or {dim}D with channels last)", path)
    if name is None:
        name = path.name[:-7] if path.name.endswith(".nii.gz") else path.stem
    return InputImage(name, np.ascontiguousarray(arr, dtype=np.float32), *nifti_geometry(path))


def nifti_geometry(path: Path) -> tuple[tuple[float, ...], tuple[float, ...], tuple[float, ...]]:
    """(spacing, origin, direction) from a NIfTI affine's columns, so `write_nifti` reproduces it exactly."""

    aff = np.asarray(nib.load(str(path)).affine, dtype=float)
    spacing = np.linalg.norm(aff[:3, :3], axis=0)
    spacing[spacing == 0] = 1.0
    direction = aff[:3, :3] / spacing[None, :]
    return (tuple(float(s) for s in spacing), tuple(float(v) for v in aff[:3, 3]),
            tuple(float(v) for v in direction.ravel()))


def write_mask(path: Path, mask: np.ndarray, like: InputImage) -> None:
    write_nifti(path, mask.astype(np.uint8, copy=False), like.spacing, like.origin, like.direction)
