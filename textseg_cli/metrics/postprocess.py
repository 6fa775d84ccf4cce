"""Largest-connected-component post-processing (the `--lcc` flag; also used by training methods).

Components use full connectivity (26 neighbours in 3D, 8 in 2D), which is the default of
`skimage.measure.label` that the semi-supervised repositories' `getLargestCC` relies on.
"""

from __future__ import annotations

import numpy as np
from scipy.ndimage import generate_binary_structure, label


def largest_connected_component(mask: np.ndarray, connectivity: int | None = None) -> np.ndarray:
    """Boolean mask keeping only the largest connected component of `mask` (empty stays empty).

    `connectivity` is the scipy rank (1 = face neighbours ... ndim = full); default full.
    Ties keep the component found first in C order.
    """
    mask = np.asarray(mask).astype(bool, copy=False)
    structure = generate_binary_structure(mask.ndim, mask.ndim if connectivity is None else connectivity)
    labels, n = label(mask, structure=structure)
    if n <= 1:
        return mask.copy()
    sizes = np.bincount(labels.ravel())
    sizes[0] = 0
    return labels == int(np.argmax(sizes))


def lcc_per_class(labels: np.ndarray, classes=None) -> np.ndarray:
    """Keep each foreground class's largest component in a label map; removed voxels become background."""
    labels = np.asarray(labels)
    out = labels.copy()
    values = np.unique(labels) if classes is None else np.asarray(list(classes))
    for c in values:
        if c == 0:
            continue
        cls = labels == c
        out[cls & ~largest_connected_component(cls)] = 0
    return out


def lcc_batch(t):
    """Per-sample, per-class LCC of a batch of label maps or binary masks `(B, *spatial)` (torch).

    Runs on CPU numpy; returns a tensor of the same dtype on the same device.
    """
    import torch

    arr = t.detach().cpu().numpy()
    out = np.stack([lcc_per_class(sample) for sample in arr]) if arr.shape[0] else arr.copy()
    return torch.from_numpy(out).to(device=t.device, dtype=t.dtype)
