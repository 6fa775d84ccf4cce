"""The 2D U-Net baseline: shapes, odd sizes, published parameter count, registry."""

from __future__ import annotations

import torch

from textseg_cli.models import build_model, count_parameters
from textseg_cli.models.unet2d import UNet2D


def test_shapes_both_up_modes_and_odd_sizes():
    for bilinear in (True, False):
        net = build_model("unet2d", in_channels=3, num_classes=2, base=4, bilinear=bilinear)
        assert isinstance(net, UNet2D)
        for hw in ((32, 32), (37, 45)):
            y = net(torch.randn(2, 3, *hw))
            assert y.shape == (2, 2, *hw)


def test_published_width_parameter_counts():
    # The widely used U-Net (64..1024): 17.26 M with bilinear up (bottleneck 512), 31.04 M with transposed convs.
    assert abs(count_parameters(UNet2D(3, 1, base=64, bilinear=True)) / 1e6 - 17.26) < 0.01
    assert abs(count_parameters(UNet2D(3, 1, base=64, bilinear=False)) / 1e6 - 31.04) < 0.01


def test_learns_a_trivial_mask():
    torch.manual_seed(0)
    net = UNet2D(1, 2, base=4)
    x = torch.rand(4, 1, 16, 16)
    y = (x[:, 0] > 0.5).long()
    opt = torch.optim.Adam(net.parameters(), 1e-2)
    for _ in range(60):
        loss = torch.nn.functional.cross_entropy(net(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.3
