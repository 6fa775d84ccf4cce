"""Trajectory parity (issue 26) of AD-MT and CrossMatch: textseg's real training loop (the engine's `Trainer`, built
from the config `textseg train --method M` resolves on LA) against the official script's own loop, executed
(`_trajectory.lockstep`), on the same batches and the same random draws, in float64 on CPU at patch 16³ and V-Net
width 4, compared after EVERY iteration (every weight and buffer, the optimiser state: SGD momentum or AdamW's
step/exp_avg/exp_avg_sq, the lr, the loss terms) within rtol 1e-9 / atol 1e-12.

AD-MT (ADMT_K iterations): the script's numpy draws (RPA periods, the CutMix coin, `cut_mix_3d`'s boxes and, via
`torch.randperm`, its permutation) come from one private RandomState seeded by the script's own
`np.random.seed(args["seed"])`; textseg's method RandomState is seeded with the same seed (its run seed set to the
yml's). The strong view, which the official loader draws in its workers, is drawn by the official
WeakStrongAugment at the start of each teacher-1 step from that stream (where textseg draws it); textseg's own view
is checked against it (≤ 1e-5: float32 arithmetic) and the official bits are used on both sides. Scaled identically
on both sides (unscaled values asserted): max_iterations (yml 15,000 → ADMT_K, an edited copy of the yml) and the
ramp divisor iter_num // 150 → // PER. The teachers' `num_batches_tracked` is not compared (the script's buffer EMA
turns it into a float; textseg keeps the long counter; unused with BatchNorm momentum 0.1, docs/fidelity.md).
The lr lag (the script sets lr(t) after step t, so step t runs lr(t − 1)) is asserted on the source and reproduced by
the shipped `optim.step_offset: 1` (asserted too); the official line runs unchanged.

CrossMatch (CM_K iterations): the three official DataLoaders (labeled, unlabeled, CutMix partners) are one stand-in
(the loop's `zip` of the three replaced by it); the image-level perturbation (the torchio strong views and the
CutMix boxes the loader draws) is textseg's own draws, recorded in its step and handed to the official step as its
loader's outputs (their equality to torchio and `obtain_cutmix_box` is test_crossmatch_parity.py's). Dropout draws
(V-Net and the perturbation dropouts) are shared. Scaled identically: the 17,000 of the poly lr and of the τ ramp
→ CM_SPAN, max_iterations (train.sh 14,000, 14,001 steps) → CM_K − 1 (CM_K steps).

Written against AD-MT@03ef84c, CrossMatch@59772e0.
"""

from __future__ import annotations

import functools
import re
import shlex
import sys
import time
import types

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml
from _trajectory import _module, _Null, lockstep, make_batches, shipped_config, tiny_dataset
from parity_helpers import official_commit, official_module

from textseg_cli.methods import admt as admt_mod
from textseg_cli.models import vnet_fp

PATCH = (16, 16, 16)
WIDTH = 4
RTOL, ATOL = 1e-9, 1e-12
SEED = 7  # of the shared noise/dropout generators
BASE_SETS = ["data.patch_size={},{},{}".format(*PATCH), f"method.backbone.n_filters={WIDTH}"]

ADMT_K = 150  # α = 0 until iteration 80, then the warm start (ema_decay itself from 278 on: admt RPA test)
PER = 3  # the ramp divisor (unscaled 150): the λ ramp of length 40 completes at iteration 120
CM_K = 100
CM_SPAN = 200  # poly lr and τ ramp length (unscaled 17,000)


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
    return tiny_dataset(tmp_path_factory.mktemp("trajectory_new") / "prepared", PATCH)


def _narrow(cls):
    return functools.partial(cls, n_filters=WIDTH)


class _Proxy(types.ModuleType):
    """A module that answers as `real` except for the attributes given (e.g. numpy with a private `random`)."""

    def __init__(self, real: types.ModuleType, **over):
        super().__init__(real.__name__)
        self.__dict__.update(over)
        self._real = real

    def __getattr__(self, name):
        return getattr(self._real, name)


def _finish(record_property, t0, c0, bad, trainer, k, name):
    record_property("seconds", round(time.perf_counter() - t0, 1))
    record_property("cpu_seconds", round(time.process_time() - c0, 1))
    print(f"{name}: {time.perf_counter() - t0:.1f} s wall, {time.process_time() - c0:.1f} s CPU")
    assert trainer.iteration == k
    assert not bad, f"{len(bad)} mismatches, first:\n" + "\n".join(bad[:20])


# --- AD-MT ----------------------------------------------------------------------------------------------------------

def test_admt_trajectory(official_dir, data_dir, tmp_path, float64, record_property, monkeypatch):
    """AD-MT over ADMT_K iterations: RPA's alternation of the two EMA teachers over many random periods (the
    active one in train mode and EMA-updated, the other in eval mode), the strong view in teacher-1 periods and
    CutMix in teacher-2 periods, the CCM ensemble and compromise, the λ ramp (scaled), the EMA α from 0 through the
    warm start to ema_decay, the poly lr (with the script's lag, see the module docstring)."""
    repo = "AD-MT"
    record_property("commit", official_commit(official_dir, repo))
    code = official_dir / repo / "code"
    src = (code / "train_post_3d_aut.py").read_text(encoding="utf-8")
    yml_text = (official_dir / repo / "cfgs" / "config_3d_la_aut.yml").read_text(encoding="utf-8")
    yml = yaml.safe_load(yml_text)
    shipped = shipped_config("ad-mt")
    hp = shipped["method"]
    # the unscaled values of what is scaled, and the RPA rule
    assert yml["max_iterations"] == shipped["train"]["iterations"] == 15000
    assert "get_current_consistency_weight(iter_num//150, args)" in src and hp["consistency"]["per"] == 150
    assert (yml["consistency"], yml["consistency_rampup"]) == (hp["consistency"]["weight"], hp["consistency"]["rampup"])
    assert (yml["alt_param_updating_period_iters"], yml["alt_flag_updating_period_random"]) == (
        hp["period"], hp["period_random"]) == (19, True)
    assert yml["ema_decay"] == hp["ema_decay"] and "update_ema_variables(model, ema_model, args[\"ema_decay\"], iter_num//2" in src
    lag = "lr_ = base_lr * (1.0 - iter_num / max_iterations) ** 0.9"
    assert lag in src  # set after step iter_num: the next step runs lr(t − 1) (docs/fidelity.md, lr schedule)
    assert shipped_config("ad-mt")["optim"]["step_offset"] == 1  # textseg's poly does the same

    for name in ("cv2",):  # imported by randcolor.py for its uint8 path only
        try:
            __import__(name)
        except ImportError:
            monkeypatch.setitem(sys.modules, name, types.ModuleType(name))
    dataset = official_module(official_dir, repo, "dataloaders.dataset_3d")
    aug = dataset.WeakStrongAugment(list(PATCH), flag_rot=False)
    np_of_dataset = _Proxy(np, random=np.random.RandomState(0))
    monkeypatch.setattr(dataset, "np", np_of_dataset)

    def loader_view(rs: np.random.RandomState, u: torch.Tensor) -> torch.Tensor:
        """The official loader's strong view of each unlabeled patch (dataset_3d.py:114-121), drawn from `rs`."""
        np_of_dataset.random = rs
        out = [torch.from_numpy(aug.randblur(aug.randcolor(img.copy())).astype(np.float32)).unsqueeze(0)
               for img in u[:, 0].numpy()]
        return torch.stack(out).to(u.dtype)

    rs = np.random.RandomState(0)  # the official side's numpy stream (seeded by the script's np.random.seed)
    np_official = _Proxy(np, random=rs)
    torch_mix = _Proxy(torch, randperm=lambda n, *a, **k: torch.as_tensor(rs.permutation(n)))

    class Sampled(dict):
        """The loader's `sampled_batch` (unlabeled first, then labeled); the strong view drawn when the script reads
        it at the start of a step, from the official stream, in teacher-1 periods only (as textseg draws it)."""

        def __getitem__(self, key):
            if key == "image_strong":
                alt = sys._getframe(1).f_locals["alternate_indicator"]
                u = self["u"]
                strong = loader_view(rs, u) if alt.get_alternate_state() else u.clone()
                return torch.cat([strong, self["l"]])
            return super().__getitem__(key)

    def as_batch(b):
        return Sampled(u=b.image_u, l=b.image_l, image_weak=torch.cat([b.image_u, b.image_l]),
                       label_aug=torch.cat([torch.zeros_like(b.label_l[: len(b.image_u)]), b.label_l]))

    view_err: list[float] = []

    def checked_view(rng, image, hp_):
        state = rng.get_state()
        ours = real_view(rng, image, hp_)
        tmp = np.random.RandomState(0)
        tmp.set_state(state)
        theirs = loader_view(tmp, image)
        assert tmp.get_state()[2] == rng.get_state()[2], "a different number of draws"
        view_err.append(float((ours - theirs).abs().max()))
        return theirs

    real_view = admt_mod.strong_view
    monkeypatch.setattr(admt_mod, "strong_view", checked_view)

    def final_state(*a, **k):
        """var_all_case_LA at the end of the epoch: the last step's locals of train() made visible to the final
        report (run_official reports the script's globals)."""
        frame = sys._getframe(1)
        frame.f_globals.update(frame.f_locals)
        return 0.5

    rpa_official: list[tuple] = []
    rpa_ours: list[tuple] = []
    alphas: list[float] = []

    def parts(g):
        alt = g["alternate_indicator"]
        rpa_official.append((bool(alt.flag_alternate), int(alt.random_alternate_period), int(alt._counter)))
        terms = {n: g[n] for n in ("loss", "loss_lb", "loss_ulb", "consistency_weight", "high_ratio") if n in g}
        if len(rpa_official) > 1:  # the teacher that was active during the step just reported
            terms["active"] = 1.0 if rpa_official[-2][0] else 2.0
        return ({"student": g["model"], "teacher1": g["ema_model"], "teacher2": g["ema_model_another"]},
                g["optimizer"], terms)

    def nets(m):
        if not hasattr(m, "_traj_wrapped"):
            m._traj_wrapped = True
            rpa_ours.append((m.active_first, m.period, m.counter))
            real_after = m.on_after_optimizer_step

            def after(ctx):
                alphas.append(m.ema_alpha(ctx.iteration))
                real_after(ctx)
                rpa_ours.append((m.active_first, m.period, m.counter))
            m.on_after_optimizer_step = after
        return {"student": m.student, "teacher1": m.teacher1, "teacher2": m.teacher2}

    work = tmp_path / "ad-mt"
    (work / "cfgs").mkdir(parents=True)
    scaled_yml = yml_text.replace("max_iterations: 15000", f"max_iterations: {ADMT_K}")
    assert scaled_yml != yml_text
    (work / "cfgs" / "config_3d_la_aut.yml").write_text(scaled_yml, encoding="utf-8")
    stubs = {"numpy": np_official, "pandas": _module("pandas", DataFrame=_Null),
             "torch.utils.tensorboard": _module("torch.utils.tensorboard", SummaryWriter=_Null),
             "dataloaders.dataset_3d": _module("dataloaders.dataset_3d", LAHeart=_Null, Pancreas=_Null,
                                               WeakStrongAugment=_Null, TwoStreamBatchSampler=_Null),
             "val_3D": _module("val_3D", var_all_case_LA=final_state, var_all_case_Pancrease=final_state)}
    t0, c0 = time.perf_counter(), time.process_time()
    bad, trainer = lockstep(
        script=code / "train_post_3d_aut.py", argv=["--cfg", "config_3d_la_aut.yml", "--exp", "LA_runs/v1"],
        cwd=work, official_parts=parts, method="ad-mt", data_dir=data_dir, run_dir=tmp_path / "run",
        sets=[*BASE_SETS, "train.batch_labeled=2", "train.batch_unlabeled=2", f"method.consistency.per={PER}",
              f"seed={yml['seed']}"],
        textseg_nets=nets, batches=make_batches(ADMT_K, PATCH, 2, 2), seed=SEED, rtol=RTOL, atol=ATOL,
        term_map={"loss": "loss", "loss_lb": "loss_l", "loss_ulb": "loss_u", "consistency_weight": "consistency_weight",
                  "high_ratio": "high_ratio", "active": "active_teacher"},
        stubs=stubs, as_batch=as_batch,
        wraps={"networks.net_factory": {"VNet": _narrow}, "train_utils": {"np": lambda _np: np_official},
               "dataloaders.mixaugs": {"np": lambda _np: np_official, "torch": lambda _t: torch_mix}},
        edits=[("iter_num//150", f"iter_num//{PER}")])
    # the teachers' num_batches_tracked: float in the script (its buffer EMA), long in textseg; never read
    bad = [line for line in bad if not re.search(r"teacher[12]\.\S*num_batches_tracked", line)]
    # a step without a confident voxel: the script's CE mean over no voxel is NaN (its gradient 0), textseg's 0
    # (docs/fidelity.md, "no confident voxel"); the weights after such a step are compared like any other
    empty = {int(m.group(1)) for line in bad if (m := re.match(r"it (\d+) term loss_u: 0\.0 vs official loss_ulb nan$",
                                                               line))}
    bad = [line for line in bad if not (int(line.split()[1]) in empty and re.search(r"term loss(_u)?: \S+ vs "
                                                                                    r"official loss(_ulb)? nan$", line))]
    _finish(record_property, t0, c0, bad, trainer, ADMT_K, "ad-mt")
    assert rpa_ours == rpa_official, next((i, a, b) for i, (a, b) in enumerate(zip(rpa_ours, rpa_official)) if a != b)
    switches = sum(a[0] != b[0] for a, b in zip(rpa_ours, rpa_ours[1:]))
    assert switches >= 2 and len({p for _, p, _ in rpa_ours}) >= 3, (switches, rpa_ours[:20])
    assert view_err and max(view_err) <= 1e-5, max(view_err or [0])
    assert alphas[0] == alphas[81] == 0.0 and alphas[82] == 0.5 and 0.5 < alphas[-1] < hp["ema_decay"]


# --- CrossMatch -----------------------------------------------------------------------------------------------------

def _train_sh_argv(text: str, label_num: int) -> list[str]:
    for line in text.replace("\\\n", " ").splitlines():
        argv = shlex.split(line)
        if argv[:2] == ["python", "train_cross_match.py"] and f"--label_num {label_num}" in " ".join(argv):
            return argv[2:]
    raise AssertionError(f"train.sh has no run with --label_num {label_num}")


def test_crossmatch_trajectory(official_dir, data_dir, tmp_path, float64, record_property, monkeypatch):
    """CrossMatch over CM_K iterations: AdamW (its step, exp_avg, exp_avg_sq compared and synchronised), the poly
    lr and the τ ramp (both scaled), the teacher passes in train mode, feature perturbation, the strong views and
    CutMix boxes, all loss terms."""
    repo, code = "CrossMatch", official_dir / "CrossMatch" / "LA" / "code"
    record_property("commit", official_commit(official_dir, repo))
    src = (code / "train_cross_match.py").read_text(encoding="utf-8")
    argv = _train_sh_argv((code / "train.sh").read_text(encoding="utf-8"), 8)
    shipped = shipped_config("crossmatch")
    lr_line, tau_line = "lr_ = base_lr * (1 - iter_num / 17000) ** 0.9", "ramps.sigmoid_rampup(iter_num, 17000)"
    assert lr_line in src and tau_line in src
    assert shipped["optim"]["poly_iterations"] == shipped["method"]["threshold_rampup"] == 17000
    i = argv.index("--max_iterations")
    assert int(argv[i + 1]) + 1 == shipped["train"]["iterations"]  # the loop runs max_iterations + 1 steps
    assert argv[argv.index("--optimizer") + 1] == "AdamW" and shipped["optim"]["name"] == "adamw"
    argv[i + 1] = str(CM_K - 1)

    # textseg's perturbation dropouts, looked up at call time (so that shared_draws serves them as the official's)
    monkeypatch.setitem(vnet_fp.PERTURBATIONS, "dropout", lambda *a, **k: F.dropout3d(*a, **k))
    rec: dict[str, list[torch.Tensor]] = {"views": [], "boxes": []}
    n_boxes = [0]

    def nets(m):
        if not hasattr(m, "_traj_wrapped"):
            m._traj_wrapped = True
            real_view, real_box = m.strong_view, m._box

            def view(image, draws):
                rec["views"].append(real_view(image, draws))
                return rec["views"][-1]

            def box(spatial, draws, device):
                rec["boxes"].append(real_box(spatial, draws, device))
                n_boxes[0] += int(rec["boxes"][-1].sum() > 0)
                return rec["boxes"][-1]
            m.strong_view, m._box = view, box
        return {"net": m.net}

    class Loaded:
        """One step's three loader outputs, read when the script unpacks them (after textseg's step recorded its
        views and boxes: per unlabeled sample s1, s2, box1, box2, then per partner s1, s2)."""

        def __init__(self, b):
            self.b = b

        def __iter__(self):
            b, v, bx = self.b, rec["views"], rec["boxes"]
            assert len(v) == 8 and len(bx) == 4, (len(v), len(bx))
            st = lambda i, j, xs=v: torch.stack([xs[i], xs[j]]).clone()
            out = ((b.image_l, b.label_l),
                   (b.image_u[:2], st(0, 2), st(1, 3), st(0, 2, bx), st(1, 3, bx)),
                   (b.image_u[2:], st(4, 6), st(5, 7), None, None))
            rec["views"], rec["boxes"] = [], []
            return iter(out)

    tau = [None]

    def parts(g):
        names = {"loss", "loss_x", "loss_u_s1", "loss_u_s2", "loss_u_w_kd", "loss_weak_dec_w_t", "loss_strong_dec_w_t",
                 "loss_weak_dec_w_s2_t", "loss_strong_dec_w_s2_t", "loss_weak_dec_w_s2", "loss_strong_dec_w_s2"}
        terms = {n: g[n] for n in names if n in g}
        if tau[0] is not None:
            terms["tau"] = tau[0]  # the τ the step just reported used (the script updates it inside the step)
        tau[0] = float(g["conf_thresh"])
        return {"net": g["net"]}, g["optimizer"], terms

    class LAHeart:
        def __init__(self, *a, **k):
            pass

        def __len__(self):
            return 76

    stubs = {"dataloaders.la_heart": _module("dataloaders.la_heart", LAHeart=LAHeart, RandomCrop=_Null,
                                             RandomRotFlip=_Null, ToTensor=_Null),
             "test_util": _module("test_util", test_all_case=_Null())}
    (tmp_path / "code").mkdir()
    t0, c0 = time.perf_counter(), time.process_time()
    bad, trainer = lockstep(
        script=code / "train_cross_match.py", argv=argv, cwd=tmp_path / "code", official_parts=parts,
        method="crossmatch", data_dir=data_dir, run_dir=tmp_path / "run",
        sets=[*BASE_SETS, "train.batch_labeled=2", "train.batch_unlabeled=4", f"optim.poly_iterations={CM_SPAN}",
              f"method.threshold_rampup={CM_SPAN}"],
        textseg_nets=nets, batches=make_batches(CM_K, PATCH, 2, 4), seed=SEED, rtol=RTOL, atol=ATOL,
        term_map={"loss": "loss", "loss_x": "loss_x", "loss_u_s1": "loss_u_s1", "loss_u_s2": "loss_u_s2",
                  "loss_u_w_kd": "loss_kd", "loss_weak_dec_w_t": "loss_kd_weak_t",
                  "loss_strong_dec_w_t": "loss_kd_strong_t", "loss_weak_dec_w_s2_t": "loss_kd_weak_s2_t",
                  "loss_strong_dec_w_s2_t": "loss_kd_strong_s2_t", "loss_weak_dec_w_s2": "loss_kd_weak_s2",
                  "loss_strong_dec_w_s2": "loss_kd_strong_s2", "tau": "conf_threshold"},
        stubs=stubs, as_batch=Loaded, import_wraps={"networks.vnet": {"VNet": _narrow}},
        edits=[("enumerate(zip(trainloader_l, trainloader_u, trainloader_u_mix))", "enumerate(trainloader_l)"),
               (lr_line, lr_line.replace("17000", str(CM_SPAN))), (tau_line, tau_line.replace("17000", str(CM_SPAN)))])
    _finish(record_property, t0, c0, bad, trainer, CM_K, "crossmatch")
    assert n_boxes[0] > CM_K  # CutMix boxes (p 0.5) acted
    assert all("exp_avg" in s for s in trainer.optimizer.state.values())
