"""Intensity and geometry steps shared by preparers. Each step is a pure function on arrays in
(x, y, z) order so it can be recorded in dataset.json by name and parameters."""

from __future__ import annotations

from typing import Sequence

import numpy as np

from textseg_cli.errors import DataError


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
