"""Each semi-supervised method's loss on a tiny hand-made case; expected values are worked out by hand
(in comments) from the published formulas, not by calling the code under test."""

from __future__ import annotations

import math

import pytest
import torch

from textseg_cli.methods.bcp import masked_dice_loss, mix_loss
from textseg_cli.methods.cps import cps_losses
from textseg_cli.methods.dtc import dtc_losses
from textseg_cli.methods.mcf import disagreement_mse, mcf_consistency
from textseg_cli.methods.mlrp import reliability, reliable_cross_supervision
from textseg_cli.methods.uamt import supervised_ce_dice, uamt_consistency
from textseg_cli.methods.urpc import pyramid_consistency

LN3 = math.log(3.0)
S = 1e-5  # smooth of the Dice losses


def vox(*pairs: tuple[float, float]) -> torch.Tensor:
    """(1, 2, 1, 1, N) tensor from per-voxel (class 0, class 1) pairs."""
    return torch.tensor(pairs, dtype=torch.float32).T.reshape(1, 2, 1, 1, len(pairs))


def test_uamt_supervised_and_masked_consistency():
    # logits [0, ln3] → p = (.25, .75); [0, 0] → (.5, .5)
    logits = vox((0.0, LN3), (0.0, 0.0))
    labels = torch.tensor([1, 0]).reshape(1, 1, 1, 2)
    ce, dice = supervised_ce_dice(logits, labels)
    assert float(ce) == pytest.approx((math.log(4 / 3) + math.log(2)) / 2, rel=1e-5)
    # foreground dice, squared denominators: p1 = (.75, .5), t = (1, 0)
    assert float(dice) == pytest.approx(1 - (2 * 0.75 + S) / (0.75 ** 2 + 0.5 ** 2 + 1 + S), rel=1e-5)

    student = vox((0.0, 0.0), (0.0, LN3))  # (.5, .5), (.25, .75)
    teacher = vox((0.0, LN3), (0.0, 0.0))  # (.25, .75), (.5, .5)
    unc = torch.tensor([0.1, 0.9]).reshape(1, 1, 1, 1, 2)
    cons, mask = uamt_consistency(student, teacher, unc, threshold=0.5)
    # only voxel 1 is certain: Σ_c (.25)² = .125, divided by K·Σm = 2
    assert mask.flatten().tolist() == [1.0, 0.0]
    assert float(cons) == pytest.approx(0.125 / 2, rel=1e-5)


def test_dtc_terms_on_a_line():
    labels = torch.tensor([0, 0, 1, 1, 1, 0, 0]).reshape(1, 1, 1, 7)
    seg = torch.zeros(1, 1, 1, 1, 7)  # σ = 0.5 everywhere
    parts = dtc_losses(seg, torch.zeros(1, 1, 1, 1, 7), labels, n_labeled=1, num_classes=2)
    assert float(parts["dice"]) == pytest.approx(1 - (2 * 1.5 + S) / (7 * 0.25 + 3 + S), rel=1e-5)
    assert float(parts["ce"]) == pytest.approx(math.log(2), rel=1e-5)
    # normalised SDF of the line: (1, .5, 0, -1, 0, .5, 1) → mean square 3.5 / 7
    assert float(parts["sdf"]) == pytest.approx(0.5, rel=1e-5)
    assert float(parts["consistency"]) == pytest.approx(0.0, abs=1e-7)  # σ(-1500·0) = σ(0)
    s = torch.full((1, 1, 1, 1, 7), 0.001)  # σ(-1.5) against 0.5
    parts = dtc_losses(seg, s, labels, n_labeled=1, num_classes=2)
    assert float(parts["consistency"]) == pytest.approx((1 / (1 + math.exp(1.5)) - 0.5) ** 2, rel=1e-4)


def test_urpc_rectified_pyramid_consistency():
    # voxel 1: scales (.5, .5) and (.9, .1), mean (.7, .3); voxel 2: both (.5, .5) (no disagreement)
    p1 = vox((0.5, 0.5), (0.5, 0.5))
    p2 = vox((0.9, 0.1), (0.5, 0.5))
    kl1 = 0.7 * math.log(0.7 / 0.5) + 0.3 * math.log(0.3 / 0.5)
    kl2 = 0.7 * math.log(0.7 / 0.9) + 0.3 * math.log(0.3 / 0.1)
    expected = 0.0
    for kl in (kl1, kl2):
        w = math.exp(-kl)  # voxel 2 has KL 0, weight 1
        rectified = (2 * 0.04 * w / 4) / ((w + 1) / 2)  # mean over 2 voxels × 2 classes / mean weight
        expected += rectified + kl / 2
    assert float(pyramid_consistency([p1, p2])) == pytest.approx(expected / 2, rel=1e-5)


def test_mcf_consistency_and_disagreement():
    probs = vox((0.6, 0.4))
    pseudo = vox((0.8 ** 2 / 0.68, 0.2 ** 2 / 0.68))  # sharpened (.8, .2) with T = 0.5
    a, b = 0.8 ** 2 / 0.68, 0.2 ** 2 / 0.68
    plain = ((0.6 - a) ** 2 + (0.4 - b) ** 2) / 2
    assert float(mcf_consistency(probs, pseudo, double_softmax=False)) == pytest.approx(plain, rel=1e-5)
    s1 = 1 / (1 + math.exp(-0.2))  # softmax(.6, .4)
    t1 = 1 / (1 + math.exp(-(a - b)))
    assert float(mcf_consistency(probs, pseudo, double_softmax=True)) == pytest.approx((s1 - t1) ** 2, rel=1e-5)

    fg = torch.tensor([0.8, 0.3, 0.6])
    p = torch.stack([1 - fg, fg]).reshape(1, 2, 1, 1, 3)
    labels = torch.tensor([1, 0, 0]).reshape(1, 1, 1, 3)
    disagree = torch.tensor([True, False, True]).reshape(1, 1, 1, 3)
    assert float(disagreement_mse(p, labels, disagree)) == pytest.approx((0.2 ** 2 + 0.6 ** 2) / 2, rel=1e-5)


def test_bcp_masked_dice_and_mix_loss():
    logits = vox((0.0, 0.0), (0.0, LN3))  # p = (.5, .5), (.25, .75)
    ones = torch.ones(1, 1, 1, 2, dtype=torch.long)
    zeros = torch.zeros(1, 1, 1, 2, dtype=torch.long)
    mask = torch.tensor([1, 0]).reshape(1, 1, 2)  # voxel 1 outside the cuboid, voxel 2 inside
    # outside region (voxel 1, label 1): class 0 dice 1e-5/(.5+1e-5), class 1 (1+1e-5)/(1.5+1e-5)
    d_out = 1 - (S / (0.5 + S) + (1 + S) / (1.5 + S)) / 2
    assert float(masked_dice_loss(logits, ones, mask)) == pytest.approx(d_out, rel=1e-5)
    # inside region (voxel 2, label 0): class 0 (.5+1e-5)/(1.25+1e-5), class 1 1e-5/(.75+1e-5)
    d_in = 1 - ((0.5 + S) / (1.25 + S) + S / (0.75 + S)) / 2
    expected = (1.0 * d_out + 0.5 * d_in + 1.0 * math.log(2) + 0.5 * math.log(4)) / 2
    assert float(mix_loss(logits, ones, zeros, mask, 1.0, 0.5)) == pytest.approx(expected, rel=1e-5)
    # without a mask: per-class Dice over both voxels, label 1 everywhere
    full = 1 - (S / (0.75 + S) + (2 * 1.25 + S) / (1.25 + 2 + S)) / 2
    assert float(masked_dice_loss(logits, ones)) == pytest.approx(full, rel=1e-5)


def test_mlrp_reliability_and_cross_supervision():
    teacher = torch.tensor([[0.8, 0.3], [0.2, 0.7]]).reshape(1, 2, 1, 1, 2)  # argmax (0, 1)
    feat = torch.tensor([[1.0, 0.0], [0.0, 1.0]]).reshape(1, 2, 1, 1, 2)  # f1 = (1, 0), f2 = (0, 1)
    # prototypes (1, 0) and (0, 1): cosine maps (1, 0) and (0, 1);
    # r1 = 1 - mean((1-.8)², (0-.2)²) = .96, r2 = 1 - mean((0-.3)², (1-.7)²) = .91
    r = reliability(teacher, feat)
    assert r.flatten().tolist() == pytest.approx([0.96, 0.91], rel=1e-5)
    student = vox((0.6, 0.4), (0.1, 0.9))  # voxel 1 less certain than the teacher, voxel 2 more certain
    ce_probs = math.log(1 + math.exp(-0.2))  # CE of the probabilities (.6, .4) taken as logits, target 0
    loss = reliable_cross_supervision(student, None, teacher, feat, ce_on_probabilities=True)
    assert float(loss) == pytest.approx(ce_probs * 0.96 / (1 + 1e-6), rel=1e-5)
    loss = reliable_cross_supervision(student, torch.log(student), teacher, feat, ce_on_probabilities=False)
    assert float(loss) == pytest.approx(-math.log(0.6) * 0.96 / (1 + 1e-6), rel=1e-5)


def test_cps_supervised_and_cross_pseudo_terms():
    # sample 0 labeled (label 1), sample 1 unlabeled; one voxel each
    l1 = torch.tensor([[0.0, LN3], [LN3, 0.0]]).reshape(2, 2, 1, 1, 1)  # argmax on sample 1: 0
    l2 = torch.tensor([[0.0, 0.0], [0.0, LN3]]).reshape(2, 2, 1, 1, 1)  # argmax on sample 1: 1
    labels = torch.ones(1, 1, 1, 1, dtype=torch.long)
    sup1, sup2, ps1, ps2 = cps_losses(l1, l2, labels, n_labeled=1)
    dice1 = ((1 - S / (0.0625 + S)) + (1 - (1.5 + S) / (0.5625 + 1 + S))) / 2  # p = (.25, .75), t = (0, 1)
    assert float(sup1) == pytest.approx(0.5 * (math.log(4 / 3) + dice1), rel=1e-5)
    dice2 = ((1 - S / (0.25 + S)) + (1 - (1 + S) / (0.25 + 1 + S))) / 2  # p = (.5, .5)
    assert float(sup2) == pytest.approx(0.5 * (math.log(2) + dice2), rel=1e-5)
    assert float(ps1) == pytest.approx(math.log(4), rel=1e-5)  # (ln3, 0) against class 1: -ln .25
    assert float(ps2) == pytest.approx(math.log(4), rel=1e-5)  # (0, ln3) against class 0
