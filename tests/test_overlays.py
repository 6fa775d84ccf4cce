"""Overlay PNGs: sizes, contour colours, 3D slice choice, `textseg prep overlays`, `textseg eval --overlays`."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import run_cli
from PIL import Image

from textseg_cli.reports.overlays import (PAD, PREDICTION_COLOUR, REFERENCE_COLOUR, contour, panel, panel_origin,
                                          render_2d, render_3d, slices_to_show, spread)


def _square(shape, r0, r1, c0, c1):
    m = np.zeros(shape, np.uint8)
    m[r0:r1, c0:c1] = 1
    return m


def test_2d_overlay_size_and_contour_colours(tmp_path):
    img = np.linspace(0, 1, 20 * 30, dtype=np.float32).reshape(20, 30)
    ref = _square((20, 30), 4, 12, 5, 15)
    pred = _square((20, 30), 8, 16, 18, 26)
    pic = render_2d(img, ref, pred, text="Two lesions, upper left and lower right.", title="case", scale=2)
    path = tmp_path / "o.png"
    pic.save(path)
    arr = np.asarray(Image.open(path).convert("RGB"))
    top, left = panel_origin(title=True, captions=False)
    assert arr.shape[1] == max(30 * 2 + 2 * PAD, 160) and arr.shape[0] > top + 40
    pan = arr[top:top + 40, left:left + 60]
    np.testing.assert_array_equal(pan[8, 10], REFERENCE_COLOUR)  # top edge of the reference square (row 4 × 2)
    np.testing.assert_array_equal(pan[16, 36], PREDICTION_COLOUR)  # top edge of the prediction (row 8 × 2)
    inside = pan[14, 20]
    assert inside[0] == inside[1] == inside[2]  # grey image inside the contour, not coloured
    # every contour pixel is coloured, and only those (the image is grey)
    colour = np.any(pan != pan[..., :1], axis=-1)
    ref_c = contour(np.repeat(np.repeat(ref, 2, 0), 2, 1))
    pred_c = contour(np.repeat(np.repeat(pred, 2, 0), 2, 1))
    np.testing.assert_array_equal(colour, ref_c | pred_c)
    # a colour image (C, H, W) keeps its size too
    assert panel(np.stack([img] * 3), ref, None, scale=1).shape == (20, 30, 3)


def test_3d_overlay_shows_middle_and_largest_slice():
    ref = np.zeros((16, 16, 10), np.uint8)
    ref[4:12, 4:12, 2] = 1
    ref[6:9, 6:9, 5] = 1
    assert slices_to_show(ref, None, 10) == [(5, "z=5 (middle)"), (2, "z=2 (largest reference)")]
    pic = render_3d(np.random.default_rng(0).standard_normal((16, 16, 10)), ref, None, title="vol", scale=1)
    assert pic.size[0] == max(2 * 16 + 3 * PAD, 160)
    assert slices_to_show(None, None, 7) == [(3, "z=3 (middle)")]
    assert spread(list("abcdefg"), 3) == ["a", "d", "g"] and spread(list("ab"), 5) == ["a", "b"]


def test_prep_overlays_command(synthetic_data, tmp_path):
    out = tmp_path / "ov"
    code, text = run_cli("prep", "overlays", synthetic_data, "--n", "3", "--out", out, "--split", "train")
    assert code == 0, text
    files = sorted(p.name for p in out.iterdir())
    assert files == ["synth_000.png", "synth_002.png", "synth_005.png"]
    arr = np.asarray(Image.open(out / "synth_000.png").convert("RGB"))
    assert np.any(np.all(arr == REFERENCE_COLOUR, axis=-1))  # the label contour is drawn
    assert not np.any(np.all(arr == PREDICTION_COLOUR, axis=-1))
    code, text = run_cli("prep", "overlays", synthetic_data, "--n", "3", "--out", out, "--split", "train")
    assert code == 2 and "force" in text


def test_eval_overlays_have_image_size(tmp_path):
    from textseg_cli.data.io import write_nifti
    from textseg_cli.evaluation.folders import evaluate_folders

    labels, pred = tmp_path / "labels", tmp_path / "pred"
    for i in range(3):
        write_nifti(labels / f"c{i}.nii.gz", _square((64, 48), 10, 30, 10, 20 + i), (1.0, 1.0))
        write_nifti(pred / f"c{i}.nii.gz", _square((64, 48), 12, 30, 10, 20), (1.0, 1.0))
    df = evaluate_folders(pred, labels, tmp_path / "ev", overlays=2, show=False)
    assert df.attrs["meta"]["overlays"] == ["c0.png", "c1.png"]
    pic = Image.open(tmp_path / "ev" / "overlays" / "c1.png")
    assert pic.size[0] == max(48 * 4 + 2 * PAD, 160)  # enlarged ×4 (256 // 64)
    from textseg_cli.errors import ConfigError

    with pytest.raises(ConfigError, match="output folder"):
        evaluate_folders(pred, labels, tmp_path / "ev2", overlays=1, write=False, show=False)
