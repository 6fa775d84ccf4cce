"""LViT's training augmentation (`RandomGenerator`, HUANGLIZI/LViT Load_Dataset.py:16-54), on (C, x, y) arrays.

Per sample: with probability 1/2 a rotation by k·90° (k uniform in 0..3) followed by a flip along one
axis (uniform in rows/columns; always one flip); otherwise, with probability 1/2, a rotation by an
integer angle uniform in [-20, 19] degrees about the image centre with nearest-neighbour sampling, the
same size, and zeros outside (scipy.ndimage.rotate, order=0, reshape=False) for image and mask alike;
otherwise nothing. Nearest sampling only moves pixels, so rotating float images equals LViT's rotating
uint8 images and scaling afterwards. The validation transform (ValGenerator) does nothing at 224×224.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage


def rot_flip(image: np.ndarray, label: np.ndarray | None, k: int, axis: int):
    """Load_Dataset.py:16-23 (`random_rot_flip`) with its draws given: rot90 by k, then flip along `axis`."""
    image = np.flip(np.rot90(image, k, axes=(1, 2)), axis=axis + 1)
    label = None if label is None else np.flip(np.rot90(label, k, axes=(0, 1)), axis=axis)
    return image, label


def rotate(image: np.ndarray, label: np.ndarray | None, angle: float):
    """Load_Dataset.py:26-30 (`random_rotate`) with its angle given. LViT rotates (rows, cols, C) arrays in
    scipy's default plane axes=(1, 0), which scipy sorts to (0, 1): rows/cols; here (C, rows, cols) → (1, 2)."""

    image = ndimage.rotate(image, angle, axes=(1, 2), order=0, reshape=False)
    label = None if label is None else ndimage.rotate(label, angle, axes=(0, 1), order=0, reshape=False)
    return image, label


def random_generator(image: np.ndarray, label: np.ndarray | None, rng: np.random.Generator):
    """One draw of LViT's RandomGenerator (Load_Dataset.py:42-45) from `rng`."""
    if rng.random() > 0.5:
        return rot_flip(image, label, int(rng.integers(0, 4)), int(rng.integers(0, 2)))
    if rng.random() > 0.5:
        return rotate(image, label, int(rng.integers(-20, 20)))  # np.random.randint(-20, 20): -20..19
    return image, label
