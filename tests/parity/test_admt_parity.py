"""AD-MT parity against the official code (ZhenZHAO/AD-MT@03ef84c, code/train_post_3d_aut.py).

The training loop is script code inside `train()`; instead of restating it, the tests compile the script's own
statements out of its syntax tree (by line range at that commit, each range checked by its first words) and run
them in a namespace that holds textseg's networks. Its hyper-parameters come from the script itself: the argparse
lines of its `__main__` block (:503-577, parsed with an empty command line) and its config reading (:583-593,
cfgs/config_3d_la_aut.yml) — no constant of the method is restated here. textseg's side is built from its packaged
config (textseg_cli/configs/ad-mt.yaml, LA profile), so changing one of its values fails the tests that use it.

Random draws are fed identically: the method draws from one numpy RandomState seeded with the run's seed; the
official code draws from np.random, seeded with the same seed before the script's `AlternateUpdate` is built
(:154, the first period draw), and its `torch.randperm` in cut_mix_3d (mixaugs.py:189) is served from np.random
(the method's permutation draw). The strong view, which the official loader draws in its workers
(dataset_3d.py:114-121), is drawn at the same place of the stream as textseg draws it (the start of a step of
teacher 1). Dropout draws follow one torch seed on both sides. cv2 (used only by randcolor.py's uint8 path) and
tensorboard (the SummaryWriter of train()) get stand-ins when they are not installed, so the script imports.
"""

from __future__ import annotations

import ast
import copy
import importlib
import itertools
import sys
import types
import warnings

import numpy as np
import pytest
import torch
from parity_helpers import assert_close, copy_by_order, official_commit, official_module

from textseg_cli.data.batch import Batch
from textseg_cli.engine.optim import build_optimizer, build_scheduler, lr_factor
from textseg_cli.methods import admt
from textseg_cli.methods.admt import (
    compromise,
    cutmix_3d,
    entropy_ensemble,
    strong_view,
)
from textseg_cli.methods.base import StepContext
from textseg_cli.methods.registry import build_method
from textseg_cli.runs.config import build_config

REPO, SCRIPT = "AD-MT", "train_post_3d_aut.py"
PATCH = (16, 16, 16)
SEED = 7
RPA_SEED = 28  # its draws switch teachers three times in the ten steps of the RPA test (periods 2, 5, 2, ...)


@pytest.fixture
def off(official_dir, monkeypatch, record_property):
    record_property("commit", official_commit(official_dir, REPO))
    for name in ("cv2", "torch.utils.tensorboard"):
        try:
            importlib.import_module(name)
        except ImportError:
            stub = types.ModuleType(name)
            stub.SummaryWriter = None
            monkeypatch.setitem(sys.modules, name, stub)
    script = official_module(official_dir, REPO, "train_post_3d_aut")
    path = official_dir / REPO / "code" / SCRIPT
    tree = ast.parse(path.read_text(encoding="utf-8"))
    train = next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "train")
    main = next(n for n in tree.body if isinstance(n, ast.If))  # if __name__ == "__main__"
    epoch = next(n for n in train.body if isinstance(n, ast.For))  # for epoch_num in iterator (:158)
    inner = next(n for n in epoch.body if isinstance(n, ast.For))  # for i_batch, sampled_batch in ... (:180)
    source = path.read_text(encoding="utf-8")
    ns = types.SimpleNamespace(script=script, path=str(path), source=source, train=train, main=main,
                               epoch=epoch, inner=inner, dataset=sys.modules["dataloaders.dataset_3d"],
                               mixaugs=sys.modules["dataloaders.mixaugs"])
    monkeypatch.chdir(official_dir / REPO)  # :584 opens ./cfgs/<cfg>, relative to the repository (train_3d_aut.sh)
    ns.args = _official_args(ns)
    return ns


def _lines(off, nodes, lo: int, hi: int, starts: str) -> list[ast.stmt]:
    """The statements of `nodes` on lines lo..hi; the first must begin with `starts` (the commit's layout)."""
    stmts = [s for s in nodes if lo <= s.lineno <= hi]
    assert stmts and ast.get_source_segment(off.source, stmts[0]).startswith(starts), (lo, starts)
    return stmts


def _run(off, stmts: list[ast.stmt], ns: dict) -> None:
    code = compile(ast.Module(body=list(stmts), type_ignores=[]), off.path, "exec")
    exec(code, ns)  # noqa: S102 (the official script's own statements)


def _official_args(off) -> dict:
    ns = dict(vars(off.script))
    _run(off, _lines(off, off.main.body, 503, 577, "parser = argparse.ArgumentParser()"), ns)
    ns["args"] = vars(ns["parser"].parse_args([]))  # :579-580 with an empty command line
    ns["args"]["cfg"] = "config_3d_la_aut.yml"
    _run(off, _lines(off, off.main.body, 583, 593, "cfgs_file = args['cfg']"), ns)
    return ns["args"]


def _textseg_method(seed: int = SEED):
    cfg = build_config("ad-mt", "la", 3, list(PATCH), sets=["method.backbone.n_filters=4", f"seed={seed}"])
    torch.manual_seed(0)
    m = build_method("ad-mt", cfg, 1, 2, dim=3)
    with torch.no_grad():  # sharper random networks: the threshold and the compromise then act on many voxels
        for net in (m.student, m.teacher1, m.teacher2):
            net.decoder.out_conv.weight.mul_(3.0)
    return m, cfg


def _batch(k: int, patch=PATCH) -> Batch:
    g = torch.Generator().manual_seed(100 + k)
    x = torch.randn(4, 1, *patch, generator=g)
    y = torch.zeros(2, *patch, dtype=torch.long)
    y[0, 3:11, 4:12, 2:9] = 1
    y[1, 6:14, 2:10, 5:15] = 1
    return Batch(x[:2], y, x[2:])


def _loop_namespace(off, model, ema_model, ema_model_another, iter_num: int, seed: int = SEED) -> dict:
    """The script's state before a step: train() :60-63 (sizes), :128-131 (optimizer, losses), :144-154
    (alternate parameters and the AlternateUpdate, which draws the first period), the epoch prologue :161-178."""
    ns = dict(vars(off.script))
    ns.update(args=dict(off.args), model=model, ema_model=ema_model, ema_model_another=ema_model_another,
              iter_num=iter_num, epoch_num=0)
    np.random.seed(seed)
    _run(off, _lines(off, off.train.body, 60, 63, 'base_lr = args["base_lr"]'), ns)
    _run(off, _lines(off, off.train.body, 128, 131, "optimizer = optim.SGD("), ns)
    _run(off, _lines(off, off.train.body, 144, 154, "alt_flag_epoch_shuffle_teachers = "), ns)
    _run(off, _lines(off, off.epoch.body, 161, 178, "if alt_flag_epoch_shuffle_teachers:"), ns)
    return ns


def _loader_strong(off, u: torch.Tensor) -> torch.Tensor:
    """WeakStrongAugment's strong view of each patch (dataset_3d.py:114-121), drawing from np.random."""
    aug = off.dataset.WeakStrongAugment(list(PATCH), flag_rot=False)
    out = []
    for img in u[:, 0].numpy():
        image_strong = aug.randblur(aug.randcolor(img.copy()))
        out.append(torch.from_numpy(image_strong.astype(np.float32)).unsqueeze(0))
    return torch.stack(out)


def _official_step(off, ns: dict, b: Batch, state: bool, monkeypatch, upto: int = 343) -> None:
    """One pass of the loop body :181-`upto` on batch `b` with teacher 1 active when `state`."""
    u = b.image_u
    strong = _loader_strong(off, u) if state else u.clone()  # discarded by the code in teacher-2 periods (:260)
    ns["sampled_batch"] = {"image_weak": torch.cat([u, b.image_l]), "image_strong": torch.cat([strong, b.image_l]),
                           "label_aug": torch.cat([torch.zeros_like(b.label_l[: len(u)]), b.label_l])}
    with monkeypatch.context() as mp:
        mp.setattr(torch, "randperm", lambda n, *a, **k: torch.as_tensor(np.random.permutation(n)))
        _run(off, _lines(off, off.inner.body, 181, upto, 'num_lb = args["labeled_bs"]'), ns)


def _loader_bits(ours: torch.Tensor, ns: dict) -> torch.Tensor:
    """textseg's strong view checked against the official loader's of the same step (`img_ulb_s`, :201), which
    then replaces it bit for bit."""
    theirs = ns["img_ulb_s"]
    assert_close(ours, theirs, atol=1e-5)
    return theirs.to(ours.dtype).clone()


def _grads(loss, module):
    params = [p for p in module.parameters() if p.requires_grad]
    return torch.autograd.grad(loss, params, allow_unused=True)


def _assert_grads(a, b):
    a = [torch.zeros(1) if g is None else g for g in a]
    b = [torch.zeros(1) if g is None else g for g in b]
    num = sum(float((x - y).norm() ** 2) for x, y in zip(a, b)) ** 0.5
    den = sum(float(y.norm() ** 2) for y in b) ** 0.5
    assert num <= 1e-4 * max(den, 1e-12), (num, den)


def _close(a, b, atol=1e-5):
    value = lambda t: float(t.detach()) if isinstance(t, torch.Tensor) else float(t)
    assert value(a) == pytest.approx(value(b), abs=atol, rel=1e-5)


# ----------------------------------------------------------------------------------------------------------


def test_admt_network_and_initialisation(off):
    """net_factory "vnet" (net_factory.py:13-15) equals the student's V-Net in train and eval mode; the three
    networks are initialised as the script's three create_model calls (:85-87) from one torch seed."""
    cfg = build_config("ad-mt", "la", 3, list(PATCH), sets=[f"seed={SEED}"])
    torch.manual_seed(0)
    official = [off.script.net_factory(net_type=off.args["model"], in_chns=1, class_num=off.args["num_classes"])
                for _ in range(3)]
    torch.manual_seed(0)
    m = build_method("ad-mt", cfg, 1, 2, dim=3)
    for o, ours in zip(official, (m.student, m.teacher1, m.teacher2)):
        for (n1, v1), (n2, v2) in zip(o.state_dict().items(), ours.state_dict().items()):
            assert v1.shape == v2.shape and torch.equal(v1, v2), (n1, n2)
    net = official[0]
    copy_by_order(net, m.student)
    x = torch.randn(2, 1, *PATCH, generator=torch.Generator().manual_seed(0))
    for train in (False, True):
        net.train(train)
        m.student.train(train)
        torch.manual_seed(7)
        a = net(x)
        torch.manual_seed(7)
        assert_close(m.student(x), a, atol=1e-5)


def test_admt_ccm_ensemble_and_compromise(off):
    """The entropy-weighted ensemble (:221-240, run from the script) and every conflict mode of
    get_compromise_pseudo_btw_tea_stu (train_utils.py:144-180), in float64."""
    _, cfg = _textseg_method()
    g = torch.Generator().manual_seed(1)
    p1 = torch.softmax(3 * torch.randn(2, 2, *PATCH, generator=g, dtype=torch.float64), 1)
    p2 = torch.softmax(3 * torch.randn(2, 2, *PATCH, generator=g, dtype=torch.float64), 1)
    ps = torch.softmax(3 * torch.randn(2, 2, *PATCH, generator=g, dtype=torch.float64), 1)
    ns = dict(vars(off.script), ema_outputs_soft_1=p1.clone(), ema_outputs_soft_2=p2.clone(),
              alt_param_ensemble_temp=off.args["alt_param_ensemble_temp"],
              num_ulb=off.args["batch_size"] - off.args["labeled_bs"])  # :182
    with_block = next(s for s in off.inner.body if isinstance(s, ast.With) and s.lineno == 205)
    branch = with_block.body[0].body  # if not flag_start_self_learning and not args["flag_pseudo_from_student"]
    _run(off, _lines(off, branch, 221, 240, "_, pseudo_outputs_1 = torch.max(ema_outputs_soft_1"), ns)
    ens = entropy_ensemble(p1, p2, float(cfg["method"]["ensemble_temperature"]))
    conf, label = ens.max(1)
    assert_close(conf, ns["pseudo_logits"], atol=1e-12)
    assert torch.equal(label, ns["pseudo_outputs"]) and torch.equal(p1.argmax(1) != p2.argmax(1),
                                                                    ns["mtx_bool_conflict"])
    conf_s, label_s = ps.max(1)
    for mode in ("pixel_confidence", "random", "always_tea", "always_stu"):
        for teacher_conflict in (ns["mtx_bool_conflict"], None):
            np.random.seed(3)
            want_t, want_c, _ = off.script.get_compromise_pseudo_btw_tea_stu(label, conf, label_s, conf_s, mode,
                                                                            teacher_conflict)
            coin = np.random.RandomState(3).random_sample() if mode == "random" else None
            got_t, got_c = compromise(label, conf, label_s, conf_s, mode, teacher_conflict, coin)
            assert torch.equal(got_t, want_t) and torch.equal(got_c, want_c), mode
    # the configured mode is the official one
    assert cfg["method"]["conflict_mode"] == off.args["alt_flag_conflict_mode"]


def test_admt_strong_view_and_cutmix(off, monkeypatch):
    """The strong view (RandomBrightnessContrast + RandomGaussianNoise, dataset_3d.py:235-280, constants of
    WeakStrongAugment's signature :94-102) and cut_mix_3d (mixaugs.py:181-215) from the same draws."""
    _, cfg = _textseg_method()
    x = torch.rand(12, 1, *PATCH, generator=torch.Generator().manual_seed(2)) * 4 - 1
    np.random.seed(SEED)
    want = _loader_strong(off, x)
    rng = np.random.RandomState(SEED)
    got = strong_view(rng, x, cfg["method"])
    assert_close(got, want, atol=1e-5)
    assert rng.get_state()[2] == np.random.get_state()[2]  # as many draws
    assert not torch.allclose(got, x)

    u = torch.randn(3, 1, *PATCH, generator=torch.Generator().manual_seed(4))
    lab, conf = (u[:, 0] > 0).long(), torch.rand(3, *PATCH, generator=torch.Generator().manual_seed(5))
    conflict = conf > 0.5
    np.random.seed(SEED)
    with monkeypatch.context() as mp:
        mp.setattr(torch, "randperm", lambda n, *a, **k: torch.as_tensor(np.random.permutation(n)))
        want = off.mixaugs.cut_mix_3d(u, lab, conf, conflict)
    got = cutmix_3d(np.random.RandomState(SEED), u, lab, conf, conflict)
    for a, b in zip(got, want):
        assert torch.equal(a, b)


@pytest.mark.parametrize("state", [True, False], ids=["teacher1-strong-view", "teacher2-cutmix"])
def test_admt_step(off, state, monkeypatch):
    """One whole step at iteration 2,999 (ramp index 19): every loss term, the total and the gradients."""
    m, cfg = _textseg_method()
    it = 2999
    ns = _loop_namespace(off, m.student, m.teacher1, m.teacher2, it)
    alt = ns["alternate_indicator"]
    assert alt.random_alternate_period == m.period  # the first period, same draw
    assert (alt.alternate_period, alt.flag_random) == (cfg["method"]["period"], cfg["method"]["period_random"])
    ns["alternate_indicator"].flag_alternate = m.active_first = state
    b = _batch(0)
    torch.manual_seed(11)
    _official_step(off, ns, b, state, monkeypatch)
    g_official = _grads(ns["loss"], m.student)
    torch.manual_seed(11)
    out = m.training_step(b, StepContext(it, cfg["train"]["iterations"], torch.device("cpu")))
    assert m.rng.get_state()[2] == np.random.get_state()[2]  # the same draws were consumed
    assert 0.0 < float(ns["high_ratio"]) < 1.0
    _close(out["high_ratio"], ns["high_ratio"])
    _close(out["loss_l"], ns["loss_lb"])
    _close(out["loss_u"], ns["loss_ulb"])
    _close(out["consistency_weight"], ns["consistency_weight"])
    _close(out["loss"], ns["loss"])
    _assert_grads(_grads(out["loss"], m.student), g_official)


def test_admt_rpa_teacher_updates_over_steps(off, monkeypatch):
    """Ten steps from iteration 78 (EMA α = 0 until the script's global step iteration // 2 reaches 40, then
    the warm start): after each, which teacher is active, the period and the counter (AlternateUpdate), the
    student and both teachers (parameters and BatchNorm buffers) equal the script's (:181-370 run as is).
    The learning rates differ by one step (docs/fidelity.md): the script sets lr(t) = base·(1 − t/T)^0.9 after
    step t (:362-365, before iter_num += 1), so step t runs with lr(t − 1); textseg's poly scheduler runs step t
    with lr(t). That lag is asserted here, and each step then runs with the script's lr on both sides."""
    m, cfg = _textseg_method(RPA_SEED)
    # float64 (thresholded pseudo-labels: a last-bit difference can flip a voxel a few steps later and the two
    # runs part); the strong view, whose float32 mean numpy and torch round differently in the last bit (a 1e-6
    # input change moves these tiny random networks' first-layer gradients by percents), is textseg's draws and
    # arithmetic checked against the loader's view, then the loader's bits on both sides (_loader_bits)
    start, steps, patch = 78, 10, (32, 32, 32)
    m.double()
    o_student, o_t1, o_t2 = (copy.deepcopy(n) for n in (m.student, m.teacher1, m.teacher2))
    ns = _loop_namespace(off, o_student, o_t1, o_t2, start - 1, RPA_SEED)
    _run(off, _lines(off, off.inner.body, 362, 367, 'if args["poly"]:'), ns)  # lr after step start − 1
    ns["iter_num"] = start
    opt = build_optimizer(m.param_groups(), cfg["optim"])
    sched = build_scheduler(opt, cfg["train"]["iterations"], cfg["optim"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for _ in range(start):
            sched.step()
    m.train()
    o_student.train()
    states = []
    for k in range(steps):
        b = _batch(k, patch)
        b.image_l, b.image_u = b.image_l.double(), b.image_u.double()
        alt = ns["alternate_indicator"]
        assert (alt.flag_alternate, alt.random_alternate_period, alt._counter) == (m.active_first, m.period,
                                                                                  m.counter)
        states.append(m.active_first)
        lr_official = ns["optimizer"].param_groups[0]["lr"]  # what the script runs step start + k with
        # the script's lag (step t runs lr(t − 1)) is the shipped step_offset 1: textseg's schedule gives the same
        assert lr_official == pytest.approx(ns["base_lr"] * lr_factor(start + k, ns["max_iterations"],
                                                                      cfg["optim"]), rel=1e-12)
        lr_textseg = cfg["optim"]["lr"] * lr_factor(start + k, cfg["train"]["iterations"], cfg["optim"])
        assert opt.param_groups[0]["lr"] == pytest.approx(lr_textseg, rel=1e-12)
        for group in opt.param_groups:
            group["lr"] = lr_official
        torch.manual_seed(200 + k)
        _official_step(off, ns, b, alt.flag_alternate, monkeypatch, upto=348)  # with zero_grad/backward/step
        _run(off, _lines(off, off.inner.body, 351, 370, "if not flag_start_self_learning:"), ns)
        torch.manual_seed(200 + k)
        ctx = StepContext(start + k, cfg["train"]["iterations"], torch.device("cpu"))
        with monkeypatch.context() as mp:
            mp.setattr(admt, "strong_view", lambda rng, image, hp: _loader_bits(strong_view(rng, image, hp), ns))
            out = m.training_step(b, ctx)
        opt.zero_grad(set_to_none=True)
        out["loss"].backward()
        opt.step()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            sched.step()
        m.on_after_optimizer_step(ctx)
        _close(out["loss"], ns["loss"])
        for net, ours, theirs in (("student", m.student, o_student), ("teacher1", m.teacher1, o_t1),
                                  ("teacher2", m.teacher2, o_t2)):
            for (name, a), b_ in zip(ours.state_dict().items(), theirs.state_dict().values()):
                if a.is_floating_point():  # num_batches_tracked: the code's buffer EMA turns it into a float
                    err = float((a.double() - b_.double()).abs().max())
                    assert err <= 1e-5, (k, net, name, err)
    alt = ns["alternate_indicator"]
    assert (alt.flag_alternate, alt.random_alternate_period, alt._counter) == (m.active_first, m.period, m.counter)
    # one more teacher update late in training, where α reaches ema_decay (:353-357 at iter_num 2,999)
    ns["iter_num"] = 2999
    with torch.no_grad():  # the same offset on both students, so that 1 − α shows well above the tolerance
        for p, q in zip(m.student.parameters(), o_student.parameters()):
            p.add_(0.1)
            q.add_(0.1)
    _run(off, _lines(off, off.inner.body, 351, 357, "if not flag_start_self_learning:"), ns)
    m.on_after_optimizer_step(StepContext(2999, cfg["train"]["iterations"], torch.device("cpu")))
    for ours, theirs in ((m.teacher1, o_t1), (m.teacher2, o_t2)):
        for a, b_ in zip(ours.state_dict().values(), theirs.state_dict().values()):
            if a.is_floating_point():
                assert float((a.double() - b_.double()).abs().max()) <= 1e-5
    assert sum(a != b for a, b in itertools.pairwise(states)) >= 3, states
