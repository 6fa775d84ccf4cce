"""Issue 13 points 9 (TGC-Net) and the random-CLIP rule: regression tests that fail on the old behaviour."""

import json

import numpy as np
import pytest
import torch

from textseg_cli.runs.config import build_config
from textseg_cli.errors import ConfigError
from textseg_cli.methods.registry import build_method
from textseg_cli.methods.clip_weights import run_uses_random_clip
from textseg_cli.models.registry import build_model
from textseg_cli.models.tgcnet.clip_backbone import TINY_CLIP
from textseg_cli.text.embeddings import save_embeddings

SMALL = dict(clip_model=TINY_CLIP, d_model=64, cnn_channels=(8, 16, 32, 32, 64), sse_layers=1, decoder_hidden=32,
             window=4, date_heads=4)
TINY_SETS = ["method.clip_model=tiny", "method.net.d_model=64", "method.net.cnn_channels=[8,16,32,32,64]",
             "method.net.sse_layers=1", "method.net.decoder_hidden=32", "method.net.window=4",
             "method.net.date_heads=4", "method.date=main-only"]


def test_tgcnet_cnn_only_never_runs_clip_image_tower(monkeypatch, one_thread):
    torch.manual_seed(0)
    net = build_model("tgcnet", date="main-only", sse="cnn-only", **SMALL).eval()
    assert net.sse.p_v is None  # no projection of CLIP image features exists

    def no_clip(*a, **k):
        raise AssertionError("CLIP's image tower ran in the CNN-only variant")

    monkeypatch.setattr(net.clip, "encode_image", no_clip)
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        out = net(x, ["a lesion.", "a lesion."])
        assert out.shape == (2, 1, 32, 32)
        assert not torch.allclose(out, net(torch.rand(2, 3, 32, 32), ["a lesion.", "a lesion."]))
    fused = build_model("tgcnet", date="main-only", sse="no-deform", **SMALL).eval()  # the former "cnn-only"
    monkeypatch.setattr(fused.clip, "encode_image", no_clip)
    with pytest.raises(AssertionError, match="image tower"):
        fused(x, ["a lesion.", "a lesion."])


def test_tgcnet_training_needs_an_explicit_clip_choice(tmp_path, one_thread):
    cfg = build_config("tgcnet", None, 2, [32, 32], sets=TINY_SETS)
    with pytest.raises(ConfigError, match="--clip-weights none"):
        build_method("tgcnet", cfg, 3, 2, dim=2, data_root=str(tmp_path), class_names=["bg", "fg"])
    cfg = build_config("tgcnet", None, 2, [32, 32], sets=[*TINY_SETS, 'method.clip_weights="none"'])
    m = build_method("tgcnet", cfg, 3, 2, dim=2, data_root=str(tmp_path), class_names=["bg", "fg"])
    assert run_uses_random_clip(m.cfg)
    # the demo profile uses the tiny random CLIP and says so
    assert build_config("tgcnet", "synthetic2d", 2, [32, 32])["method"]["clip_weights"] == "none"


def test_random_clip_embeddings_are_recorded_for_every_result_row(tmp_path):
    # what the demo encodes (`encode --pretrained none`) makes its VCLIPSeg run a random-CLIP run
    rnd = save_embeddings(tmp_path / "r.safetensors", {"embeddings": torch.randn(2, 8)},
                          {"encoder": "clip", "pretrained": None, "texts": ["a", "b"]})
    real = save_embeddings(tmp_path / "o.safetensors", {"embeddings": torch.randn(2, 8)},
                           {"encoder": "clip", "pretrained": "openai", "texts": ["a", "b"]})
    assert run_uses_random_clip({"method": {"name": "vclipseg", "text": {"embeddings": str(rnd)}}})
    assert not run_uses_random_clip({"method": {"name": "vclipseg", "text": {"embeddings": str(real)}}})
    assert run_uses_random_clip({"method": {"name": "text-semiseg", "text": {"clip_pretrained": "none"}}})
    assert not run_uses_random_clip({"method": {"name": "text-semiseg", "text": {"clip_pretrained": "openai"}}})
    assert not run_uses_random_clip({"method": {"name": "mcnet"}})


def test_evaluation_rows_of_a_random_clip_run_say_so(tmp_path, monkeypatch):
    from test_eval_2d import Sign2D, _folder

    from textseg_cli.data.prepared import load_prepared
    from textseg_cli.runs.checkpoint import save_checkpoint
    from textseg_cli.runs.config import save_config
    from textseg_cli.evaluation import run as run_eval
    from textseg_cli.methods import registry
    from textseg_cli.reports.compare import compare_results

    data = _folder(tmp_path, "tiny2d", 0)
    registry.list_methods()
    monkeypatch.setitem(registry.METHODS, "sign2d", Sign2D)
    emb = save_embeddings(tmp_path / "r.safetensors", {"embeddings": torch.randn(2, 8)},
                          {"encoder": "clip", "pretrained": None, "texts": ["a", "b"]})
    ds = load_prepared(data)
    cfg = build_config("sign2d", ds.name, 2, ds.patch_size, sets=[f"method.text.embeddings={emb}"])
    cfg["data"]["root"] = str(ds.root)
    run_dir = tmp_path / "run"
    save_config(cfg, run_dir / "config.yaml")
    for name in ("best", "last"):
        save_checkpoint(run_dir / "checkpoints" / f"{name}.pt", {"method": Sign2D().state_dict(), "iteration": 1})
    run_eval.evaluate_run(run_dir, split="val", inference="whole", overlays=0, table="md")
    out = run_dir / "eval" / "val-best-whole"
    meta = json.loads((out / "meta.json").read_text(encoding="utf-8"))
    assert meta["clip"] == "random CLIP" and meta["name"] == "sign2d (random CLIP)" and meta["method"] == "sign2d"
    assert "sign2d (random CLIP)" in (out / "table.md").read_text(encoding="utf-8")
    table = tmp_path / "t.md"
    compare_results([out], table="md", out=table)
    assert "random CLIP" in table.read_text(encoding="utf-8")


def test_lvit_release_names_find_their_settings():
    from textseg_cli.data.names import canonical_name
    from textseg_cli.data.prep.lvit import KNOWN_MODALITIES

    for name, lr, modality in (("QaTa-Covid19", 2e-5, "chest x-ray"), ("QaTa-COV19", 2e-5, "chest x-ray"),
                               ("MosMedDataPlus", 5e-4, "ct"), ("MosMedData+", 5e-4, "ct")):
        cfg = build_config("tgcnet", name, 2, [224, 224])
        assert cfg["optim"]["lr"] == pytest.approx(lr), name
        assert KNOWN_MODALITIES[canonical_name(name)] == modality
    assert build_config("tgcnet", "other", 2, [224, 224])["optim"]["lr"] == pytest.approx(2e-4)


def test_clip_finetune_trains_clip_at_a_hundredth_of_the_lr(tmp_path, one_thread):
    cfg = build_config("tgcnet", None, 2, [32, 32], sets=[*TINY_SETS, 'method.clip_weights="none"',
                                                          'method.clip_finetune="qv"', "optim.lr=0.001"])
    m = build_method("tgcnet", cfg, 3, 2, dim=2, data_root=str(tmp_path), class_names=["bg", "fg"])
    groups = m.param_groups()
    assert len(groups) == 2 and groups[1]["lr"] == pytest.approx(1e-5)
    clip_ids = {id(p) for p in m.net.clip.parameters() if p.requires_grad}
    assert clip_ids == {id(p) for p in groups[1]["params"]} and clip_ids
    assert not clip_ids & {id(p) for p in groups[0]["params"]}
    frozen = build_method("tgcnet", build_config("tgcnet", None, 2, [32, 32],
                                                 sets=[*TINY_SETS, 'method.clip_weights="none"']),
                          3, 2, dim=2, data_root=str(tmp_path), class_names=["bg", "fg"])
    assert len(frozen.param_groups()) == 1
    assert np.isclose(sum(p.numel() for g in groups for p in g["params"]),
                      sum(p.numel() for p in m.parameters() if p.requires_grad))


def test_tgcnet_decoder_follows_catseg_vitl_layout():
    from textseg_cli.models.tgcnet.decoder import AggregatorLayer, ClassBlock, CostAggregationDecoder, SwinPair

    dec = CostAggregationDecoder(d_model=256, text_len=32)
    # [Swin pair → class aggregation] × 2, interleaved (the old decoder ran 2 Swin blocks, then 2 class blocks)
    assert len(dec.layers) == 2 and all(isinstance(lay, AggregatorLayer) for lay in dec.layers)
    assert [type(m).__name__ for m in dec.layers[0].children()] == ["SwinPair", "ClassBlock"]
    assert isinstance(dec.layers[0].swin, SwinPair) and not dec.layers[0].swin.block_1.shifted
    assert dec.layers[0].swin.block_2.shifted
    # appearance guidance: conv 3×3 + ReLU (then LayerNorm in each Swin pair); class pooling 2×2
    conv, relu = dec.app_guide
    assert isinstance(conv, torch.nn.Conv2d) and conv.kernel_size == (3, 3) and isinstance(relu, torch.nn.ReLU)
    assert isinstance(dec.layers[0].swin.guidance_norm, torch.nn.LayerNorm)
    assert dec.layers[0].classes.pool == 2
    # decoder widths of the ViT-L configuration: 128 → 64 → 32 with guidance 32 and 16
    assert dec.up1.up.out_channels == 128 - 32 and dec.up2.up.out_channels == 64 - 16
    assert dec.head.in_channels == 32
    # class pooling: class attention sees the 2×2-pooled map (CAT-Seg POOLING_SIZES [2, 2]), output at full size
    torch.manual_seed(0)
    blk = ClassBlock(8, 4, heads=2, pool=2).eval()
    seen = []
    orig = blk.attend
    blk.attend = lambda x, g: seen.append(tuple(x.shape)) or orig(x, g)
    y = blk(torch.randn(1, 3, 4, 6, 8), torch.randn(1, 3, 4))
    assert seen == [(1, 3, 2 * 3, 8)] and y.shape == (1, 3, 4, 6, 8)


def test_tgcnet_window_attention_has_no_position_bias_by_default():
    """CAT-Seg's WindowAttention (cat_seg/modeling/transformer/model.py) has no relative position bias (its
    docstring, copied from Swin, says otherwise); TGC-Net follows CAT-Seg, Swin's table is `rel_pos_bias=True`."""
    from textseg_cli.models.tgcnet.decoder import CostAggregationDecoder, WindowBlock

    plain, biased = CostAggregationDecoder(d_model=64, text_len=4), CostAggregationDecoder(64, 4, rel_pos_bias=True)
    assert not any("bias_table" in n for n, _ in plain.named_parameters())
    tables = [p for n, p in biased.named_parameters() if n.endswith("bias_table")]
    assert len(tables) == 4 and all(t.shape == ((2 * 12 - 1) ** 2, 4) for t in tables)  # 2 layers × 2 blocks
    assert sum(p.numel() for p in biased.parameters()) - sum(p.numel() for p in plain.parameters()) == 4 * 529 * 4
    # without the table the block is plain windowed attention: permuting tokens inside one window permutes the output
    torch.manual_seed(0)
    blk = WindowBlock(dim=8, guide_dim=4, heads=2, window=4).eval()
    x, g = torch.randn(1, 4, 4, 8), torch.randn(1, 4, 4, 4)
    perm = torch.randperm(16)
    with torch.no_grad():
        y = blk(x, g).reshape(16, 8)
        yp = blk(x.reshape(16, 8)[perm].reshape(1, 4, 4, 8), g.reshape(16, 4)[perm].reshape(1, 4, 4, 4)).reshape(16, 8)
    assert torch.allclose(yp, y[perm], atol=1e-5)
    blk_b = WindowBlock(dim=8, guide_dim=4, heads=2, window=4, rel_pos_bias=True).eval()
    with torch.no_grad():
        blk_b.bias_table.normal_()
        yb = blk_b(x, g).reshape(16, 8)
        ybp = blk_b(x.reshape(16, 8)[perm].reshape(1, 4, 4, 8), g.reshape(16, 4)[perm].reshape(1, 4, 4, 4))
    assert not torch.allclose(ybp.reshape(16, 8), yb[perm], atol=1e-3)  # the position bias breaks the symmetry


def test_per_case_auxiliary_prompt_word_cap(tmp_path, monkeypatch):
    # issue 20: the cap of `prompts/aux_prompt.yaml` (max_words) holds offline and for LLM replies (2 × cap)
    from fake_openai_server import FakeOpenAIServer

    monkeypatch.setenv("TEXTSEG_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test")
    monkeypatch.delenv("OPENAI_BASE_URL", raising=False)
    monkeypatch.delenv("TEXTSEG_PROMPTS", raising=False)
    with FakeOpenAIServer(default_content="CXR: opacity.") as server:
        _word_cap_checks(server, tmp_path)


def _word_cap_checks(server, tmp_path):
    from test_describe import PRIMARY, _prepared

    from textseg_cli.errors import TextsegError
    from textseg_cli.text.describe import count_words, describe_per_case, offline_aux_prompt
    from textseg_cli.text.prompts import load_aux_template

    tpl = load_aux_template()
    cap = int(tpl.get("max_words", 16))
    long_text = " ".join(f"zone{i}" for i in range(3 * cap))
    body = offline_aux_prompt(long_text, None, tpl).split(": ", 1)[1].rstrip(".")
    assert count_words(body) == cap and body.split()[-1] == f"zone{cap - 1}"
    root = _prepared(tmp_path, {"a": PRIMARY})
    server.push(content=" ".join(["opacity"] * (2 * cap + 1)))
    with pytest.raises(TextsegError, match=rf"case 'a'.*{2 * cap + 1} words \(limit {2 * cap}\)"):
        describe_per_case(root, "gpt-4", base_url=server.url, backoff=0.01)
    server.push(content=" ".join(["opacity"] * (2 * cap)))
    ok = describe_per_case(root, "gpt-4", base_url=server.url, backoff=0.01, refresh=True)
    assert count_words(ok.record["aux_texts"]["a"]) == 2 * cap


# --- Text-SemiSeg and VCLIPSeg defaults follow the published code (default suite; the parity suite compares
# --- against the code itself) -----------------------------------------------------------------------------

def _text_method(name, tmp_path, *sets, patch=(32, 32, 16), rows=2):
    import torch.nn.functional as F  # noqa: N812

    g = torch.Generator().manual_seed(0)
    emb = save_embeddings(tmp_path / f"{name}.safetensors", {"embeddings": 3 * torch.randn(rows, 64, generator=g)},
                          {"encoder": "clip", "pretrained": "openai", "texts": ["background", "liver"]})
    cfg = build_config(name, "synthetic", 3, list(patch),
                       sets=["method.backbone.n_filters=4", f"method.text.embeddings={emb}", *sets])
    m = build_method(name, cfg, 1, 2, 3, class_names=["background", "liver"], dataset_name="synthetic",
                     data_root=None, patch_size=list(patch))
    return m, F


def test_text_semiseg_published_text_dice_and_tmr(tmp_path, one_thread):
    from textseg_cli.methods.text_semiseg import ce_plus_dice
    from textseg_cli.models.text_fusion import TMROfficial

    m, F = _text_method("text-semiseg", tmp_path)
    # F_t is L2-normalised per class (CoOp.py:199); the file holds rows of norm ≈ 24
    assert torch.allclose(m.text().norm(dim=-1), torch.ones(2), atol=1e-6)
    # Dice: squared denominators over all classes on sigmoid(logits), smooth 1e-10 (utils/losses.py:32-73)
    logits = torch.tensor([[[[0.3, -1.0], [2.0, 0.5]]], [[[-0.2, 1.5], [0.1, -0.7]]]]).permute(1, 0, 2, 3)
    labels = torch.tensor([[[0, 1], [1, 0]]])
    s = torch.sigmoid(logits)
    onehot = torch.stack([labels == 0, labels == 1], 1).float()
    dice = sum(1 - (2 * (s[:, k] * onehot[:, k]).sum() + 1e-10) / ((s[:, k] ** 2).sum() + onehot[:, k].sum() + 1e-10)
               for k in range(2)) / 2
    expected = F.cross_entropy(logits, labels) + dice
    got = ce_plus_dice(logits, labels, dict(m.hparams["dice"]), activation=m.seg_activation)
    assert got.item() == pytest.approx(expected.item(), rel=1e-6)
    # --tmr official builds the published layer, sized to the bottleneck grid (patch / 16)
    off, _ = _text_method("text-semiseg", tmp_path, "method.tmr=official")
    assert isinstance(off.fusions[0], TMROfficial) and off.fusions[0].grid == (2, 2, 1)
    # the Lung profile uses the published strides (prediction.py:118-120)
    assert build_config("text-semiseg", "lung", 3, [96, 96, 96])["inference"]["stride"] == [18, 18, 4]
    # inference: sigmoid of the foreground logit (prediction.py:70), as [1 − σ, σ]
    z = torch.tensor([[[[[0.0]]], [[[1.2]]]]])
    p = m._to_proba(z)
    assert torch.allclose(p[:, 1], torch.sigmoid(torch.tensor(1.2)).view(1, 1, 1, 1))


def test_csa_published_reduction_hand_computed():
    from textseg_cli.methods.text_losses import csa_loss

    feat = torch.tensor([[[[[1.0, 3.0]]], [[[2.0, 0.0]]]]])  # (1, D=2, 1, 1, 2)
    probs = torch.tensor([[[[[1.0, 0.0]]], [[[0.0, 1.0]]]]])
    text = torch.tensor([[0.0, 0.0], [1.0, 1.0]])
    # prototypes [0.5, 1] and [1.5, 0]; torch.mean over (B, K, D) of the squared errors = (0.25+1+0.25+1)/4
    got = csa_loss(feat, [probs], text, channel_reduction="mean", class_reduction="mean", resize="trilinear")
    assert got.item() == pytest.approx(0.625)


def test_vclipseg_published_vwpm_and_inference(tmp_path, one_thread):
    m, F = _text_method("vclipseg", tmp_path)
    v = m.vwpm
    # VNet_clip.py:291-297: 3³ conv + BN (+ LeakyReLU) to 64, MLP 64→16→2 (Linear), Linear 512→C, 3³ fusion conv
    assert v.img_conv.kernel_size == (3, 3, 3) and v.img_conv.out_channels == 64
    assert isinstance(v.mlp1, torch.nn.Linear) and (v.mlp1.out_features, v.mlp2.out_features) == (16, 2)
    assert v.fuse_conv.kernel_size == (3, 3, 3) and isinstance(v.fuse_bn, torch.nn.BatchNorm3d)
    # the text is used as encoded (no normalisation); decoder 1 predicts
    assert m.text_embeddings.norm(dim=-1).min() > 5
    x = torch.randn(1, 1, 32, 32, 16)
    m.eval()
    with torch.no_grad():
        p0 = m.predict_proba(x)
        assert torch.allclose(p0, m.predict_proba(x, 0)) and not torch.allclose(p0, m.predict_proba(x, "mean"))
    # hard whole-batch pseudo-labels by default, soft (Eq. 9) as a switch
    assert m.pseudo_label == "hard"
    soft, _ = _text_method("vclipseg", tmp_path, "method.pseudo_label=soft")
    assert soft.pseudo_label == "soft"
