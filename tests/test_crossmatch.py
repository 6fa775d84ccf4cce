"""CrossMatch (`textseg train --method crossmatch`): CLI training, resume, `textseg models`, and the pieces of the
method that the parity tests (tests/parity/test_crossmatch_parity.py) do not reach without the official checkout."""

from __future__ import annotations

import csv

import numpy as np
import pytest
import torch
from conftest import run_cli
from scipy import ndimage

from textseg_cli.data.batch import Batch
from textseg_cli.methods.base import StepContext
from textseg_cli.methods.crossmatch import (
    Draws,
    cutmix_box,
    foreground_dice,
    gaussian_blur,
)
from textseg_cli.methods.registry import build_method
from textseg_cli.runs.checkpoint import load_checkpoint
from textseg_cli.runs.config import build_config

TINY = ["--set", "method.backbone.n_filters=4", "--set", "train.batch_labeled=2", "--set", "train.batch_unlabeled=4"]


def _train(data, out, iterations, *extra):
    return run_cli("train", "--method", "crossmatch", "--data", data, "--labeled", "2", "--iterations", iterations,
                   "--val-every", "2", "--seed", "0", "--device", "cpu", "--threads", "1", "--out", out, *TINY, *extra)


def test_trains_from_the_cli_and_writes_checkpoints(synthetic_data, tmp_path):
    run = tmp_path / "run"
    code, out = _train(synthetic_data, run, 3)
    assert code == 0, out
    assert (run / "checkpoints" / "last.pt").is_file() and (run / "checkpoints" / "best.pt").is_file()
    log = (run / "log.csv").read_text(encoding="utf-8").splitlines()[0].split(",")
    assert {"loss", "loss_x", "loss_kd", "conf_threshold"} <= set(log)
    ckpt = load_checkpoint(run / "checkpoints" / "last.pt")
    assert ckpt["iteration"] == 3 and ckpt["config"]["optim"]["name"] == "adamw"


def test_resumed_run_equals_the_uninterrupted_one(synthetic_data, tmp_path):
    """The image perturbations draw from a generator seeded by (seed, rank, step) and the dropouts from the global
    RNG the engine checkpoints: 2 + 2 resumed steps give the weights of 4 steps."""
    code, out = _train(synthetic_data, tmp_path / "full", 4)
    assert code == 0, out
    code, out = _train(synthetic_data, tmp_path / "part", 2)
    assert code == 0, out
    code, out = run_cli("train", "--resume", "--out", tmp_path / "part", "--iterations", "4", "--threads", "1")
    assert code == 0, out
    a = load_checkpoint(tmp_path / "full" / "checkpoints" / "last.pt")["method"]
    b = load_checkpoint(tmp_path / "part" / "checkpoints" / "last.pt")["method"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_models_lists_crossmatch_with_its_parameter_count():
    code, out = run_cli("models", "--in-channels", "1", "--classes", "2", "--patch", "112,112,80")
    assert code == 0, out
    line = next(ln for ln in out.splitlines() if "crossmatch" in ln)
    assert "9,448,866" in line  # the LA V-Net: the feature perturbation adds no parameters


def _method(**sets):
    cfg = build_config("crossmatch", "synthetic", 3, [32, 32, 16],
                       sets=["method.backbone.n_filters=4", *[f"method.{k}={v}" for k, v in sets.items()]])
    torch.manual_seed(0)
    return build_method("crossmatch", cfg, 1, 2, dim=3)


def test_confidence_threshold_follows_the_code_update():
    """τ is 0.75 at step 0 and (0.75 + 0.25·ramp(t − 1, 17000))·ln 2 after it (train_cross_match.py:365-367)."""
    m = _method()
    assert m.confidence_threshold(0) == 0.75
    for t in (1, 2, 5000, 17001, 20000):
        ramp = float(np.exp(-5 * (1 - min(t - 1, 17000) / 17000) ** 2))
        assert m.confidence_threshold(t) == pytest.approx((0.75 + 0.25 * ramp) * np.log(2), rel=1e-12)


def test_perturbation_dropouts_act_in_eval_mode_too():
    """The official PertDropout keeps its dropouts outside the module tree: eval() leaves them on, while the
    V-Net's own dropout and the plain forward are deterministic in eval mode."""
    m = _method().eval()
    x = torch.randn(4, 1, 32, 32, 16)
    with torch.no_grad():
        a, b = m.net(x), m.net(x)
        assert torch.equal(a, b) and torch.equal(m.predict_logits(x), a)
        first, rest, weak, strong = m.net(x, need_fp=True)
        assert torch.allclose(first, a[:2], atol=1e-5) and torch.allclose(rest, a[2:], atol=1e-5)
        assert not torch.allclose(weak, rest) and not torch.allclose(strong, rest)
    assert m.net.pert_rates == (0.25, 0.75)


def test_draws_depend_on_seed_rank_and_step_only():
    m = _method()
    u = torch.randn(2, 1, 32, 32, 16)
    ctx = lambda it, rank=0: StepContext(it, 10, torch.device("cpu"), extra={"rank": rank})
    one = m.perturb_images(u[:1], u[1:], m.draws(ctx(3)))
    again = m.perturb_images(u[:1], u[1:], m.draws(ctx(3)))
    assert all(torch.equal(p, q) for p, q in zip(one, again))
    other = [m.perturb_images(u[:1], u[1:], m.draws(c))[0] for c in (ctx(4), ctx(3, rank=1))]
    assert all(not torch.equal(one[0], o) for o in other)


def test_cutmix_box_reproduces_the_code_axes():
    """`mask[z:z+d, y:y+h, x:x+w]` (la_heart.py:45): the corner drawn against the last axis indexes the first."""
    g = Draws(torch.Generator().manual_seed(0))
    boxes = [cutmix_box([112, 112, 80], g) for _ in range(40)]
    assert any(b.sum() == 0 for b in boxes) and any(b.sum() > 0 for b in boxes)  # p = 0.5
    for b in boxes:
        if b.sum():
            nz = b.nonzero()
            assert int(nz[:, 0].min()) < 80  # z ∈ [0, 80 − d) on the first axis


def test_gaussian_blur_equals_scipy():
    x = torch.randn(1, 20, 17, 9, dtype=torch.float64)
    stds = [0.1, 1.3, 2.0]
    ours = gaussian_blur(x, stds)
    ref = ndimage.gaussian_filter(x[0].numpy(), stds)
    np.testing.assert_allclose(ours[0].numpy(), ref, atol=1e-12)


def test_foreground_dice_ignores_unconfident_voxels():
    probs = torch.softmax(torch.randn(2, 2, 8, 8, 4), 1)
    labels = (torch.rand(2, 8, 8, 4) > 0.5).long()
    valid = torch.rand(2, 8, 8, 4) > 0.3
    p, t = probs[:, 1][valid], labels[valid].float()
    expected = 1 - (2 * (p * t).sum() + 1e-5) / ((p * p).sum() + (t * t).sum() + 1e-5)
    assert float(foreground_dice(probs, labels, valid)) == pytest.approx(float(expected), rel=1e-6)


def test_odd_unlabeled_batch_is_refused():
    from textseg_cli.errors import ConfigError

    m = _method()
    b = Batch(torch.randn(2, 1, 32, 32, 16), torch.zeros(2, 32, 32, 16, dtype=torch.long), torch.randn(3, 1, 32, 32, 16))
    with pytest.raises(ConfigError, match="batch_unlabeled must be even"):
        m.training_step(b, StepContext(0, 10, torch.device("cpu")))


# --- "+Text" (`--text tmr+csa`) -----------------------------------------------------------------------------------

def _grads_seen_by_the_addon(monkeypatch) -> list[dict[str, bool]]:
    """Per optimiser step of a CLI run: whether every parameter of the text path (TMR fusion, CSA head) got a
    non-zero gradient. Read in `on_after_optimizer_step`, after the step's backward (the engine zeroes before it)."""
    from textseg_cli.methods.text_addon import TextAddon

    seen: list[dict[str, bool]] = []
    original = TextAddon.on_after_optimizer_step

    def spy(self, ctx):
        def ok(params):
            params = list(params)
            return bool(params) and all(p.grad is not None and bool(p.grad.abs().sum() > 0) for p in params)
        seen.append({"tmr": all(ok(s.encoder.fusion.parameters()) for s in self.students),
                     "csa": ok(self.csa_heads.parameters())})
        return original(self, ctx)

    monkeypatch.setattr(TextAddon, "on_after_optimizer_step", spy)
    return seen


def test_text_addon_trains_crossmatch_from_the_cli(synthetic_data, tmp_path, monkeypatch):
    """`--text tmr+csa` on CrossMatch: the network is called with need_fp=True, which returns a tuple of logits; the
    add-on pairs the decoder's input and output, so CSA sees every forward and TMR/CSA receive gradients."""
    from method_matrix import write_inputs

    emb = write_inputs(tmp_path / "inputs")["clip"]
    seen = _grads_seen_by_the_addon(monkeypatch)
    run = tmp_path / "text"
    code, out = _train(synthetic_data, run, 2, "--text", "tmr+csa", "--text-embeddings", emb,
                       "--set", "train.log_every=1", "--val-every", "0")
    assert code == 0, out
    assert seen == [{"tmr": True, "csa": True}] * 2
    with open(run / "log.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 2 and all(np.isfinite(float(r["loss_csa"])) and float(r["loss_csa"]) > 0 for r in rows)
    assert "text_addon: tmr+csa" in (run / "config.yaml").read_text(encoding="utf-8")


def test_text_addon_sees_the_feature_perturbed_decodings(tmp_path, monkeypatch):
    """CSA gets one (bottleneck, logits) pair per gradient-carrying forward, with the perturbed copies in both:
    net([x, u], need_fp) and net([s1, s2], need_fp) decode 2 + 2 + 2·2 = 8 samples each; the teacher passes under
    no_grad are not recorded."""
    import textseg_cli.methods.text_addon as text_addon
    from method_matrix import Spec, batch, build, ctx, write_inputs

    spec = Spec("crossmatch+tmr+csa", "crossmatch", sets=["method.backbone.n_filters=4", "method.text_addon=tmr+csa"],
                emb="clip")
    m = build(spec, write_inputs(tmp_path))
    b = batch(spec)
    b = Batch(b.image_l, b.label_l, torch.cat([b.image_u, b.image_u.flip(-1)]))  # 4 unlabeled: 2 + 2 CutMix partners
    shapes = []
    real = text_addon.csa_loss

    def spy(feats, probs, text, **kw):
        shapes.append((feats.shape[0], [p.shape[0] for p in probs]))
        return real(feats, probs, text, **kw)

    monkeypatch.setattr(text_addon, "csa_loss", spy)
    out = m.training_step(b, ctx(0))
    assert shapes == [(8, [8]), (8, [8])]
    out["loss"].backward()
    assert all(p.grad is not None for p in m.base.net.encoder.fusion.parameters())
    assert all(p.grad is not None for p in m.csa_heads.parameters())


@pytest.mark.parametrize("preset", ["la", "pancreas"])
def test_paper_presets_hold_plus_text_rows_for_the_new_baselines(preset, tmp_path):
    """The LA and Pancreas tables run CrossMatch and AD-MT both plain and "+Text" (`--text tmr+csa`)."""
    from textseg_cli.experiments.presets import write_preset
    from textseg_cli.experiments.spec import commands, load_experiment

    exp = load_experiment(write_preset(preset, tmp_path / f"{preset}.yaml"))
    for method, display in (("crossmatch", "CrossMatch"), ("ad-mt", "AD-MT")):
        plain = next(m for m in exp.methods if m.id == method)
        text = next(m for m in exp.methods if m.id == f"{method}_plustext")
        assert (plain.method, plain.name, plain.sets) == (method, display, ["train.precision=fp32"])
        assert (text.method, text.name) == (method, f"{display} + Text")
        assert text.sets == ["method.text_addon=tmr+csa", "train.precision=fp32"]
        run = next(r for r in exp.runs() if r.entry.id == text.id)
        assert "--set method.text_addon=tmr+csa" in commands(exp, run, True)[0]
        cfg = build_config(method, preset, 3, None, sets=text.sets)
        assert cfg["method"]["text_addon"] == "tmr+csa"
