"""Network parity: each official network, its weights copied into textseg's through `copy_by_order` (the documented
name mapping: registration order, leaf names and shapes checked), gives the same outputs (≤1e-5) on a fixed input in
eval mode and in train mode (dropout drawn from the same seed; BatchNorm on batch statistics).
Written against: MC-Net@fee453c, UA-MT@88ed29a, DTC@2525b9c, SSL4MIS@06df604, BCP@7879f98, MCF@ad20659, MLRP@5ca2d87
(the exact commits are read from each checkout's .commit and printed with -rA)."""

from __future__ import annotations

import pytest
import torch

from parity_helpers import assert_close, copy_by_order, official_commit, official_module
from textseg_cli.models.vnet import MultiDecoderVNet, VNet


def _outputs(out):
    if isinstance(out, torch.Tensor):
        return [out]
    flat = []
    for o in out:
        flat.extend(_outputs(o))
    return flat


def _compare(official_net, ours, x, to_ours=lambda outs: outs, to_official=lambda outs: outs):
    for train in (False, True):
        official_net.train(train)
        ours.train(train)
        torch.manual_seed(7)
        a = to_official(_outputs(official_net(x)))
        torch.manual_seed(7)
        b = to_ours(_outputs(ours(x)))
        assert len(a) == len(b)
        for u, v in zip(a, b):
            assert_close(v, u, atol=1e-5)


def _x(size=16, batch=2):
    return torch.randn(batch, 1, size, size, size, generator=torch.Generator().manual_seed(0))


# (repository, module, class, textseg network factory)
VNETS = [
    ("UA-MT", "networks.vnet", "VNet", lambda: VNet(1, 2)),
    ("SSL4MIS", "networks.vnet", "VNet", lambda: VNet(1, 2)),  # CPS's V-Net (net_factory_3d "vnet")
    ("MCF", "networks.vnet", "VNet", lambda: VNet(1, 2)),
    ("MC-Net", "networks.VNet", "MCNet3d_v1", lambda: MultiDecoderVNet(1, 2, up_modes=(0, 1))),
    ("MC-Net", "networks.VNet", "MCNet3d_v2", lambda: MultiDecoderVNet(1, 2, up_modes=(0, 1, 2))),
    ("MLRP", "networks.VNet", "MCNet3d_v1", lambda: MultiDecoderVNet(1, 2, up_modes=(0, 2))),
]


@pytest.mark.parametrize("repo,module,cls,ours", VNETS, ids=[f"{r}-{c}" for r, _, c, _ in VNETS])
def test_vnet_family(official_dir, repo, module, cls, ours, record_property):
    record_property("commit", official_commit(official_dir, repo))
    mod = official_module(official_dir, repo, module)
    torch.manual_seed(0)
    kwargs = dict(n_channels=1, n_classes=2, normalization="batchnorm", has_dropout=True)
    official_net = getattr(mod, cls)(**kwargs)
    net = ours()
    mapping = copy_by_order(official_net, net)
    assert len(mapping) == len(net.state_dict())
    _compare(official_net, net, _x())


def test_dtc_dual_head(official_dir, record_property):
    from textseg_cli.methods.dtc import DualHeadVNet

    record_property("commit", official_commit(official_dir, "DTC"))
    mod = official_module(official_dir, "DTC", "networks.vnet_sdf")
    torch.manual_seed(0)
    official_net = mod.VNet(n_channels=1, n_classes=1, normalization="batchnorm", has_dropout=True)
    net = DualHeadVNet(1, 1)
    # official decoder.out_conv is the SDF head, decoder.out_conv2 the segmentation head (vnet_sdf.py:181-182,235-237)
    mapping = copy_by_order(official_net, net, order=["out_conv.weight", "out_conv.bias"])
    assert mapping["out_conv2.weight"] == "decoder.out_conv.weight" and mapping["out_conv.weight"] == "sdf_head.weight"
    # official forward → (tanh SDF, seg logits); textseg → (seg logits, tanh SDF)
    _compare(official_net, net, _x(), to_official=lambda outs: outs[::-1])


def test_bcp_vnet(official_dir, record_property):
    record_property("commit", official_commit(official_dir, "BCP"))
    mod = official_module(official_dir, "BCP", "networks.VNet")
    torch.manual_seed(0)
    official_net = mod.VNet(n_channels=1, n_classes=2, normalization="batchnorm", has_dropout=True)
    net = VNet(1, 2)
    # the contrastive heads are never called by LA_BCP_train.py; forward returns (seg, pooled features)
    copy_by_order(official_net, net, skip=("projection_head", "prediction_head", "contrastive_class_selector"))
    _compare(official_net, net, _x(48), to_official=lambda outs: outs[:1])  # its 3³ max-pool needs ≥ 3³


def test_mcf_resnet34_vnet(official_dir, record_property):
    from textseg_cli.models.resnet3d import ResVNet

    record_property("commit", official_commit(official_dir, "MCF"))
    mod = official_module(official_dir, "MCF", "networks.ResNet34")
    torch.manual_seed(0)
    official_net = mod.Resnet34(n_channels=1, n_classes=2, normalization="batchnorm", has_dropout=True)
    net = ResVNet(1, 2, normalization="batchnorm", has_dropout=True, n_filters=16)
    copy_by_order(official_net, net)
    _compare(official_net, net, _x())


def test_urpc_unet3d_deep_supervision(official_dir, record_property):
    from textseg_cli.models.unet3d import UNet3DDeepSup

    record_property("commit", official_commit(official_dir, "SSL4MIS"))
    mod = official_module(official_dir, "SSL4MIS", "networks.unet_3D_dv_semi")
    torch.manual_seed(0)
    official_net = mod.unet_3D_dv_semi(n_classes=2, in_channels=1)
    net = UNet3DDeepSup(1, 2, norm="instance", n_filters=16)
    copy_by_order(official_net, net)
    _compare(official_net, net, _x(32))
