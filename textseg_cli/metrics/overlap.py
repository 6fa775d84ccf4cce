"""Overlap metrics on binary masks, equal to `medpy.metric.binary.dc` / `jc`."""

from __future__ import annotations

import numpy as np


def _as_bool(mask: np.ndarray) -> np.ndarray:
    return np.atleast_1d(np.asarray(mask).astype(bool, copy=False))


def dice(pred: np.ndarray, ref: np.ndarray) -> float:
    """Dice = 2|P∩R| / (|P|+|R|); 1.0 when both masks are empty (as medpy)."""
    p, r = _as_bool(pred), _as_bool(ref)
    inter = np.count_nonzero(p & r)
    total = np.count_nonzero(p) + np.count_nonzero(r)
    return 1.0 if total == 0 else float(2.0 * inter / float(total))


def jaccard(pred: np.ndarray, ref: np.ndarray) -> float:
    """Jaccard = |P∩R| / |P∪R|; 1.0 when both masks are empty (as medpy)."""
    p, r = _as_bool(pred), _as_bool(ref)
    inter = np.count_nonzero(p & r)
    union = np.count_nonzero(p | r)
    return 1.0 if union == 0 else float(inter) / float(union)
