import pytest
import torch

from textseg_cli.errors import ConfigError
from textseg_cli.models import build_model, count_parameters
from textseg_cli.models.vnet import MultiDecoderVNet, VNet, VNetDecoder, VNetEncoder


def test_parameter_counts_match_the_literature():
    v = build_model("vnet")
    assert count_parameters(v) == 9_448_866
    assert count_parameters(v.encoder) == 7_376_896
    assert count_parameters(v.decoder) == 2_071_970
    assert count_parameters(build_model("vnet_multi", up_modes=(0, 1))) == 12_347_716
    assert count_parameters(build_model("vnet_multi", up_modes=(0, 1, 2))) == 15_246_566


def test_encoder_features_and_additive_skips():
    enc = VNetEncoder(in_channels=2, n_filters=4).eval()
    feats = enc(torch.zeros(1, 2, 32, 32, 16))
    assert [f.shape[1] for f in feats] == [4, 8, 16, 32, 64]
    assert [tuple(f.shape[2:]) for f in feats] == [(32, 32, 16), (16, 16, 8), (8, 8, 4), (4, 4, 2), (2, 2, 1)]
    dec = VNetDecoder(num_classes=3, n_filters=4, up_mode=1).eval()
    assert dec(feats).shape == (1, 3, 32, 32, 16)


@pytest.mark.parametrize("norm", ["batchnorm", "instancenorm", "groupnorm", "none", "batch"])
def test_normalisations_run(norm):
    net = VNet(1, 2, n_filters=4, normalization=norm)
    assert net(torch.randn(2, 1, 32, 32, 16)).shape == (2, 2, 32, 32, 16)


def test_unknown_norm_and_mode_are_config_errors():
    with pytest.raises(ConfigError, match="normalization"):
        VNet(normalization="layer")
    with pytest.raises(ConfigError, match="upsampling mode"):
        VNet(up_mode=3)


def test_dropout_only_in_training():
    torch.manual_seed(0)
    net = VNet(1, 2, n_filters=4)
    x = torch.randn(2, 1, 16, 16, 16)
    net.eval()
    assert torch.equal(net(x), net(x))  # no dropout in eval
    net.train()
    assert not torch.equal(net(x), net(x))  # dropout active while training
    quiet = VNet(1, 2, n_filters=4, has_dropout=False).train()
    quiet.load_state_dict(net.state_dict())
    a, b = quiet(x), quiet(x)
    assert torch.allclose(a, b)


def test_multi_decoder_and_2d_variant():
    net = MultiDecoderVNet(1, 2, n_filters=4, up_modes=(0, 1, 2)).eval()
    outs = net(torch.randn(1, 1, 16, 16, 16))
    assert len(outs) == 3 and all(o.shape == (1, 2, 16, 16, 16) for o in outs)
    assert not torch.allclose(outs[0], outs[1])
    net2d = build_model("vnet", 3, 4, dim=2, n_filters=4).eval()
    assert net2d(torch.randn(2, 3, 32, 32)).shape == (2, 4, 32, 32)
    assert any(isinstance(m, torch.nn.Conv2d) for m in net2d.modules())
