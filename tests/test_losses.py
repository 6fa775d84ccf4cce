import math

import pytest
import torch

from textseg_cli.methods.losses import ce_dice_loss, consistency_weight, dice_loss, mse, one_hot, sharpen, sigmoid_rampup, softmax_mse


def _two_class(p_fg):
    p = torch.tensor(p_fg, dtype=torch.float32).view(1, 1, -1)
    return torch.cat([1 - p, p], dim=1)  # (1, 2, N)


def test_dice_loss_hand_computed():
    probs = _two_class([0.8, 0.6, 0.1, 0.0])
    labels = torch.tensor([[1, 0, 1, 0]])
    # foreground: Σp·t = 0.8 + 0.1 = 0.9; Σp = 1.5; Σt = 2 → 1 - 1.8 / 3.5
    assert dice_loss(probs, labels, smooth=0.0).item() == pytest.approx(1 - 1.8 / 3.5)
    # squared: Σp² = 0.64 + 0.36 + 0.01 = 1.01 → 1 - 1.8 / 3.01
    assert dice_loss(probs, labels, smooth=0.0, squared=True).item() == pytest.approx(1 - 1.8 / 3.01)
    # background too: Σp·t = 0.4 + 1.0 = 1.4; Σp = 2.5; Σt = 2 → mean of the two classes
    both = dice_loss(probs, labels, smooth=0.0, include_background=True, reduction="none")
    assert both.tolist() == pytest.approx([1 - 2.8 / 4.5, 1 - 1.8 / 3.5])
    # one-hot targets give the same value as indices
    assert dice_loss(probs, one_hot(labels, 2), smooth=0.0).item() == pytest.approx(1 - 1.8 / 3.5)


def test_dice_loss_sums_over_the_batch():
    probs = torch.cat([_two_class([1.0, 0.0]), _two_class([0.0, 0.0])])  # sample 2 predicts nothing
    labels = torch.tensor([[1, 0], [1, 0]])
    # batch sums: Σp·t = 1, Σp = 1, Σt = 2 → 1 - 2/3 (a per-sample mean would give 0.5)
    assert dice_loss(probs, labels, smooth=0.0).item() == pytest.approx(1 / 3)


def test_ce_dice_loss_combines_terms():
    logits = torch.tensor([[[2.0, -1.0], [0.0, 1.0]]])  # (1, K=2, N=2)
    labels = torch.tensor([[0, 1]])
    total, ce, dice = ce_dice_loss(logits, labels, ce_weight=0.5, dice_weight=0.5, smooth=0.0)
    p = torch.softmax(logits, 1)
    expected_ce = -(math.log(p[0, 0, 0].item()) + math.log(p[0, 1, 1].item())) / 2
    assert ce.item() == pytest.approx(expected_ce, rel=1e-6)
    pf = p[0, 1]
    expected_dice = 1 - 2 * pf[1].item() / (pf.sum().item() + 1)
    assert dice.item() == pytest.approx(expected_dice, rel=1e-6)
    assert total.item() == pytest.approx(0.5 * expected_ce + 0.5 * expected_dice, rel=1e-6)


def test_sharpen_hand_computed():
    p = torch.tensor([0.5, 0.6, 0.9, 0.0, 1.0])
    s = sharpen(p, 0.5)  # T = 0.5 → p² / (p² + (1-p)²)
    assert s.tolist() == pytest.approx([0.5, 0.36 / (0.36 + 0.16), 0.81 / 0.82, 0.0, 1.0])
    s01 = sharpen(torch.tensor([0.6]), 0.1)
    assert s01.item() == pytest.approx(0.6 ** 10 / (0.6 ** 10 + 0.4 ** 10))


def test_mse_and_softmax_mse():
    assert mse(torch.tensor([1.0, 3.0]), torch.tensor([0.0, 1.0])).item() == pytest.approx(2.5)
    a = torch.tensor([[0.0, 0.0]]).T[None]  # (1, 2, 1): uniform softmax
    b = torch.tensor([[math.log(3.0), 0.0]]).T[None]  # softmax = (0.75, 0.25)
    assert softmax_mse(a, b).item() == pytest.approx(0.0625)


def test_rampup_and_consistency_weight():
    assert sigmoid_rampup(0, 40) == pytest.approx(math.exp(-5))
    assert sigmoid_rampup(20, 40) == pytest.approx(math.exp(-1.25))
    assert sigmoid_rampup(40, 40) == 1.0 and sigmoid_rampup(100, 40) == 1.0
    assert sigmoid_rampup(5, 0) == 1.0
    # the field's convention: ramp on iteration // 150
    assert consistency_weight(149, 1.0, 40) == pytest.approx(math.exp(-5))
    assert consistency_weight(150, 1.0, 40) == pytest.approx(math.exp(-5 * (1 - 1 / 40) ** 2))
    assert consistency_weight(3000, 0.1, 40) == pytest.approx(0.1 * math.exp(-1.25))
    assert consistency_weight(6000, 2.0, 40) == 2.0
