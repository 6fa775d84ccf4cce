"""Text-guided methods (Text-SemiSeg, VCLIPSeg, LLM-SegNet) and the "+Text" add-on: modules, losses, CLI runs."""

import csv

import pytest
import torch
import torch.nn.functional as F
from conftest import run_cli

from textseg_cli.runs.config import build_config
from textseg_cli.errors import ConfigError
from textseg_cli.data.batch import Batch
from textseg_cli.methods.base import StepContext
from textseg_cli.methods.flags import text_flag_sets
from textseg_cli.methods.registry import build_method
from textseg_cli.methods.ssl_common import threshold_pseudo_label
from textseg_cli.methods.text_addon import TextAddon
from textseg_cli.methods.text_losses import csa_loss, dca_mix
from textseg_cli.text.embeddings import save_embeddings

CTX = dict(class_names=["background", "liver"], dataset_name="synthetic", data_root=None, patch_size=[32, 32, 16])


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def emb(tmp_path_factory):
    """Offline embedding files in the `textseg encode` format: CLIP class prompts (2×64), BERT texts (15×32)."""
    d = tmp_path_factory.mktemp("emb")
    g = torch.Generator().manual_seed(0)
    clip = save_embeddings(d / "clip.safetensors", {"embeddings": F.normalize(torch.randn(2, 64, generator=g), dim=-1)},
                           {"encoder": "clip", "texts": ["A pixel of a background.", "A pixel of a liver."]})
    bert = save_embeddings(d / "bert.safetensors", {"embeddings": torch.randn(15, 32, generator=g)},
                           {"encoder": "bert", "texts": [f"description {i}" for i in range(15)]})
    return {"clip": clip, "bert": bert}


def _method(name, emb_path, *sets, patch=(32, 32, 16)):
    cfg = build_config(name, "synthetic", 3, list(patch),
                       sets=["method.backbone.n_filters=4", f"method.text.embeddings={emb_path}", *sets])
    return build_method(name, cfg, 1, 2, 3, **CTX)


def _batch(seed=0, bu=2):
    g = torch.Generator().manual_seed(seed)
    lab = torch.zeros(2, 32, 32, 16, dtype=torch.long)
    lab[:, 8:20, 10:22, 4:12] = 1
    img = torch.randn(2, 1, 32, 32, 16, generator=g) + 2.0 * lab.unsqueeze(1)
    return Batch(img, lab, torch.randn(bu, 1, 32, 32, 16, generator=g))


def _ctx(it=0):
    return StepContext(it, 100, torch.device("cpu"))


# --- modules and losses -----------------------------------------------------------------------------

def test_dca_with_lcc_pseudo_labels_on_tiny_volumes():
    # decoder probabilities on an unlabeled 8×8×4 volume: a big blob and a small stray blob
    probs = torch.zeros(1, 2, 8, 8, 4)
    probs[0, 1, 1:4, 1:4, 1:3] = 0.9
    probs[0, 1, 6, 6, 3] = 0.8
    probs[0, 0] = 1 - probs[0, 1]
    pl = threshold_pseudo_label(probs, 0.5, lcc=True)
    assert int(pl.sum()) == 18 and pl[0, 6, 6, 3] == 0  # the stray voxel is not the largest component
    x_l, x_u = torch.full((1, 1, 8, 8, 4), 1.0), torch.full((1, 1, 8, 8, 4), 2.0)
    y_l = torch.zeros(1, 8, 8, 4, dtype=torch.long)
    y_l[0, 5:8, 0:2, :] = 1
    xu, yu, xl, yl = dca_mix(x_l, y_l, x_u, pl)
    # labeled foreground pasted onto the unlabeled image (Eq. 5), pseudo-foreground onto the labeled one
    assert torch.equal(xu[0, 0] == 1.0, y_l[0] == 1) and torch.equal(xl[0, 0] == 2.0, pl[0] == 1)
    assert torch.equal(yu, ((y_l + pl) > 0).long()) and torch.equal(yl, ((y_l + pl) > 0).long())


def test_csa_channel_mean_reduction():
    feat = torch.tensor([[[[[1.0, 3.0]]], [[[2.0, 0.0]]]]])
    probs = torch.tensor([[[[[1.0, 0.0]]], [[[0.0, 1.0]]]]])
    text = torch.tensor([[0.0, 0.0], [1.0, 1.0]])
    # prototypes [0.5, 1] and [1.5, 0]: per-class squared errors (0.25 + 1) and (0.25 + 1), averaged over 2 channels
    assert csa_loss(feat, [probs], text, channel_reduction="mean").item() == pytest.approx(1.25)
    with pytest.raises(ValueError):
        csa_loss(feat, [probs], text, channel_reduction="max")


def test_text_semiseg_text_changes_prediction_and_official_tmr_does_not(emb):
    x = _batch().image_l
    outs = {}
    for mode in ("paper", "official"):
        torch.manual_seed(0)
        # train-mode batch statistics (no dropout): an untrained net's eval-mode BN can silence the decoder
        m = _method("text-semiseg", emb["clip"], f"method.tmr={mode}", "method.backbone.has_dropout=false")
        m.fusions.eval()  # the published TMR layer has dropout 0.1
        with torch.no_grad():
            a = m.predict_logits(x)
            m.text.embeddings.copy_(torch.randn_like(m.text.embeddings) * 3)
            b = m.predict_logits(x)
        outs[mode] = (a, b)
    assert not torch.allclose(*outs["paper"], atol=1e-5)
    assert torch.allclose(*outs["official"], atol=1e-5)


def test_text_semiseg_dca_trains_only_the_worse_decoder(emb):
    torch.manual_seed(0)
    m = _method("text-semiseg", emb["clip"], "method.csa=false")
    b = _batch()
    sup = [torch.tensor(0.2), torch.tensor(0.9)]  # decoder 0 is better → decoder 1 learns from the mix
    pls = [threshold_pseudo_label(torch.rand(2, 2, 32, 32, 16).softmax(1), 0.5, lcc=True)] * 2
    seg = lambda o, y: F.cross_entropy(o.float(), y)  # noqa: E731
    mixed, csa = m._dca(b, sup, pls, m.text(), seg)
    assert csa is None
    mixed.backward()
    g0 = [p.grad for p in m.net.decoders[0].parameters()]
    g1 = [p.grad for p in m.net.decoders[1].parameters()]
    assert all(g is None or float(g.abs().sum()) == 0 for g in g0)
    assert sum(float(g.abs().sum()) for g in g1 if g is not None) > 0


def test_text_semiseg_step_terms_follow_the_flags(emb):
    b = _batch()
    full = _method("text-semiseg", emb["clip"], "method.dca_start=0").training_step(b, _ctx(1))
    assert {"loss_sup", "loss_csa", "loss_consistency", "loss_dca", "loss_csa_mixed"} <= set(full)
    late = _method("text-semiseg", emb["clip"], "method.dca_start=5").training_step(b, _ctx(5))
    assert "loss_dca" not in late  # DCA only after dca_start (iter_num > mixed_iterations, trainer.py:157)
    bare = _method("text-semiseg", emb["clip"], "method.tmr=false", "method.csa=false", "method.dca=false")
    assert bare.text is None and bare.fusions is None and bare.csa_heads is None
    # ramp at the 0-based iteration as the published trainer (trainer.py:153): 0.1 · exp(-5 (1 - (t // 150) / 200)^2);
    # at t = 299 that is epoch 1 (the old 1-based count gave epoch 2)
    w = _method("text-semiseg", emb["clip"]).training_step(b, _ctx(299))["consistency_weight"].item()
    assert w == pytest.approx(0.1 * torch.exp(torch.tensor(-5 * (1 - 1 / 200) ** 2)).item(), rel=1e-6)
    w = _method("text-semiseg", emb["clip"]).training_step(b, _ctx(300))["consistency_weight"].item()
    assert w == pytest.approx(0.1 * torch.exp(torch.tensor(-5 * (1 - 2 / 200) ** 2)).item(), rel=1e-6)


def test_vclipseg_vwpm_uses_text_and_flags_remove_modules(emb):
    torch.manual_seed(0)
    m = _method("vclipseg", emb["clip"], "method.backbone.has_dropout=false")
    x = _batch().image_l
    with torch.no_grad():
        a = m.predict_proba(x)
        m.text_embeddings.copy_(-m.text_embeddings.flip(0) * 5)
        assert not torch.allclose(a, m.predict_proba(x), atol=1e-6)
    out = _method("vclipseg", emb["clip"]).train().training_step(_batch(), _ctx())
    assert {"loss_dice", "loss_unsup", "loss_vtcm"} <= set(out) and torch.isfinite(out["loss"])
    plain = _method("vclipseg", emb["clip"], "method.vwpm=false", "method.vtcm=false")
    assert plain.vwpm is None and plain.vtcm_heads is None and "loss_vtcm" not in plain.training_step(_batch(), _ctx())


def test_llm_segnet_injection_beta_and_loss_kinds(emb):
    torch.manual_seed(0)
    m = _method("llm-segnet", emb["bert"], "method.beta=1.0", "method.backbone.has_dropout=false")
    x = _batch().image_l
    with torch.no_grad():
        a = m.predict_logits(x)
        m.text_embeddings.mul_(-3)
        assert not torch.allclose(a, m.predict_logits(x), atol=1e-5)
    for kind in ("usl", "mse", "nll"):
        m.cfg["method"]["unsup_loss"] = kind
        out = m.training_step(_batch(), _ctx())
        assert torch.isfinite(out["loss"]) and out["loss_unsup"] >= 0
    with pytest.raises(ConfigError, match="unsup_loss"):
        _method("llm-segnet", emb["bert"], "method.unsup_loss=kl")


def test_missing_embeddings_name_the_encode_command():
    cfg = build_config("vclipseg", "synthetic", 3, [32, 32, 16], sets=["method.backbone.n_filters=4"])
    with pytest.raises(ConfigError, match="textseg encode --encoder clip"):
        build_method("vclipseg", cfg, 1, 2, 3, **CTX)
    cfg = build_config("llm-segnet", "synthetic", 3, [32, 32, 16], sets=["method.backbone.n_filters=4"])
    with pytest.raises(ConfigError, match="textseg encode --encoder bert"):
        build_method("llm-segnet", cfg, 1, 2, 3, **CTX)


def test_text_addon_on_uamt_keeps_the_teacher_an_ema_of_the_fused_student(emb):
    torch.manual_seed(0)
    m = _method("uamt", emb["clip"], "method.text_addon=tmr+csa")
    assert isinstance(m, TextAddon)
    s_tmr, t_tmr = m.base.student.encoder.fusion, m.base.teacher.encoder.fusion
    assert all(not p.requires_grad for p in t_tmr.parameters())
    opt = torch.optim.SGD(m.param_groups(), lr=0.1)
    out = m.training_step(_batch(), _ctx(3))
    assert out["loss_csa"] > 0
    out["loss"].backward()
    assert s_tmr.q.weight.grad is not None and m.csa_heads[0].net.weight.grad is not None
    opt.step()
    before = t_tmr.q.weight.clone()
    m.on_after_optimizer_step(_ctx(3))
    alpha = min(1 - 1 / 4, 0.99)
    assert torch.allclose(t_tmr.q.weight, alpha * before + (1 - alpha) * s_tmr.q.weight, atol=1e-6)
    # a fresh build loads the state dict (what `load_run` does)
    again = _method("uamt", emb["clip"], "method.text_addon=tmr+csa")
    again.load_state_dict(m.state_dict())
    m.eval(), again.eval()
    x = _batch().image_l
    with torch.no_grad():
        assert torch.allclose(m.predict_logits(x), again.predict_logits(x), atol=1e-5)


def test_text_addon_on_dtc_and_refusals(emb):
    torch.manual_seed(0)
    m = _method("dtc", emb["clip"], "method.text_addon=tmr+csa")
    out = m.training_step(_batch(), _ctx())
    assert "loss_csa" in out and torch.isfinite(out["loss"])
    with pytest.raises(ConfigError, match="tmr\\+csa"):
        _method("dtc", emb["clip"], "method.text_addon=tmr+foo")
    with pytest.raises(ConfigError, match="already text-guided"):
        text_flag_sets("vclipseg", text="tmr+csa")
    with pytest.raises(ConfigError, match="applies to vclipseg"):
        text_flag_sets("mcnet", vwpm=False)
    assert text_flag_sets("text-semiseg", tmr="off", csa=False, text_embeddings="e.safetensors") == [
        "method.text.embeddings=e.safetensors", "method.tmr=false", "method.csa=false"]


def test_coop_prompts_train_with_a_random_clip_tower(tmp_path):
    """Text-SemiSeg's default text source: learnable context vectors over a frozen CLIP text tower."""
    cfg = build_config("text-semiseg", "synthetic", 3, [32, 32, 16],
                       sets=["method.backbone.n_filters=4", "method.text.clip_pretrained=none", "method.dca_start=0"])
    torch.manual_seed(0)
    m = build_method("text-semiseg", cfg, 1, 2, 3, **CTX)
    assert m.text.kind == "coop" and m.text.coop.class_names == ["background", "liver"]
    trainable = {n for n, p in m.named_parameters() if p.requires_grad and n.startswith("text.")}
    assert trainable == {"text.coop.ctx"}
    out = m.training_step(_batch(), _ctx())
    out["loss"].backward()
    assert float(m.text.coop.ctx.grad.abs().sum()) > 0


# --- CLI: training improves validation Dice; every ablation flag runs ---------------------------------

TINY = ["--set", "method.backbone.n_filters=4", "--set", "train.batch_labeled=1", "--set", "train.batch_unlabeled=1",
        "--set", "train.log_every=5", "--device", "cpu"]


def _val(run):
    rows = list(csv.DictReader(open(run / "log.csv", newline="")))
    return {int(r["iteration"]): float(r["val_dice"]) for r in rows if r.get("val_dice")}


@pytest.mark.parametrize("method,kind,extra", [
    # CE-weighted runs first predict all background for a few hundred steps; Dice alone moves within 40
    ("text-semiseg", "clip", ["--set", "method.seg_loss.ce=0", "--set", "method.dice.include_background=false",
                              "--set", "optim.schedule=constant", "--set", "method.dca_start=20"]),
    ("vclipseg", "clip", []),
    ("llm-segnet", "bert", ["--set", "method.seg_loss.ce=0"]),
])
def test_cli_training_raises_validation_dice(synthetic_data, emb, tmp_path, method, kind, extra):
    run = tmp_path / "run"
    code, out = run_cli("train", "--method", method, "--data", synthetic_data, "--labeled", "3", "--iterations", "40",
                        "--out", run, "--val-every", "20", "--set", "val.at_start=true", "--text-embeddings", emb[kind],
                        *TINY, *extra)
    assert code == 0, out
    val = _val(run)
    assert sorted(val) == [0, 20, 40]
    assert max(val[20], val[40]) > val[0] + 0.1, val
    assert f"embeddings: {emb[kind]}" in (run / "config.yaml").read_text(encoding="utf-8")


ABLATIONS = [
    ("text-semiseg", "clip", ["--no-tmr"]), ("text-semiseg", "clip", ["--no-csa"]),
    ("text-semiseg", "clip", ["--no-dca"]), ("text-semiseg", "clip", ["--tmr", "official"]),
    ("text-semiseg", "clip", ["--text-fusion", "repeat"]),
    ("vclipseg", "clip", ["--no-vwpm"]), ("vclipseg", "clip", ["--no-vtcm"]),
    ("llm-segnet", "bert", ["--unsup-loss", "mse"]), ("llm-segnet", "bert", ["--unsup-loss", "nll", "--t1", "0.8",
                                                                              "--t2", "0.2"]),
    ("uamt", "clip", ["--text", "tmr+csa"]), ("dtc", "clip", ["--text", "tmr+csa"]),
]


@pytest.mark.parametrize("method,kind,flags", ABLATIONS, ids=[f"{m}{''.join(f)}" for m, _, f in ABLATIONS])
def test_cli_ablation_flags_run(synthetic_data, emb, tmp_path, method, kind, flags):
    run = tmp_path / "run"
    code, out = run_cli("train", "--method", method, "--data", synthetic_data, "--labeled", "3", "--iterations", "2",
                        "--out", run, "--val-every", "0", "--text-embeddings", emb[kind], "--set", "method.dca_start=0",
                        *TINY, *flags)
    assert code == 0, out
    cfg = (run / "config.yaml").read_text(encoding="utf-8")
    expected = {"--no-tmr": "tmr: false", "--no-csa": "csa: false", "--no-dca": "dca: false",
                "--tmr": "tmr: official", "--text-fusion": "text_fusion: repeat", "--no-vwpm": "vwpm: false",
                "--no-vtcm": "vtcm: false", "--unsup-loss": "unsup_loss:", "--text": "text_addon: tmr+csa"}[flags[0]]
    assert expected in cfg
    assert (run / "checkpoints" / "last.pt").exists()


def test_cli_reports_missing_embeddings_and_misplaced_flags(synthetic_data, tmp_path):
    code, out = run_cli("train", "--method", "vclipseg", "--data", synthetic_data, "--iterations", "1",
                        "--out", tmp_path / "a", *TINY)
    assert code == 2 and "textseg encode --encoder clip" in out
    code, out = run_cli("train", "--method", "mcnet", "--data", synthetic_data, "--iterations", "1", "--no-dca",
                        "--out", tmp_path / "b", *TINY)
    assert code == 2 and "--dca applies to text-semiseg" in out


def test_llm_segnet_unsupervised_weight_is_unramped_by_default(emb):
    # Eq. 1 of the paper has no ramp on L_u: weight 1 from the first step (the old default ramped over 40 epochs)
    m = _method("llm-segnet", emb["bert"])
    assert m.training_step(_batch(), _ctx(0))["consistency_weight"].item() == pytest.approx(1.0)
    ramped = _method("llm-segnet", emb["bert"], "method.consistency.rampup=40")
    w = ramped.training_step(_batch(), _ctx(299))["consistency_weight"].item()  # 1-based step 300 → epoch 2
    assert w == pytest.approx(float(torch.exp(torch.tensor(-5 * (1 - 2 / 40) ** 2))), rel=1e-6)
    assert "2407.05088" in m.paper


def test_vclipseg_step_weights_at_chosen_iterations(emb):
    # λ_u = 1 · ramp((t + 1) // 150, 40) (train_3d.py:195-196); labeled Dice × 0.5, L_reg × 0.5 (--lamda, --sim_w)
    m = _method("vclipseg", emb["clip"])
    for it, epoch in ((0, 0), (149, 1), (2999, 20), (7000, 40)):
        w = m.training_step(_batch(), _ctx(it))["consistency_weight"].item()
        assert w == pytest.approx(float(torch.exp(torch.tensor(-5 * (1 - min(epoch, 40) / 40) ** 2))), rel=1e-6)
    hp = m.hparams
    assert (hp["sup_weight"], hp["reg_weight"], hp["eval_decoder"], hp["pseudo_label"]) == (0.5, 0.5, 0, "hard")


def test_text_addon_csa_defaults_are_published_and_former_reading_is_a_switch(emb):
    """`--text` CSA: the published CSA by default (Text-SemiSeg trainer.py:122-138, value parity in
    tests/parity/test_text_addon_parity.py); the add-on's former reading (softmax, average pooling, sum over classes,
    raw F_t, no feature norm) stays reachable through `method.csa.*` / `method.text.normalize` and gives its value."""
    from textseg_cli.methods.text_addon import CSA_DEFAULTS
    from textseg_cli.text.embeddings import load_embeddings

    old = ["method.csa.activation=softmax", "method.csa.resize=avgpool", "method.csa.class_reduction=sum",
           "method.csa.feature_norm=none", "method.text.normalize=false"]
    values = {}
    for name, sets in (("default", []), ("former", old)):
        torch.manual_seed(0)
        m = _method("dtc", emb["clip"], "method.text_addon=tmr+csa", *sets)
        fused, outs = [], []
        hooks = [m.base.net.encoder.register_forward_hook(lambda mod, i, o: fused.append(o[-1])),
                 m.base.net.register_forward_hook(lambda mod, i, o: outs.append(o))]
        out = m.training_step(_batch(), _ctx(3))
        for h in hooks:
            h.remove()
        values[name] = float(out["loss_csa"])
        if name == "default":
            assert m.csa == CSA_DEFAULTS and m.text.normalize is True
            continue
        seg = outs[0][0].detach()  # the former formula by hand: softmax([0, z]), average pooling, Σ classes, raw F_t
        probs = torch.softmax(torch.cat([torch.zeros_like(seg), seg], 1), 1)
        with torch.no_grad():
            ref = csa_loss(m.csa_heads[0](fused[0]), [probs], load_embeddings(emb["clip"])[0], pool="mean",
                           channel_reduction="mean")
        assert float(out["loss_csa"]) == pytest.approx(float(ref), rel=1e-5)
    assert values["default"] != pytest.approx(values["former"], rel=1e-3)
    with pytest.raises(ConfigError, match="method.csa.activation"):
        _method("dtc", emb["clip"], "method.text_addon=csa", "method.csa.activation=tanh")
