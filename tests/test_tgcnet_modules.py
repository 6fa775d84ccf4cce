"""TGC-Net's modules: MSDeformAttn against explicit bilinear sampling, DATE/VLCM masking, the decoder,
text sensitivity, frozen/trainable split, every ablation switch, and the CLIP feature cache."""

from __future__ import annotations

import itertools

import pytest
import torch

from textseg_cli.errors import ConfigError
from textseg_cli.models import build_model
from textseg_cli.models.tgcnet.clip_backbone import TINY_CLIP
from textseg_cli.models.tgcnet.date import DATE
from textseg_cli.models.tgcnet.decoder import ClassBlock, WindowBlock
from textseg_cli.models.tgcnet.msdeform_attn import MSDeformAttn, ms_deform_attn_core, reference_points
from textseg_cli.models.tgcnet.vlcm import VLCM

SMALL = dict(clip_model=TINY_CLIP, d_model=64, cnn_channels=(8, 16, 32, 32, 64), sse_layers=1, decoder_hidden=32,
             window=4, date_heads=4)
T1, T2 = "one lesion, upper left.", "two lesions, upper right and lower left."


def _bilinear_reference(value, shapes, locs, weights):
    """Direct computation: for each query/head/level/point, interpolate the 4 neighbouring pixels by index
    arithmetic (pixel centres at (i + 0.5) / size, zeros outside) and sum with the attention weights."""
    b, _, heads, dh = value.shape
    _, q, _, levels, points, _ = locs.shape
    out = torch.zeros(b, q, heads, dh, dtype=torch.float64)
    starts = [0]
    for h, w in shapes:
        starts.append(starts[-1] + h * w)
    for bi, qi, hi, li, pi in itertools.product(range(b), range(q), range(heads), range(levels), range(points)):
        h, w = shapes[li]
        x = locs[bi, qi, hi, li, pi, 0].item() * w - 0.5
        y = locs[bi, qi, hi, li, pi, 1].item() * h - 0.5
        x0, y0 = int(torch.floor(torch.tensor(x))), int(torch.floor(torch.tensor(y)))
        for xx, yy in ((x0, y0), (x0 + 1, y0), (x0, y0 + 1), (x0 + 1, y0 + 1)):
            if 0 <= xx < w and 0 <= yy < h:
                wgt = (1 - abs(x - xx)) * (1 - abs(y - yy))
                out[bi, qi, hi] += weights[bi, qi, hi, li, pi].item() * wgt * value[bi, starts[li] + yy * w + xx, hi].double()
    return out.reshape(b, q, heads * dh)


def test_msdeform_core_matches_explicit_bilinear_sampling():
    torch.manual_seed(0)
    shapes = [(3, 4), (2, 2)]
    value = torch.randn(2, sum(h * w for h, w in shapes), 2, 3)
    locs = torch.rand(2, 5, 2, 2, 3, 2) * 1.4 - 0.2  # some points fall outside the map (zero padding)
    weights = torch.rand(2, 5, 2, 2, 3).flatten(-2).softmax(-1).view(2, 5, 2, 2, 3)
    got = ms_deform_attn_core(value, shapes, locs, weights)
    assert torch.allclose(got.double(), _bilinear_reference(value, shapes, locs, weights), atol=1e-5)


def test_msdeform_module_zero_offsets_read_the_reference_pixel():
    torch.manual_seed(0)
    attn = MSDeformAttn(d_model=8, levels=1, heads=2, points=1)
    torch.nn.init.zeros_(attn.sampling_offsets.bias)  # sample exactly at each pixel centre
    shapes = [(3, 5)]
    src = torch.randn(1, 15, 8)
    out = attn(src, reference_points(shapes, 1), src, shapes)
    assert torch.allclose(out, attn.output_proj(attn.value_proj(src)), atol=1e-5)


def test_date_masks_padding_and_vlcm_ignores_padded_text():
    torch.manual_seed(0)
    date = DATE(16, heads=4)
    f_p, f_a = torch.randn(2, 6, 16), torch.randn(2, 6, 16)
    valid_p = torch.tensor([[1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 1, 0]], dtype=torch.bool)
    valid_a = torch.tensor([[1, 1, 1, 1, 0, 0], [1, 1, 0, 0, 0, 0]], dtype=torch.bool)
    out, valid = date(f_p, valid_p, f_a, valid_a)
    assert torch.equal(valid, valid_p | valid_a)
    f_p2 = f_p.clone()
    f_p2[~valid_p] = 100.0  # junk in primary padding changes nothing
    assert torch.allclose(date(f_p2, valid_p, f_a, valid_a)[0], out, atol=1e-5)
    # Where the auxiliary prompt is padding, F_T is LayerNorm(F_p): nothing was injected.
    assert torch.allclose(out[1, 3], date.norm(f_p[1, 3]), atol=1e-5)
    for mode in ("gated", "single", "bi"):
        vlcm = VLCM(16, 4, mode)
        f_v, f_t = torch.randn(2, 9, 16), torch.randn(2, 6, 16)
        v1, _ = vlcm(f_v, (3, 3), f_t, valid_p)
        f_t2 = f_t.clone()
        f_t2[~valid_p] = 50.0
        v2, _ = vlcm(f_v, (3, 3), f_t2, valid_p)
        assert torch.allclose(v1, v2, atol=1e-5), mode
        assert not torch.allclose(v1, f_v)


def test_decoder_blocks_shapes_and_shift_mask():
    torch.manual_seed(0)
    blk = WindowBlock(16, 8, heads=2, window=4, shifted=True)
    x, g = torch.randn(2, 7, 9, 16), torch.randn(2, 7, 9, 8)  # not a multiple of the window: padded
    assert blk(x, g).shape == (2, 7, 9, 16)
    cls = ClassBlock(16, 8, heads=2)
    y = cls(torch.randn(2, 3, 6, 5, 16), torch.randn(2, 3, 8))
    assert y.shape == (2, 3, 6, 5, 16)
    # With shift, a token at the top-left corner cannot see the wrapped-around bottom-right token.
    blk = WindowBlock(4, 1, heads=1, window=4, shifted=True)
    x = torch.zeros(1, 8, 8, 4)
    base = blk(x, torch.zeros(1, 8, 8, 1))
    x[0, 7, 7] = 10.0
    assert torch.allclose(blk(x, torch.zeros(1, 8, 8, 1))[0, 0, 0], base[0, 0, 0], atol=1e-6)


def test_text_changes_output_and_frozen_trainable_split():
    torch.manual_seed(0)
    net = build_model("tgcnet", in_channels=1, num_classes=2, date="main-only", **SMALL)
    x = torch.rand(2, 1, 40, 40)
    y1 = net(x, [T1, T1])
    y2 = net(x, [T1, T2])
    assert y1.shape == (2, 1, 40, 40)
    assert torch.allclose(y1[0], y2[0], atol=1e-5) and not torch.allclose(y1[1], y2[1], atol=1e-4)
    y2.square().mean().backward()
    clip = [p for p in net.clip.parameters()]
    others = [p for n, p in net.named_parameters() if not n.startswith("clip.")]
    assert all(not p.requires_grad and p.grad is None for p in clip)
    assert all(p.requires_grad for p in others) and all(p.grad is not None for p in net.decoder.parameters())
    # the text path is trained: the gradient reaches P_T (text → model width) and depends on which text it was
    g_text = net.text_proj.weight.grad.clone()
    assert g_text.abs().sum() > 0
    net.zero_grad()
    net(x, [T1, T1]).square().mean().backward()
    assert not torch.allclose(net.text_proj.weight.grad, g_text, atol=1e-8)
    n_frozen = sum(p.numel() for p in clip)
    n_train = sum(p.numel() for p in net.parameters() if p.requires_grad)
    assert n_frozen == sum(p.numel() for p in net.clip.clip.parameters()) and n_train == sum(p.numel() for p in others)
    shares = net.parameter_shares()
    assert shares["clip"] == 0 and shares["date"] == 0
    assert sum(v for k, v in shares.items() if k != "sse.cnn") == n_train


def test_clip_finetune_modes_count_parameters():
    torch.manual_seed(0)
    qv = build_model("tgcnet", date="main-only", clip_finetune="qv", **SMALL)
    # q and v deltas (64×64 each) for 2 vision + 2 text attention layers of the tiny CLIP.
    assert qv.parameter_shares()["clip"] == 4 * 2 * 64 * 64
    x = torch.rand(1, 3, 32, 32)
    before = qv(x, [T1]).detach()
    assert torch.allclose(before, qv(x, [T1]).detach())  # zero deltas: starts as the frozen CLIP
    full = build_model("tgcnet", date="main-only", clip_finetune="full", **SMALL)
    # all of CLIP but its contrastive logit_scale, which no feature uses (DDP needs a gradient for each)
    assert full.parameter_shares()["clip"] == sum(p.numel() for p in full.clip.parameters()) - 1
    assert not full.clip.clip.logit_scale.requires_grad
    assert len(full.cache) == 0 and full.cache.max_items == 0  # no caching of features that train


@pytest.mark.parametrize("switch,values", [("sse", ["on", "off", "cnn-only", "no-deform"]),
                                           ("date", ["injection", "main-only", "aux-only", "llm-expanded"]),
                                           ("vlcm", ["gated", "none", "single", "bi"])])
def test_every_ablation_switch_runs(switch, values):
    torch.manual_seed(0)
    x = torch.rand(2, 3, 36, 36)
    for v in values:
        kw = {**SMALL, "date": "main-only", switch: v}
        net = build_model("tgcnet", **kw)
        y = net(x, [[T1, T2], [T2, T1]], aux_texts=[["CXR opacity", "aux b"], ["aux c", "aux d"]])
        assert y.shape == (2, 2, 36, 36), (switch, v)
        y.mean().backward()


def test_injection_requires_aux_and_cache_reuses_clip_features():
    torch.manual_seed(0)
    net = build_model("tgcnet", **SMALL)
    x = torch.rand(2, 3, 32, 32)
    with pytest.raises(ConfigError, match="auxiliary"):
        net(x, [T1, T2])
    net.eval()
    y1 = net(x, [T1, T2], [T2, T1])
    misses = net.cache.misses
    y2 = net(x, [T1, T2], [T2, T1])
    assert net.cache.misses == misses and net.cache.hits >= 6  # 2 images + texts served from the cache
    net.use_cache = False
    y3 = net(x, [T1, T2], [T2, T1])
    assert torch.allclose(y1, y2) and torch.allclose(y1, y3, atol=2e-3)  # cache stores float16


@pytest.mark.benchmark
def test_vit_l_14_336_trainable_count_near_paper():
    net = build_model("tgcnet")  # ViT-L-14-336, pretrained=None (no download)
    shares = net.parameter_shares()
    trainable = sum(v for k, v in shares.items() if k != "sse.cnn")
    # 11,220,833 (docs/methods.md): the paper's 10.3 M plus what CAT-Seg's ViT-L decoder layout adds
    # (3×3 guidance convs, a second Swin pair); the decoder itself is 2,193,633
    assert trainable == 11_220_833 and shares["decoder"] == 2_193_633, shares


# Whether a trained TGC-Net uses the text: tests/test_tgcnet_text_effect.py (a text-only task in the default
# suite; true vs shuffled texts over seeds under -m benchmark).


def test_method_case_text_reaches_inference_copies():
    """`textseg eval` sets each case's text on the method, then may predict with a deep copy made
    earlier (BatchNorm folded): the copy must see the current text."""
    import copy

    from textseg_cli.methods.tgcnet import TGCNetMethod

    torch.manual_seed(0)
    net_kw = {k: v for k, v in SMALL.items() if k != "clip_model"}
    cfg = {"method": {"clip_model": "tiny", "date": "main-only", "net": net_kw}}
    m = TGCNetMethod(cfg, 1, 2, dim=2, data_root=None).eval()
    x = torch.rand(1, 1, 32, 32)
    with pytest.raises(ConfigError, match="set_case_text"):
        m.predict_logits(x)
    twin = copy.deepcopy(m)
    with torch.no_grad():
        m.set_case_text(T1)
        a = twin.predict_logits(x)
        assert torch.allclose(a, m.predict_logits(x)) and a.shape == (1, 2, 32, 32)
        m.set_case_text(T2)
        assert not torch.allclose(twin.predict_logits(x), a, atol=1e-4)
    assert twin.net.cache is m.net.cache


def test_train_cli_ablation_flags_reach_the_model(tmp_path, one_thread):
    import yaml

    from conftest import run_cli

    data = tmp_path / "s2d"
    code, out = run_cli("prep", "synthetic", "--dim", "2", "--cases", "12", "--size", "32", "--val", "2", "--test", "2",
                        "--out", data)
    assert code == 0, out
    code, out = run_cli("train", "--method", "tgcnet", "--data", data, "--sse", "maybe", "--iterations", "1")
    assert code == 2 and "--sse 'maybe': expected one of on, off, cnn-only, no-deform" in out
    code, out = run_cli("train", "--method", "mcnet", "--data", data, "--vlcm", "none")
    assert code == 2 and "--vlcm applies to tgcnet" in out
    run = tmp_path / "run"
    code, out = run_cli("train", "--method", "tgcnet", "--data", data, "--out", run, "--iterations", "2",
                        "--set", "data.profile=synthetic2d", "--set", "val.every=0",
                        "--sse", "off", "--vlcm", "none", "--clip-finetune", "qv", "--date", "main-only")
    assert code == 0, out
    method = yaml.safe_load((run / "config.yaml").read_text(encoding="utf-8"))["method"]
    assert (method["sse"], method["vlcm"], method["clip_finetune"], method["date"]) == ("off", "none", "qv", "main-only")
    from textseg_cli.runs.load import load_run

    net = load_run(run, "last").method.net
    assert net.sse.mode == "off" and net.vlcm.mode == "none" and net.clip.finetune == "qv"
    code, out = run_cli("eval", run, "--split", "val", "--eval-size", "16")
    assert code == 0, out
    assert (run / "eval" / "val-last-whole" / "summary.csv").exists()  # the run's inference.mode, not sliding


def test_clip_weights_from_a_local_checkpoint(tmp_path):
    from textseg_cli.models.tgcnet.clip_backbone import build_open_clip

    torch.manual_seed(1)
    src = build_open_clip(TINY_CLIP)
    path = tmp_path / "tiny_clip.pt"
    torch.save({"state_dict": src.state_dict()}, path)
    torch.manual_seed(2)
    net = build_model("tgcnet", date="main-only", clip_weights=str(path), **SMALL)
    for (name, a), b in zip(src.state_dict().items(), net.clip.clip.state_dict().values()):
        assert torch.equal(a, b), name
    assert str(path) in net.clip.model_key  # cache entries are keyed by the weights too
    with pytest.raises(ConfigError, match="could not load CLIP weights"):
        build_model("tgcnet", date="main-only", clip_weights=str(tmp_path / "missing.pt"), **SMALL)


def _signature(net) -> tuple:
    """What an ablation switch must change: the modules built (names and shapes) or which parameters train."""
    shapes = tuple(sorted((k, tuple(v.shape)) for k, v in net.state_dict().items()))
    return shapes, tuple(sorted(n for n, p in net.named_parameters() if p.requires_grad))


@pytest.mark.parametrize("switch", [{"sse": "off"}, {"sse": "cnn-only"}, {"sse": "no-deform"}, {"vlcm": "none"},
                                    {"vlcm": "single"}, {"vlcm": "bi"}, {"clip_finetune": "qv"},
                                    {"clip_finetune": "full"}, {"date": "injection"}])
def test_each_ablation_switch_changes_the_built_network(switch):
    torch.manual_seed(0)
    base = build_model("tgcnet", date="main-only", **SMALL)
    torch.manual_seed(0)
    variant = build_model("tgcnet", **{"date": "main-only", **SMALL, **switch})
    assert _signature(variant) != _signature(base), switch
