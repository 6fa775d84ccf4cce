"""Augmentation and inference parity with the official scripts.

- RandomRotFlip (every repository that ships it) on a fixed seed equals `textseg_cli.data.augment.random_rot_flip`
  given the same draws (np.random.seed(s) for the official global draws, RandomState(s) for ours); for every (k, axis)
  both ask for the same bounds in the same order; the sampler's `augment.rotflip` equals the official class fed the
  sampler's own draws.
- Sliding-window prediction equals each official `test_single_case` on a fixed network (probabilities ≤1e-5 and the
  label map), and the LCC `textseg eval` applies equals the scripts' `getLargestCC`.
Commits: read from each checkout's .commit (MC-Net@fee453c, UA-MT@88ed29a, DTC@2525b9c, BCP@7879f98, MLRP@5ca2d87,
VCLIPSeg@fe50145 when written)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from parity_helpers import official_commit, official_module
from textseg_cli.data.augment import random_rot_flip
from textseg_cli.data.sampling import Augment, TwoStreamSampler
from textseg_cli.inference.sliding_window import sliding_window_inference
from textseg_cli.methods.registry import build_method
from textseg_cli.metrics.postprocess import lcc_per_class

ROTFLIP = [("UA-MT", "dataloaders.la_heart"), ("DTC", "dataloaders.la_heart"), ("MC-Net", "dataloaders.dataset"),
           ("BCP", "dataloaders.dataset"), ("MLRP", "dataloaders.dataset"), ("VCLIPSeg", "dataloaders.dataset")]


@pytest.fixture(autouse=True)
def old_numpy_aliases(monkeypatch):
    monkeypatch.setattr(np, "int", int, raising=False)  # the scripts' np.int (removed in numpy 1.24)


@pytest.mark.parametrize("repo,module", ROTFLIP, ids=[r for r, _ in ROTFLIP])
def test_random_rot_flip(official_dir, repo, module, record_property):
    record_property("commit", official_commit(official_dir, repo))
    mod = official_module(official_dir, repo, module)
    vol = np.random.default_rng(0).random((6, 5, 4)).astype(np.float32)
    lab = (vol > 0.5).astype(np.uint8)
    seen = set()
    for seed in range(24):
        np.random.seed(seed)
        ref = mod.RandomRotFlip()({"image": vol, "label": lab})
        img, lb = random_rot_flip(vol, lab, np.random.RandomState(seed))
        assert np.array_equal(ref["image"], img) and np.array_equal(ref["label"], lb)
        seen.add(img.tobytes())
    assert len(seen) == 4  # a flip always follows the rotation: the 4 reflections of the square occur


class _Draws:
    """np.random.randint / RandomState.randint stand-in: hands out given values (or a Generator's draws in the
    bounds asked for) and records the bounds."""

    def __init__(self, values=(), rng=None):
        self.values, self.rng, self.bounds = iter(values), rng, []

    def randint(self, low, high):
        self.bounds.append((low, high))
        return int(self.rng.integers(low, high)) if self.rng is not None else next(self.values)


@pytest.mark.parametrize("repo,module", ROTFLIP, ids=[r for r, _ in ROTFLIP])
def test_random_rot_flip_draws_and_arrays_match_official(official_dir, repo, module, monkeypatch):
    """Every (k, axis) the official RandomRotFlip can draw: the same bounds asked in the same order, the same
    arrays (the official class runs with np.random.randint answering k and axis)."""
    mod = official_module(official_dir, repo, module)
    vol = np.random.default_rng(1).random((6, 5, 4)).astype(np.float32)
    lab = (vol > 0.5).astype(np.uint8)
    for k in range(4):
        for axis in range(2):
            official = _Draws((k, axis))
            with monkeypatch.context() as mp:
                mp.setattr(np.random, "randint", official.randint)
                ref = mod.RandomRotFlip()({"image": vol, "label": lab})
            ours = _Draws((k, axis))
            img, lb = random_rot_flip(vol, lab, ours)
            assert ours.bounds == official.bounds, (k, axis, ours.bounds, official.bounds)
            assert np.array_equal(ref["image"], img) and np.array_equal(ref["label"], lb), (k, axis)


@pytest.mark.parametrize("repo,module", ROTFLIP[:1], ids=[r for r, _ in ROTFLIP[:1]])
def test_sampler_rotflip_equals_official_randomrotflip(official_dir, repo, module, monkeypatch):
    """textseg's sampler with `augment.rotflip` (patch = the whole volume, so the crop keeps everything) against the
    official RandomRotFlip fed the sampler's own random stream: the volume the network sees is the official one."""
    mod = official_module(official_dir, repo, module)
    vol = np.random.default_rng(0).random((1, 6, 6, 4)).astype(np.float32)
    lab = (vol[0] > 0.5).astype(np.uint8)
    seen = set()
    for seed in range(16):
        batch = TwoStreamSampler([vol], [lab], [], [6, 6, 4], 1, 0, seed=seed,
                                 augment=Augment(rotflip=True)).next_batch()
        rng = np.random.default_rng(seed)
        rng.permutation(1)  # the sampler's case-cycle draw comes first
        draws = _Draws(rng=rng)
        with monkeypatch.context() as mp:
            mp.setattr(np.random, "randint", draws.randint)
            ref = mod.RandomRotFlip()({"image": vol[0], "label": lab})
        assert draws.bounds == [(0, 4), (0, 2)]
        assert np.array_equal(batch.image_l[0, 0].numpy(), ref["image"]), seed
        assert np.array_equal(batch.label_l[0].numpy(), ref["label"]), seed
        seen.add(ref["image"].tobytes())
    assert len(seen) >= 4


def _official_single_case(official_dir, repo):
    """(repository's test_single_case, the network it expects, how textseg predicts with the same weights)."""
    if repo == "UA-MT":
        return official_module(official_dir, "UA-MT", "test_util").test_single_case, "uamt"
    if repo == "DTC":
        return official_module(official_dir, "DTC", "test_util").test_single_case, "dtc"
    if repo == "BCP":
        return official_module(official_dir, "BCP", "utils.test_3d_patch").test_single_case, "bcp"
    return official_module(official_dir, "MC-Net", "utils.test_patch").test_single_case_first_output, "mcnet"


@pytest.mark.parametrize("repo", ["UA-MT", "DTC", "BCP", "MC-Net"])
def test_sliding_window_and_lcc(official_dir, repo, record_property):
    record_property("commit", official_commit(official_dir, repo))
    single_case, method_name = _official_single_case(official_dir, repo)
    torch.manual_seed(0)
    cfg = {"method": {"backbone": {"n_filters": 4, "has_dropout": False}}}
    method = build_method(method_name, cfg, 1, 2, dim=3).eval()
    net = {"uamt": lambda: method.student, "bcp": lambda: method.student,
           "dtc": lambda: method.net, "mcnet": lambda: method.net}[method_name]()
    if repo == "BCP":  # BCP's VNet returns (seg, features)
        official_net = lambda x: (net(x), None)  # noqa: E731
    elif repo == "DTC":  # DTC's returns (tanh SDF, seg logits)
        official_net = lambda x: net(x)[::-1]  # noqa: E731
    else:
        official_net = net
    image = np.random.default_rng(1).standard_normal((21, 19, 18)).astype(np.float32)
    patch, sxy, sz = (16, 16, 16), 4, 3
    # DTC: one sigmoid channel; BCP and MC-Net accumulate only the foreground softmax y[0, 1] and threshold it at
    # 0.5 (test_3d_patch.py:131-137, test_patch.py:155-161), so they are called with one score channel
    num_classes = 2 if repo == "UA-MT" else 1
    with torch.no_grad():
        label_ref, score_ref = single_case(official_net, image, sxy, sz, patch, num_classes=num_classes)
        probs = sliding_window_inference(lambda x: method.predict_proba(x), torch.from_numpy(image)[None], patch,
                                         (sxy, sxy, sz), sw_batch_size=2)
    ours = probs.numpy()
    if num_classes == 1:  # DTC: textseg's two-class softmax of [0, z] is (1 - σ(z), σ(z))
        np.testing.assert_allclose(ours[1], score_ref[0], atol=1e-5)
    else:
        np.testing.assert_allclose(ours, score_ref, atol=1e-5)
    mask = probs.argmax(0).numpy()
    assert np.array_equal(mask, np.asarray(label_ref).astype(mask.dtype))
    lcc_module = {"DTC": "test_util", "BCP": "utils.test_3d_patch", "MC-Net": "utils.test_patch"}.get(repo)
    if lcc_module:  # UA-MT's test script has no LCC
        getlcc = official_module(official_dir, repo, lcc_module).getLargestCC
        # a mask with several components, so that keeping the largest one changes it
        blobs = np.zeros((12, 12, 12), dtype=np.uint8)
        blobs[1:5, 1:5, 1:5] = 1
        blobs[7:9, 7:9, 7:9] = 1
        for m in (mask.astype(np.uint8), blobs):
            assert np.array_equal(lcc_per_class(m, [1]) > 0, getlcc(m))
