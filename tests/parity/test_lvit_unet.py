"""Parity with HUANGLIZI/LViT (TEXTSEG_OFFICIAL/LViT, written against a9b0b41): the U-Net (nets/UNet.py), the loss
(utils.py WeightedDiceBCE), the scheduler as train_model.py steps it (utils.py CosineAnnealingWarmRestarts) and
the augmentation (Load_Dataset.py RandomGenerator). Skipped unless TEXTSEG_OFFICIAL points to the folder holding
the `LViT` checkout; the official files are imported at run time (never copied). Their module-level imports of
cv2 and bert_embedding, unused by the parts tested, are stubbed.

Weight mapping (documented in textseg_cli/models/lvit_unet.py, `LVIT_NAME_MAP`): LViT `X.nConvs.N.*` → `X.convs.N.*`,
`X.norm.*` → `X.bn.*`; every other name is the same.
"""

from __future__ import annotations

import importlib.util
import os
import random
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch

pytestmark = pytest.mark.parity


@pytest.fixture(scope="module")
def lvit_dir() -> Path:
    root = os.environ.get("TEXTSEG_OFFICIAL")
    if not root:
        pytest.skip("TEXTSEG_OFFICIAL is not set (folder of the official repositories)")
    path = Path(root).resolve() / "LViT"
    if not (path / "nets" / "UNet.py").is_file():
        pytest.skip(f"{path} is not a checkout of HUANGLIZI/LViT")
    return path


def _load(path: Path, name: str):
    """Import one official file under a private name, with cv2/bert_embedding stubbed while it loads."""
    stubs = {"cv2": types.ModuleType("cv2"), "bert_embedding": types.ModuleType("bert_embedding")}
    stubs["bert_embedding"].BertEmbedding = object
    saved = {k: sys.modules.get(k) for k in stubs}
    sys.modules.update({k: v for k, v in stubs.items() if saved[k] is None})
    try:
        spec = importlib.util.spec_from_file_location(name, path)
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        return mod
    finally:
        for k, v in saved.items():
            if v is None:
                sys.modules.pop(k, None)


def test_unet_equal_outputs_train_and_eval(lvit_dir):
    from textseg_cli.models.lvit_unet import LViTUNet, from_lvit_key

    official = _load(lvit_dir / "nets" / "UNet.py", "_lvit_official_unet").UNet(n_channels=3, n_classes=1)
    torch.manual_seed(0)
    ours = LViTUNet(3, 1)
    mapped = {from_lvit_key(k): v.clone() for k, v in official.state_dict().items()}
    assert set(mapped) == set(ours.state_dict()) and len(mapped) == len(official.state_dict())
    ours.load_state_dict(mapped)
    assert sum(p.numel() for p in official.parameters()) == sum(p.numel() for p in ours.parameters()) == 14_751_873
    x = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    for train in (True, False):  # train first: BatchNorm batch statistics and the same running-stat update
        official.train(train)
        ours.train(train)
        a, b = official(x), ours(x)
        torch.testing.assert_close(b, a, atol=1e-5, rtol=0)
    for k, v in official.state_dict().items():  # running statistics moved identically in train mode
        torch.testing.assert_close(ours.state_dict()[from_lvit_key(k)], v)


def test_weighted_dice_bce_values_and_gradients(lvit_dir):
    from textseg_cli.methods.lvit_unet import weighted_dice_bce

    utils = _load(lvit_dir / "utils.py", "_lvit_official_utils")
    crit = utils.WeightedDiceBCE(dice_weight=0.5, BCE_weight=0.5)  # train_model.py:135
    g = torch.Generator().manual_seed(0)
    for trial in range(5):
        logits = torch.randn(2, 1, 32, 32, generator=g) * 3
        target = (torch.rand(2, 32, 32, generator=g) > (0.3 + 0.1 * trial)).float()
        if trial == 4:
            target[1] = 0  # an image without foreground
        la, lb = logits.clone().requires_grad_(), logits.clone().requires_grad_()
        a = crit(torch.sigmoid(la), target)
        b, _, _ = weighted_dice_bce(torch.sigmoid(lb), target, 0.5, 0.5)
        torch.testing.assert_close(b, a, atol=1e-6, rtol=1e-6)
        a.backward()
        b.backward()
        torch.testing.assert_close(lb.grad, la.grad, atol=1e-8, rtol=1e-5)


def test_scheduler_stepped_per_epoch_as_lvit(lvit_dir):
    from textseg_cli.engine.optim import build_scheduler

    utils = _load(lvit_dir / "utils.py", "_lvit_official_utils")
    ref_opt = torch.optim.Adam([torch.nn.Parameter(torch.zeros(1))], lr=1e-3)
    ref = utils.CosineAnnealingWarmRestarts(ref_opt, T_0=10, T_mult=1, eta_min=1e-4)  # train_model.py:138
    opt = torch.optim.Adam([torch.nn.Parameter(torch.zeros(1))], lr=1e-3)
    ours = build_scheduler(opt, 35 * 12, {"schedule": "cosine_restarts", "restart_period": 10, "eta_min": 1e-4,
                                          "lr": 1e-3}, iterations_per_epoch=12)
    for epoch in range(35):
        for _ in range(12):  # LViT's lr is constant within an epoch: it steps after validation
            assert opt.param_groups[0]["lr"] == pytest.approx(ref_opt.param_groups[0]["lr"], rel=1e-12), epoch
            opt.step()
            ours.step()
        ref_opt.step()
        ref.step()  # Train_one_epoch.py:129-130, called with the validation loader only (train_model.py:164)


def test_random_generator_same_draws_same_output(lvit_dir):
    from textseg_cli.data.augment_lvit import rot_flip, rotate

    ld = _load(lvit_dir / "Load_Dataset.py", "_lvit_official_load_dataset")
    gen = ld.RandomGenerator(output_size=[40, 40])  # the image's own size: no zoom, as at 224 in LViT
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (40, 40, 3)).astype(np.uint8)  # (rows, cols, C) as cv2 gives it
    label = (rng.random((40, 40)) > 0.6).astype(np.uint8)
    ours_in = image.transpose(2, 0, 1).astype(np.float32) / 255.0  # (C, rows, cols), to_tensor's scale
    branches = set()
    for seed in range(60):
        random.seed(seed)
        np.random.seed(seed)
        out = gen({"image": image, "label": label, "text": np.zeros((1, 4))})
        # the same draws, restated from Load_Dataset.py:17-20, 27, 42-45
        random.seed(seed)
        np.random.seed(seed)
        if random.random() > 0.5:
            k, axis = np.random.randint(0, 4), np.random.randint(0, 2)
            img, lab = rot_flip(ours_in, label, k, axis)
            branches.add("rot_flip")
        elif random.random() > 0.5:
            img, lab = rotate(ours_in, label, np.random.randint(-20, 20))
            branches.add("rotate")
        else:
            img, lab = ours_in, label
            branches.add("none")
        torch.testing.assert_close(torch.from_numpy(np.ascontiguousarray(img)), out["image"], atol=1e-7, rtol=0)
        assert torch.equal(torch.from_numpy(np.ascontiguousarray(lab)).long(), out["label"])
    assert branches == {"rot_flip", "rotate", "none"}
