"""`textseg prep synthetic`: the bundled demo/test data set (see textseg_cli/data/synthetic.py).

Cases are generated in HU, windowed to [0, 1] with the abdominal window and z-scored over the whole
volume; every step and its parameters are recorded in dataset.json. Splits: the first cases form the
training list (its head is the labeled subset), then validation, then test. Every case gets its label
file; which training cases count as labeled is decided at train time (`--labeled`).
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Sequence

import numpy as np

from textseg_cli.console import progress
from textseg_cli.data import synthetic as gen
from textseg_cli.data.prep.synthetic2d import prep_synthetic_2d
from textseg_cli.data.prep.writer import PreparedWriter, volume_qc
from textseg_cli.data.preprocessing import apply_window, zscore
from textseg_cli.errors import ConfigError

WINDOW = (40.0, 400.0)  # level, width in HU: HU [-160, 240] -> [0, 1]
DEFAULT_SIZE = (64, 64, 48)


def default_patch_size(size: Sequence[int]) -> list[int]:
    """Per axis the largest multiple of 16 (the V-Net's total downsampling) within 3/4 of the size."""
    return [max(16, int(0.75 * s) // 16 * 16) for s in size]


def _check_counts(n_cases: int, n_val: int, n_test: int) -> int:
    n_train = n_cases - n_val - n_test
    if n_val < 0 or n_test < 0:
        raise ConfigError("--val and --test must not be negative")
    if n_train < 1:
        raise ConfigError(f"--cases {n_cases} leaves no training case after --val {n_val} and --test {n_test}")
    return n_train


def prep_synthetic_2d_given(out, force: bool = False, size: Sequence[int] | None = None, **given):
    """Delegate to the 2D generator, passing only the settings the user gave (it has its own defaults)."""
    if given.pop("n_classes", 1) not in (None, 1):
        raise ConfigError("--classes 2 is only available for 3D synthetic data")
    kw = {k: v for k, v in given.items() if v is not None}
    if size is not None:
        size = tuple(int(s) for s in size)
        if len(set(size)) != 1 or len(size) > 2:
            raise ConfigError(f"--size {','.join(map(str, size))} with --dim 2: expected one square size such as 64")
        kw["size"] = size[0]
    return prep_synthetic_2d(out=out, force=force, **kw)


def prep_synthetic(out: str | Path, n_cases: int = 20, size: Sequence[int] | None = DEFAULT_SIZE, n_classes: int = 1,
                   seed: int = 0, n_val: int = 4, n_test: int = 4, force: bool = False,
                   patch_size: Sequence[int] | None = None, dim: int = 3):
    """Generate the synthetic CT-like data set into OUT and return its PreparedDataset.

    size: (x, y, z) voxels, each at least 16; patch_size defaults to `default_patch_size(size)`.
    n_classes: 1 (liver-like organ) or 2 (plus a kidney-like organ). dim=2 delegates to the 2D generator
    (`textseg_cli.data.prep.synthetic2d`). Case i depends only on (seed, i).
    """
    n_train = _check_counts(n_cases, n_val, n_test)
    if dim == 2:
        return prep_synthetic_2d_given(out, force, None if size is None or tuple(size) == DEFAULT_SIZE else size,
                                       n_cases=n_cases, seed=seed, n_val=n_val, n_test=n_test, n_classes=n_classes)
    if dim != 3:
        raise ConfigError(f"--dim {dim}: expected 2 or 3")
    if n_classes not in (1, 2):
        raise ConfigError(f"--classes {n_classes}: expected 1 or 2")
    size = tuple(int(s) for s in (DEFAULT_SIZE if size is None else size))
    if len(size) != 3 or any(not 16 <= s <= 512 for s in size):
        raise ConfigError(f"--size {','.join(map(str, size))}: expected three sizes X,Y,Z between 16 and 512")
    patch = default_patch_size(size) if patch_size is None else [int(p) for p in patch_size]
    if len(patch) != 3 or any(not 1 <= p <= s for p, s in zip(patch, size)):
        raise ConfigError(f"--patch {','.join(map(str, patch))}: expected three sizes no larger than the volume "
                          f"{','.join(map(str, size))}")

    writer = PreparedWriter(out, name="synthetic", dim=3, modality="CT", channel_names=["CT"],
                            class_names=gen.CLASS_NAMES[n_classes], force=force)
    ids = [f"synth_{i:03d}" for i in range(n_cases)]
    hashes = hashlib.sha256()
    with progress() as bar:
        job = bar.add_task("prep synthetic", total=n_cases, info="")
        for i, cid in enumerate(ids):
            hu, label = gen.generate_case(seed, i, size, n_classes)
            image = zscore(apply_window(hu, *WINDOW))
            digest = hashlib.sha256(image.tobytes() + label.tobytes()).hexdigest()[:16]
            hashes.update(f"{cid}:{digest};".encode())
            qc = volume_qc(image, label, gen.SPACING, hu_p50=float(np.median(hu)))
            writer.add_case(cid, image, label, gen.SPACING, qc=qc, content_hash=digest)
            bar.update(job, advance=1, info=cid)
    splits = {"train": ids[:n_train], "val": ids[n_train:n_train + n_val], "test": ids[n_train + n_val:]}
    preprocessing = [
        {"step": "generate", "params": {"generator": "textseg_cli.data.synthetic", "version": gen.GENERATOR_VERSION,
                                        "size": list(size), "n_classes": n_classes, "seed": seed,
                                        "spacing_mm": list(gen.SPACING), "units": "HU",
                                        "case_seed": "SeedSequence([seed, case index, version])"}},
        {"step": "window", "params": {"level": WINDOW[0], "width": WINDOW[1],
                                      "range": [WINDOW[0] - WINDOW[1] / 2, WINDOW[0] + WINDOW[1] / 2],
                                      "scaled_to": [0, 1]}},
        {"step": "zscore", "params": {"over": "all voxels of the volume"}},
    ]
    labeled = {"rule": "first_n_of_train", "doc": "the first N cases of splits.train in its order are labeled",
               "default": max(1, n_train // 3)}
    return writer.finish(splits=splits, preprocessing=preprocessing, source={"layout": "synthetic", "paths": []},
                         patch_size=patch, labeled=labeled, seed=seed,
                         extra={"content_hash": hashes.hexdigest()[:16]})
