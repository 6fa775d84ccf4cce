"""LViT's U-Net and its MoNuSeg protocol: parameter count, WeightedDiceBCE values, the per-epoch cosine
restarts, the RandomGenerator augmentation's properties, early stopping, the time budget and the loader
resize. Parity with the official code itself: tests/parity/test_lvit_unet.py."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from textseg_cli.data.augment_lvit import random_generator, rot_flip, rotate
from textseg_cli.engine.optim import build_scheduler
from textseg_cli.engine.stopping import StopRules, resolve_epochs
from textseg_cli.methods.lvit_unet import weighted_bce, weighted_dice_bce, weighted_soft_dice
from textseg_cli.models import build_model, count_parameters
from textseg_cli.models.lvit_unet import LViTUNet

from conftest import run_cli


# --- network ------------------------------------------------------------------------------------------

def test_parameter_count_is_lvits():
    with torch.device("meta"):
        net = build_model("lvit-unet", in_channels=3, num_classes=2)
    assert count_parameters(net) == 14_751_873  # LViT nets/UNet.py UNet(n_channels=3, n_classes=1)
    assert net.outc.out_channels == 1  # binary → one sigmoid output, not two softmax channels


@pytest.mark.benchmark  # builds every registered network (about a minute on a busy 2-core machine)
def test_textseg_models_lists_it_with_lvits_count():
    code, out = run_cli("models", "--in-channels", "3", "--patch", "224,224")
    assert code == 0
    rows = [line for line in out.splitlines() if line.strip("│ ").split("│")[0].strip() in ("lvit-unet", "lvit-unet (2D)")]
    assert len(rows) == 2 and all("14,751,873" in r for r in rows)  # the network and the method
    code, out = run_cli("models")  # the default (3D) listing counts the 2D method as LViT builds it (RGB)
    rows = [line for line in out.splitlines() if line.strip("│ ").split("│")[0].strip() in ("lvit-unet", "lvit-unet (2D)")]
    assert code == 0 and any("14,751,873" in r for r in rows), rows


def test_forward_is_sigmoid_of_logits_and_method_predicts_by_threshold():
    torch.manual_seed(0)
    net = LViTUNet(3, 1, base=8).eval()  # the synthetic2d profile's width
    x = torch.rand(2, 3, 32, 32)
    p = net(x)
    assert p.shape == (2, 1, 32, 32) and torch.allclose(p, torch.sigmoid(net.logits(x)))
    from textseg_cli.runs.config import build_config
    from textseg_cli.methods.lvit_unet import LViTUNetMethod

    cfg = build_config("lvit-unet", "synthetic2d", 2, [32, 32])
    m = LViTUNetMethod(cfg, 3, 2, dim=2).eval()
    m.net.load_state_dict(net.state_dict())
    proba = m.predict_proba(x)
    assert torch.allclose(proba[:, 1:], p, atol=1e-6)
    assert torch.equal(proba.argmax(1), (p[:, 0] > 0.5).long())


# --- loss ---------------------------------------------------------------------------------------------

def test_weighted_dice_bce_on_a_fixed_example():
    prob = torch.tensor([[[[0.9, 0.2], [0.6, 0.1]]]])
    target = torch.tensor([[[1.0, 0.0], [1.0, 0.0]]])
    # utils.py:25-37: foreground and background BCE means, 0.5 each:
    # 0.5·(−ln .9 − ln .6)/2 + 0.5·(−ln .8 − ln .9)/2
    assert weighted_bce(prob, target).item() == pytest.approx(0.23617255159896328, rel=1e-6)
    # utils.py:45-61 with w = 0.5 everywhere: 1 − (2·0.375 + 1e-5) / (0.805 + 1e-5)
    assert weighted_soft_dice(prob, target).item() == pytest.approx(0.06832213264431486, rel=1e-5)
    total, dice, bce = weighted_dice_bce(prob, target, 0.5, 0.5)
    assert total.item() == pytest.approx(0.15224734212163907, rel=1e-5)


def test_weighted_bce_pools_the_batch_and_dice_averages_images():
    torch.manual_seed(0)
    prob = torch.rand(2, 1, 8, 8) * 0.98 + 0.01
    target = torch.zeros(2, 8, 8)
    target[0, :2] = 1  # image 0: 16 foreground pixels, image 1: none
    both = weighted_bce(prob, target)
    bce = torch.nn.functional.binary_cross_entropy(prob[:, 0], target, reduction="none")
    fg, bg = target > 0.5, target < 0.5
    assert both.item() == pytest.approx((0.5 * bce[fg].mean() + 0.5 * bce[bg].mean()).item(), rel=1e-5)
    per_image = [weighted_soft_dice(prob[i:i + 1], target[i:i + 1]).item() for i in range(2)]
    assert weighted_soft_dice(prob, target).item() == pytest.approx(np.mean(per_image), rel=1e-6)


# --- scheduler ----------------------------------------------------------------------------------------

def test_cosine_restarts_steps_once_per_epoch_like_torchs_sgdr():
    optim_cfg = {"schedule": "cosine_restarts", "restart_period": 10, "eta_min": 1e-4, "lr": 1e-3}
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.Adam([p], lr=1e-3)
    sched = build_scheduler(opt, 25 * 12, optim_cfg, iterations_per_epoch=12)
    ref_opt = torch.optim.Adam([torch.nn.Parameter(torch.zeros(1))], lr=1e-3)
    ref = torch.optim.lr_scheduler.CosineAnnealingWarmRestarts(ref_opt, T_0=10, T_mult=1, eta_min=1e-4)
    for epoch in range(25):
        lrs = []
        for _ in range(12):
            lrs.append(opt.param_groups[0]["lr"])
            opt.step()
            sched.step()
        assert max(lrs) == min(lrs), f"lr changed inside epoch {epoch}"
        assert lrs[0] == pytest.approx(ref_opt.param_groups[0]["lr"], rel=1e-9), epoch
        expected = 1e-4 + 0.9e-3 * (1 + math.cos(math.pi * (epoch % 10) / 10)) / 2
        assert lrs[0] == pytest.approx(expected, rel=1e-9)
        ref_opt.step()
        ref.step()  # LViT: once per epoch, after validation (Train_one_epoch.py:129-130)


# --- augmentation -------------------------------------------------------------------------------------

def _pair(size=24):
    rng = np.random.default_rng(0)
    label = (rng.random((size, size)) > 0.7).astype(np.uint8)
    image = np.stack([label * 0.5 + 0.25, rng.random((size, size)), np.full((size, size), 0.75)]).astype(np.float32)
    return image, label


def test_random_generator_branches_and_what_each_does():
    image, label = _pair()
    rng = np.random.default_rng(1)
    kinds = {"identity": 0, "rot_flip": 0, "rotate": 0}
    rot_flips = [rot_flip(image, label, k, a)[1] for k in range(4) for a in range(2)]
    for _ in range(800):
        img, lab = random_generator(image, label, rng)
        assert img.shape == image.shape and lab.shape == label.shape and set(np.unique(lab)) <= {0, 1}
        # image and mask move together: channel 0 encodes the mask (0.25/0.75), 0 where rotated in from outside
        inside = img[2] > 0
        assert np.array_equal(img[0][inside] > 0.5, lab[inside] == 1)
        assert set(np.unique(img[2])) <= {0.0, 0.75}  # nearest sampling: no new values
        if img is image:
            kinds["identity"] += 1
        elif any(np.array_equal(lab, r) for r in rot_flips) and inside.all():
            kinds["rot_flip"] += 1
        else:
            kinds["rotate"] += 1
    # p = 1/2, 1/4, 1/4 (Load_Dataset.py:42-45); 800 draws: 4 standard deviations ≈ ±0.06
    assert abs(kinds["rot_flip"] / 800 - 0.5) < 0.07
    assert abs(kinds["identity"] / 800 - 0.25) < 0.07
    assert abs(kinds["rotate"] / 800 - 0.25) < 0.07


def test_rot_flip_always_flips_and_rotate_keeps_size_with_zero_fill():
    image, label = _pair()
    for k in range(4):
        for axis in range(2):
            img, lab = rot_flip(image, label, k, axis)
            assert np.array_equal(lab, np.flip(np.rot90(label, k), axis))
            assert np.array_equal(img[1], np.flip(np.rot90(image[1], k), axis))
    img, lab = rotate(image, label, 19)
    assert img.shape == image.shape and (img[2] == 0).any() and (img[2] == 0.75).any()
    img0, lab0 = rotate(image, label, 0)
    assert np.array_equal(img0, image) and np.array_equal(lab0, label)


def test_rotation_angles_are_lvits_integer_range(monkeypatch):
    # np.random.randint(-20, 20) (Load_Dataset.py:27): integers −20..19
    import textseg_cli.data.augment_lvit as aug

    class FakeRng:  # first draw 0.2: no rot_flip; second 0.9: rotate
        def __init__(self):
            self.real, self.draws = np.random.default_rng(3), iter([0.2, 0.9] * 200)
            self.ranges = set()

        def random(self):
            return next(self.draws)

        def integers(self, lo, hi):
            self.ranges.add((lo, hi))
            return self.real.integers(lo, hi)

    angles = []
    monkeypatch.setattr(aug, "rotate", lambda i, lab, a: angles.append(a) or (i, lab))
    rng = FakeRng()
    for _ in range(200):
        random_generator(*_pair(8), rng)
    assert rng.ranges == {(-20, 20)} and len(angles) == 200
    assert min(angles) >= -20 and max(angles) <= 19 and all(isinstance(a, int) for a in angles)


# --- early stopping and the time budget ---------------------------------------------------------------

def _lvit_loop(dices, patience, epochs):
    """train_model.py:150-189 restated: returns (epochs run, best epoch)."""
    max_dice, best_epoch = 0.0, 1
    for epoch in range(epochs):
        val_dice = dices[epoch]
        if val_dice > max_dice:
            if epoch + 1 > 5:
                max_dice, best_epoch = val_dice, epoch + 1
        if epoch - best_epoch + 1 > patience:
            return epoch + 1, best_epoch
    return epochs, best_epoch


def _our_loop(dices, patience, epochs, every=12):
    cfg = {"train": {"epochs": epochs, "iterations": 0, "batch_labeled": 2, "time_budget_min": None},
           "val": {"every": 0, "patience": patience, "best_after": 5, "best_floor": 0.0}}
    resolve_epochs(cfg, 24)
    rules = StopRules(cfg)
    best, best_it = None, None
    for e in range(1, epochs + 1):
        it = e * cfg["val"]["every"]
        if rules.is_best(it, dices[e - 1], best):
            best, best_it = dices[e - 1], it
        if rules.early_stop(it, best_it):
            return e, rules.epoch(best_it) or 1
    return epochs, rules.epoch(best_it) or 1


def test_early_stopping_matches_lvits_loop():
    rng = np.random.default_rng(0)
    for trial in range(300):
        n = 120
        dices = np.maximum.accumulate(rng.random(n)) * (rng.random(n) > 0.3) if trial % 2 else rng.random(n)
        patience = int(rng.integers(1, 12))
        assert _our_loop(list(dices), patience, n) == _lvit_loop(list(dices), patience, n), trial


def test_resolve_epochs_and_refusals():
    from textseg_cli.errors import ConfigError

    cfg = {"train": {"epochs": 2000, "iterations": 5, "batch_labeled": 2}, "val": {"every": 7}}
    assert resolve_epochs(cfg, 24) == 24000 and cfg["val"]["every"] == 12 and cfg["train"]["iterations_per_epoch"] == 12
    cfg = {"train": {"epochs": 3, "iterations": 5, "batch_labeled": 2}, "val": {"every": 7}}
    assert resolve_epochs(cfg, 5) == 9  # ⌈5 / 2⌉ = 3 iterations per epoch
    with pytest.raises(ConfigError, match="val.patience"):
        resolve_epochs({"train": {"iterations": 5}, "val": {"patience": 0}}, 4)
    with pytest.raises(ConfigError, match="train.time_budget_min"):
        resolve_epochs({"train": {"iterations": 5, "time_budget_min": -1}, "val": {}}, 4)


@pytest.fixture(scope="module")
def tiny_2d(tmp_path_factory):
    from textseg_cli.data.prep.synthetic2d import prep_synthetic_2d

    root = tmp_path_factory.mktemp("lvit") / "s2d"
    prep_synthetic_2d(root, n_cases=8, size=16, seed=3, n_val=2, n_test=0)
    return root


def test_trainer_stops_early_and_records_it(tiny_2d, tmp_path, monkeypatch, one_thread):
    import textseg_cli.engine.loop as trainer_mod
    from textseg_cli.engine.setup import train

    seq = iter([0.1, 0.5, 0.4, 0.6, 0.3, 0.3, 0.3, 0.9, 0.9, 0.9])
    monkeypatch.setattr(trainer_mod, "validate", lambda *a, **k: {"val_dice": next(seq)})
    res = train("lvit-unet", tiny_2d, out=tmp_path / "run", quiet=True,
                            sets=["train.epochs=10", "val.patience=2", "val.best_after=1", "method.backbone.base=2"])
    end = json.loads((tmp_path / "run" / "training.json").read_text(encoding="utf-8"))
    # epoch 1 is not eligible (best_after), 4 is the best, epochs 5-7 do not improve: 7 − 4 > 2 → stop after 7
    assert end["ended"] == "early_stopping" and end["epochs"] == 7 and end["best_epoch"] == 4
    assert res.stop_reason.startswith("early stopping") and res.iteration == 7 * 3
    assert (tmp_path / "run" / "checkpoints" / "best.pt").exists()


def test_trainer_time_budget_stops_cleanly(tiny_2d, tmp_path, one_thread):
    from textseg_cli.engine.setup import train

    res = train("lvit-unet", tiny_2d, out=tmp_path / "run", quiet=True,
                sets=["train.epochs=50", "train.time_budget_min=1e-6", "method.backbone.base=2"])
    end = json.loads((tmp_path / "run" / "training.json").read_text(encoding="utf-8"))
    assert end["ended"] == "time_budget" and end["epochs"] == 1 and "time budget" in res.stop_reason
    assert (tmp_path / "run" / "checkpoints" / "last.pt").exists()


def test_explicit_iterations_override_epochs(tiny_2d, tmp_path, one_thread):
    from textseg_cli.engine.setup import train

    res = train("lvit-unet", tiny_2d, out=tmp_path / "run", quiet=True, iterations=2,
                sets=["train.epochs=50", "method.backbone.base=2"])
    assert res.iteration == 2 and json.loads((tmp_path / "run" / "training.json").read_text(encoding="utf-8"))["ended"] == "completed"


def test_time_budget_in_iteration_mode_is_checked_between_validations(tiny_2d, tmp_path, one_thread):
    """A run that validates only at its end (what `textseg plan` writes for a tight budget) still stops at its
    budget: in iteration mode the budget is checked after every step, not only where a validation ends (it used
    to run on past the budget until the final validation)."""
    from textseg_cli.engine.setup import train

    res = train("lvit-unet", tiny_2d, out=tmp_path / "run", quiet=True, iterations=40,
                sets=["train.epochs=null", "val.every=40", "train.time_budget_min=1e-6", "method.backbone.base=2"])
    end = json.loads((tmp_path / "run" / "training.json").read_text(encoding="utf-8"))
    assert end["ended"] == "time_budget" and res.iteration == 1 and "next step" in res.stop_reason
    assert (tmp_path / "run" / "checkpoints" / "last.pt").exists()


# --- data: LViT's loader resize -----------------------------------------------------------------------

def test_lvit_loader_resize_is_bilinear_255_and_dilating_masks():
    from textseg_cli.data.prep.lvit import lvit_loader_resize

    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, (40, 40, 3)).astype(np.uint8)
    mask = np.zeros((40, 40), np.uint8)
    mask[10:12, 20:22] = 255
    out, m = lvit_loader_resize(img, mask, 20)
    assert out.shape == (20, 20, 3) and out.dtype == np.float32
    assert np.allclose(out * 255, np.round(out * 255), atol=1e-4)  # whole grey levels / 255
    # 2× down with half-pixel centres: each output is the mean of a 2×2 block (cv2 INTER_LINEAR at scale 2)
    block = img.reshape(20, 2, 20, 2, 3).astype(np.float64).mean(axis=(1, 3))
    assert np.abs(out * 255 - np.floor(block + 0.5)).max() <= 1e-3
    assert m.sum() == 1 and m[5, 10] == 1
    odd, m2 = lvit_loader_resize(img, mask, 17)  # non-integer scale: bilinear > 0 grows the mask
    assert m2.sum() >= 1


def test_eval_metrics_equal_lvits_test_script_on_nonempty_masks():
    from sklearn.metrics import jaccard_score

    from textseg_cli.metrics import dice, jaccard

    rng = np.random.default_rng(0)
    for _ in range(20):
        prob = rng.random((224, 224))
        lab = (rng.random((224, 224)) > rng.uniform(0.5, 0.95)).astype(np.float32)
        pred = (prob > 0.5).astype(np.float32)  # test_model.py:51: output > 0.5
        # test_model.py:17-21, per image
        lvit_dice = 2 * np.sum(lab * pred) / (np.sum(lab) + np.sum(pred) + 1e-5)
        lvit_iou = jaccard_score(lab.reshape(-1), pred.reshape(-1))
        assert dice(pred > 0, lab > 0) == pytest.approx(lvit_dice, abs=1e-8)
        assert jaccard(pred > 0, lab > 0) == pytest.approx(lvit_iou, abs=1e-12)


# --- the reproduction script ---------------------------------------------------------------------------

def _tiny_lvit_source(root):
    import pandas as pd
    from PIL import Image

    rng = np.random.default_rng(0)
    for split, n in (("Train", 4), ("Val", 2)):
        for sub in ("img", "labelcol"):
            (root / f"{split}_Folder" / sub).mkdir(parents=True)
        for i in range(n):
            img = rng.integers(0, 255, (30, 40, 3), dtype=np.uint8)
            mask = np.zeros((30, 40), np.uint8)
            mask[5 + i:15 + i, 8:20] = 255
            img[mask > 0] //= 3  # dark "nuclei" the network can learn
            Image.fromarray(img).save(root / f"{split}_Folder" / "img" / f"{split}{i}.png")
            Image.fromarray(mask).save(root / f"{split}_Folder" / "labelcol" / f"{split}{i}.png")
        pd.DataFrame({"Image": [f"{split}{i}.png" for i in range(n)],
                      "Description": ["Dark nuclei, upper left."] * n}).to_excel(
            root / f"{split}_Folder" / f"{split}_text.xlsx", index=False)


def test_reproduce_script_runs_end_to_end_and_says_the_protocol_is_incomplete(tmp_path):
    """scripts/reproduce_monuseg_unet.sh on a tiny LViT-layout set with a 30-second budget: prep → train → eval on
    val, the summary names the precision that ran, the epochs, the validation Dice/IoU, and that the budget (not
    early stopping) ended training."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    src, out = tmp_path / "src", tmp_path / "out"
    _tiny_lvit_source(src)
    env = {**os.environ, "TEXTSEG": str(Path(sys.executable).parent / "textseg"), "PYTHON": sys.executable,
           "EVAL_RESERVE_MIN": "0.02", "PRECISION": "fp32"}
    r = subprocess.run(["bash", str(repo / "scripts/reproduce_monuseg_unet.sh"), str(src), str(out),
                        "--budget-min", "0.5", "--threads", "1"], env=env, capture_output=True, text=True, encoding="utf-8", errors="replace",
                       timeout=1500)
    text = r.stdout + r.stderr
    assert r.returncode == 0, text[-3000:]
    assert "precision: fp32 (asked fp32" in text
    assert "validation (2 images" in text and "Dice " in text and "IoU " in text
    assert "PROTOCOL NOT COMPLETE" in text and "validation Dice by epoch: 1: " in text
    end = json.loads((out / "lvit-unet" / "training.json").read_text())
    assert end["ended"] == "time_budget" and 1 <= end["epochs"] < 2000
    env_json = json.loads((out / "lvit-unet" / "env.json").read_text())
    assert env_json["precision"]["train"]["precision"] == "fp32"
    # a second run into the same folder is refused before anything is written
    r2 = subprocess.run(["bash", str(repo / "scripts/reproduce_monuseg_unet.sh"), str(src), str(out)], env=env,
                        capture_output=True, text=True, encoding="utf-8", errors="replace", timeout=1500)
    assert r2.returncode == 2 and "not empty" in r2.stderr
