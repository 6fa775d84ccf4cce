"""Named training augmentations that reproduce a published data pipeline exactly.

`rotflip` is `RandomRotFlip` of the LA scripts of UA-MT, DTC, MC-Net/MC-Net+, BCP, MLRP and VCLIPSeg (e.g.
yulequan/UA-MT code/dataloaders/la_heart.py:112-121, ycwu1997/MC-Net code/dataloaders/dataset.py:48-55), applied
to the whole volume before the random crop as in those scripts: k ~ U{0..3}, rot90 by k in the first two spatial
axes, then one flip along an axis drawn from the first two. Same random draws in the same order, so given the
same draws it gives the same arrays (tests/parity/test_augment_parity.py).
"""

from __future__ import annotations

import numpy as np


def _randint(rng, high: int) -> int:
    """One draw from U{0..high-1}: `integers` of a numpy Generator, `randint` of a RandomState / np.random."""
    draw = getattr(rng, "integers", None) or rng.randint
    return int(draw(0, high))


def random_rot_flip(image: np.ndarray, label: np.ndarray | None, rng, channel_axis: bool = False):
    """(image, label) rotated by k·90° in the first two spatial axes, then flipped along one of them.

    `image` is (*spatial) or, with `channel_axis`, (C, *spatial); `label` (*spatial) or None. Returns views
    (np.rot90/np.flip): copy or crop them afterwards. Draw order as the official code: k, then the flip axis.
    """
    k = _randint(rng, 4)
    axis = _randint(rng, 2)
    off = 1 if channel_axis else 0
    image = np.flip(np.rot90(image, k, axes=(off, off + 1)), axis=axis + off)
    if label is not None:
        label = np.flip(np.rot90(label, k, axes=(0, 1)), axis=axis)
    return image, label
