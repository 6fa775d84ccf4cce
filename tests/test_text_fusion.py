"""Text-fusion modules and text-guided losses: shapes, text sensitivity, hand-computed values."""

import math

import pytest
import torch

from textseg_cli.methods.text_losses import (ProjectionHead, csa_loss, dca_mix, dlb_pseudo_label, dlb_weights,
                                             usl_loss, vtcm_loss)
from textseg_cli.models.text_fusion import TMR, VWPM, RepeatTextFusion, TextInjection, TMROfficial


@pytest.fixture
def fv():
    torch.manual_seed(0)
    return torch.randn(2, 32, 4, 5, 3)


def test_tmr_shape_and_text_changes_output(fv):
    tmr = TMR(channels=32, text_dim=64, heads=4).eval()
    t1, t2 = torch.randn(2, 64), torch.randn(2, 64)
    out1, out2 = tmr(fv, t1), tmr(fv, t2)
    assert out1.shape == fv.shape
    assert not torch.allclose(out1, out2, atol=1e-5)


def test_tmr_hand_computed_token_weights_have_mean_one():
    # LN weight 0 makes every token a = b (the LN bias), so keys are equal, softmax over N tokens is 1/N and
    # the token weight N · mean_k attn = 1. With V and proj_out the identity each plane adds b, and the plane
    # weights 1/3 sum to 1: out = F_v + b exactly. Without the ×N factor a plane of N tokens would add b/N.
    torch.manual_seed(0)
    tmr = TMR(channels=4, text_dim=4, heads=1).eval()
    b = torch.tensor([0.5, -1.0, 2.0, 0.25])
    with torch.no_grad():
        tmr.norm.weight.zero_()
        tmr.norm.bias.copy_(b)
        for lin in (tmr.v, tmr.proj_out):
            lin.weight.copy_(torch.eye(4))
            lin.bias.zero_()
    fv = torch.randn(2, 4, 2, 3, 4)
    out = tmr(fv, torch.randn(3, 4))
    assert torch.allclose(out, fv + b.view(1, 4, 1, 1, 1), atol=1e-6)


def test_tmr_official_layer_structure():
    torch.manual_seed(0)
    grid = (2, 3, 2)
    tmr = TMROfficial(channels=8, grid=grid, text_dim=16, d_model=16, heads=2, dim_head=8).eval()
    fv = torch.randn(2, 8, *grid)
    assert torch.equal(tmr.view_weights.detach(), torch.ones(3))  # view weights start at 1
    # one token per plane: the text enters only through the count K (Σ_i attn_ij = K), not its values
    out1, out2 = tmr(fv, torch.randn(2, 16)), tmr(fv, torch.randn(2, 16) * 5)
    assert torch.allclose(out1, out2, atol=1e-5)
    assert not torch.allclose(out1, tmr(fv, torch.randn(3, 16)), atol=1e-4)
    # the whole plane is embedded and un-embedded: the added term varies across each plane
    with torch.no_grad():
        tmr.view_weights.copy_(torch.tensor([1.0, 0.0, 0.0]))  # axial only: constant along X
    view = tmr(fv, torch.randn(2, 16)) - 2 * fv  # output = (F_v + view) + F_v
    assert torch.allclose(view[:, :, 0], view[:, :, 1], atol=1e-5)
    assert view[:, :, 0].flatten(2).std(-1).min() > 1e-3
    with pytest.raises(ValueError, match="bottleneck"):
        tmr(torch.randn(1, 8, 2, 2, 2), torch.randn(2, 16))


def test_repeat_fusion_and_injection_use_text(fv):
    rep = RepeatTextFusion(channels=32, text_dim=64, num_texts=2).eval()
    assert not torch.allclose(rep(fv, torch.randn(2, 64)), rep(fv, torch.randn(2, 64)))
    inj = TextInjection(channels=32, text_dim=16, hidden=8, beta=0.5, num_texts=15, grid=fv.shape[2:])
    a, b = inj(fv, torch.randn(15, 16)), inj(fv, torch.randn(15, 16))
    assert a.shape == fv.shape and not torch.allclose(a, b)


def test_llm_injection_depends_on_which_description_is_which(fv):
    # The former reading mean-pooled the descriptions into one constant per channel: reordering them or
    # moving across the volume changed nothing. The spatial reading maps each description to C and the
    # N descriptions to the bottleneck grid.
    torch.manual_seed(0)
    text = torch.randn(15, 16)
    inj = TextInjection(channels=32, text_dim=16, hidden=8, beta=1.0, num_texts=15, grid=fv.shape[2:])
    z = inj.text_map(text)
    assert z.shape == (32, *fv.shape[2:]) and z.flatten(1).std(1).min() > 1e-4  # varies over space
    assert not torch.allclose(inj(fv, text), inj(fv, text.flip(0)), atol=1e-5)
    assert torch.allclose(inj(fv, text) - fv, z.unsqueeze(0).expand_as(fv), atol=1e-5)
    bigger = torch.randn(1, 32, 8, 10, 6)  # whole-volume inference: z resized to the grid
    assert inj(bigger, text).shape == bigger.shape
    pooled = TextInjection(channels=32, text_dim=16, hidden=8, beta=1.0, mode="pooled")
    assert torch.allclose(pooled(fv, text), pooled(fv, text.flip(0)), atol=1e-6)
    learn = TextInjection(channels=32, text_dim=16, hidden=8, beta=0.3, num_texts=15, grid=fv.shape[2:],
                          learnable_beta=True)
    assert isinstance(learn.beta, torch.nn.Parameter) and float(learn.beta) == pytest.approx(0.3)


def test_vwpm_text_changes_output(fv):
    m = VWPM(channels=32, text_dim=64, num_classes=2).eval()
    smap = m.semantic_map(fv)
    assert torch.allclose(smap.sum(1), torch.ones_like(smap[:, 0]), atol=1e-5)
    out1, out2 = m(fv, torch.randn(2, 64)), m(fv, torch.randn(2, 64))
    assert out1.shape == fv.shape and not torch.allclose(out1, out2)


def test_csa_loss_hand_computed():
    # One sample, feature grid 1x1x2, D=2, two classes; probabilities already on the grid.
    feat = torch.tensor([[[[[1.0, 3.0]]], [[[2.0, 0.0]]]]])  # (1, 2, 1, 1, 2)
    probs = torch.tensor([[[[[1.0, 0.0]]], [[[0.0, 1.0]]]]])  # class 0 at voxel 0, class 1 at voxel 1
    text = torch.tensor([[0.0, 0.0], [1.0, 1.0]])
    # mean pooling: proto_0 = (1*[1,2] + 0)/2 = [0.5, 1]; proto_1 = [3, 0]/2 = [1.5, 0]
    expected = (0.5**2 + 1**2) + (0.5**2 + 1**2)
    assert csa_loss(feat, [probs], text, pool="mean").item() == pytest.approx(expected)
    # masked: proto_0 = [1, 2], proto_1 = [3, 0]
    expected_masked = (1 + 4) + (4 + 1)
    assert csa_loss(feat, [probs, probs], text, pool="masked").item() == pytest.approx(2 * expected_masked)


def test_vtcm_loss_hand_computed():
    proj = torch.nn.functional.normalize(torch.tensor([[[[1.0, 0.0, 1.0]], [[0.0, 1.0, 1.0]]]]), dim=1)  # (1,2,1,3)
    labels = torch.tensor([[[0, 1, 1]]])
    pred_a = torch.tensor([[[0, 1, 0]]])  # disagrees at voxel 2
    pred_b = torch.tensor([[[0, 1, 1]]])
    text = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    # class 0: voxel 0 -> [1,0], cos with [1,0] = 1; class 1: voxel 1 -> [0,1], cos 1 -> loss 0
    assert vtcm_loss(proj, labels, [pred_a, pred_b], text).item() == pytest.approx(0.0, abs=1e-6)
    text2 = torch.tensor([[0.0, 1.0], [0.0, 1.0]])  # class 0 now orthogonal -> 1 - (0 + 1) / 2
    assert vtcm_loss(proj, labels, [pred_a, pred_b], text2).item() == pytest.approx(0.5, abs=1e-6)
    none = vtcm_loss(proj, labels, [1 - labels], text)  # no agreement anywhere: zero, no NaN
    assert none.item() == 0.0
    # class 1 without an agreeing voxel: "official" counts it as cosine 0 (the published NaN prototype gets no
    # gradient, and the mean divides by K); "skip" leaves it out of the mean
    only0 = [torch.tensor([[[0, 0, 0]]])]
    assert vtcm_loss(proj, labels, only0, text2, absent="official").item() == pytest.approx(1.0, abs=1e-6)
    assert vtcm_loss(proj, labels, only0, text, absent="official").item() == pytest.approx(0.5, abs=1e-6)
    assert vtcm_loss(proj, labels, only0, text, absent="skip").item() == pytest.approx(0.0, abs=1e-6)
    assert vtcm_loss(proj, labels, [1 - labels], text, absent="official").item() == 1.0


def test_vtcm_one_prototype_from_both_heads():
    # The published code averages the two heads' features into ONE prototype per class (train_3d.py:152),
    # not one prototype per head: heads [1,0] and [0,1] at the class-1 voxel give proto [.5,.5], cos 1/√2·... .
    h1 = torch.tensor([[[[0.0, 1.0]], [[1.0, 0.0]]]])  # (1, D=2, 1, 2): class-0 voxel [0,1], class-1 voxel [1,0]
    h2 = torch.tensor([[[[0.0, 0.0]], [[1.0, 1.0]]]])  # class-0 voxel [0,1], class-1 voxel [0,1]
    labels = torch.tensor([[[0, 1]]])
    text = torch.tensor([[0.0, 1.0], [1.0, 1.0]])
    # class 0: proto [0,1] → cos 1; class 1: proto mean([1,0],[0,1]) = [.5,.5] → cos with [1,1] = 1
    assert vtcm_loss([h1, h2], labels, [labels, labels], text).item() == pytest.approx(0.0, abs=1e-6)
    # per-head prototypes would give class 1: cos([1,0],[1,1]) = cos([0,1],[1,1]) = 1/√2 → loss > 0
    per_head = (vtcm_loss(h1, labels, [labels], text) + vtcm_loss(h2, labels, [labels], text)) / 2
    assert per_head.item() > 0.1


def test_dlb_weights_and_pseudo_label():
    w = dlb_weights([torch.tensor(0.0), torch.tensor(1.0)])
    a, b = 1 - 0.5, 1 - 1 / (1 + math.exp(-1))
    assert w[0].item() == pytest.approx(math.exp(a) / (math.exp(a) + math.exp(b)))
    p1 = torch.tensor([[[0.9, 0.4]], [[0.1, 0.6]]]).unsqueeze(0)  # (1, 2, 1, 2)
    p2 = torch.tensor([[[0.2, 0.3]], [[0.8, 0.7]]]).unsqueeze(0)
    pl = dlb_pseudo_label([p1, p2], torch.tensor([0.7, 0.3]))
    # voxel 0: 0.7*0.9+0.3*0.2=0.69 vs 0.31 -> 0; voxel 1: 0.37 vs 0.63 -> 1
    assert pl.tolist() == [[[0, 1]]]


def test_usl_loss_hand_computed():
    q = torch.tensor([[0.95, 0.5, 0.02], [0.05, 0.5, 0.98]]).unsqueeze(0)  # (1, 2, 3)
    p = torch.tensor([[0.8, 0.6, 0.3], [0.2, 0.4, 0.7]]).unsqueeze(0)
    t1, t2 = 0.9, 0.1
    # two classes: a confident voxel (max q > t1) is also "complementary" (min q < t2), and the complement NLL
    # -log(1 - p_argmin) is the same term again; each voxel counts once.
    # voxel 0: conf (0.95>0.9) -> -0.95*log 0.8
    # voxel 1: uncertain -> mean((0.1)^2, (0.1)^2) = 0.01
    # voxel 2: conf (0.98) -> -0.98*log 0.7
    l0 = -0.95 * math.log(0.8)
    l2 = -0.98 * math.log(0.7)
    expected = (l0 + 0.01 + l2) / 3
    # `reading="textseg"`: textseg's former reading (the default is Eq. 8 as printed, tests/test_usl_formula.py)
    assert usl_loss(p, q, t1, t2, reading="textseg").item() == pytest.approx(expected, rel=1e-5)
    assert usl_loss(p, q, t1, t2, kind="nll", reading="textseg").item() == pytest.approx((l0 + l2) / 3, rel=1e-5)
    mse = ((p - q) ** 2).mean(1).mean().item()
    assert usl_loss(p, q, kind="mse", reading="textseg").item() == pytest.approx(mse, rel=1e-6)
    # three classes: the complement term still applies where no class is confident
    q3 = torch.tensor([[0.6], [0.35], [0.05]]).unsqueeze(0)
    p3 = torch.tensor([[0.5], [0.3], [0.2]]).unsqueeze(0)
    assert usl_loss(p3, q3, t1, t2, reading="textseg").item() == pytest.approx(-0.95 * math.log(0.8), rel=1e-5)


def test_dca_mix_pastes_foreground_both_ways():
    x_l = torch.full((1, 1, 4), 1.0)
    x_u = torch.full((1, 1, 4), 2.0)
    y_l = torch.tensor([[1, 1, 0, 0]])
    pu = torch.tensor([[0, 0, 0, 1]])
    xu, yu, xl, yl = dca_mix(x_l, y_l, x_u, pu)
    assert xu.flatten().tolist() == [1, 1, 2, 2] and yu.flatten().tolist() == [1, 1, 0, 1]
    assert xl.flatten().tolist() == [1, 1, 1, 2] and yl.flatten().tolist() == [1, 1, 0, 1]


def test_projection_head_normalised():
    h = ProjectionHead(8, 16, hidden=8, normalize=True)
    y = h(torch.randn(1, 8, 2, 2, 2))
    assert torch.allclose(y.norm(dim=1), torch.ones(1, 2, 2, 2), atol=1e-5)
