"""Trajectory parity (issue 26) of the two SSL4MIS 3D methods, URPC and CPS: K iterations of textseg's real
training loop (the engine's `Trainer`, built from the config `textseg train --method M` resolves on LA, run by
`Trainer.run`) against the official training script's own loop (its source executed, see _trajectory.py), fed the
same batches and the same dropout draws, in float64 on CPU, compared after EVERY iteration 1..K: every weight and
buffer of each network, the SGD momentum buffers, the lr and the logged loss terms, within rtol 1e-9 / atol 1e-12,
in lock step (textseg's networks and momentum set to the official's after each step; why: see
test_trajectory_parity.py). Counters, lr schedules and ramps are each side's own.

Neither method has an EMA teacher (no warm start to pass), so what K must cover is the consistency ramp and the
poly lr: both sides ramp their weight on iteration // 150, scaled to iteration // PER on both, so the LA profile's
ramp (length 40) completes at iteration 40 · PER, before K (URPC: 80 of K = 100; CPS: 80 of K = 100), and the
poly lr decays over the K iterations of each run (`--max_iterations K`, `train.iterations = K`), its first steps
included (where URPC's one-step lag shows: it sets lr(t − 1) after step t, textseg's `optim.step_offset: 1`). URPC
runs K = 100 because its U-Net is ~6× slower per step than CPS's V-Nets on CPU (the test stays < 60 s CPU). No
validation runs (the scripts validate from iteration 200 on).

Set identically on both sides, and only these: batch 2 + 2, K, the network width, the ramp divisor (asserted
unscaled against the script's literal 150 and the shipped `consistency.per`), and:
- URPC: patch 32×16×16 (the U-Net pools four times and instance-normalises its bottleneck, which needs more than
  one voxel: 16³ would leave 1); width n_filters 2 (the script's `feature_scale` 32: 64…1024 / 32 = 2…32 channels;
  the class does not take n_filters); the script's `num_classes = 3` (its GTV/BraTS data) set to LA's 2. The LA
  profile's ramp length 40 (textseg's choice, no LA script; the script's default 400 = the shipped value on
  BraTS, asserted) is passed as `--consistency_rampup 40`.
- CPS: patch 16³; `--model vnet` (the script's default is `unet_3D`; textseg's CPS uses the SSL4MIS V-Net, the
  LA literature's backbone, docs/fidelity.md), the V-Net's n_filters 4 (net_factory_3d does not pass it, so its
  VNet is wrapped); `--consistency_rampup 40` as for URPC (script default 200 = shipped value on BraTS,
  asserted). The script's two SGD optimisers (equal settings) against textseg's one over both networks.

The scripts run their loop inside `train()`; the state after the last step is read from `train()`'s locals when
it closes its SummaryWriter (`_ExportingWriter`), since the loop ends without asking the loader for another batch.

Written against SSL4MIS@06df604.
"""

from __future__ import annotations

import functools
import re
import sys
import time

import pytest
import torch

from _trajectory import _module, _Null, lockstep, make_batches, shipped_config, tiny_dataset
from parity_helpers import official_commit
from textseg_cli.runs.config import build_config

# URPC: K, ramp divisor (both sides; unscaled 150), U-Net width and patch; CPS: the same for its V-Nets
URPC_K, URPC_PER, URPC_WIDTH, URPC_PATCH = 100, 2, 2, (32, 16, 16)
CPS_K, CPS_PER, CPS_WIDTH, CPS_PATCH = 100, 2, 4, (16, 16, 16)
LA_RAMPUP = 40  # the LA profile's ramp length (textseg's choice; the scripts' defaults: URPC 400, CPS 200)
RTOL, ATOL = 1e-9, 1e-12
SEED = 7  # of the shared noise/dropout generators
REPO = "SSL4MIS"


class _ExportingWriter(_Null):
    """The scripts' SummaryWriter: `close()`, called at the end of `train()`, copies the caller's locals (model,
    optimizer, loss terms of the last step) into the script's globals, which the final report reads."""

    def close(self, *a, **k):
        caller = sys._getframe(1)
        caller.f_globals.update(caller.f_locals)


def _no_validation(*a, **k):
    raise AssertionError("validation runs from iteration 200 on; this test runs fewer")


STUBS = {"dataloaders": _module("dataloaders", utils=_Null()),
         "dataloaders.brats2019": _module("dataloaders.brats2019", BraTS2019=_Null, CenterCrop=_Null,
                                          RandomCrop=_Null, RandomRotFlip=_Null, ToTensor=_Null,
                                          TwoStreamBatchSampler=_Null),
         "tensorboardX": _module("tensorboardX", SummaryWriter=_ExportingWriter),
         "val_urpc_util": _module("val_urpc_util", test_all_case=_no_validation),
         "val_3D": _module("val_3D", test_all_case=_no_validation)}


@pytest.fixture
def float64():
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


def _argparse_default(src: str, flag: str) -> float:
    m = re.search(rf"'--{flag}',[^)]*default=([0-9.e-]+)", src)
    assert m, flag
    return float(m.group(1))


def _check_unscaled(src: str, method: str) -> None:
    """What the test scales or sets, unscaled: the script's literal iter_num//150 against the shipped
    consistency.per; its --consistency_rampup default against the shipped value on BraTS (the method file's base
    value) and the LA profile's ramp length; its SGD settings and poly power against the shipped optim."""
    base = brats_config(method)
    la = shipped_config(method)
    assert re.search(r"iter_num ?// ?150\)", src) and la["method"]["consistency"]["per"] == 150
    assert _argparse_default(src, "consistency_rampup") == base["method"]["consistency"]["rampup"]
    assert la["method"]["consistency"]["rampup"] == LA_RAMPUP
    assert _argparse_default(src, "consistency") == la["method"]["consistency"]["weight"]
    assert _argparse_default(src, "base_lr") == la["optim"]["lr"]
    assert "momentum=0.9, weight_decay=0.0001)" in src
    assert (la["optim"]["momentum"], la["optim"]["weight_decay"]) == (0.9, 0.0001)
    assert "(1.0 - iter_num / max_iterations) ** 0.9" in src
    assert (la["optim"]["schedule"], la["optim"]["poly_power"]) == ("poly", 0.9)
    # the poly lr set before the increment of iter_num (URPC) runs one step behind: shipped optim.step_offset 1
    lag = int(src.index("lr_ = base_lr * (1.0 - iter_num") < src.index("iter_num = iter_num + 1"))
    assert la["optim"]["step_offset"] == lag
    assert _argparse_default(src, "labeled_bs") == la["train"]["batch_labeled"]
    assert _argparse_default(src, "batch_size") == la["train"]["batch_labeled"] + la["train"]["batch_unlabeled"]


def brats_config(method: str) -> dict:
    """The config `textseg train --method M` resolves on BraTS (the scripts' own data set; the method files hold
    no BraTS overrides, so these are the method's base values)."""
    return build_config(method, "brats", 3, None)


def _run(official_dir, tmp_path, record_property, *, script: str, method: str, k: int, per: int,
         patch: tuple[int, int, int], **kw) -> None:
    record_property("commit", official_commit(official_dir, REPO))
    (tmp_path / "code").mkdir()
    data_dir = tiny_dataset(tmp_path / "prepared", patch)
    sets = ["data.patch_size={},{},{}".format(*patch), "train.batch_labeled=2", "train.batch_unlabeled=2",
            f"method.consistency.per={per}", *kw.pop("sets")]
    t0, c0 = time.perf_counter(), time.process_time()
    bad, trainer = lockstep(script=official_dir / REPO / "code" / script, cwd=tmp_path / "code", method=method,
                            data_dir=data_dir, run_dir=tmp_path / "run", sets=sets, batches=make_batches(k, patch),
                            seed=SEED, rtol=RTOL, atol=ATOL, stubs=STUBS, **kw)
    record_property("seconds", round(time.perf_counter() - t0, 1))
    record_property("cpu_seconds", round(time.process_time() - c0, 1))
    print(f"{method}: {time.perf_counter() - t0:.1f} s wall, {time.process_time() - c0:.1f} s CPU")
    assert trainer.iteration == k
    assert not bad, f"{len(bad)} mismatches, first:\n" + "\n".join(bad[:20])


# --- URPC -----------------------------------------------------------------------------------------------------


def _urpc_net(cls):
    """unet_3D_dv_semi at textseg's n_filters URPC_WIDTH: its channels are 64…1024 / feature_scale."""
    return functools.partial(cls, feature_scale=64 // URPC_WIDTH)


def test_urpc_trajectory(official_dir, tmp_path, float64, record_property):
    """URPC: the deep-supervised 3D U-Net (four outputs, Dropout3d 0.5/0.3/0.2/0.1 in the decoder), the mean over
    scales of CE + Dice on the labeled half, the uncertainty-rectified pyramid consistency on the unlabeled half
    with its ramped weight, SGD lr 0.1 with poly decay."""
    script = "train_uncertainty_rectified_pyramid_consistency_3D.py"
    src = (official_dir / REPO / "code" / script).read_text(encoding="utf-8")
    _check_unscaled(src, "urpc")

    def parts(g):
        terms = {n: g[n] for n in ("loss", "consistency_loss", "consistency_weight") if n in g}
        if "loss_ce_aux1" in g:
            terms["ce"] = sum(g[f"loss_ce_aux{i}"] for i in range(1, 5)) / 4
            terms["dice"] = sum(g[f"loss_dice_aux{i}"] for i in range(1, 5)) / 4
        return {"net": g["model"]}, g["optimizer"], terms

    _run(official_dir, tmp_path, record_property, script=script, method="urpc", k=URPC_K, per=URPC_PER,
         patch=URPC_PATCH, sets=[f"method.backbone.n_filters={URPC_WIDTH}"],
         argv=["--max_iterations", str(URPC_K), "--consistency_rampup", str(LA_RAMPUP)],
         official_parts=parts, textseg_nets=lambda m: {"net": m.net},
         term_map={"loss": "loss", "ce": "loss_ce", "dice": "loss_dice", "consistency_loss": "loss_consistency",
                   "consistency_weight": "consistency_weight"},
         import_wraps={"networks.unet_3D_dv_semi": {"unet_3D_dv_semi": _urpc_net}},
         edits=[("num_classes = 3", "num_classes = 2"), ("iter_num//150", f"iter_num//{URPC_PER}")])


# --- CPS ------------------------------------------------------------------------------------------------------


def test_cps_trajectory(official_dir, tmp_path, float64, record_property):
    """CPS: two V-Nets (batch norm, Dropout3d), each ½(CE + Dice) on the labeled half and the CE to the other's
    argmax on the unlabeled half with the ramped weight, SGD lr 0.01 with poly decay (two optimisers there, one
    here)."""
    script = "train_cross_pseudo_supervision_3D.py"
    src = (official_dir / REPO / "code" / script).read_text(encoding="utf-8")
    _check_unscaled(src, "cps")
    assert shipped_config("cps")["method"]["backbone"] == {"n_filters": 16, "normalization": "batchnorm",
                                                          "has_dropout": True}
    assert "normalization='batchnorm', has_dropout=True" in (
        official_dir / REPO / "code" / "networks" / "net_factory_3d.py").read_text(encoding="utf-8")

    def parts(g):
        terms = {n: g[n] for n in ("loss", "loss1", "loss2", "pseudo_supervision1", "pseudo_supervision2",
                                   "consistency_weight") if n in g}
        return {"net1": g["model1"], "net2": g["model2"]}, [g["optimizer1"], g["optimizer2"]], terms

    _run(official_dir, tmp_path, record_property, script=script, method="cps", k=CPS_K, per=CPS_PER,
         patch=CPS_PATCH, sets=[f"method.backbone.n_filters={CPS_WIDTH}"],
         argv=["--max_iterations", str(CPS_K), "--consistency_rampup", str(LA_RAMPUP), "--model", "vnet"],
         official_parts=parts, textseg_nets=lambda m: {"net1": m.net1, "net2": m.net2},
         term_map={"loss": "loss", "loss1": "loss_sup1", "loss2": "loss_sup2", "pseudo_supervision1": "loss_cps1",
                   "pseudo_supervision2": "loss_cps2", "consistency_weight": "consistency_weight"},
         wraps={"networks.net_factory_3d": {"VNet": lambda cls: functools.partial(cls, n_filters=CPS_WIDTH)}},
         edits=[("iter_num // 150", f"iter_num // {CPS_PER}")])
