"""Shared semi-supervised pieces (textseg_cli.methods.ssl_common), checked on hand-made cases."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn as nn

from textseg_cli.methods import ssl_common as sc


def _const_net(value: float) -> nn.Module:
    net = nn.Sequential(nn.Conv3d(1, 1, 1), nn.BatchNorm3d(1))
    with torch.no_grad():
        for p in net.parameters():
            p.fill_(value)
    return net


def test_ema_update_decay_and_warm_start():
    teacher, student = _const_net(1.0), _const_net(3.0)
    student[1].running_mean.fill_(7.0)
    assert sc.ema_update(teacher, student, 0.99) == pytest.approx(0.99)
    for p in teacher.parameters():
        assert torch.allclose(p, torch.full_like(p, 0.99 * 1 + 0.01 * 3))
    # buffers are the teacher's own (not averaged)
    assert float(teacher[1].running_mean) == 0.0

    teacher = _const_net(1.0)
    assert sc.ema_update(teacher, student, 0.99, iteration=0) == 0.0  # first step: a copy
    assert all(torch.allclose(p, torch.full_like(p, 3.0)) for p in teacher.parameters())
    teacher = _const_net(1.0)
    assert sc.ema_update(teacher, student, 0.99, iteration=9) == pytest.approx(0.9)  # min(1 - 1/10, 0.99)
    assert all(torch.allclose(p, torch.full_like(p, 0.9 * 1 + 0.1 * 3)) for p in teacher.parameters())


def test_make_teacher_and_copy_weights():
    student = _const_net(2.0)
    teacher = sc.make_teacher(student)
    assert all(not p.requires_grad for p in teacher.parameters())
    assert all(p.requires_grad for p in student.parameters())
    other = _const_net(5.0)
    other[1].running_var.fill_(4.0)
    sc.copy_weights(teacher, other)
    assert all(torch.allclose(p, torch.full_like(p, 5.0)) for p in teacher.parameters())
    assert float(teacher[1].running_var) == 4.0


def test_cuboid_mask_size_and_positions():
    gen = torch.Generator().manual_seed(0)
    starts = set()
    for _ in range(200):
        m = sc.cuboid_mask((6, 6, 3), ratio=2 / 3, generator=gen)
        assert m.shape == (6, 6, 3) and m.dtype == torch.long
        zeros = (m == 0).nonzero()
        assert len(zeros) == 4 * 4 * 2  # int(6·2/3)=4, int(3·2/3)=2
        lo, hi = zeros.min(0).values, zeros.max(0).values
        assert (hi - lo + 1).tolist() == [4, 4, 2]  # one solid box
        starts.add(tuple(lo.tolist()))
    # corners 0..d-s-1 as BCP's context_mask (randint(0, d - s) excludes d - s): 2 × 2 × 1 positions
    assert starts == {(x, y, 0) for x in range(2) for y in range(2)}
    m = sc.cuboid_mask((8, 8, 8), size=(8, 2, 3), generator=gen)
    assert int((m == 0).sum()) == 8 * 2 * 3


def test_mix_keeps_a_outside_and_b_inside():
    mask = torch.tensor([[1, 0], [0, 1]])
    a = torch.full((2, 1, 2, 2), 1.0)
    b = torch.full((2, 1, 2, 2), 5.0)
    assert torch.equal(sc.mix(a, b, mask)[0, 0], torch.tensor([[1.0, 5.0], [5.0, 1.0]]))
    la, lb = torch.ones(1, 2, 2, dtype=torch.long), torch.full((1, 2, 2), 2, dtype=torch.long)
    out = sc.mix(la, lb, mask)
    assert out.dtype == torch.long and out[0].tolist() == [[1, 2], [2, 1]]


def test_normalized_sdf_line_by_hand():
    # foreground voxels 2..4 on a 7-voxel line: inside −posdis/2, outside +negdis/2, inner boundary 0
    lab = np.zeros((1, 1, 1, 7), dtype=np.uint8)
    lab[0, 0, 0, 2:5] = 1
    sdf = sc.normalized_sdf(lab)
    assert sdf.dtype == np.float32
    assert np.allclose(sdf[0, 0, 0], [1.0, 0.5, 0.0, -1.0, 0.0, 0.5, 1.0])
    # empty → zeros; full → no NaN (no outside)
    assert not sc.normalized_sdf(np.zeros((2, 3, 3, 3))).any()
    full = sc.normalized_sdf(np.ones((1, 3, 3, 3)))
    assert np.isfinite(full).all() and full.max() == 0.0
    # torch input works the same
    assert np.allclose(sc.normalized_sdf(torch.from_numpy(lab)), sdf)


def test_entropy_of_mean_is_ln2_for_disagreeing_passes():
    p1 = torch.tensor([1.0, 0.0]).view(1, 2, 1, 1, 1)
    p2 = torch.tensor([0.0, 1.0]).view(1, 2, 1, 1, 1)
    u = sc.entropy_of_mean([p1, p2])
    assert u.shape == (1, 1, 1, 1, 1)
    assert float(u) == pytest.approx(math.log(2), abs=1e-5)
    assert float(sc.entropy_of_mean(torch.stack([p1, p1]))) == pytest.approx(0.0, abs=1e-5)


def test_noisy_is_clipped():
    x = torch.zeros(10000)
    d = sc.noisy(x, std=1.0, clip=0.2)
    assert d.abs().max() <= 0.2 + 1e-7 and d.std() > 0.1


def test_threshold_pseudo_label_and_lcc():
    fg = torch.tensor([0.4, 0.5, 0.7, 0.1, 0.9, 0.2, 0.2]).view(1, 1, 1, 7)
    probs = torch.cat([1 - fg, fg], dim=1)
    assert sc.threshold_pseudo_label(probs)[0, 0].tolist() == [0, 1, 1, 0, 1, 0, 0]
    # largest connected component keeps the 2-voxel run, drops the single voxel
    assert sc.threshold_pseudo_label(probs, lcc=True)[0, 0].tolist() == [0, 1, 1, 0, 0, 0, 0]
    # three classes: argmax where confident, background elsewhere
    p3 = torch.tensor([[0.2, 0.7, 0.1], [0.3, 0.3, 0.4]]).T.reshape(1, 3, 1, 2)
    assert sc.threshold_pseudo_label(p3, threshold=0.5)[0, 0].tolist() == [1, 0]


def test_sharpen_softmax_two_classes_by_hand():
    p = torch.tensor([0.8, 0.2]).view(1, 2, 1)
    s = sc.sharpen_softmax(p, 0.5)  # p²/(p²+q²)
    assert float(s[0, 1, 0]) == pytest.approx(0.04 / 0.68, rel=1e-5)
    assert float(s.sum()) == pytest.approx(1.0)
    tiny = sc.sharpen_softmax(torch.tensor([0.51, 0.49]).view(1, 2, 1), 0.01)
    assert torch.isfinite(tiny).all() and float(tiny[0, 0, 0]) > 0.98


def test_masked_mean():
    v = torch.tensor([1.0, 2.0, 3.0, 4.0])
    assert float(sc.masked_mean(v, torch.tensor([1, 0, 1, 0]))) == pytest.approx(2.0)
    assert float(sc.masked_mean(v, torch.zeros(4))) == 0.0
