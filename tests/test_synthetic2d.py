"""The 2D synthetic set: the text, not the image, decides which lesions are the target."""

from __future__ import annotations

import json

import numpy as np
from scipy import ndimage

from textseg_cli.data.prepared import load_prepared
from textseg_cli.data.prep.synthetic2d import REGIONS, lesion_mask, prep_synthetic_2d, region_slices, regions_from_text


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    s = a.sum() + b.sum()
    return 1.0 if s == 0 else 2.0 * float((a & b).sum()) / float(s)


def test_text_decides_target_and_blind_guess_is_bounded(tmp_path):
    ds = prep_synthetic_2d(tmp_path / "s2d", n_cases=24, size=48, seed=3, n_val=4, n_test=4)
    spec = json.loads((tmp_path / "s2d" / "dataset.json").read_text(encoding="utf-8"))
    assert spec["dim"] == 2 and spec["seed"] == 3 and spec["patch_size"] == [48, 48]
    assert [len(spec["splits"][k]) for k in ("train", "val", "test")] == [16, 4, 4]
    blind, all_targets_shown = [], True
    for cid in ds.case_ids:
        case = ds.load_case(cid)
        img, lab = case.image[0], case.label.astype(bool)
        assert img.shape == (48, 48) and 0.0 <= img.min() and img.max() <= 1.0
        regions = regions_from_text(case.text)
        assert 1 <= len(regions) < len(case.meta["lesion_regions"])
        # The text-consistent mask (visible lesions inside the named regions) is exactly the label.
        lesions = lesion_mask(img).astype(bool)
        named = np.zeros_like(lesions)
        for r in regions:
            rs, cs = region_slices(r, 48)
            named[rs, cs] = True
        assert _dice(lesions & named, lab) > 0.9
        # Every lesion is a separate blob of similar brightness, one per listed region.
        n_blobs = ndimage.label(lesions)[1]
        all_targets_shown &= n_blobs == len(case.meta["lesion_regions"])
        blind.append(_dice(lesions, lab))
    assert all_targets_shown
    assert np.mean(blind) < 0.75  # ignoring the text (predicting every lesion) is bounded well below 1


def test_seeded_and_regions_named(tmp_path):
    a = prep_synthetic_2d(tmp_path / "a", n_cases=6, size=32, seed=7, n_val=1, n_test=1)
    b = prep_synthetic_2d(tmp_path / "b", n_cases=6, size=32, seed=7, n_val=1, n_test=1)
    for cid in a.case_ids:
        ca, cb = a.load_case(cid), b.load_case(cid)
        assert ca.text == cb.text and np.array_equal(ca.image, cb.image) and np.array_equal(ca.label, cb.label)
        assert all(r in REGIONS for r in regions_from_text(ca.text))
    assert load_prepared(tmp_path / "a").spec["splits"]["test"] == ["s2d_0005"]
