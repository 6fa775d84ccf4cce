"""`textseg bench` on a tiny patch (CPU, one iteration)."""

from __future__ import annotations

import json

import pytest

from conftest import run_cli
from textseg_cli.bench.benchmark import default_stride, run_benchmark
from textseg_cli.errors import ConfigError


def test_default_strides_follow_the_literature():
    assert default_stride((112, 112, 80)) == (18, 18, 4)
    assert default_stride((96, 96, 96)) == (16, 16, 16)
    assert default_stride((32, 16, 8)) == (16, 8, 4)


def test_bench_rejects_bad_options():
    with pytest.raises(ConfigError, match="unknown method"):
        run_benchmark(method="no-such-method")
    code, out = run_cli("bench", "--batch", "2x2", "--device", "cpu")
    assert code == 2 and "--batch" in out


def test_bench_tiny_mcnet_cpu(tmp_path):
    out = tmp_path / "bench.json"
    code, text = run_cli("bench", "--method", "mcnet", "--patch", "16,16,16", "--batch", "1+1", "--iterations", "1",
                         "--repeats", "1", "--device", "cpu", "--volume", "24,20,16", "--stride", "8,8,8",
                         "--out", out)
    assert code == 0, text
    assert "train it/s" in text and "sliding s/volume" in text and "[cpu] training" in text
    report = json.loads(out.read_text(encoding="utf-8"))
    row = report["results"][0]
    assert row["device"] == "cpu" and report["patch"] == [16, 16, 16]
    assert row["train_it_per_s"] > 0 and row["train_peak_mem_mb"] > 0
    assert row["windows"] == 2 * 2 * 1  # (24-16)/8+1, (20-16)/8 rounded up +1, one window along z
    assert row["sliding_s"] > 0 and row["whole_s"] > 0
    code, text = run_cli("bench", "--method", "mcnet", "--patch", "16,16,16", "--out", out, "--device", "cpu")
    assert code == 2 and "--force" in text  # never overwrites silently


def test_bench_tgcnet_times_the_clip_cache_on_and_off(tmp_path, one_thread):
    out = tmp_path / "tgc.json"
    code, text = run_cli("bench", "--method", "tgcnet", "--patch", "32,32", "--batch", "2+0", "--iterations", "1",
                         "--repeats", "1", "--device", "cpu", "--volume", "none", "--channels", "3",
                         "--set", "data.profile=synthetic2d", "--out", out)
    assert code == 0, text
    assert "cpu, cache on" in text and "cpu, cache off" in text and "train images/s" in text
    rows = json.loads(out.read_text(encoding="utf-8"))["results"]
    assert [r["feature_cache"] for r in rows] == ["on", "off"]
    for r in rows:
        assert r["train_images_per_s"] == pytest.approx(2 * r["train_it_per_s"]) and r["train_peak_mem_mb"] > 0
    on, off = rows
    assert on["feature_cache_hits"] > 0 and off["feature_cache_hits"] == 0  # the switch really took
    code, text = run_cli("bench", "--method", "tgcnet", "--patch", "32,32", "--volume", "none",
                         "--feature-cache", "sometimes")
    assert code == 2 and "--feature-cache" in text


def test_bench_reference_json_line(one_thread):
    """--reference times the papers' step and window loop in the same run; --json prints one JSON line."""
    code, text = run_cli("bench", "--method", "mcnet", "--patch", "16,16,16", "--batch", "1+1", "--iterations", "1",
                         "--repeats", "1", "--device", "cpu", "--volume", "20,16,16", "--stride", "8,8,8",
                         "--no-whole", "--reference", "--json", "--precision", "bf16",
                         "--set", "method.backbone.n_filters=4")
    assert code == 0, text
    line = next(ln for ln in text.splitlines() if ln.startswith("{"))
    report = json.loads(line)
    row = report["results"][0]
    assert report["reference"] is True and row["precision"] == "bf16" and row["threads"] >= 1
    assert row["precision_detail"]["channels_last"] is True
    for key in ("train_s_per_it", "ref_train_s_per_it", "sliding_s", "sliding_fp32_s", "ref_sliding_s",
                "train_peak_mem_mb", "ref_train_peak_mem_mb"):
        assert row[key] > 0, key
    assert row["train_speedup_vs_reference"] == pytest.approx(row["ref_train_s_per_it"] / row["train_s_per_it"])
    assert row["sliding_fp32_speedup_vs_reference"] == pytest.approx(row["ref_sliding_s"] / row["sliding_fp32_s"])
    assert "training step:" in text and "sliding window at fp32:" in text


def test_reference_window_loop_equals_textseg_sliding_window():
    """The benchmark's papers' loop and textseg's sliding window give the same probabilities (fp32)."""
    import numpy as np
    import torch

    from textseg_cli.bench.benchmark import method_config
    from textseg_cli.bench.reference import reference_sliding_window
    from textseg_cli.inference.predict import predict_case
    from textseg_cli.methods.registry import build_method

    torch.manual_seed(0)
    patch = (16, 16, 16)
    m = build_method("mcnet", method_config("mcnet", patch, ["method.backbone.n_filters=4"]), 1, 2, dim=3,
                     quiet_warnings=True)
    image = np.random.default_rng(0).standard_normal((1, 21, 14, 18)).astype(np.float32)
    ref = reference_sliding_window(m, image, patch, (6, 6, 5))
    ours = predict_case(m, image, {"mode": "sliding", "patch_size": list(patch), "stride": [6, 6, 5],
                                   "precision": "fp32"}, "cpu")
    np.testing.assert_allclose(ours.numpy(), ref, atol=1e-4)
