"""Largest-connected-component post-processing (the `--lcc` flag; also used by training methods).

Components use full connectivity (26 neighbours in 3D, 8 in 2D), which is the default of
`skimage.measure.label` that the semi-supervised repositories' `getLargestCC` relies on.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
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

    CPU tensors go through scipy; tensors on an accelerator stay there (`lcc_batch_device`, the same
    result without a copy to the host). Returns a tensor of the same dtype on the same device.
    """

    if t.device.type != "cpu":
        return lcc_batch_device(t)
    arr = t.detach().numpy()
    out = np.stack([lcc_per_class(sample) for sample in arr]) if arr.shape[0] else arr.copy()
    return torch.from_numpy(out).to(dtype=t.dtype)


def lcc_batch_device(t):
    """`lcc_batch` in torch ops on the tensor's own device; equal to the scipy path voxel for voxel."""

    t = t.detach()
    out = t.clone()
    if t.shape[0] == 0 or t.numel() == 0:
        return out
    for c in range(1, int(t.max()) + 1):
        cls = t == c
        out[cls & ~largest_component_device(cls)] = 0
    return out


def largest_component_device(mask):
    """Per sample of a boolean batch `(B, *spatial)` (2D or 3D), its largest full-connectivity component.

    Every foreground voxel starts with its C-order index; 3×3(×3) min-pooling within the mask, with
    pointer jumping (a voxel takes the label of the voxel its label names), converges to each
    component's first voxel. Ties between equal sizes keep the component found first in C order, as
    scipy's numbering with `np.argmax` does.
    """

    b, spatial = mask.shape[0], mask.shape[1:]
    n = int(np.prod(spatial))
    pool = {2: F.max_pool2d, 3: F.max_pool3d}.get(len(spatial))
    if pool is None:
        raise ValueError(f"largest_component_device: 2D or 3D masks, got shape {tuple(mask.shape)}")
    # float32 holds indices exactly below 2**24 voxels (a training patch); float64 beyond
    dtype = torch.float32 if n < 2 ** 24 else torch.float64
    big = torch.tensor(float(n), dtype=dtype, device=mask.device)
    idx = torch.arange(n, device=mask.device, dtype=dtype).view(1, *spatial).expand(b, *spatial)
    lab = torch.where(mask, idx, big)
    while True:
        prev = lab
        for _ in range(4):
            lab = -pool(-lab.unsqueeze(1), 3, stride=1, padding=1).squeeze(1)
            lab = torch.where(mask, lab, big)
            flat = lab.reshape(b, n)
            jumped = flat.gather(1, flat.clamp_max(n - 1).long()).view_as(lab)
            lab = torch.where(mask, torch.minimum(lab, jumped), big)
        if torch.equal(lab, prev):
            break
    keys = (lab.reshape(b, n).long() + torch.arange(b, device=mask.device)[:, None] * (n + 1)).reshape(-1)
    sizes = torch.bincount(keys, minlength=b * (n + 1)).view(b, n + 1)
    sizes[:, n] = 0  # background
    best = sizes.argmax(1)  # first maximum: the lowest first-voxel index among equal sizes
    return mask & (lab.reshape(b, n).long() == best[:, None]).view_as(mask)
