"""Regression tests of issue 13's baseline fixes: each fails on the behaviour before the fix.
(Parity against the official code itself lives in tests/parity/, run with TEXTSEG_OFFICIAL set.)"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from textseg_cli.data.augment import random_rot_flip
from textseg_cli.data.sampling import Augment, TwoStreamSampler
from textseg_cli.runs.config import build_config
from textseg_cli.engine.optim import lr_factor
from textseg_cli.inference.protocol import resolve_lcc
from textseg_cli.methods.mcf import mcf_consistency


def _la(method: str) -> dict:
    return build_config(method, "la", 3, [112, 112, 80])


def test_mcf_consistency_default_is_plain_mse():
    # MCF utils/losses.py:65-68: the softmax lines are commented out
    p = torch.softmax(torch.randn(2, 2, 4, 4, 4), 1)
    q = torch.softmax(torch.randn(2, 2, 4, 4, 4), 1)
    assert float(mcf_consistency(p, q)) == pytest.approx(float(((p - q) ** 2).mean()), rel=1e-6)
    assert _la("mcf")["method"]["consistency"]["double_softmax"] is False


def test_mlrp_default_feeds_logits_to_the_cross_entropy():
    assert _la("mlrp")["method"]["ce_on_probabilities"] is False


class _Draws:
    """Stands for np.random / a RandomState: hands out the given values, checks each lies in [low, high) and
    records the bounds asked for."""

    def __init__(self, *values):
        self.values, self.bounds = iter(values), []

    def randint(self, low, high):
        value = next(self.values)
        assert low <= value < high, (low, value, high)
        self.bounds.append((low, high))
        return value


@pytest.mark.parametrize("k", range(4))
@pytest.mark.parametrize("axis", range(2))
def test_random_rot_flip_by_hand(k, axis):
    # UA-MT dataloaders/la_heart.py:112-121: k = randint(0, 4), rot90(k) in axes (0, 1), then axis = randint(0, 2)
    # and one flip along it (the same code sits in MC-Net, DTC, BCP, MLRP and VCLIPSeg; compared with it in
    # tests/parity/test_inference_parity.py)
    vol = np.arange(2 * 3 * 2).reshape(2, 3, 2)
    draws = _Draws(k, axis)
    img, lab = random_rot_flip(vol, vol.copy(), draws)
    expected = np.flip(np.rot90(vol, k, axes=(0, 1)), axis=axis)
    assert draws.bounds == [(0, 4), (0, 2)]
    assert img.shape == expected.shape and np.array_equal(img, expected) and np.array_equal(lab, expected)
    # channel-first images rotate their spatial axes, not the channel axis
    img_c, _ = random_rot_flip(vol[None], None, _Draws(k, axis), channel_axis=True)
    assert np.array_equal(img_c[0], expected)


def test_sampler_rotflip_rotates_the_volume_then_crops():
    vol = np.random.default_rng(0).random((1, 6, 6, 4)).astype(np.float32)
    lab = (vol[0] > 0.5).astype(np.uint8)
    seen = set()
    for seed in range(16):
        s = TwoStreamSampler([vol], [lab], [], [4, 4, 4], 1, 0, seed=seed, augment=Augment(rotflip=True))
        batch = s.next_batch()
        rng = np.random.default_rng(seed)  # the sampler's draws, in its order: case cycle, k, flip axis, crop
        rng.permutation(1)
        k, axis = int(rng.integers(0, 4)), int(rng.integers(0, 2))
        r_img = np.flip(np.rot90(vol, k, axes=(1, 2)), axis=axis + 1)  # by hand, not through random_rot_flip
        r_lab = np.flip(np.rot90(lab, k, axes=(0, 1)), axis=axis)
        starts = [int(rng.integers(0, n - 4 + 1)) for n in r_img.shape[1:]]
        sl = tuple(slice(a, a + 4) for a in starts)
        assert np.array_equal(batch.image_l[0].numpy(), r_img[(slice(None),) + sl])
        assert np.array_equal(batch.label_l[0].numpy(), r_lab[sl])
        seen.add((k, axis))
    assert len(seen) >= 6  # most of the 8 (k, axis) pairs occur: the draws are really exercised


@pytest.mark.parametrize("method", ["mcnet", "mcnet+", "uamt", "dtc", "bcp", "mlrp", "sup", "urpc", "cps", "vclipseg"])
def test_la_configs_use_the_official_rotflip(method):
    aug = _la(method)["data"]["augment"]
    assert aug["rotflip"] is True and not aug["flip"] and not aug["rot90"]


def test_mcf_la_config_crops_only():  # train_MCF.py:119-121: RandomCrop only
    assert not any(_la("mcf")["data"]["augment"].values())


def test_suponly_is_uamt_supervised_baseline():
    cfg = _la("sup")
    assert cfg["train"]["batch_labeled"] == 4 and cfg["train"]["iterations"] == 6000
    o = cfg["optim"]
    assert o["schedule"] == "step" and o["step_size"] == 2500 and o["step_gamma"] == 0.1
    # train_LA.py:137-141: lr changes after the 2,500th step, so 0-based step 2,500 runs at 0.001
    assert lr_factor(2499, 6000, o) == 1.0 and lr_factor(2500, 6000, o) == pytest.approx(0.1)


@pytest.mark.parametrize("method,expected", [("dtc", True), ("bcp", True), ("text-semiseg", True),
                                             ("mcnet", False), ("uamt", False), ("mlrp", False), (None, False)])
def test_lcc_follows_the_method_protocol(method, expected):
    on, why = resolve_lcc(None, method)
    assert on is expected and why
    assert resolve_lcc(False, method)[0] is False and resolve_lcc(True, method)[0] is True


def test_models_fidelity_points_every_method_to_the_ledger():
    from conftest import run_cli

    from textseg_cli.methods.registry import list_methods

    for name, cls in list_methods().items():  # each class states its own row (not one inherited from a parent)
        assert {"display_name", "official_code", "official_commit", "ledger"} <= set(vars(cls)), name
        assert cls.official_code and cls.ledger.startswith("docs/"), name
    code, out = run_cli("models", "--fidelity")
    assert code == 0 and "HiLab-git/DTC" in out and "2525b9c" in out and "docs/fidelity" in out


def test_tgcnet_optimiser_is_the_listed_interpretation():
    """docs/fidelity.md (TGC-Net, "optimiser and schedule"): the paper names AdamW and per-data-set lr only."""
    from textseg_cli.runs.config import build_config

    cfg = build_config("tgcnet", "qata-cov19", 2, [224, 224])
    assert (cfg["optim"]["name"], cfg["optim"]["schedule"], cfg["optim"]["weight_decay"]) == ("adamw", "constant", 1e-4)
    assert cfg["optim"]["lr"] == 2e-5 and cfg["train"]["iterations"] == 20000 and cfg["train"]["batch_labeled"] == 8


def test_text_semiseg_lung_and_brats_use_the_official_rotflip():
    """docs/fidelity.md (Text-SemiSeg, augmentation): train.py:113-119 applies RandomRotFlip on BraTS and Lung."""
    from textseg_cli.runs.config import build_config

    for profile in ("lung", "brats"):
        assert build_config("text-semiseg", profile, 3, [96, 96, 96])["data"]["augment"]["rotflip"] is True
