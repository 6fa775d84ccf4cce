"""`textseg prep synthetic` and the 3D phantom generator."""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import run_cli

from textseg_cli.data.prepared import load_prepared
from textseg_cli.data.preprocessing import apply_window
from textseg_cli.data.synthetic import generate_case


def best_band_threshold_dice(image: np.ndarray, mask: np.ndarray, bins: int = 64) -> float:
    """Best Dice of any intensity band lo <= v < hi (covers 'above t' and 'below t' thresholds)."""
    edges = np.linspace(image.min(), image.max() + 1e-6, bins + 1)
    fg = np.concatenate([[0], np.cumsum(np.histogram(image[mask], edges)[0])])
    allv = np.concatenate([[0], np.cumsum(np.histogram(image, edges)[0])])
    tp = fg[None, :] - fg[:, None]  # [lo, hi) over bin edges
    pred = allv[None, :] - allv[:, None]
    dice = np.where(pred > 0, 2 * tp / (pred + mask.sum() + 1e-9), 0.0)
    return float(dice.max())


def test_generator_is_deterministic_per_seed_and_case():
    a_img, a_lab = generate_case(seed=3, index=1, size=(32, 32, 24))
    b_img, b_lab = generate_case(seed=3, index=1, size=(32, 32, 24))
    assert np.array_equal(a_img, b_img) and np.array_equal(a_lab, b_lab)
    c_img, c_lab = generate_case(seed=4, index=1, size=(32, 32, 24))
    d_img, d_lab = generate_case(seed=3, index=2, size=(32, 32, 24))
    assert not np.array_equal(a_lab, c_lab) and not np.allclose(a_img, c_img)
    assert not np.array_equal(a_lab, d_lab)


def test_threshold_alone_does_not_segment_the_organ():
    for index in range(2):
        hu, label = generate_case(seed=0, index=index, size=(64, 64, 48))
        organ = label == 1
        assert 0.01 < organ.mean() < 0.15  # a non-trivial target
        assert 20 < hu[organ].mean() - np.median(hu[(label == 0) & (hu > -200)]) < 120  # modest contrast
        image = apply_window(hu, 40.0, 400.0)
        assert best_band_threshold_dice(image, organ) < 0.7


def test_two_classes_add_a_second_organ_without_changing_the_image():
    hu1, lab1 = generate_case(seed=0, index=0, size=(32, 32, 24), n_classes=1)
    hu2, lab2 = generate_case(seed=0, index=0, size=(32, 32, 24), n_classes=2)
    assert np.array_equal(hu1, hu2)
    assert set(np.unique(lab2)) == {0, 1, 2}
    assert np.array_equal(lab2 == 1, lab1 == 1)


def test_cli_writes_a_valid_prepared_set(tmp_path):
    out = tmp_path / "syn"
    code, text = run_cli("prep", "synthetic", "--out", out, "--cases", "5", "--size", "32,32,24", "--val", "1",
                         "--test", "1", "--classes", "2", "--seed", "7")
    assert code == 0, text
    spec = json.loads((out / "dataset.json").read_text(encoding="utf-8"))
    assert spec["class_names"] == ["background", "liver", "kidney"]
    assert spec["patch_size"] == [16, 16, 16]
    assert spec["splits"] == {"train": ["synth_000", "synth_001", "synth_002"], "val": ["synth_003"],
                              "test": ["synth_004"]}
    assert [s["step"] for s in spec["preprocessing"]] == ["generate", "window", "zscore"]
    assert spec["seed"] == 7 and spec["labeled"]["rule"] == "first_n_of_train"
    ds = load_prepared(out)
    for cid in ds.case_ids:  # every case has its label, the image is z-scored
        case = ds.load_case(cid)
        assert case.image.shape == (1, 32, 32, 24) and case.label.shape == (32, 32, 24)
        assert abs(case.image.mean()) < 1e-3 and abs(case.image.std() - 1) < 1e-3
        assert set(np.unique(case.label)) <= {0, 1, 2}
    # the prepared image is exactly the generator's output, windowed and z-scored
    hu, label = generate_case(seed=7, index=2, size=(32, 32, 24), n_classes=2)
    w = apply_window(hu, 40.0, 400.0)
    case = ds.load_case("synth_002")
    assert np.allclose(case.image[0], (w - w.mean()) / w.std(), atol=1e-5)
    assert np.array_equal(case.label, label)


def test_cli_refuses_existing_output_and_bad_options(tmp_path):
    out = tmp_path / "syn"
    assert run_cli("prep", "synthetic", "--out", out, "--cases", "3", "--size", "16", "--val", "1", "--test", "1")[0] == 0
    code, text = run_cli("prep", "synthetic", "--out", out, "--cases", "3", "--size", "16", "--val", "1", "--test", "1")
    assert code == 2 and "already exists" in text and str(out) in text and "Traceback" not in text
    code, text = run_cli("prep", "synthetic", "--out", out, "--cases", "3", "--size", "16", "--val", "1",
                         "--test", "1", "--seed", "1", "--force")
    assert code == 0, text
    assert json.loads((out / "dataset.json").read_text(encoding="utf-8"))["seed"] == 1
    for bad, expect in ((["--size", "8,8,8"], "--size"), (["--size", "a,b"], "--size"),
                        (["--cases", "2", "--val", "1", "--test", "1"], "no training case"),
                        (["--patch", "64,64,64", "--size", "32"], "--patch")):
        code, text = run_cli("prep", "synthetic", "--out", tmp_path / "bad", *bad)
        assert code == 2 and expect in text and "Traceback" not in text, text


def test_dim2_delegates_to_the_2d_generator(tmp_path, monkeypatch):
    calls = {}

    def fake_prep_synthetic_2d(out, force=False, **kw):
        calls.update(out=out, force=force, **kw)
        from textseg_cli.data.prep.synthetic import prep_synthetic

        return prep_synthetic(tmp_path / "stand-in", n_cases=3, size=(16, 16, 16), n_val=1, n_test=1)

    import textseg_cli.data.prep.synthetic as synthetic_mod

    monkeypatch.setattr(synthetic_mod, "prep_synthetic_2d", fake_prep_synthetic_2d)
    code, text = run_cli("prep", "synthetic", "--dim", "2", "--out", tmp_path / "s2", "--cases", "9", "--size", "48")
    assert code == 0, text
    assert calls == {"out": tmp_path / "s2", "force": False, "n_cases": 9, "seed": 0, "size": 48}


def test_split_counts_follow_the_arguments_and_are_disjoint(synthetic_data):
    """prep_synthetic(n_cases=10, n_val=2, n_test=2, patch_size=...) (the session fixture's call): the splits have
    exactly the asked sizes, share no case, cover every case, and every held-out case has a foreground label."""
    ds = load_prepared(synthetic_data)
    train, val, test = (set(ds.split(s)) for s in ("train", "val", "test"))
    assert (len(train), len(val), len(test)) == (6, 2, 2)
    assert not (train & val or train & test or val & test) and train | val | test == set(ds.case_ids)
    assert ds.patch_size == [32, 32, 16]
    assert all(ds.load_case(cid).label.any() for cid in sorted(val | test))


@pytest.mark.parametrize("size", [(16, 16, 16), (40, 24, 20)])
def test_odd_sizes_still_have_an_organ(size):
    _, label = generate_case(seed=0, index=0, size=size)
    assert label.shape == size and label.any()
