"""`textseg bench --roofline` and `textseg bench --reference monai` on tiny inputs (CPU; no timing assertions)."""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest
import torch

from conftest import run_cli
from textseg_cli.bench.benchmark import method_config
from textseg_cli.bench.monai_ref import compare_metrics, compare_sliding, monai_overlap, synthetic_pairs
from textseg_cli.bench.roofline import PHASES, roofline_precisions
from textseg_cli.errors import ConfigError
from textseg_cli.methods.registry import build_method
from textseg_cli.runtime.precision import resolve_precision

TINY = ("--method", "mcnet", "--patch", "16,16,16", "--batch", "1+1", "--iterations", "1", "--repeats", "1",
        "--device", "cpu", "--set", "method.backbone.n_filters=4")


def test_roofline_report_structure(tmp_path, one_thread):
    out = tmp_path / "roofline.json"
    code, text = run_cli("bench", "--roofline", *TINY, "--volume", "20,20,16", "--stride", "8,8,8",
                         "--precision", "fp32,bf16", "--gemm-size", "64", "--out", out)
    assert code == 0, text
    assert "forward" in text and "of peak" in text and "sliding window" in text
    report = json.loads(out.read_text(encoding="utf-8"))
    for key in ("method", "patch", "batch", "volume", "stride", "steps", "repeats", "gemm_size", "device",
                "device_name", "threads", "torch", "convs", "peaks", "results"):
        assert key in report, key
    # the network's bounding convolutions: the widest is the 16·n_filters bottleneck, at 1/16 of the patch
    widest = report["convs"]["conv_widest"]
    assert widest["in_channels"] == widest["out_channels"] == 64 and widest["input"][2:] == [1, 1, 1]
    assert report["convs"]["conv_heaviest"]["flops"] >= widest["flops"]
    assert set(report["peaks"]) == {"fp32", "bf16"}
    for entry in report["peaks"].values():
        assert set(entry["kernels"]) == {"gemm", "conv_widest", "conv_heaviest"}
        assert entry["peak_flops_per_s"] == max(k["flops_per_s"] for k in entry["kernels"].values()) > 0
        assert entry["kernels"]["gemm"]["flops"] == 2 * 64 ** 3
    assert [r["precision"] for r in report["results"]] == ["fp32", "bf16"]
    for row in report["results"]:
        phases = row["train"]["phases"]
        assert tuple(phases) == PHASES
        assert all(ph["s"] >= 0 for ph in phases.values())
        assert sum(ph["share_of_step"] for ph in phases.values()) == pytest.approx(1.0, rel=0.05)
        fwd, bwd = phases["forward"]["flops"], phases["backward"]["flops"]
        assert fwd > 0
        # backward = gradients w.r.t. inputs and weights of every conv (2x the forward), less the first conv's
        # input gradient (the image needs none)
        assert 1.5 * fwd < bwd <= 2 * fwd
        assert phases["data"]["flops"] == phases["optimizer"]["flops"] == 0  # elementwise: FlopCounterMode counts 0
        assert phases["loss"]["flops"] == 0  # MC-Net's loss: softmax, Dice, MSE — no matrix products
        # a phase's achieved FLOP/s over a measured peak: positive, and not several times the best kernel measured
        for name in ("forward", "backward"):
            assert 0 < phases[name]["fraction_of_peak"] < 5
        assert phases["loss"]["fraction_of_peak"] is None
        assert row["train"]["step_flops"] == fwd + bwd
        assert 0 < row["train"]["fraction_of_peak"] < 5
        assert row["sliding"]["flops"] > 0 and 0 < row["sliding"]["fraction_of_peak"] < 5
    assert row["precision_detail"]["channels_last"] is True and row["train"]["channels_last"] is True


def test_roofline_precisions_follow_the_cpu(monkeypatch):
    cpu = torch.device("cpu")
    monkeypatch.setenv("TEXTSEG_CPU_BF16", "0")
    assert [p.name for p in roofline_precisions("auto", cpu)] == ["fp32"]
    monkeypatch.setenv("TEXTSEG_CPU_BF16", "1")
    assert [p.name for p in roofline_precisions("auto", cpu)] == ["fp32", "bf16"]
    assert [p.name for p in roofline_precisions("bf16", cpu)] == ["bf16"]
    with pytest.raises(ConfigError, match="--precision"):
        roofline_precisions("fp16", cpu)


def test_reference_monai_without_monai_exits_2(monkeypatch):
    monkeypatch.setitem(sys.modules, "monai", None)  # `import monai` raises ImportError
    code, text = run_cli("bench", "--reference", "monai", *TINY)
    assert code == 2 and "pip install" in text and "[monai]" in text
    assert len(text.strip().splitlines()) == 1


def test_reference_argument_needs_reference_flag():
    code, text = run_cli("bench", "monai", *TINY)
    assert code == 2 and "--reference monai" in text
    code, text = run_cli("bench", "--reference", "nnunet", *TINY)
    assert code == 2 and "--reference monai" in text


def test_monai_overlap_gives_textseg_stride():
    pytest.importorskip("monai")
    from monai.inferers.utils import _get_scan_interval

    for patch, stride, size in (((112, 112, 80), (18, 18, 4), (140, 140, 88)), ((96, 96, 96), (16, 16, 16),
                                                                               (120, 120, 120)),
                                ((16, 16, 16), (8, 3, 16), (24, 20, 16))):
        ov = monai_overlap(patch, stride)
        assert tuple(_get_scan_interval(size, patch, len(patch), ov)) == stride
    with pytest.raises(ConfigError, match="gaps"):
        monai_overlap((16, 16), (20, 8))


def test_monai_sliding_window_agrees_in_constant_mode(one_thread):
    """Same network, same windows: MONAI's constant-mode loop around textseg's per-window predictor returns
    textseg's probabilities. Both place windows by the same rule, pad the short z axis (13 < 16) with the odd
    voxel high and average with a count map, adding windows in the same order, so the fp32 results are expected
    bit-equal; 1e-6 (8 float32 ulps of a probability <= 1) leaves room for a MONAI release that sums in another
    order. MONAI around the plain network differs only by the BatchNorm folding textseg applies (rounding of
    the folded weights, float32): 1e-4."""
    pytest.importorskip("monai")

    patch, stride = (16, 16, 16), (8, 8, 8)
    cfg = method_config("mcnet", patch, ["method.backbone.n_filters=4"])
    torch.manual_seed(0)
    m = build_method("mcnet", cfg, 1, 2, dim=3, quiet_warnings=True)
    image = torch.rand((1, 24, 20, 13), generator=torch.Generator().manual_seed(1))
    out = compare_sliding(m, image, patch, stride, 2, [resolve_precision("fp32", "cpu")], torch.device("cpu"), 1)
    r = out["by_precision"]["fp32"]
    assert out["mode"] == "constant" and r["textseg_s"] > 0 and r["monai_same_s"] > 0
    assert r["max_abs_diff"] <= 1e-6 and r["mask_disagreement"] == 0.0
    assert out["monai_plain_fp32"]["max_abs_diff_vs_textseg_fp32"] <= 1e-4


def test_monai_metrics_compare(one_thread):
    """Dice equals MONAI's up to float32; HD95 differs by definition (pooled vs max of directed percentiles), and
    textseg's own surface distances reduced MONAI's way give MONAI's value."""
    pytest.importorskip("monai")

    pairs = synthetic_pairs(2, (24, 20, 12))
    assert all(p.any() and r.any() for p, r in pairs)
    out = compare_metrics(pairs, (0.8, 0.8, 2.0), 1)
    assert out["dice_max_abs_diff"] < 1e-6
    assert out["hd95_max_directed_vs_monai_max_abs_diff"] < 1e-4
    assert all(c["hd95_monai"] >= c["hd95_textseg"] - 1e-4 for c in out["per_case"])  # max of the two >= pooled
    assert np.isfinite(out["monai_over_textseg"]) and out["textseg_s"] > 0
