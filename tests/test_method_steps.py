"""Value-level step tests of the baselines' loss weights and thresholds (issue 20; values from issue 13's
official scripts, file:line below). Each builds the method twice — from its packaged LA config and from the code
defaults alone — runs one `training_step` at a chosen iteration and compares the logged weight, threshold and
total with a hand computation. A changed constant (e.g. UA-MT's 0.1 → 1.0) or a shifted ramp index fails here.
Networks run in eval mode so that a second forward pass reproduces the step's outputs exactly."""

from __future__ import annotations

import math

import pytest
import torch

from textseg_cli.runs.config import build_config
from textseg_cli.data.batch import Batch
from textseg_cli.methods.base import StepContext
from textseg_cli.methods.registry import build_method
from textseg_cli.methods.mlrp import reliable_cross_supervision
from textseg_cli.methods.ssl_common import sharpen_softmax

PATCH = [16, 16, 16]


def ramp(t: float, length: float) -> float:
    """exp(-5 (1 - t/L)^2), the Gaussian ramp of every script's ramps.sigmoid_rampup."""
    t = min(max(t, 0.0), length)
    return math.exp(-5.0 * (1.0 - t / length) ** 2)


def _method(name: str, source: str, iterations: int = 6000, patch=PATCH):
    if source == "config":
        cfg = build_config(name, "la", 3, list(patch), sets=["method.backbone.n_filters=4", f"train.iterations={iterations}"])
    else:  # the code's own defaults (no packaged values), which must equal the published ones too
        cfg = {"method": {"backbone": {"n_filters": 4}}, "train": {"iterations": iterations}}
    torch.manual_seed(0)
    m = build_method(name, cfg, 1, 2, dim=3).eval()
    return m


def _batch(bl: int = 2, bu: int = 2, patch=PATCH) -> Batch:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(bl + bu, 1, *patch, generator=g)
    y = torch.zeros(bl, *patch, dtype=torch.long)
    y[:, 4:12, 5:11, 3:13] = 1
    return Batch(x[:bl], y, x[bl:])


def _step(m, it: int, total: int = 6000, batch: Batch | None = None):
    with torch.no_grad():
        return m.training_step(batch or _batch(), StepContext(it, total, torch.device("cpu")))


SOURCES = ["config", "code"]


@pytest.mark.parametrize("source", SOURCES)
def test_uamt_weight_threshold_and_total(source):
    # UA-MT train_LA_meanteacher_certainty_unlabel.py:38-39 (0.1, 40), :171 (iter//150), :173 (threshold)
    m = _method("uamt", source)
    it = 3000
    out = _step(m, it)
    w = 0.1 * ramp(it // 150, 40)
    assert float(out["consistency_weight"]) == pytest.approx(w, rel=1e-6)
    thr = (0.75 + 0.25 * ramp(it, 6000)) * math.log(2)
    assert float(out["uncertainty_threshold"]) == pytest.approx(thr, rel=1e-6)
    total = 0.5 * (out["loss_ce"] + out["loss_dice"]) + w * out["loss_consistency"]
    assert float(out["loss"]) == pytest.approx(float(total), rel=1e-5)


@pytest.mark.parametrize("source", SOURCES)
def test_dtc_weight_and_total(source):
    # DTC train_la_dtc.py: consistency 1.0, rampup 40 (:60-63), iter//150 (:189), beta 0.3, CE not optimised
    m = _method("dtc", source)
    out = _step(m, 3000)
    w = 1.0 * ramp(20, 40)
    assert float(out["consistency_weight"]) == pytest.approx(w, rel=1e-6)
    total = out["loss_dice"] + 0.3 * out["loss_sdf"] + w * out["loss_consistency"]
    assert float(out["loss"]) == pytest.approx(float(total), rel=1e-5)


@pytest.mark.parametrize("source", SOURCES)
def test_urpc_weight_and_total(source):
    # SSL4MIS train_uncertainty_rectified_pyramid_consistency_3D.py: 0.1 (:61), rampup 400 (:63; LA profile 40)
    m = _method("urpc", source, patch=[32, 32, 32])  # instance norm needs > 1 voxel at the bottleneck
    out = _step(m, 3000, batch=_batch(patch=[32, 32, 32]))
    length = 40 if source == "config" else 400
    w = 0.1 * ramp(3000 // 150, length)
    assert float(out["consistency_weight"]) == pytest.approx(w, rel=1e-6)
    total = (out["loss_ce"] + out["loss_dice"]) / 2 + w * out["loss_consistency"]
    assert float(out["loss"]) == pytest.approx(float(total), rel=1e-5)


@pytest.mark.parametrize("source", SOURCES)
def test_cps_weight_and_total(source):
    # SSL4MIS train_cross_pseudo_supervision_3D.py: 0.1 (:60), rampup 200 (:62; LA profile 40), iter//150 (:159)
    m = _method("cps", source)
    out = _step(m, 3000)
    length = 40 if source == "config" else 200
    w = 0.1 * ramp(20, length)
    assert float(out["consistency_weight"]) == pytest.approx(w, rel=1e-6)
    total = out["loss_sup1"] + out["loss_sup2"] + w * (out["loss_cps1"] + out["loss_cps2"])
    assert float(out["loss"]) == pytest.approx(float(total), rel=1e-5)


@pytest.mark.parametrize("source", SOURCES)
def test_mcnet_weight_uses_the_incremented_step(source):
    # MC-Net train_mcnet_3d.py:160-161: iter_num += 1 before the weight; at 0-based 2999 the ramp index is 20
    m = _method("mcnet", source, 15000)
    out = _step(m, 2999)
    w = 1.0 * ramp(20, 40)
    assert float(out["consistency_weight"]) == pytest.approx(w, rel=1e-6)
    assert float(out["loss"]) == pytest.approx(float(0.5 * out["loss_dice"] + w * out["loss_consistency"]), rel=1e-5)


@pytest.mark.parametrize("source", SOURCES)
def test_mcf_weight_and_plain_mse_consistency(source):
    # MCF train_MCF.py: weight 0.1 · ramp(iter//150, 40) (:206), softmax_mse_loss without softmax
    # (utils/losses.py:65-68), sum / (b·c·w·h·d) (:209-210), pseudo-label p^(1/T)/Σ (:192-199, T = 0.1)
    m = _method("mcf", source)
    batch = _batch()
    out = _step(m, 3000, batch=batch)
    w = 0.1 * ramp(20, 40)
    assert float(out["consistency_weight"]) == pytest.approx(w, rel=1e-6)
    with torch.no_grad():
        x = torch.cat([batch.image_l, batch.image_u])
        pv, pr = torch.softmax(m.vnet(x), 1), torch.softmax(m.resnet(x), 1)
    good, other = (pr, pv) if bool(out["good_student_is_resnet"]) else (pv, pr)
    p = good[2:] ** 10
    expected = ((other[2:] - p / p.sum(1, keepdim=True)) ** 2).mean()
    assert float(out["loss_consistency"]) == pytest.approx(float(expected), rel=1e-4)


@pytest.mark.parametrize("source", SOURCES)
def test_mlrp_weight_and_logit_cross_entropy(source):
    # MLRP train_Mutual_Reliable.py:43-44 (1.0, 40), :200-201 (iter += 1, then //150), :197 CE on the logits
    m = _method("mlrp", source, 15000)
    batch = _batch()
    out = _step(m, 2999, batch=batch)
    w = 1.0 * ramp(20, 40)
    assert float(out["consistency_weight"]) == pytest.approx(w, rel=1e-6)
    assert float(out["loss"]) == pytest.approx(float(0.5 * out["loss_dice"] + w * out["loss_consistency"]), rel=1e-5)
    with torch.no_grad():
        logits, feats = m._forward(torch.cat([batch.image_l, batch.image_u]))
        probs = [torch.softmax(z, 1) for z in logits]
        on_logits = sum(reliable_cross_supervision(probs[i], logits[i], probs[j], feats[j], ce_on_probabilities=False)
                        for i, j in ((0, 1), (1, 0)))
        on_probs = sum(reliable_cross_supervision(probs[i], logits[i], probs[j], feats[j], ce_on_probabilities=True)
                       for i, j in ((0, 1), (1, 0)))
    assert float(out["loss_consistency"]) == pytest.approx(float(on_logits), rel=1e-5)
    assert abs(float(on_logits) - float(on_probs)) > 1e-3  # the two readings differ on this batch


def test_sharpen_matches_the_mcf_pseudo_label_formula():
    p = torch.softmax(torch.randn(2, 2, 3, 3, 3), 1)
    q = p ** 10
    assert torch.allclose(sharpen_softmax(p, 0.1), q / q.sum(1, keepdim=True), atol=1e-6)
