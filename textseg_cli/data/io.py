"""Reading and writing volumes.

Arrays are kept in (x, y, z) order as the h5 files of the semi-supervised literature store them;
NIfTI files carry the spacing in their affine (diagonal, origin 0 unless a source gives one).
Multi-channel images are stored as 4D NIfTI with channels last and returned channels first.
"""

from __future__ import annotations

import gzip
import os
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
        img = None
        try:
            img = nib.load(str(path))  # the header only
            check_declared_size(path, img)  # before the array is allocated
            arr = np.asanyarray(img.dataobj)
        except DataError:
            raise
        except MemoryError:
            raise DataError("not enough memory to read it" + (f": {_declared(img)}" if img is not None else ""),
                            path) from None
        except Exception as exc:  # EOFError, zlib.error, "Expected N bytes, got M", a header cut short
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


def _declared(img) -> str:
    """'header declares 20000x20000x200 int16 voxels (160.0 GB)' for error messages."""
    shape = tuple(int(s) for s in img.header.get_data_shape())
    nbytes = int(np.prod(shape, dtype=object)) * img.header.get_data_dtype().itemsize
    return f"the header declares {'x'.join(map(str, shape))} {img.header.get_data_dtype()} voxels ({_size(nbytes)})"


def _size(nbytes: float) -> str:
    for unit in ("bytes", "kB", "MB", "GB"):
        if nbytes < 1000 or unit == "GB":
            return f"{nbytes:.0f} {unit}" if unit == "bytes" else f"{nbytes:.1f} {unit}"
        nbytes /= 1000
    return f"{nbytes:.1f} GB"


def available_memory() -> int | None:
    """Bytes of memory available to a new allocation: psutil's figure when installed, else Linux's
    MemAvailable, else the physical memory (os.sysconf); None when none of them is known."""
    try:
        import psutil  # lazy: optional third-party package, not a textseg_cli module
        return int(psutil.virtual_memory().available)
    except ImportError:
        pass
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return int(os.sysconf("SC_PHYS_PAGES")) * int(os.sysconf("SC_PAGE_SIZE"))
    except (AttributeError, OSError, ValueError):
        return None


_MAX_DEFLATE_RATIO = 1032  # the most a deflate stream (gzip) can expand: a bound on a .nii.gz's declared data


def check_declared_size(path: str | Path, img, dtype=None) -> None:
    """Refuse a NIfTI whose header declares more data than the file or the memory can hold, BEFORE the array
    is allocated (issue 25.6): a corrupt dim field (20000x20000x200) otherwise ends in a MemoryError that read
    as "truncated". A .nii must hold offset + voxels x itemsize bytes; a .nii.gz's uncompressed size is not
    known up front, so its array (in `dtype`, or as nibabel returns it) must fit in the available memory."""
    path = Path(path)
    hdr = img.header
    shape = tuple(int(s) for s in hdr.get_data_shape())
    if any(s < 0 for s in shape):
        raise DataError(f"corrupt NIfTI header: negative dimension in {shape}", path)
    n_voxels = int(np.prod(shape, dtype=object))
    disk = n_voxels * hdr.get_data_dtype().itemsize
    # where nibabel reads the data from (a header's vox_offset 0 means right after it, byte 352)
    offset = int(getattr(img.dataobj, "offset", None) or hdr.get_data_offset())
    if not path.name.lower().endswith(".gz"):
        size = path.stat().st_size
        if offset + disk > size:
            raise DataError(f"{_declared(img)} from byte {offset}, but the file holds {_size(size)}: a truncated "
                            "file or a corrupt header", path)
        return  # nibabel maps an uncompressed file; its size bounds the array
    size = path.stat().st_size
    if offset + disk > _MAX_DEFLATE_RATIO * size:
        raise DataError(f"{_declared(img)}, but the file is {_size(size)}: deflate compresses at most "
                        f"{_MAX_DEFLATE_RATIO}:1, so the file is truncated or its header corrupt", path)
    slope, inter = hdr.get_slope_inter()
    scaled = slope not in (None, 1.0) or inter not in (None, 0.0)
    itemsize = np.dtype(dtype).itemsize if dtype is not None else (8 if scaled else hdr.get_data_dtype().itemsize)
    need, avail = n_voxels * max(itemsize, hdr.get_data_dtype().itemsize), available_memory()
    if avail is not None and need > avail:
        raise DataError(f"{_declared(img)}, {_size(need)} in memory, more than the {_size(avail)} available: a "
                        "corrupt header, or an image too large for this machine", path)


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
    except Exception as exc:
        raise DataError(f"unreadable NIfTI ({type(exc).__name__}: {exc})", path) from exc
    check_declared_size(path, img, dtype)
    try:
        arr = np.asarray(img.dataobj)
        if dtype is not None:
            arr = arr.astype(dtype, copy=False)
    except MemoryError:
        raise DataError(f"not enough memory to read it: {_declared(img)}", path) from None
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
