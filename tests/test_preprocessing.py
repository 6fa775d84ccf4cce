"""Preprocessing steps (windowing, clipping, masks, resampling, cropping) and the shared processing chain."""

from __future__ import annotations

import json

import numpy as np
import pytest

from textseg_cli.data import preprocessing as pp
from textseg_cli.data.prep.steps import (Loaded, Processing, apply_processing, check_geometry, check_label_values,
                                         load_split_file, parse_spacing, parse_split_counts, processing_from_options,
                                         seeded_split)
from textseg_cli.errors import ConfigError, DataError


def test_window_presets_and_explicit():
    assert pp.parse_window("lung") == (-600.0, 1500.0)
    assert set(pp.WINDOW_PRESETS) >= {"abdomen", "lung", "brain", "bone", "mediastinum"}
    assert pp.parse_window((75, 400)) == (75.0, 400.0) == pp.parse_window("75,400") == pp.parse_window("75 400")
    assert pp.parse_window("none") is None and pp.parse_window(None) is None
    with pytest.raises(ConfigError, match="preset"):
        pp.parse_window("liver-ish")
    with pytest.raises(ConfigError, match="positive"):
        pp.parse_window((40, 0))
    out = pp.apply_window(np.array([-1000.0, -125.0, 75.0, 275.0, 3000.0]), 75, 400)
    assert out.dtype == np.float32 and out.tolist() == [0.0, 0.0, 0.5, 1.0, 1.0]


def test_clip_percentiles_and_zscore_nonzero():
    img = np.zeros((10, 10, 10), np.float32)
    img[2:8, 2:8, 2:8] = np.arange(216, dtype=np.float32).reshape(6, 6, 6) + 1
    clipped = pp.clip_percentiles(img, upper=90, mask=img != 0)
    assert clipped.max() == pytest.approx(np.percentile(img[img != 0], 90))
    assert clipped.min() == 0  # percentiles over the mask, clipping everywhere: background untouched
    z = pp.zscore_nonzero(img)
    brain = img != 0
    assert np.all(z[~brain] == 0)
    assert abs(z[brain].mean()) < 1e-5 and abs(z[brain].std() - 1) < 1e-4


def test_body_mask_drops_the_table():
    ct = np.full((30, 30, 4), -1000.0)
    ct[5:20, 5:20] = 40.0  # body
    ct[26:28, 2:28] = 200.0  # table, not connected to the body
    body = pp.body_mask(ct)
    assert body[10, 10, 0] and not body[27, 10, 0]
    assert pp.bbox(body) == [(5, 20), (5, 20), (0, 4)]


def test_resample_spacing_shape_labels_and_edges():
    ramp = np.tile(np.linspace(-1000, 500, 24)[:, None, None], (1, 20, 8)).astype(np.float32)
    out, sp = pp.resample(ramp, (0.8, 0.8, 2.5), (1, 1, 1))
    assert sp == (1.0, 1.0, 1.0) and out.shape == (19, 16, 20) and out.dtype == np.float32
    # the new grid reaches past the old one in z; edge voxels repeat the edge, never 0 HU padding
    assert np.allclose(out[0, :, -1], -1000, atol=1)
    assert np.all(np.diff(out[:, 5, -1]) >= 0)  # still the ramp, no jump to 0
    assert out[0].mean() == pytest.approx(-1000, abs=5)
    label = np.zeros((24, 20, 8), np.uint8)
    label[8:16, 6:14, 2:6] = 2
    lab, _ = pp.resample(label, (0.8, 0.8, 2.5), (1, 1, 1), is_label=True)
    assert lab.dtype == np.uint8 and set(np.unique(lab)) == {0, 2}
    ml_before, ml_after = label.astype(bool).sum() * 0.8 * 0.8 * 2.5, lab.astype(bool).sum() * 1.0
    assert abs(ml_after - ml_before) / ml_before < 0.25
    same, sp2 = pp.resample(label, (1, 1, 1), (None, None, 1))
    assert same.shape == label.shape and sp2 == (1.0, 1.0, 1.0)
    multi, _ = pp.resample(np.stack([ramp, ramp]), (0.8, 0.8, 2.5), (1, 1, 1))
    assert multi.shape == (2, 19, 16, 20)


def test_existing_helpers_unchanged():
    m = np.zeros((10, 10, 10), bool)
    m[3:5, 4:6, 5:9] = True
    assert pp.bbox(m) == [(3, 5), (4, 6), (5, 9)]
    assert pp.expand_box([(3, 5), (4, 6), (5, 9)], (10, 10, 10), (1, 1, 0), (6, 0, 0)) == [(0, 8), (3, 7), (5, 9)]
    assert pp.crop(np.ones((10, 10, 10)), [(0, 2), (0, 3), (0, 4)]).shape == (2, 3, 4)
    z = pp.zscore(np.arange(10.0))
    assert abs(z.mean()) < 1e-6


def test_chain_label_crop_window_record():
    ct = np.full((1, 40, 40, 10), -1000.0, np.float32)
    ct[0, 5:35, 5:35] = 40.0
    label = np.zeros((40, 40, 10), np.uint8)
    label[18:22, 17:21, 4:6] = 1
    proc = Processing(window=(75, 400), crop="label", crop_axes=(True, True, False), crop_min_size=(10, 10, 0),
                      crop_margin=(3, 3, 0), normalize="none")
    res = apply_processing("c1", Loaded(ct, label, (1.0, 1.0, 2.0), (5.0, 6.0, 7.0)), proc)
    assert res.crop_box == [(12, 28), (11, 27), (0, 10)]  # 4 -> 10 (+3 each side), z whole
    assert res.image.shape == (1, 16, 16, 10) and res.label.sum() == label.sum()
    assert res.image.min() >= 0 and res.image.max() <= 1
    assert res.origin == (17.0, 17.0, 7.0)  # origin moves with the crop
    assert res.stats["prenorm_max"] <= 1
    assert [s["step"] for s in proc.record()] == ["crop", "window"]
    json.dumps(proc.record())
    with pytest.raises(DataError, match="empty label"):
        apply_processing("c2", Loaded(ct, np.zeros_like(label), (1.0, 1.0, 2.0)), proc)


def test_chain_body_crop_uses_hu_and_nonzero_crop():
    ct = np.full((1, 30, 30, 6), -1000.0, np.float32)
    ct[0, 6:24, 8:20] = 30.0
    proc = processing_from_options(window_preset="lung", crop="body", crop_margin=1)
    res = apply_processing("c", Loaded(ct, None, (1.0, 1.0, 1.0)), proc)
    assert res.crop_box == [(5, 25), (7, 21), (0, 6)]
    assert abs(res.image.mean()) < 1e-4  # z-scored after the lung window
    mr = np.zeros((1, 20, 20, 8), np.float32)
    mr[0, 4:10, 5:15, 2:6] = 5.0
    res = apply_processing("m", Loaded(mr, None, (1.0, 1.0, 1.0)), Processing(crop="nonzero", normalize="none"))
    assert res.image.shape == (1, 6, 10, 4)


def test_option_parsers():
    assert parse_spacing("1") == (1.0, 1.0, 1.0) and parse_spacing("0.8,0.8,2") == (0.8, 0.8, 2.0)
    assert parse_spacing("none") is None and parse_spacing(None) is None
    with pytest.raises(ConfigError, match="spacing"):
        parse_spacing("-1")
    assert parse_split_counts("48,15", 63) == {"train": 48, "val": 0, "test": 15}
    assert parse_split_counts("250,25,60", 335) == {"train": 250, "val": 25, "test": 60}
    assert parse_split_counts("0.8,0.2", 10) == {"train": 8, "val": 0, "test": 2}
    with pytest.raises(ConfigError, match="335 cases but 6"):
        parse_split_counts("250,25,60", 6)
    with pytest.raises(ConfigError):
        Processing(crop="lungs")
    with pytest.raises(ConfigError, match="either"):
        processing_from_options(window=(1, 2), window_preset="lung")


def test_seeded_split_is_deterministic():
    ids = [f"lung_{i:03d}" for i in range(63)]
    a = seeded_split(ids, parse_split_counts("48,15", 63), seed=1337)
    b = seeded_split(list(reversed(ids)), parse_split_counts("48,15", 63), seed=1337)
    c = seeded_split(ids, parse_split_counts("48,15", 63), seed=1)
    assert a == b and a != c
    assert len(a["train"]) == 48 and len(a["test"]) == 15 and not set(a["train"]) & set(a["test"])


def test_split_file_forms(tmp_path):
    ids = ["a", "b", "c", "d"]
    (tmp_path / "s").mkdir()
    (tmp_path / "s" / "train.txt").write_text("b\na\n")
    (tmp_path / "s" / "test.list").write_text("d\n")
    assert load_split_file(tmp_path / "s", ids) == {"train": ["b", "a"], "val": [], "test": ["d"]}
    (tmp_path / "s.json").write_text(json.dumps({"train": ["a"], "val": ["b"], "test": ["c", "zz"]}))
    with pytest.raises(ConfigError, match="unknown case"):
        load_split_file(tmp_path / "s.json", ids)
    (tmp_path / "s.yaml").write_text("train: [a, b]\ntest: [b]\n")
    with pytest.raises(ConfigError, match="both"):
        load_split_file(tmp_path / "s.yaml", ids)


def test_geometry_and_label_checks():
    ref = {"shape": (4, 4, 4), "spacing": (1, 1, 2), "origin": (0, 0, 0), "direction": tuple(np.eye(3).ravel())}
    check_geometry("c", "label", ref, dict(ref, spacing=(1, 1, 2.0000001)))
    with pytest.raises(DataError, match=r"case 'c': label geometry differs from the image: size \(4, 4, 5\)"):
        check_geometry("c", "label", ref, dict(ref, shape=(4, 4, 5)))
    with pytest.raises(DataError, match="direction"):
        check_geometry("c", "label", ref, dict(ref, direction=tuple(np.diag([-1, 1, 1]).ravel())))
    lab, warn = check_label_values("c", np.array([0.0, 1.0, 1.0]), (0, 1))
    assert lab.dtype == np.uint8 and warn == []
    with pytest.raises(DataError, match="non-integer"):
        check_label_values("c", np.array([0.0, 0.5]), (0, 1))
    _, warn = check_label_values("c", np.array([0, 3]), (0, 1, 2, 4), strict=False)
    assert "unexpected label value(s) [3]" in warn[0]
