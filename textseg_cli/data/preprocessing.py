"""Intensity and geometry steps shared by preparers. Each step is a pure function on arrays in
(x, y, z) order so it can be recorded in dataset.json by name and parameters."""

from __future__ import annotations

from typing import Sequence

import numpy as np
import SimpleITK as sitk
from scipy import ndimage

from textseg_cli.errors import ConfigError, DataError


def zscore(image: np.ndarray, mask: np.ndarray | None = None) -> np.ndarray:
    """(image - mean) / std over `mask` voxels (all voxels when None); float32."""
    img = np.asarray(image, dtype=np.float32)
    vals = img[mask.astype(bool)] if mask is not None else img
    mean, std = float(vals.mean()), float(vals.std())
    return ((img - mean) / max(std, 1e-8)).astype(np.float32)


def bbox(mask: np.ndarray) -> list[tuple[int, int]]:
    """Inclusive-exclusive bounding box [(lo, hi), ...] of the non-zero voxels of `mask`."""
    idx = np.nonzero(mask)
    if len(idx[0]) == 0:
        raise DataError("empty mask has no bounding box")
    return [(int(i.min()), int(i.max()) + 1) for i in idx]


def expand_box(box: Sequence[tuple[int, int]], shape: Sequence[int], margins: Sequence[int],
               min_size: Sequence[int] | None = None) -> list[tuple[int, int]]:
    """Grow each (lo, hi) by margin on both sides (after enlarging to min_size), clipped to the shape."""
    out = []
    for ax, (lo, hi) in enumerate(box):
        if min_size is not None and min_size[ax] and hi - lo < min_size[ax]:
            extra = min_size[ax] - (hi - lo)
            lo -= extra // 2
            hi += extra - extra // 2
        lo, hi = lo - margins[ax], hi + margins[ax]
        out.append((max(0, lo), min(shape[ax], hi)))
    return out


def crop(array: np.ndarray, box: Sequence[tuple[int, int]]) -> np.ndarray:
    """Crop the leading len(box) axes of `array`."""
    return array[tuple(slice(lo, hi) for lo, hi in box)]


# --- intensity windows ------------------------------------------------------------------------------

# CT windows (level, width) in HU as radiology reading presets; the Pancreas-CT benchmark uses its own
# explicit (75, 400) window, i.e. HU [-125, 275].
WINDOW_PRESETS: dict[str, tuple[float, float]] = {
    "abdomen": (40.0, 400.0),
    "lung": (-600.0, 1500.0),
    "brain": (40.0, 80.0),
    "bone": (400.0, 1800.0),
    "mediastinum": (50.0, 350.0),
}


def parse_window(spec) -> tuple[float, float] | None:
    """A preset name, (level, width), or the text 'L W' / 'L,W' -> (level, width); None/'none' -> None."""
    if spec is None:
        return None
    if isinstance(spec, str):
        text = spec.strip().lower()
        if text in ("", "none", "off"):
            return None
        if text in WINDOW_PRESETS:
            return WINDOW_PRESETS[text]
        parts = text.replace(",", " ").split()
    else:
        parts = list(spec)
    try:
        level, width = (float(p) for p in parts)
    except (TypeError, ValueError):
        raise ConfigError(f"window {spec!r}: expected a preset ({', '.join(WINDOW_PRESETS)}) or 'LEVEL WIDTH'") from None
    if width <= 0:
        raise ConfigError(f"window {spec!r}: width must be positive")
    return level, width


def apply_window(image: np.ndarray, level: float, width: float) -> np.ndarray:
    """Clip to [level - width/2, level + width/2] and scale linearly to [0, 1]; float32."""
    lo = level - width / 2.0
    out = (np.asarray(image, dtype=np.float32) - lo) / float(width)
    return np.clip(out, 0.0, 1.0).astype(np.float32)


def clip_percentiles(image: np.ndarray, lower: float | None = None, upper: float | None = 99.9,
                     mask: np.ndarray | None = None) -> np.ndarray:
    """Clip intensities at the given percentiles, computed over `mask` voxels (all voxels when None)."""
    img = np.asarray(image, dtype=np.float32)
    vals = img[mask.astype(bool)] if mask is not None else img.ravel()
    if vals.size == 0:
        return img
    lo = float(np.percentile(vals, lower)) if lower is not None else None
    hi = float(np.percentile(vals, upper)) if upper is not None else None
    return np.clip(img, lo, hi).astype(np.float32)


def zscore_nonzero(image: np.ndarray) -> np.ndarray:
    """z-score over the non-zero voxels; background (zero) voxels stay 0 (brain MRI convention)."""
    mask = np.asarray(image) != 0
    if not mask.any():
        return np.asarray(image, dtype=np.float32)
    return (zscore(image, mask) * mask).astype(np.float32)


# --- masks for cropping -----------------------------------------------------------------------------

def nonzero_mask(image: np.ndarray) -> np.ndarray:
    """Voxels that are non-zero in any channel of a (C, x, y, z) image (or of an (x, y, z) image)."""
    img = np.asarray(image)
    return (img != 0).any(axis=0) if img.ndim == 4 else img != 0


def body_mask(image_hu: np.ndarray, threshold: float = -500.0) -> np.ndarray:
    """The patient's body in a CT volume: the largest connected component above `threshold` HU.

    Taking the largest component drops the table and air-surrounded debris that a plain threshold keeps.
    """

    fg = np.asarray(image_hu) > threshold
    labels, n = ndimage.label(fg)
    if n <= 1:
        return fg
    sizes = np.bincount(labels.ravel())
    sizes[0] = 0
    return labels == int(sizes.argmax())


# --- resampling -------------------------------------------------------------------------------------

def _to_sitk(array: np.ndarray, spacing, origin=None, direction=None):

    img = sitk.GetImageFromArray(np.ascontiguousarray(np.transpose(array, (2, 1, 0))))  # (x,y,z) -> sitk (z,y,x)
    img.SetSpacing([float(s) for s in spacing])
    if origin is not None:
        img.SetOrigin([float(o) for o in origin])
    if direction is not None:
        img.SetDirection([float(d) for d in direction])
    return img


def resampled_shape(shape: Sequence[int], spacing: Sequence[float], target: Sequence[float | None]) -> list[int]:
    """Grid size that covers the same physical extent at the target spacing (None keeps an axis)."""
    return [int(n) if t is None else max(1, int(round(n * s / float(t)))) for n, s, t in zip(shape, spacing, target)]


def resample(array: np.ndarray, spacing: Sequence[float], target: Sequence[float | None], *, is_label: bool = False,
             origin=None, direction=None) -> tuple[np.ndarray, tuple[float, ...]]:
    """Resample an (x, y, z) array (or (C, x, y, z) image, per channel) to `target` spacing with SimpleITK.

    Images use 3rd-order B-spline interpolation, labels nearest neighbour; the first voxel centre (origin)
    and direction are kept, the size is round(n * spacing / target) and voxels past the old grid's edge
    take the nearest edge value. Returns the new array (same dtype for labels, float32 for images) and spacing.
    """

    arr = np.asarray(array)
    if arr.ndim == 4:
        outs = [resample(c, spacing, target, is_label=is_label, origin=origin, direction=direction) for c in arr]
        return np.stack([o[0] for o in outs]), outs[0][1]
    new_spacing = tuple(float(s) if t is None else float(t) for s, t in zip(spacing, target))
    size = resampled_shape(arr.shape, spacing, target)
    if list(size) == list(arr.shape) and np.allclose(new_spacing, spacing):
        return (arr if is_label else arr.astype(np.float32)), new_spacing
    src = _to_sitk(arr if is_label else arr.astype(np.float32), spacing, origin, direction)
    f = sitk.ResampleImageFilter()
    f.SetSize([int(s) for s in size])
    f.SetOutputOrigin(src.GetOrigin())
    f.SetOutputSpacing(new_spacing)
    f.SetOutputDirection(src.GetDirection())
    f.SetInterpolator(sitk.sitkNearestNeighbor if is_label else sitk.sitkBSpline)
    f.SetOutputPixelType(src.GetPixelID())
    # The new grid can reach up to half an old voxel past the last one; repeat the edge there instead of
    # padding with 0 (which is soft tissue in HU and would become fake anatomy).
    f.SetUseNearestNeighborExtrapolator(True)
    out = f.Execute(src)
    res = np.ascontiguousarray(np.transpose(sitk.GetArrayFromImage(out), (2, 1, 0)))
    return (res.astype(arr.dtype) if is_label else res.astype(np.float32)), new_spacing
