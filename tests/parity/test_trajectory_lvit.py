"""Trajectory parity of LViT's U-Net baseline (`lvit-unet`, issue 26): K = 44 iterations (22 epochs of 2) of
textseg's real training loop (the engine's `Trainer`, built from the config `textseg train --method lvit-unet`
resolves on a MoNuSeg-named set prepared by `prep lvit --protocol lvit`, run by `Trainer.run` in epoch mode)
against LViT's own train_model.py (its source executed, see _trajectory.py): its epoch loop, `train_one_epoch` of
Train_one_epoch.py for the training pass AND for the validation pass (which steps the lr scheduler, once per
epoch), fed the same batches, in float64 on CPU, compared after EVERY iteration 1..K: every weight and BatchNorm
buffer of the U-Net, Adam's state (step, exp_avg, exp_avg_sq), the lr and the loss terms (total, weighted Dice,
weighted BCE), within rtol 1e-9 / atol 1e-12, the two sides synchronised after each step as `_trajectory.lockstep`
explains.

What one step covers: nets/UNet.py's U-Net (conv-BN-ReLU blocks, max-pool down, transposed-conv up, sigmoid head),
utils.py's WeightedDiceBCE(0.5, 0.5) on the sigmoid probabilities, Adam (lr 1e-3, default betas/eps, no weight
decay), and the lr of utils.py's CosineAnnealingWarmRestarts(T_0=10, T_mult=1, eta_min=1e-4) stepped by the
validation pass after every epoch (textseg: `optim.schedule: cosine_restarts` counting epochs of `train.epochs`).

Why K = 44 covers every phase: there is no EMA, no ramp and no phase; the only time structure is the per-epoch lr.
With 4 training images and batch 2 an epoch is 2 iterations on both sides (LViT: len(DataLoader) = ⌈4/2⌉; textseg:
`train.epochs` → ⌈4 labeled / 2⌉), so the 44 iterations cross 21 epoch boundaries (the lr constant within an epoch,
changed after each) and two warm restarts, after epochs 10 and 20 (lr back to 1e-3 at iterations 21 and 41).
Each epoch feeds both sides a fresh shuffle of the 4 prepared images in pairs (the official loader's `shuffle=True`
pass). The restart period (10 epochs), eta_min and the lr are not scaled.

Set identically on both sides, and only these: images 32×32 (`prep lvit --resize 32 --protocol lvit` of a tiny
synthetic LViT-layout folder; LViT: 224), the U-Net width 4 (nets/UNet.py's literal `in_channels = 64` edited;
textseg's `method.backbone.base`), the run length (Config.py's `epochs = 2000` → 23 on the official side: its 23rd
epoch reports the state after 22 and is stopped; textseg's `train.epochs` 22), and 4 labeled training cases (the
data set's size; MoNuSeg: 24 images, 12 iterations per epoch). The unscaled values (Config.py, train_model.py) are
asserted against the shipped config.

Stand-ins on the official side (nothing that touches a training state): train_model.py only builds LViT
(:101-125), so `nets.LViT.LViT(config, n_channels, n_classes)` builds nets/UNet.py's `UNet(n_channels, n_classes)`
called on the images only (the README's "replace LViT with U-Net"; docs/fidelity.md decision 1); thop's profile
(a forward in eval mode under no_grad, hooks removed after) returns zeros; Load_Dataset's data-set classes and
transforms (the augmentation is tested in test_lvit_unet.py; here both sides get the same un-augmented images),
read_text (the spreadsheets, unused by the U-Net), cv2 (only `imwrite` of validation pictures), ml_collections,
torchinfo, logging and tensorboard are inert. The validation loader hands out the prepared validation images.
In this float64 run `.float()` of an integer mask gives float64 on both sides (LViT: masks.float(), textseg's loss:
target.float()), as `shared_draws` keeps float64 tensors float64. textseg's own validation (best.pt selection,
no effect on training) is off: its inference casts images to float32, which this float64 network cannot take.

Written against LViT@a9b0b41.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import inspect
import re
import sys
import time
import types
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from _trajectory import _module, _Null, lockstep, shipped_config
from parity_helpers import official_commit, require_checkout
from textseg_cli.data.batch import Batch
from textseg_cli.data.prep.lvit import prep_lvit
from textseg_cli.models.lvit_unet import build_lvit_unet

REPO, SCRIPT = "LViT", "train_model.py"
N_TRAIN, BATCH, EPOCHS = 4, 2, 22
PER_EPOCH = -(-N_TRAIN // BATCH)  # LViT's len(DataLoader) with drop_last false; textseg's ⌈labeled / batch⌉
K = EPOCHS * PER_EPOCH
SIZE = 32  # pixels (LViT: 224)
WIDTH = 4  # U-Net base width (LViT: 64)
RTOL, ATOL = 1e-9, 1e-12
SEED = 5  # of the shared draw generators (the U-Net draws nothing) and of the epoch shuffles
DATASET = ("monuseg", 2)
SETS = [f"data.patch_size={SIZE},{SIZE}", f"data.labeled={N_TRAIN}", f"train.epochs={EPOCHS}",
        f"method.backbone.base={WIDTH}",
        # textseg's validation casts images to float32 (inference), which a float64 network cannot take: off here
        # (a split the set lacks; no effect on training); the official validation pass runs (it steps the lr)
        "val.split=none"]


@pytest.fixture
def float64():
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


@contextlib.contextmanager
def _integer_float_is_float64():
    """`.float()` of an integer tensor gives float64 (the masks; float tensors keep `.float()`'s meaning)."""
    had = "float" in torch.Tensor.__dict__
    orig = torch.Tensor.float

    def as_float(self, *a, **k):
        return self.to(torch.float64) if not self.is_floating_point() else orig(self, *a, **k)

    torch.Tensor.float = as_float
    try:
        yield
    finally:
        if had:
            torch.Tensor.float = orig
        else:
            del torch.Tensor.float


@contextlib.contextmanager
def _absent_modules():
    """Inert stand-ins for the modules LViT's code imports but never uses in a training step, when they are not
    installed: cv2 (`imwrite` of validation pictures), ml_collections (Config.get_CTranS_config, LViT's
    transformer settings), torchinfo (Train_one_epoch imports `summary`), bert_embedding."""
    class ConfigDict(types.SimpleNamespace):
        pass

    fakes = {"cv2": _module("cv2", imwrite=lambda *a, **k: True),
             "ml_collections": _module("ml_collections", ConfigDict=ConfigDict),
             "torchinfo": _module("torchinfo", summary=_Null()),
             "bert_embedding": _module("bert_embedding", BertEmbedding=_Null)}
    added = [n for n in fakes if n not in sys.modules and importlib.util.find_spec(n) is None]
    sys.modules.update({n: fakes[n] for n in added})
    try:
        yield
    finally:
        for n in added:
            sys.modules.pop(n, None)


def _lvit_folder(src: Path) -> None:
    """A tiny LViT-layout release (Train_Folder: N_TRAIN, Val_Folder: 2 RGB images of 48×48 with masks and
    spreadsheets); `prep lvit --resize 32 --protocol lvit` reads it as LViT's loader would."""
    rng = np.random.default_rng(SEED)
    for split, n in (("Train", N_TRAIN), ("Val", 2)):
        folder = src / f"{split}_Folder"
        (folder / "img").mkdir(parents=True)
        (folder / "labelcol").mkdir()
        rows = {}
        for i in range(n):
            name = f"{split.lower()}{i}"
            mask = np.zeros((48, 48), np.uint8)
            r, c = rng.integers(0, 24, 2)
            mask[r:r + 16 + i, c:c + 20 - i] = 255
            image = (0.6 * mask[..., None] + rng.integers(0, 100, (48, 48, 3))).clip(0, 255).astype(np.uint8)
            Image.fromarray(image).save(folder / "img" / f"{name}.png")
            Image.fromarray(mask).save(folder / "labelcol" / f"{name}.png")
            rows[f"{name}.png"] = f"Nuclei in image {name}."
        pd.DataFrame({"Image": list(rows), "Description": list(rows.values())}).to_excel(
            folder / f"{split}_text.xlsx", index=False)


def _cases(ds, split: str) -> tuple[list[str], torch.Tensor, torch.Tensor]:
    ids = ds.split(split)
    cases = [ds.load_case(c, with_label=True) for c in ids]
    images = torch.from_numpy(np.stack([c.image for c in cases])).double().contiguous()
    labels = torch.from_numpy(np.stack([c.label for c in cases])).long().contiguous()  # as a collated batch
    return ids, images, labels


def _epoch_batches(ds) -> list[Batch]:
    """EPOCHS shuffled passes over the prepared training images, in pairs (the official loader's shuffle=True)."""
    ids, images, labels = _cases(ds, "train")
    assert len(ids) == N_TRAIN and images.shape[1:] == (3, SIZE, SIZE), images.shape
    g = torch.Generator().manual_seed(SEED)
    out = []
    for _ in range(EPOCHS):
        order = torch.randperm(N_TRAIN, generator=g)
        for j in range(PER_EPOCH):
            idx = order[j * BATCH:(j + 1) * BATCH]
            out.append(Batch(images[idx], labels[idx], torch.zeros(0, 3, SIZE, SIZE, dtype=torch.float64),
                             ids_l=[ids[i] for i in idx]))
    return out


def _as_official(batch: Batch) -> tuple[dict[str, torch.Tensor], list[str]]:
    """train_one_epoch's `(sampled_batch, names)`, tensors of its own (on CPU the script's metrics write into the
    masks through `.cpu().numpy()`, which on CUDA are copies); the text (unused by the U-Net) is a placeholder."""
    n = batch.image_l.shape[0]
    return ({"image": batch.image_l.clone(), "label": batch.label_l.clone(), "text": torch.zeros(n, 1, 4)},
            [f"{i}.png" for i in batch.ids_l])


class _ValLoader:
    """The validation DataLoader: the prepared validation images as one batch, fresh tensors every epoch (the
    script's save_on_batch sets mask pixels to 255 in place: on CPU in the loader's own tensors)."""

    def __init__(self, ids: list[str], images: torch.Tensor, labels: torch.Tensor):
        self.batch = Batch(images, labels, images[:0], ids_l=ids)

    def __len__(self) -> int:
        return 1

    def __iter__(self):
        return iter([_as_official(self.batch)])


def _check_unscaled(lvit: Path) -> None:
    """What this test scales or relies on, unscaled, against the shipped config: Config.py (epochs, batch, lr,
    patience, seed, cosine lr on), train_model.py (loss weights, Adam without weight decay, the scheduler's
    T_0/T_mult/eta_min passed to the validation pass only, best model after epoch 5) and nets/UNet.py's width."""
    cfg = shipped_config("lvit-unet", ["data.patch_size=224,224"], DATASET)  # MoNuSeg as prepared for LViT
    conf = (lvit / "Config.py").read_text(encoding="utf-8")
    train = (lvit / SCRIPT).read_text(encoding="utf-8")
    unet = (lvit / "nets" / "UNet.py").read_text(encoding="utf-8")

    def num(name: str) -> float:
        m = re.search(rf"^{name} = ([0-9.e-]+)", conf, re.M)
        assert m, name
        return float(m.group(1))

    assert num("epochs") == cfg["train"]["epochs"] == 2000
    assert num("batch_size") == cfg["train"]["batch_labeled"] == BATCH and cfg["train"]["batch_unlabeled"] == 0
    assert num("learning_rate") == cfg["optim"]["lr"]
    assert num("early_stopping_patience") == cfg["val"]["patience"]
    assert num("seed") == cfg["seed"]
    assert re.search(r"^cosineLR = True", conf, re.M)
    hp = cfg["method"]
    assert f"WeightedDiceBCE(dice_weight={hp['dice_weight']}, BCE_weight={hp['bce_weight']})" in train
    assert "torch.optim.Adam(filter(lambda p: p.requires_grad, model.parameters()), lr=lr)" in train
    assert cfg["optim"]["name"] == "adam" and cfg["optim"]["weight_decay"] == 0.0
    o = cfg["optim"]
    assert o["schedule"] == "cosine_restarts" and not o.get("warmup_iterations")
    m = re.search(r"CosineAnnealingWarmRestarts\(optimizer, T_0=(\d+), T_mult=1, eta_min=([0-9.e-]+)\)", train)
    assert m and int(m.group(1)) == o["restart_period"] and float(m.group(2)) == o["eta_min"], m
    # the scheduler goes to the validation call only, which steps it once per epoch (Train_one_epoch.py:129-130)
    assert ("train_one_epoch(train_loader, model, criterion, optimizer, writer, epoch, None, model_type, logger)"
            in train)
    assert "train_one_epoch(val_loader, model, criterion,\n" in train and "lr_scheduler, model_type, logger)" in train
    assert "if epoch + 1 > 5:" in train and cfg["val"]["best_after"] == 5
    assert "in_channels = 64" in unet and (cfg["method"].get("backbone") or {}).get("base") is None
    assert inspect.signature(build_lvit_unet).parameters["base"].default == 64


def test_lvit_unet_trajectory(official_dir, tmp_path, float64, record_property):
    """LViT's U-Net: K iterations of the whole loop across 21 lr epoch boundaries and two warm restarts."""
    lvit = require_checkout(official_dir, REPO)
    record_property("commit", official_commit(official_dir, REPO))
    _check_unscaled(lvit)
    restart = shipped_config("lvit-unet", SETS, DATASET)["optim"]["restart_period"]
    assert 2 * restart * PER_EPOCH < K, "K must cross two warm restarts"
    _lvit_folder(tmp_path / "src")
    ds = prep_lvit(tmp_path / "src", tmp_path / "prepared", resize=SIZE, protocol="lvit", name="MoNuSeg")
    batches = _epoch_batches(ds)
    val_loader = _ValLoader(*_cases(ds, "val"))
    (tmp_path / "code").mkdir()
    terms: dict[str, torch.Tensor] = {}

    def recording(cls):
        """utils.WeightedDiceBCE as the script builds it, recording (total, Dice, BCE) of each training call."""
        class Recorded(cls):
            def __init__(self, *a, **k):
                super().__init__(*a, **k)
                self._parts: dict[str, torch.Tensor] = {}
                self.dice_loss.register_forward_hook(lambda m, i, o: self._parts.__setitem__("dice", o))
                self.BCE_loss.register_forward_hook(lambda m, i, o: self._parts.__setitem__("bce", o))

            def forward(self, inputs, targets):
                loss = super().forward(inputs, targets)
                if torch.is_grad_enabled():  # the training pass (the validation pass runs under no_grad)
                    terms.update(loss=loss.detach(), **{k: v.detach() for k, v in self._parts.items()})
                return loss
        return Recorded

    def unet_as_lvit(config_vit, n_channels=3, n_classes=1):
        """train_model.py's `LViT(config_vit, n_channels=..., n_classes=...)` → nets/UNet.py's UNet, images only."""
        unet = importlib.import_module("nets.UNet").UNet  # the module loaded with the width edit

        class UNetOnImages(unet):
            def forward(self, x, text=None):
                return super().forward(x)
        return UNetOnImages(n_channels=n_channels, n_classes=n_classes)

    class DataSet:
        def __init__(self, folder, *a, **k):
            self.val = "Val_Folder" in str(folder)

    def data_loader(training, dataset, *a, **k):
        assert k.get("batch_size") == BATCH and k.get("shuffle") is True
        return val_loader if dataset.val else training(PER_EPOCH)

    def parts(g):
        return {"net": g["model"]}, g["optimizer"], dict(terms)

    stubs = {"nets.LViT": _module("nets.LViT", LViT=unet_as_lvit),
             "thop": _module("thop", profile=lambda *a, **k: (0, 0)),
             "Load_Dataset": _module("Load_Dataset", RandomGenerator=_Null, ValGenerator=_Null,
                                     ImageToImage2D=DataSet, LV2D=DataSet),
             "logging": _module("logging", getLogger=_Null(), FileHandler=_Null, Formatter=_Null,
                                StreamHandler=_Null, basicConfig=_Null(), info=_Null(), INFO=20)}
    t0, c0 = time.perf_counter(), time.process_time()
    with _absent_modules(), _integer_float_is_float64():
        bad, trainer = lockstep(
            script=lvit / SCRIPT, argv=[], cwd=tmp_path / "code", method="lvit-unet", data_dir=ds.root,
            run_dir=tmp_path / "run", sets=SETS, batches=batches, seed=SEED, rtol=RTOL, atol=ATOL,
            dataset=DATASET, official_parts=parts, textseg_nets=lambda m: {"net": m.net},
            term_map={"loss": "loss", "dice": "loss_dice", "bce": "loss_bce"},
            stubs=stubs, as_batch=_as_official, data_loader=data_loader,
            import_wraps={"utils": {"WeightedDiceBCE": recording, "read_text": lambda f: lambda *a, **k: {}}},
            module_edits={"Config": [("epochs = 2000", f"epochs = {EPOCHS + 1}")],
                          "nets.UNet": [("in_channels = 64", f"in_channels = {WIDTH}")]})
    record_property("seconds", round(time.perf_counter() - t0, 1))
    record_property("cpu_seconds", round(time.process_time() - c0, 1))
    print(f"lvit-unet: {time.perf_counter() - t0:.1f} s wall, {time.process_time() - c0:.1f} s CPU")
    assert trainer.iteration == K
    assert trainer.cfg["train"]["iterations_per_epoch"] == PER_EPOCH and trainer.max_iterations == K
    assert not bad, f"{len(bad)} mismatches, first:\n" + "\n".join(bad[:20])
    # the lr trajectory really crossed the epochs and the restart (textseg's, equal to LViT's at every step)
    # what the compared lr went through (textseg's schedule, equal to LViT's at every step): a new value each
    # epoch, back to the base lr after every `restart` epochs
    lr = [trainer.scheduler.lr_lambdas[0](it) for it in range(K)]
    assert all(lr[e * PER_EPOCH] != lr[e * PER_EPOCH - 1] for e in range(1, EPOCHS))
    assert lr[0] == lr[restart * PER_EPOCH] == lr[2 * restart * PER_EPOCH] == 1.0
