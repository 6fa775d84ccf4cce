"""Trajectory parity (issue 26): K = 110 iterations of textseg's real training loop (the engine's `Trainer`,
built from the config `textseg train --method M` resolves on LA, run by `Trainer.run`) against the official
training script's own loop (its source executed, see _trajectory.py), fed the same batches and the same noise and
dropout draws, in float64 on CPU, compared after EVERY iteration 1..K: every weight and buffer of each network
(student and EMA teacher), the SGD momentum buffers, the lr and the logged loss terms, within rtol 1e-9 /
atol 1e-12.

The two run in lock step (`_trajectory.lockstep`): after each step textseg's networks and momentum are set to the
official's. Why: the two sides compute the same sums in different orders (~1e-16 apart after a step), and these
tiny training runs amplify that ~10× every few iterations (free-running float64 runs part at 1e-9 by iteration
~10 and completely by ~50), so only a per-step comparison can be tight. Counters, lr schedules, ramps and EMA
decays are not synchronised: each side runs its own.

Set identically on both sides, and only these: patch 16×16×16, batch 2 + 2, K iterations, the V-Net width
n_filters 4 (the official network classes and textseg's config both take it; the scripts do not pass it, so the
official class is wrapped with n_filters=4), and the ramp divisor: both sides ramp their consistency weight on
iteration // 150, which stays 0 over K = 110 iterations, so both use iteration // 2 (the ramp of length 40
completes at iteration 80); the test asserts the unscaled values agree (the script's literal 150 and argparse
default rampup against the shipped config). Everything else comes from each side's own defaults. K = 110 passes
the EMA warm start (α = min(1 − 1/(t+1), decay) equals decay 0.99 only from t = 99 on).

Also covered, each with its own scaled lengths (asserted against the unscaled script and shipped values):
BCP (both phases, BCP_K = 100 iterations, batch 4 + 4 as published, shared cuboid-corner draws), DTC (K, the lr
step scaled to 50), MCF (MCF_K = 80, the lr step scaled to 30). MLRP, VCLIPSeg, Text-SemiSeg, URPC, CPS and the new baselines have their own files (test_trajectory_*.py).

MC-Net+ runs the same script with --model mcnet3d_v2 (its three decoders).

Written against UA-MT@88ed29a, MC-Net@fee453c, BCP@7879f98, DTC@2525b9c, MCF@ad20659.
"""

from __future__ import annotations

import functools
import itertools
import re
import time

import pytest
import torch

from _trajectory import _module, _Null, as_official, lockstep, make_batches, shipped_config, tiny_dataset
from parity_helpers import official_commit

K = 110
PATCH = (16, 16, 16)
WIDTH = 4
PER = 2  # the scaled ramp divisor (both sides; unscaled 150)
RTOL, ATOL = 1e-9, 1e-12
SEED = 7  # of the shared noise/dropout generators
SETS = ["data.patch_size={},{},{}".format(*PATCH), "train.batch_labeled=2", "train.batch_unlabeled=2",
        f"method.backbone.n_filters={WIDTH}", f"method.consistency.per={PER}"]
LA_STUBS = {"dataloaders": _module("dataloaders", utils=_Null()),
            "dataloaders.la_heart": _module("dataloaders.la_heart", LAHeart=_Null, RandomCrop=_Null,
                                            CenterCrop=_Null, RandomRotFlip=_Null, ToTensor=_Null,
                                            TwoStreamBatchSampler=_Null)}
P = "{}, {}, {}".format(*PATCH)


@pytest.fixture
def float64():
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return tiny_dataset(tmp_path_factory.mktemp("trajectory") / "prepared", PATCH)


def _narrow(cls):
    return functools.partial(cls, n_filters=WIDTH)


def _argparse_default(src: str, flag: str) -> float:
    m = re.search(rf"'--{flag}',[^)]*default=([0-9.e-]+)", src)
    assert m, flag
    return float(m.group(1))


def _check_unscaled_ramp(src: str, method: str) -> None:
    """The ramp this test scales: the script's literal iter_num//150 and its --consistency_rampup default
    against the shipped config's consistency.per and .rampup."""
    shipped = shipped_config(method)["method"]["consistency"]
    assert "iter_num//150" in src and shipped["per"] == 150
    assert _argparse_default(src, "consistency_rampup") == shipped["rampup"]


def _run(official_dir, repo, script_name, method, tmp_path, data_dir, record_property, extra_sets=(), k=K, bl=2,
         bu=2, **kw) -> None:
    record_property("commit", official_commit(official_dir, repo))
    (tmp_path / "code").mkdir()
    t0, c0 = time.perf_counter(), time.process_time()
    bad, trainer = lockstep(script=official_dir / repo / "code" / script_name, cwd=tmp_path / "code",
                            method=method, data_dir=data_dir, run_dir=tmp_path / "run", sets=[*SETS, *extra_sets],
                            batches=make_batches(k, PATCH, bl, bu), seed=SEED, rtol=RTOL, atol=ATOL, **kw)
    record_property("seconds", round(time.perf_counter() - t0, 1))
    record_property("cpu_seconds", round(time.process_time() - c0, 1))
    print(f"{method}: {time.perf_counter() - t0:.1f} s wall, {time.process_time() - c0:.1f} s CPU")
    assert trainer.iteration == k
    assert not bad, f"{len(bad)} mismatches, first:\n" + "\n".join(bad[:20])


def test_uamt_trajectory(official_dir, data_dir, tmp_path, float64, record_property):
    script = "train_LA_meanteacher_certainty_unlabel.py"
    _check_unscaled_ramp((official_dir / "UA-MT" / "code" / script).read_text(encoding="utf-8"), "uamt")

    def parts(g):
        terms = {n: g[n] for n in ("loss", "loss_seg", "loss_seg_dice", "consistency_dist", "consistency_weight",
                                   "threshold") if n in g}
        return {"student": g["model"], "teacher": g["ema_model"]}, g["optimizer"], terms

    _run(official_dir, "UA-MT", script, "uamt", tmp_path, data_dir, record_property,
         argv=["--max_iterations", str(K)], official_parts=parts,
         textseg_nets=lambda m: {"student": m.student, "teacher": m.teacher},
         term_map={"loss": "loss", "loss_seg": "loss_ce", "loss_seg_dice": "loss_dice",
                   "consistency_dist": "loss_consistency", "consistency_weight": "consistency_weight",
                   "threshold": "uncertainty_threshold"},
         stubs=LA_STUBS, import_wraps={"networks.vnet": {"VNet": _narrow}},
         edits=[("patch_size = (112, 112, 80)", f"patch_size = ({P})"),
                ("[stride * T, 2, 112, 112, 80]", f"[stride * T, 2, {P}]"),
                ("reshape(T, stride, 2, 112, 112, 80)", f"reshape(T, stride, 2, {P})"),
                ("iter_num//150", f"iter_num//{PER}")])


@pytest.mark.parametrize("method,model,cls", [("mcnet", "mcnet3d_v1", "MCNet3d_v1"),
                                              ("mcnet+", "mcnet3d_v2", "MCNet3d_v2")])
def test_mcnet_trajectory(official_dir, data_dir, tmp_path, float64, record_property, method, model, cls):
    """MC-Net, and MC-Net+ (the same script with --model mcnet3d_v2: three decoders, upsampling modes 0, 1, 2)."""
    script = "train_mcnet_3d.py"
    _check_unscaled_ramp((official_dir / "MC-Net" / "code" / script).read_text(encoding="utf-8"), method)

    def parts(g):
        terms = {n: g[n] for n in ("loss", "loss_seg", "loss_seg_dice", "loss_consist", "consistency_weight")
                 if n in g}
        return {"net": g["model"]}, g["optimizer"], terms

    stubs = {"dataloaders.dataset": _module("dataloaders.dataset", LAHeart=_Null, Pancreas=_Null,
                                            RandomRotFlip=_Null, RandomCrop=_Null, ToTensor=_Null,
                                            TwoStreamBatchSampler=_Null)}
    _run(official_dir, "MC-Net", script, method, tmp_path, data_dir, record_property,
         argv=["--max_iteration", str(K), "--model", model], official_parts=parts,
         textseg_nets=lambda m: {"net": m.net},
         term_map={"loss": "loss", "loss_seg": "loss_ce", "loss_seg_dice": "loss_dice",
                   "loss_consist": "loss_consistency", "consistency_weight": "consistency_weight"},
         stubs=stubs, wraps={"networks.net_factory": {cls: _narrow}},
         edits=[("patch_size = (112, 112, 80)", f"patch_size = ({P})"), ("iter_num//150", f"iter_num//{PER}")])


# --- BCP: both phases -----------------------------------------------------------------------------------------

BCP_K = 100  # iterations in all
BCP_PRE = 25  # pre-training iterations (both sides; unscaled 2,000), then BCP_K − BCP_PRE self-training iterations
BCP_STEP = 30  # the self-training lr step (both sides; unscaled 2,500): × 0.1 at self-training iterations 30, 60


def _bcp_check_unscaled(src: str) -> None:
    """What the BCP test scales, unscaled: the phase lengths (argparse defaults) against the shipped
    pretrain_iterations / step_offset / train.iterations, and the lr step (a literal 2500, × 0.1) against the
    shipped step schedule."""
    shipped = shipped_config("bcp")
    pre, total = shipped["method"]["pretrain_iterations"], shipped["train"]["iterations"]
    assert _argparse_default(src, "pre_max_iteration") == pre == shipped["optim"]["step_offset"]
    assert _argparse_default(src, "self_max_iteration") + pre == total
    _check_unscaled_step(src, "bcp")


def _bcp_vnet(cls):
    """BCP's VNet at n_filters WIDTH. Its forward also max-pools the bottleneck (kernel 3) into features the
    script discards (`outputs, _ = model(...)`); at patch 16 the bottleneck is 1 voxel, too small for that
    pool, so the unused pool is an identity here."""
    def make(*a, **k):
        net = cls(*a, n_filters=WIDTH, **k)
        net.pool = torch.nn.Identity()
        return net
    return make


def test_bcp_trajectory(official_dir, data_dir, tmp_path, float64, record_property):
    """BCP, both phases in one run on each side: BCP_PRE pre-training iterations (copy-paste of the labeled
    halves, ½(CE + Dice)), then self-training (EMA teacher from the pre-trained weights, LCC pseudo-labels, the
    bidirectional labeled/unlabeled mixes with the unlabeled region weighted u_weight, the stepped lr). The
    cuboid's corner is one shared stream of integer draws (the script's np.random.randint, textseg's
    torch.randint): same bounds, same corner; its size and the mixes are each side's own.

    The script's phase switch: self_train builds new networks, loads both from the best pre-training
    checkpoint and starts a fresh optimiser. Here the validation is a stand-in that improves at every call and
    runs every BCP_PRE iterations (the script: every 200), so the best checkpoint is the last pre-training
    weights, which textseg continues from (docs/fidelity.md); at k = BCP_PRE the student is compared against the
    loaded weights, and the official's fresh optimiser (no momentum; textseg keeps it, a documented difference)
    is synchronised to textseg. textseg's own teacher copy at the switch is compared from BCP_PRE + 1 on."""
    script = "LA_BCP_train.py"
    _bcp_check_unscaled((official_dir / "BCP" / "code" / script).read_text(encoding="utf-8"))
    dice = itertools.count(1)  # the stand-in validation: every checkpoint is the best so far

    def parts(ns):
        nets = {"student": ns["model"]}
        if "ema_model" in ns:
            nets["teacher"] = ns["ema_model"]
        terms = {n: ns[n] for n in ("loss", "loss_ce", "loss_dice", "loss_l", "loss_u") if n in ns}
        return nets, ns["optimizer"], terms

    def term_map(k):
        if k <= BCP_PRE:
            return {"loss": "loss", "loss_ce": "loss_ce", "loss_dice": "loss_dice"}
        return {"loss": "loss", "loss_l": "loss_l", "loss_u": "loss_u"}

    stubs = {"dataloaders.dataset": _module("dataloaders.dataset", LAHeart=_Null, RandomRotFlip=_Null,
                                            RandomCrop=_Null, ToTensor=_Null, TwoStreamBatchSampler=_Null),
             # unused imports of modules deprecated in Python 3.11/3.12
             "asyncore": _module("asyncore", write=_Null()), "imp": _module("imp"),
             "sre_parse": _module("sre_parse", SPECIAL_CHARS="")}
    _run(official_dir, "BCP", script, "bcp", tmp_path, data_dir, record_property,
         argv=["--pre_max_iteration", str(BCP_PRE),
               # one more than run: the script then asks for another batch, and the loader reports the last step
               "--self_max_iteration", str(BCP_K - BCP_PRE + 1)],
         extra_sets=["train.batch_labeled=4", "train.batch_unlabeled=4", f"method.pretrain_iterations={BCP_PRE}",
                     f"optim.step_offset={BCP_PRE}", f"optim.step_size={BCP_STEP}"], k=BCP_K, bl=4, bu=4,
         official_parts=parts, textseg_nets=lambda m: {"student": m.student, "teacher": m.teacher},
         term_map=term_map, phase_starts=(BCP_PRE,), randint=True,
         skip=("projection_head", "prediction_head", "contrastive_class_selector"), stubs=stubs,
         wraps={"networks.net_factory": {"VNet": _bcp_vnet}},
         import_wraps={"utils": {"test_3d_patch": lambda _real: _module(
             "test_3d_patch", var_all_case_LA=lambda *a, **k: float(next(dice)))}},
         module_edits={"utils.BCP_utils": [("np.random.randint(0, 112 - patch_pixel_x)",
                                            f"np.random.randint(0, {PATCH[0]} - patch_pixel_x)"),
                                           ("np.random.randint(0, 112 - patch_pixel_y)",
                                            f"np.random.randint(0, {PATCH[1]} - patch_pixel_y)"),
                                           ("np.random.randint(0, 80 - patch_pixel_z)",
                                            f"np.random.randint(0, {PATCH[2]} - patch_pixel_z)")]},
         edits=[("patch_size = (112, 112, 80)", f"patch_size = ({P})"),
                ("if iter_num % 200 == 0:", f"if iter_num % {BCP_PRE} == 0:"),
                ("iter_num % 2500 == 0", f"iter_num % {BCP_STEP} == 0"),
                ("iter_num // 2500", f"iter_num // {BCP_STEP}")])


# --- DTC ------------------------------------------------------------------------------------------------------

DTC_STEP = 50  # the lr step (both sides; unscaled 2,500): × 0.1 at iterations 50, 100


def _check_unscaled_step(src: str, method: str) -> None:
    """The lr step this test scales: the script's literal 2500 (× 0.1) against the shipped step schedule."""
    optim = shipped_config(method)["optim"]
    assert "if iter_num % 2500 == 0:" in src and "lr_ = base_lr * 0.1 ** (iter_num // 2500)" in src
    assert (optim["schedule"], optim["step_size"], optim["step_gamma"]) == ("step", 2500, 0.1)


def _float32_result(f):
    """The official SDF target as the script uses it: it casts it with `.float()`, which `shared_draws` leaves
    float64 (for textseg's upcasts of logits); textseg's sampler makes it float32 as well."""
    return lambda *a, **k: f(*a, **k).astype("float32")


def _dtc_heads_last(state):
    """DTC's VNet registers the SDF head (out_conv, tanh) before the segmentation head (out_conv2); textseg
    registers the segmentation conv (decoder.out_conv) before its sdf_head: pair seg with seg, SDF with SDF."""
    sdf = {n: t for n, t in state.items() if n.startswith("out_conv.")}
    return {**{n: t for n, t in state.items() if n not in sdf}, **sdf}


def test_dtc_trajectory(official_dir, data_dir, tmp_path, float64, record_property):
    """DTC: the dual-head V-Net, Dice + β·MSE(SDF) on the labeled half (the logged BCE is not optimised),
    the dual-task consistency mean (σ(−k·SDF) − σ(seg))² on all samples with its ramped weight, the stepped
    lr. The SDF targets are each side's own (the script's compute_sdf, textseg's sampler via label_targets)."""
    script = "train_la_dtc.py"
    src = (official_dir / "DTC" / "code" / script).read_text(encoding="utf-8")
    _check_unscaled_ramp(src, "dtc")
    _check_unscaled_step(src, "dtc")

    def parts(g):
        terms = {n: g[n] for n in ("loss", "loss_seg", "loss_seg_dice", "loss_sdf", "consistency_loss",
                                   "consistency_weight") if n in g}
        return {"net": g["model"]}, g["optimizer"], terms

    _run(official_dir, "DTC", script, "dtc", tmp_path, data_dir, record_property,
         argv=["--max_iterations", str(K)], official_parts=parts, textseg_nets=lambda m: {"net": m.net},
         term_map={"loss": "loss", "loss_seg": "loss_ce", "loss_seg_dice": "loss_dice", "loss_sdf": "loss_sdf",
                   "consistency_loss": "loss_consistency", "consistency_weight": "consistency_weight"},
         extra_sets=[f"optim.step_size={DTC_STEP}"], stubs=LA_STUBS, reorder=_dtc_heads_last,
         import_wraps={"networks.vnet_sdf": {"VNet": _narrow}, "utils.util": {"compute_sdf": _float32_result}},
         edits=[("patch_size = (112, 112, 80)", f"patch_size = ({P})"), ("iter_num//150", f"iter_num//{PER}"),
                ("iter_num % 2500 == 0", f"iter_num % {DTC_STEP} == 0"),
                ("iter_num // 2500", f"iter_num // {DTC_STEP}")])


# --- MCF ------------------------------------------------------------------------------------------------------

MCF_K = 80
# The lr step, scaled to 30 on both sides: the script drops the lr after its step 31 (it tests
# `iter_num % 2500 == 0 and iter_num != 0` before incrementing iter_num); textseg's shipped `optim.step_offset: 1`
# does the same (without it textseg stepped one iteration early: lr 0.001 vs 0.01 at iteration 31).
MCF_STEP = 30


class _Width:
    """The `width` of MCF's ResNet encoder, whose channel counts are 16 · width (base 16): 16 · _Width() is the
    int WIDTH (a float 0.25 would give float channel counts)."""

    def __rmul__(self, k: int) -> int:
        assert k == 16, k
        return WIDTH


def test_mcf_trajectory(official_dir, data_dir, tmp_path, float64, record_property):
    """MCF: the V-Net and the ResNet-34 V-Net side by side on the same batch (the script's loader returns the
    same crop twice), each CE + Dice + 0.5 · MSE on the labeled voxels where they disagree, the good student
    (lower labeled Dice loss) chosen each step, its sharpened (T = 0.1) unlabeled output supervising the other
    network by MSE with the ramped weight, two SGD optimisers (textseg: one over both), the stepped lr."""
    script = "train_MCF.py"
    src = (official_dir / "MCF" / "code" / script).read_text(encoding="utf-8")
    _check_unscaled_ramp(src, "mcf")
    optim = shipped_config("mcf")["optim"]
    assert "if iter_num % 2500 == 0 and iter_num!= 0:\n                lr_ = lr_ * 0.1" in src
    assert (optim["schedule"], optim["step_size"], optim["step_gamma"]) == ("step", 2500, 0.1)

    def parts(g):
        terms = {n: g[n] for n in ("v_loss_seg", "v_loss_seg_dice", "v_mse", "r_loss_seg", "r_loss_seg_dice",
                                   "r_mse", "consistency_weight") if n in g}
        if "v_loss" in g:
            terms["loss"] = g["v_loss"] + g["r_loss"]
            terms["good_student"] = float(g["Good_student"])
            terms["consistency"] = g["r_consistency_loss" if g["Good_student"] == 0 else "v_consistency_loss"]
        return ({"vnet": g["model_vnet"], "resnet": g["model_resnet"]}, [g["vnet_optimizer"], g["resnet_optimizer"]],
                terms)

    _run(official_dir, "MCF", script, "mcf", tmp_path, data_dir, record_property, k=MCF_K,
         argv=["--max_iterations", str(MCF_K)], official_parts=parts,
         textseg_nets=lambda m: {"vnet": m.vnet, "resnet": m.resnet},
         term_map={"loss": "loss", "v_loss_seg": "v_loss_ce", "v_loss_seg_dice": "v_loss_dice", "v_mse": "v_loss_mse",
                   "r_loss_seg": "r_loss_ce", "r_loss_seg_dice": "r_loss_dice", "r_mse": "r_loss_mse",
                   "good_student": "good_student_is_resnet", "consistency": "loss_consistency",
                   "consistency_weight": "consistency_weight"},
         extra_sets=[f"optim.step_size={MCF_STEP}"], stubs=LA_STUBS,
         as_batch=lambda b: [as_official(b), as_official(b)],
         wraps={"networks.ResNet34": {"resnet34": lambda f: functools.partial(f, width=_Width())}},
         import_wraps={"networks.vnet": {"VNet": _narrow}, "networks.ResNet34": {"Resnet34": _narrow}},
         edits=[("patch_size = (112, 112, 80)", f"patch_size = ({P})"), ("iter_num//150", f"iter_num//{PER}"),
                ("if iter_num % 2500 == 0 and iter_num!= 0:", f"if iter_num % {MCF_STEP} == 0 and iter_num!= 0:")])


# --- V-Net, labeled only (the baselines' "sup." row) ------------------------------------------------------------

def test_sup_trajectory(official_dir, data_dir, tmp_path, float64, record_property):
    """The supervised V-Net of UA-MT's train_LA.py (what `--method sup` reproduces): batch 4 labeled, 0.5·(CE +
    Dice of the foreground), SGD with the stepped lr (scaled to DTC_STEP on both sides, asserted unscaled)."""
    script = "train_LA.py"
    src = (official_dir / "UA-MT" / "code" / script).read_text(encoding="utf-8")
    _check_unscaled_step(src, "sup")
    shipped = shipped_config("sup")
    assert _argparse_default(src, "batch_size") == shipped["train"]["batch_labeled"] == 4
    assert shipped["train"]["batch_unlabeled"] == 0 and "loss = 0.5*(loss_seg+loss_seg_dice)" in src

    def parts(g):
        terms = {n: g[n] for n in ("loss", "loss_seg", "loss_seg_dice") if n in g}
        return {"net": g["net"]}, g["optimizer"], terms

    _run(official_dir, "UA-MT", script, "sup", tmp_path, data_dir, record_property, bl=4, bu=0,
         argv=["--max_iterations", str(K)], official_parts=parts, textseg_nets=lambda m: {"net": m.net},
         term_map={"loss": "loss", "loss_seg": "loss_ce", "loss_seg_dice": "loss_dice"},
         extra_sets=[f"optim.step_size={DTC_STEP}", "train.batch_labeled=4", "train.batch_unlabeled=0"],
         stubs=LA_STUBS, import_wraps={"networks.vnet": {"VNet": _narrow}},
         edits=[("patch_size = (112, 112, 80)", f"patch_size = ({P})"),
                ("iter_num % 2500 == 0", f"iter_num % {DTC_STEP} == 0"),
                ("iter_num // 2500", f"iter_num // {DTC_STEP}")])
