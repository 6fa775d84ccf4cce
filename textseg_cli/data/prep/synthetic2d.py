"""A seeded 2D data set where the text decides the target.

Every image shows 2-4 similar bright lesions, at most one per region (upper/lower × left/right,
i.e. the four quadrants; "upper" = small row index, "left" = small column index). The description
names a non-empty strict subset of them as the target ("two lesions, upper left and lower right.")
and the mask holds exactly those. A predictor that ignores the text can at best guess which of the
look-alike lesions are meant; one that reads the text can be exact. `lesion_mask` finds all visible
lesions, the simple text-blind guess (its Dice stays well below 1, see tests).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from scipy import ndimage

from textseg_cli.data.prep.writer import PreparedWriter
from textseg_cli.errors import ConfigError

REGIONS = ("upper left", "upper right", "lower left", "lower right")
_NUMBER = {1: "one lesion", 2: "two lesions", 3: "three lesions", 4: "four lesions"}


def describe_regions(regions: list[str]) -> str:
    """The description for a target set, regions in the fixed REGIONS order."""
    ordered = [r for r in REGIONS if r in regions]
    where = ordered[0] if len(ordered) == 1 else ", ".join(ordered[:-1]) + " and " + ordered[-1]
    return f"{_NUMBER[len(ordered)]}, {where}."


def regions_from_text(text: str) -> list[str]:
    """Inverse of `describe_regions` (used by tests and sanity checks)."""
    return [r for r in REGIONS if r in text]


def region_slices(region: str, size: int) -> tuple[slice, slice]:
    half = size // 2
    rows = slice(0, half) if region.startswith("upper") else slice(half, size)
    cols = slice(0, half) if region.endswith("left") else slice(half, size)
    return rows, cols


def make_case(rng: np.random.Generator, size: int) -> tuple[np.ndarray, np.ndarray, str, dict[str, Any]]:
    """One image (size, size) float32 in [0, 1], its mask (uint8 0/1), description and facts."""
    n_present = int(rng.integers(2, 5))
    present = sorted(rng.choice(4, size=n_present, replace=False).tolist())
    n_target = int(rng.integers(1, n_present))  # strict subset: the text always matters
    target = sorted(rng.choice(present, size=n_target, replace=False).tolist())

    rows, cols = np.mgrid[0:size, 0:size].astype(np.float32)
    image = 0.25 + 0.05 * rng.standard_normal((size, size)).astype(np.float32)
    mask = np.zeros((size, size), np.uint8)
    half = size / 2
    for q in present:
        r0, c0 = (0.0 if q < 2 else half), (0.0 if q % 2 == 0 else half)
        radius = rng.uniform(0.14, 0.22) * half
        aspect = rng.uniform(0.75, 1.33)
        margin = radius * max(aspect, 1 / aspect) + 1
        cr = r0 + rng.uniform(margin, half - margin)
        cc = c0 + rng.uniform(margin, half - margin)
        blob = ((rows - cr) / (radius * aspect)) ** 2 + ((cols - cc) / (radius / aspect)) ** 2 <= 1.0
        image[blob] += rng.uniform(0.45, 0.55)  # look-alike lesions: intensity alone cannot tell them apart
        if q in target:
            mask[blob] = 1
    image = np.clip(image + 0.03 * rng.standard_normal((size, size)).astype(np.float32), 0.0, 1.0)
    regions = [REGIONS[q] for q in target]
    facts = {"lesion_regions": [REGIONS[q] for q in present], "target_regions": regions}
    return image.astype(np.float32), mask, describe_regions(regions), facts


def lesion_mask(image: np.ndarray, threshold: float = 0.55) -> np.ndarray:
    """All visible lesions (what a text-blind model can find): bright pixels, denoised by a 3×3 majority."""

    bright = image > threshold
    return (ndimage.uniform_filter(bright.astype(np.float32), size=3) > 0.5).astype(np.uint8)


def prep_synthetic_2d(out: str | Path, n_cases: int = 64, size: int = 64, seed: int = 0, n_val: int = 8,
                      n_test: int = 8, force: bool = False):
    """Write the text-decides-the-target 2D set (dim 2, one channel, classes background/lesion).

    `n_cases` counts all cases; the last `n_val` + `n_test` form the val and test splits.
    Returns the `PreparedDataset`.
    """
    if size < 16 or size % 2:
        raise ConfigError(f"--size {size}: expected an even size of at least 16")
    n_train = n_cases - n_val - n_test
    if n_val < 0 or n_test < 0 or n_train < 1:
        raise ConfigError(f"n_cases={n_cases} leaves no training case after n_val={n_val} and n_test={n_test}")
    rng = np.random.default_rng(seed)
    w = PreparedWriter(out, name="synthetic2d", dim=2, modality="synthetic", channel_names=["intensity"],
                       class_names=["background", "lesion"], force=force)
    ids = [f"s2d_{i:04d}" for i in range(n_cases)]
    for cid in ids:
        image, mask, text, facts = make_case(rng, size)
        w.add_case(cid, image, mask, (1.0, 1.0), text=text, **facts)
    splits = {"train": ids[:n_train], "val": ids[n_train:n_train + n_val], "test": ids[n_train + n_val:]}
    return w.finish(
        splits=splits,
        preprocessing=[{"step": "generate", "params": {
            "generator": "textseg_cli.data.prep.synthetic2d", "size": [size, size], "seed": seed,
            "lesions_per_image": [2, 4], "targets": "non-empty strict subset of the lesions, named in the text",
            "axes": "row, column ('upper' = small row, 'left' = small column)"}}],
        source={"layout": "synthetic2d", "paths": []},
        patch_size=[size, size], seed=seed,
        extra={"regions": list(REGIONS), "purpose": "the text decides the target; text-blind models are bounded"},
    )
