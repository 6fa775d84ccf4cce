"""One precision rule for training, validation, eval, predict and bench (`textseg_cli.runtime.precision`)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from textseg_cli.runtime import precision as P
from textseg_cli.runs.config import build_config
from textseg_cli.errors import ConfigError

pytestmark = pytest.mark.usefixtures("one_thread")


def test_auto_follows_the_hardware(monkeypatch):
    monkeypatch.setattr(P, "cpu_has_bf16", lambda: True)
    assert P.resolve_precision("auto", "cpu").name == "bf16"
    assert P.resolve_precision("auto", "cpu").channels_last
    monkeypatch.setattr(P, "cpu_has_bf16", lambda: False)
    cpu = P.resolve_precision("auto", "cpu")
    assert cpu.name == "fp32" and not cpu.channels_last and "no bf16 units" in cpu.reason
    assert P.resolve_precision("bf16", "cpu").name == "bf16"  # explicit request wins
    monkeypatch.setattr(P, "_cuda_has_bf16", lambda dev: True)
    assert P.resolve_precision("auto", "cuda").name == "bf16"
    assert P.resolve_precision("fp32", "cuda").name == "fp32" and P.resolve_precision("fp32", "cuda").channels_last
    monkeypatch.setattr(P, "_cuda_has_bf16", lambda dev: False)
    assert P.resolve_precision("auto", "cuda").name == "fp32"
    with pytest.raises(ConfigError, match="--precision 'half'"):
        P.resolve_precision("half", "cpu")


def test_cpu_bf16_override(monkeypatch):
    monkeypatch.setenv("TEXTSEG_CPU_BF16", "1")
    assert P.resolve_precision("auto", "cpu").name == "bf16"
    monkeypatch.setenv("TEXTSEG_CPU_BF16", "0")
    assert P.resolve_precision("auto", "cpu").name == "fp32"
    monkeypatch.delenv("TEXTSEG_CPU_BF16")
    assert P.cpu_has_bf16() == P._cpu_detects_bf16()


def test_validation_follows_training_amp_off(monkeypatch):
    """Issue 18.6: defaults say inference.precision=auto, so the old setdefault("precision", "fp32") never
    applied and a run with train.amp=false validated in bf16 on CUDA."""
    monkeypatch.setattr(P, "_cuda_has_bf16", lambda dev: True)
    cfg = build_config("mcnet", None, 3, [16, 16, 16], sets=["train.amp=false"])
    assert cfg["inference"]["precision"] == "auto"
    assert P.training_request(cfg) == "fp32"
    assert P.resolve_precision(P.inference_request(cfg), "cuda").name == "fp32"
    cfg = build_config("mcnet", None, 3, [16, 16, 16], sets=["train.precision=fp32"])
    assert P.resolve_precision(P.inference_request(cfg), "cuda").name == "fp32"
    cfg = build_config("mcnet", None, 3, [16, 16, 16])
    assert P.resolve_precision(P.inference_request(cfg), "cuda").name == "bf16"
    cfg = build_config("mcnet", None, 3, [16, 16, 16], sets=["train.amp=false", "inference.precision=bf16"])
    assert P.inference_request(cfg) == "bf16"  # an explicit inference choice is kept
    assert P.inference_request(cfg, override="fp32") == "fp32"  # and a --precision flag beats it
    with pytest.raises(ConfigError, match="train.precision"):
        build_config("mcnet", None, 3, [16, 16, 16], sets=["train.precision=fp16"])


def test_validate_passes_the_resolved_rule_to_predict_case(monkeypatch):
    import textseg_cli.evaluation.validation as validation_mod
    from textseg_cli.evaluation.validation import validate

    seen = []

    def fake_predict(method, image, settings, device):
        assert isinstance(settings.precision, P.Precision)  # resolved before the cases, not per case
        seen.append(settings.precision.requested)
        return torch.zeros((2,) + image.shape[1:])

    monkeypatch.setattr(validation_mod, "predict_case", fake_predict)
    cases = [("c0", np.zeros((1, 4, 4, 4), np.float32), np.zeros((4, 4, 4), np.uint8))]
    for sets, expected in ((["train.amp=false"], "fp32"), ([], "auto"), (["train.precision=bf16"], "bf16")):
        cfg = build_config("mcnet", None, 3, [4, 4, 4], sets=sets)
        validate(None, cases, cfg, torch.device("cpu"), 2, ["bg", "fg"])
        assert seen[-1] == expected


def test_losses_stay_float32_under_cpu_bf16():
    """CPU autocast keeps softmax/sum in bf16 (CUDA autocast does not): Dice of 64k voxels summed in bf16
    is off by ~0.4 %; under the bf16 context they run in float32."""
    from textseg_cli.methods.losses import dice_loss

    torch.manual_seed(0)
    conv = torch.nn.Conv3d(1, 2, 3, padding=1)
    x, y = torch.randn(2, 1, 32, 32, 16), torch.randint(0, 2, (2, 32, 32, 16))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        plain = torch.softmax(conv(x), 1)
    assert plain.dtype == torch.bfloat16  # what CPU autocast alone gives
    with P.resolve_precision("bf16", "cpu").autocast():
        logits = conv(x)
        probs = torch.softmax(logits, 1)
        loss = dice_loss(probs, y)
        s = logits.sum()
    assert logits.dtype == torch.bfloat16  # the convolution still runs in bf16
    assert probs.dtype == torch.float32 and loss.dtype == torch.float32 and s.dtype == torch.float32
    ref = dice_loss(torch.softmax(conv(x).float(), 1), y)
    assert float(loss.detach()) == pytest.approx(float(ref.detach()), abs=2e-2)


def test_mcnet_step_bf16_close_to_fp32():
    from textseg_cli.bench.benchmark import _random_batch, method_config
    from textseg_cli.methods.base import StepContext
    from textseg_cli.methods.registry import build_method

    patch = (16, 16, 16)
    cfg = method_config("mcnet", patch, ["method.backbone.n_filters=4"])
    losses = {}
    for req in ("fp32", "bf16"):
        torch.manual_seed(0)
        m = build_method("mcnet", cfg, 1, 2, dim=3, quiet_warnings=True).train()
        prec = P.resolve_precision(req, "cpu")
        if prec.channels_last:
            P.to_channels_last(m)
        batch = _random_batch(1, 2, patch, 2, 2, torch.device("cpu"))
        torch.manual_seed(1)  # dropout masks
        with prec.autocast():
            out = m.training_step(batch, StepContext(0, 10, torch.device("cpu")))
        assert out["loss"].dtype == torch.float32
        losses[req] = float(out["loss"].detach())
    assert losses["bf16"] == pytest.approx(losses["fp32"], rel=2e-2)


def test_train_records_precision_in_env_and_eval_meta(tmp_path, synthetic_data):
    from textseg_cli.engine.setup import train
    from textseg_cli.evaluation.run import evaluate_run

    run = tmp_path / "run"
    train("sup", synthetic_data, labeled="2", iterations=1, out=run, device="cpu", quiet=True,
          sets=["method.backbone.n_filters=4", "train.batch_labeled=1", "train.precision=fp32", "val.every=0"])
    env = json.loads((run / "env.json").read_text(encoding="utf-8"))
    assert env["precision"]["train"]["precision"] == "fp32"
    assert env["precision"]["validation"]["precision"] == "fp32"
    evaluate_run(run, split="val", checkpoint="last", out=tmp_path / "ev", device="cpu")
    assert json.loads((tmp_path / "ev" / "meta.json").read_text(encoding="utf-8"))["precision"] == "fp32"  # follows training
    evaluate_run(run, split="val", checkpoint="last", out=tmp_path / "ev2", device="cpu", precision="bf16")
    assert json.loads((tmp_path / "ev2" / "meta.json").read_text(encoding="utf-8"))["precision"] == "bf16"


@pytest.mark.parametrize("shape", [(2, 2, 2), (2, 8, 8), (2, 2, 1)])
def test_bf16_conv_weight_gradient_on_tiny_inputs(shape):
    """oneDNN's bf16 conv3d weight gradient is wrong for inputs with a depth of 2 (1e10-1e36 instead of ~10):
    a tiny V-Net's loss went NaN at step 2. Such convs run in float32 under the CPU bf16 context."""
    torch.manual_seed(0)
    conv = torch.nn.Conv3d(32, 32, 3, padding=1)
    x = torch.randn((2, 32) + shape)
    with P.resolve_precision("bf16", "cpu").autocast():
        conv(x).float().square().sum().backward()
    got, conv.weight.grad = conv.weight.grad.clone(), None
    conv(x).square().sum().backward()
    ref = conv.weight.grad
    assert float((got - ref).abs().max() / ref.abs().max()) < 0.02


def test_float16_tensors_can_be_joined_under_cpu_bf16():
    """tgcnet stores cached CLIP features as float16; CPU autocast refuses torch.stack on them."""
    a, b = torch.randn(3, dtype=torch.float16), torch.randn(3, dtype=torch.float16)
    with P.resolve_precision("bf16", "cpu").autocast():
        joined = torch.stack([a, b])
        cat = torch.cat([a, torch.randn(2)])
    assert joined.dtype == torch.float32 and cat.dtype == torch.float32
    assert torch.equal(joined, torch.stack([a.float(), b.float()]))


@pytest.mark.benchmark
def test_mcnet_bf16_training_tracks_fp32(tmp_path, synthetic_data):
    """bf16 does not hurt: MC-Net on the synthetic tracks, same seed, fp32 vs bf16 (CPU). Prints the figures
    docs/performance.md quotes."""
    from textseg_cli.engine.setup import train

    iters = 200
    sets = ["train.log_every=1", "val.every=50", "method.backbone.n_filters=4"]
    curves, dice = {}, {}
    for prec in ("fp32", "bf16"):
        run = tmp_path / prec
        res = train("mcnet", synthetic_data, labeled="2", iterations=iters, out=run, seed=1, device="cpu",
                    quiet=True, sets=sets + [f"train.precision={prec}"])
        import csv

        with open(run / "log.csv", newline="") as f:
            rows = list(csv.DictReader(f))
        curves[prec] = np.array([float(r["loss"]) for r in rows if r.get("loss")])
        share = np.array([float(r["data_wait_share"]) for r in rows if r.get("data_wait_share")])
        print(f"{prec}: data_wait_share mean {share.mean():.4f}; {res.seconds:.1f} s")
        dice[prec] = [float(r["val_dice"]) for r in rows if r.get("val_dice")]
        assert res.iteration == iters
    for prec in curves:
        c = curves[prec]
        print(f"{prec}: loss first10 {c[:10].mean():.4f} last20 {c[-20:].mean():.4f}; val Dice {dice[prec]}")
    diff = np.abs(curves["bf16"] - curves["fp32"])
    print(f"|bf16 - fp32| loss: mean {diff.mean():.4f}, max {diff.max():.4f}")
    assert abs(curves["bf16"][-20:].mean() - curves["fp32"][-20:].mean()) < 0.05
    assert abs(dice["bf16"][-1] - dice["fp32"][-1]) < 0.1


def test_demo_precision_reaches_training_and_evaluation(tmp_path):
    """`textseg demo --precision fp32`: the demo's runs train, validate and evaluate in fp32 (what the bf16-vs-fp32
    demo comparison of docs/performance.md runs); a bad value is a one-line usage error before any folder exists."""
    from conftest import run_cli

    out = tmp_path / "demo"
    code, text = run_cli("demo", "--out", str(out), "--iterations", "1", "--methods", "mcnet", "--precision", "fp32",
                         "--device", "cpu")
    assert code == 0, text
    env = json.loads((out / "runs" / "mcnet" / "env.json").read_text())
    assert env["precision"]["train"]["requested"] == "fp32" and env["precision"]["train"]["precision"] == "fp32"
    assert env["precision"]["validation"]["precision"] == "fp32"
    meta = json.loads(next((out / "eval" / "mcnet").rglob("meta.json")).read_text())
    assert meta["precision"] == "fp32"
    code, text = run_cli("demo", "--out", str(tmp_path / "bad"), "--iterations", "1", "--precision", "fp16")
    assert code == 2 and "fp16" in text and not (tmp_path / "bad").exists(), text
