"""CrossMatch parity against AiEson/CrossMatch@59772e0 (LA/code), imported at run time.

- Network: the official `VNet(..., pert_gap, pert_type)` (networks/vnet.py), its weights copied into textseg's
  `PerturbedVNet` by registration order, gives the same outputs in eval and train mode, plain and with feature
  perturbation (`need_fp=True`), dropout drawn from the same seed; the perturbation dropouts act in eval mode too
  (the official PertDropout's dropouts are outside the module tree).
- One whole training step: the official loop body itself (train_cross_match.py, the statements of the
  `for i_batch ...` loop up to the τ update, :224-367) is taken from the script with `ast` and executed on the
  official network, with `args` built by the script's own argparse statements (:34-64) from train.sh's command line
  (lab8, train.sh:10-16), and the module-level constants (:97-100). No constant is restated here. textseg's
  `training_step` on the same inputs (strong views and CutMix boxes fed to both; the boxes made by the official
  `obtain_cutmix_box`) gives every loss term, the total, the gradients of every parameter, the BatchNorm running
  statistics after the step (the teacher passes run in train mode: the dropout-in-eval fix, :232) and the next
  step's τ, in float64.
- The CutMix box: `obtain_cutmix_box` (dataloaders/la_heart.py:14-47) and textseg's `cutmix_box` on the same draws.
- Evaluation: test_util.py's `test_single_case` equals textseg's sliding window (no LCC in the test script).
- The shipped config: every value of the official command line / script that the config holds (threshold, η, gap,
  temperature, lr, optimiser, weight decay, poly length/power, iterations, batches).
"""

from __future__ import annotations

import argparse
import ast
import functools
import shlex
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from _text_helpers import keep_float64
from parity_helpers import (
    copy_by_order,
    official_commit,
    official_module,
    require_checkout,
)

from textseg_cli.data.batch import Batch
from textseg_cli.inference.sliding_window import sliding_window_inference
from textseg_cli.methods.base import StepContext
from textseg_cli.methods.registry import build_method
from textseg_cli.runs.config import build_config

REPO, CODE = "CrossMatch", "LA/code"
SCRIPT = f"{CODE}/train_cross_match.py"
PATCH = (48, 48, 32)  # multiples of 16, and large enough for obtain_cutmix_box's largest cuboid
N_FILTERS = 4


# --- the official script, read with ast ------------------------------------------------------------------------------

def _tree(root: Path) -> ast.Module:
    return ast.parse((root / REPO / SCRIPT).read_text(encoding="utf-8"))


def _train_sh_argv(root: Path, label_num: int) -> list[str]:
    """The arguments of train.sh's `python train_cross_match.py ...` line for `--label_num label_num`."""
    text = (root / REPO / CODE / "train.sh").read_text(encoding="utf-8").replace("\\\n", " ")
    for line in text.splitlines():
        argv = shlex.split(line)
        if argv[:2] == ["python", "train_cross_match.py"] and f"--label_num {label_num}" in " ".join(argv):
            return argv[2:]
    raise AssertionError(f"train.sh has no run with --label_num {label_num}")


def official_args(root: Path, label_num: int = 8) -> argparse.Namespace:
    """`args` as the script parses train.sh's command line: its own parser statements (:34-64), executed."""
    tree = _tree(root)
    stmts = [n for n in tree.body if (isinstance(n, ast.Assign) and ast.unparse(n.targets[0]) == "parser")
             or (isinstance(n, ast.Expr) and "parser.add_argument" in ast.unparse(n))]
    ns: dict = {"argparse": argparse}
    exec(compile(ast.Module(body=stmts, type_ignores=[]), SCRIPT, "exec"), ns)  # noqa: S102 - the script's own lines
    return ns["parser"].parse_args(_train_sh_argv(root, label_num))


def module_constants(root: Path, args: argparse.Namespace) -> dict:
    """`conf_thresh`, `eta`, `pert_gap`, `LABELED_ID_NUM`, `patch_size`, ... as the module assigns them (:94-100)."""
    ns: dict = {"args": args}
    for n in _tree(root).body:
        if isinstance(n, ast.Assign) and isinstance(n.targets[0], ast.Name) and n.targets[0].id in (
                "patch_size", "num_classes", "LABELED_ID_NUM", "conf_thresh", "eta", "pert_gap", "max_iterations",
                "base_lr", "batch_size"):
            exec(compile(ast.Module(body=[n], type_ignores=[]), SCRIPT, "exec"), ns)  # noqa: S102 - the script's
    return ns


def _main_block(root: Path) -> ast.If:
    return next(n for n in _tree(root).body if isinstance(n, ast.If) and "__main__" in ast.unparse(n.test))


def loop_body(root: Path) -> list[ast.stmt]:
    """The statements of the training loop (`for i_batch, ... in enumerate(zip(...))`) up to the τ update (:365-367),
    i.e. before `optimizer.zero_grad()`."""
    loop = next(n for n in ast.walk(_main_block(root)) if isinstance(n, ast.For) and "i_batch" in ast.unparse(n.target))
    body = []
    for s in loop.body:
        if "optimizer" in ast.unparse(s):
            break
        body.append(s)
    assert ast.unparse(body[-1]).startswith("conf_thresh ="), ast.unparse(body[-1])
    return body


def statement(root: Path, target: str, calls: str) -> ast.stmt:
    """The one assignment `target = calls(...)` inside the script's main block (e.g. `net = VNet(...)`)."""
    hits = [n for n in ast.walk(_main_block(root)) if isinstance(n, ast.Assign) and isinstance(n.value, ast.Call)
            and ast.unparse(n.value.func) == calls and any(ast.unparse(t) == target for t in n.targets)]
    assert len(hits) == 1, (target, len(hits))
    return hits[0]


def _exec(stmts: list[ast.stmt], ns: dict) -> dict:
    exec(compile(ast.Module(body=stmts, type_ignores=[]), SCRIPT, "exec"), ns)  # noqa: S102 - the script's own lines
    return ns


# --- fixtures ----------------------------------------------------------------------------------------------------------

@pytest.fixture()
def official(official_dir, monkeypatch):
    require_checkout(official_dir, REPO)
    # la_heart.py imports torchio for its strong views; the parity feeds both sides the same views instead
    fake = types.ModuleType("torchio")
    fake.transforms = types.SimpleNamespace()
    monkeypatch.setitem(sys.modules, "torchio", fake)
    return types.SimpleNamespace(
        vnet=official_module(official_dir, REPO, "networks.vnet", code_dir=CODE),
        losses=official_module(official_dir, REPO, "utils.losses", code_dir=CODE),
        ramps=official_module(official_dir, REPO, "utils.ramps", code_dir=CODE),
        la_heart=official_module(official_dir, REPO, "dataloaders.la_heart", code_dir=CODE),
        root=official_dir)


def _pair(official, label_num: int = 8):
    """(official network built by the script's own `net = VNet(...)` line with n_filters=4, textseg's CrossMatch under
    the LA profile with the same weights), float64."""
    args = official_args(official.root, label_num)
    ns = {"VNet": functools.partial(official.vnet.VNet, n_filters=N_FILTERS), "args": args,
          **module_constants(official.root, args)}
    torch.manual_seed(0)
    net = _exec([statement(official.root, "net", "VNet")], ns)["net"].double()
    cfg = build_config("crossmatch", "la", 3, list(PATCH), sets=[f"method.backbone.n_filters={N_FILTERS}"])
    m = build_method("crossmatch", cfg, 1, 2, dim=3).double()
    copy_by_order(net, m.net)
    return net, m, args, ns


def _close(a, b, atol=1e-10):
    va = float(a.detach()) if isinstance(a, torch.Tensor) else float(a)
    vb = float(b.detach()) if isinstance(b, torch.Tensor) else float(b)
    assert va == pytest.approx(vb, abs=atol, rel=1e-9), (va, vb)


# --- network -----------------------------------------------------------------------------------------------------------

def test_network_train_and_eval_with_and_without_feature_perturbation(official, record_property):
    record_property("commit", official_commit(official.root, REPO))
    net, m, _, _ = _pair(official)
    x = torch.randn(4, 1, *PATCH, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    for train in (False, True):
        for need_fp in (False, True):
            net.train(train)
            m.train(train)
            torch.manual_seed(7)
            a = net(x, need_fp=True) if need_fp else (net(x),)
            torch.manual_seed(7)
            b = m.net(x, need_fp=True) if need_fp else (m.net(x),)
            assert len(a) == len(b) == (4 if need_fp else 1)
            for u, v in zip(a, b):
                torch.testing.assert_close(v, u, atol=1e-10, rtol=0)
            if need_fp and not train:  # the perturbation dropouts still act in eval mode, in both codes
                assert not torch.allclose(a[2], a[1]) and not torch.allclose(b[3], b[1])
    for (n1, b1), (n2, b2) in zip(net.state_dict().items(), m.net.state_dict().items()):
        torch.testing.assert_close(b2, b1, atol=1e-10, rtol=0, msg=f"{n1} / {n2}")  # BatchNorm running statistics
    assert m.predict_logits(x[:1]).shape == (1, 2, *PATCH)


# --- one training step -------------------------------------------------------------------------------------------------

def _inputs(official):
    """Labeled patch + label, weak unlabeled images, their strong views (stand-ins for torchio's outputs), CutMix
    partners with their strong views, and two boxes per sample from the official obtain_cutmix_box."""
    g = torch.Generator().manual_seed(5)
    r = lambda n=2: torch.randn(n, 1, *PATCH, generator=g, dtype=torch.float64)
    img_x = r()
    mask_x = torch.zeros(2, *PATCH, dtype=torch.long)
    mask_x[0, 10:30, 12:40, 5:20] = 1
    mask_x[1, 20:44, 6:30, 10:28] = 1
    img_x = img_x + 1.5 * mask_x.unsqueeze(1)
    random_state = np.random.get_state()
    np.random.seed(3)
    import random as pyrandom
    pyrandom.seed(3)
    boxes = []
    while len(boxes) < 4:  # non-empty boxes, so the CutMix lines matter
        b = official.la_heart.obtain_cutmix_box(img_size=PATCH, p=0.5)
        if b.sum() > 0:
            boxes.append(b)
    np.random.set_state(random_state)
    box1, box2 = torch.stack(boxes[:2]), torch.stack(boxes[2:])
    return {"img_x": img_x, "mask_x": mask_x, "img_u_w": r(), "img_u_s1": r(), "img_u_s2": r(), "cutmix_box1": box1,
            "cutmix_box2": box2, "img_u_w_mix": r(), "img_u_s1_mix": r(), "img_u_s2_mix": r()}


def _official_step(official, net, args, consts, inp, iteration):
    """The script's loop body (:224-367) on `net`, at step `iteration`: τ is the script's value for that step (the
    update :365-367 run at iteration − 1, or args.conf_thresh at the first step)."""
    body = loop_body(official.root)
    ns = {"net": net, "torch": torch, "F": F, "np": np, "dice_loss": official.losses.dice_loss,
          "ramps": official.ramps, "args": args, **consts, **{k: v.clone() for k, v in inp.items()}}
    if iteration > 0:
        ns["iter_num"] = iteration - 1
        _exec([body[-1]], ns)
    ns["iter_num"] = iteration
    net.train()
    torch.manual_seed(11)
    return _exec(body, ns)


def _our_step(m, inp, iteration, monkeypatch):
    views = iter([inp["img_u_s1"][0], inp["img_u_s2"][0], inp["img_u_s1"][1], inp["img_u_s2"][1],
                  inp["img_u_s1_mix"][0], inp["img_u_s2_mix"][0], inp["img_u_s1_mix"][1], inp["img_u_s2_mix"][1]])
    boxes = iter([inp["cutmix_box1"][0], inp["cutmix_box2"][0], inp["cutmix_box1"][1], inp["cutmix_box2"][1]])
    monkeypatch.setattr(m, "strong_view", lambda image, gen: next(views))
    monkeypatch.setattr(m, "_box", lambda spatial, gen, device: next(boxes))
    batch = Batch(inp["img_x"], inp["mask_x"], torch.cat([inp["img_u_w"], inp["img_u_w_mix"]]))
    m.train()
    torch.manual_seed(11)
    return m.training_step(batch, StepContext(iteration, 14001, torch.device("cpu")))


def _grads(loss, module):
    params = list(module.parameters())
    return [g if g is not None else torch.zeros_like(p)
            for g, p in zip(torch.autograd.grad(loss, params, allow_unused=True), params)]


@pytest.mark.parametrize("iteration", [0, 5000])
def test_training_step_equals_the_official_loop_body(official, monkeypatch, iteration, record_property):
    record_property("commit", official_commit(official.root, REPO))
    keep_float64(monkeypatch)
    net, m, args, consts = _pair(official)
    inp = _inputs(official)
    ns = _official_step(official, net, args, consts, inp, iteration)
    out = _our_step(m, inp, iteration, monkeypatch)
    terms = {"loss_x": "loss_x", "loss_u_s1": "loss_u_s1", "loss_u_s2": "loss_u_s2", "loss_kd": "loss_u_w_kd",
             "loss_kd_weak_t": "loss_weak_dec_w_t", "loss_kd_strong_t": "loss_strong_dec_w_t",
             "loss_kd_weak_s2_t": "loss_weak_dec_w_s2_t", "loss_kd_strong_s2_t": "loss_strong_dec_w_s2_t",
             "loss_kd_weak_s2": "loss_weak_dec_w_s2", "loss_kd_strong_s2": "loss_strong_dec_w_s2", "loss": "loss"}
    for ours, theirs in terms.items():
        _close(out[ours], ns[theirs])
    assert 0.0 < float(out["confident_fraction"]) < 1.0  # the threshold splits the voxels (it matters here)
    g_ours, g_off = _grads(out["loss"], m.net), _grads(ns["loss"], net)
    num = sum(float((a - b).norm() ** 2) for a, b in zip(g_ours, g_off)) ** 0.5
    den = sum(float(b.norm() ** 2) for b in g_off) ** 0.5
    assert num <= 1e-8 * den, (num, den)
    for (n1, b1), (n2, b2) in zip(net.state_dict().items(), m.net.state_dict().items()):  # teacher passes in train mode
        torch.testing.assert_close(b2, b1, atol=1e-10, rtol=0, msg=f"{n1} / {n2}")
    # τ of the next step: the script's update at the end of this body
    assert m.confidence_threshold(iteration + 1) == pytest.approx(float(ns["conf_thresh"]), rel=1e-12)


# --- CutMix box on the same draws -------------------------------------------------------------------------------------

class _Script:
    """One list of unit draws served to both codes: as python `random.random` and numpy `uniform`/`randint` to the
    official function, as a `crossmatch.Draws` to textseg's."""

    def __init__(self, values):
        self.values = list(values)
        self.i = 0

    def random(self) -> float:
        v = self.values[self.i]
        self.i += 1
        return v

    def uniform(self, lo: float, hi: float) -> float:
        return lo + (hi - lo) * self.random()

    def randint(self, hi: int, lo: int = 0) -> int:  # numpy: lo + ⌊u·(hi − lo)⌋
        return lo + int(self.random() * (hi - lo))


def test_cutmix_box_equals_the_official_on_the_same_draws(official, monkeypatch):
    """`obtain_cutmix_box` called as `LAHeart.__getitem__` calls it (la_heart.py:118, its keywords read with ast; the
    signature's defaults for the rest, :14-21) against the box textseg's LA config draws (`CrossMatch._box`), both fed
    the same unit draws: p, sizes, ratios, the int truncations and the swapped axes all have to agree."""
    tree = ast.parse((official.root / REPO / CODE / "dataloaders" / "la_heart.py").read_text(encoding="utf-8"))
    calls = [n for n in ast.walk(tree) if isinstance(n, ast.Call) and ast.unparse(n.func) == "obtain_cutmix_box"]
    assert len(calls) == 2 and ast.unparse(calls[0]) == ast.unparse(calls[1])
    kwargs = {k.arg: ast.literal_eval(k.value) for k in calls[0].keywords}
    m = build_method("crossmatch", build_config("crossmatch", "la", 3, [112, 112, 80]), 1, 2, dim=3)
    values = [0.2, 0.9, 0.35, 0.5, 0.7, 0.1, 0.55, 0.45] * 4 + [0.6, 0.05, 0.95, 0.3, 0.8, 0.4, 0.52, 0.98]
    checked = 0
    for start in range(len(values) - 6):
        a, b = _Script(values[start:]), _Script(values[start:])
        fake_np = types.SimpleNamespace(power=np.power, random=types.SimpleNamespace(
            uniform=a.uniform, randint=lambda lo, hi, _a=a: _a.randint(hi, lo)))
        monkeypatch.setattr(official.la_heart, "np", fake_np)
        monkeypatch.setattr(official.la_heart, "random", types.SimpleNamespace(random=a.random))
        expected = official.la_heart.obtain_cutmix_box(**kwargs)
        ours = m._box([112, 112, 80], b, torch.device("cpu"))
        assert torch.equal(ours, expected) and a.i == b.i, start
        checked += int(expected.sum() > 0)
    assert checked >= 5


# --- the shipped config ------------------------------------------------------------------------------------------------

def test_config_holds_the_official_values(official):
    """textseg's LA config against the parsed train.sh command line (lab8 and lab16) and the script's lines."""
    cfg = build_config("crossmatch", "la", 3, [112, 112, 80])
    root = official.root
    for label_num in (8, 16):
        args = official_args(root, label_num)
        hp = cfg["method"]
        assert hp["conf_thresh"] == args.conf_thresh and hp["eta"] == args.eta and hp["pert_gap"] == args.pert_gap
        assert hp["temperature"] == args.temperature and hp["pert_type"] == args.pert_type
        assert cfg["optim"]["lr"] == args.base_lr and cfg["optim"]["name"] == args.optimizer.lower()
        assert cfg["train"]["iterations"] == args.max_iterations + 1  # the loop breaks once iter_num > max_iterations
        assert cfg["train"]["batch_labeled"] == args.batch_size and cfg["train"]["batch_unlabeled"] == 2 * args.batch_size
    tree = _tree(root)
    # the assignments whose right-hand side is arithmetic: lr_ (:379), conf_thresh (:365-367), loss (:363)
    src = {ast.unparse(n.targets[0]): n.value for n in ast.walk(tree)
           if isinstance(n, ast.Assign) and isinstance(n.value, ast.BinOp)}
    lr = src["lr_"]  # lr_ = base_lr * (1 - iter_num / T) ** p
    assert cfg["optim"]["schedule"] == "poly"
    assert cfg["optim"]["poly_power"] == ast.literal_eval(lr.right.right)
    assert cfg["optim"]["poly_iterations"] == ast.literal_eval(lr.right.left.right.right)
    ramp_call = next(n for n in ast.walk(src["conf_thresh"]) if isinstance(n, ast.Call)
                     and ast.unparse(n.func) == "ramps.sigmoid_rampup")
    assert cfg["method"]["threshold_rampup"] == ast.literal_eval(ramp_call.args[1])
    assert cfg["method"]["threshold_scale"] == pytest.approx(np.log(2), rel=1e-15)
    assert "np.log(2)" in ast.unparse(src["conf_thresh"])
    adamw = next(n for n in ast.walk(tree) if isinstance(n, ast.Call) and ast.unparse(n.func) == "optim.AdamW")
    assert cfg["optim"]["weight_decay"] == ast.literal_eval(next(k.value for k in adamw.keywords
                                                                  if k.arg == "weight_decay"))
    s1 = ast.unparse(src["loss"])  # loss = (loss_x + loss_u_s1 * 0.25 + loss_u_s2 * 0.25 + loss_u_w_kd) / 2.0
    assert f"loss_u_s1 * {cfg['method']['image_weight']}" in s1 and f"loss_u_s2 * {cfg['method']['image_weight']}" in s1


# --- evaluation: the test script's sliding window, no LCC ----------------------------------------------------------------

def test_sliding_window_equals_test_single_case(official, monkeypatch):
    """LA/code/test_util.py `test_single_case` (test.py:53-62: patch, stride_xy, stride_z; argmax of the averaged
    softmax, no connected-component step) against textseg's sliding window with `predict_proba`, on one network."""
    monkeypatch.setattr(np, "float", float, raising=False)  # test_util's cal_dice spells np.float (unused here)
    util = official_module(official.root, REPO, "test_util", code_dir=CODE)
    net, m, _, _ = _pair(official)
    net.float().eval()
    m.float().eval()
    image = np.random.default_rng(1).standard_normal((37, 35, 19)).astype(np.float32)
    patch, sxy, sz = (16, 16, 16), 6, 2
    with torch.no_grad():
        label_ref, score_ref = util.test_single_case(net, image, sxy, sz, patch, num_classes=2)
        probs = sliding_window_inference(lambda x: m.predict_proba(x), torch.from_numpy(image)[None], patch,
                                         (sxy, sxy, sz), sw_batch_size=2)
    np.testing.assert_allclose(probs.numpy(), score_ref, atol=1e-5)
    assert np.array_equal(probs.argmax(0).numpy(), np.asarray(label_ref))
    assert m.protocol_lcc == "" and "LargestCC" not in (official.root / REPO / CODE / "test_util.py").read_text("utf-8")


# --- image-level perturbation: the strong view as la_heart.py builds it with torchio ------------------------------------

def test_strong_view_equals_torchio_as_la_heart_calls_it(official_dir, monkeypatch):
    """The strong-view statements of `LAHeart.__getitem__` (la_heart.py:104-109, read with ast: their probabilities
    and the torchio transforms they construct, evaluated) against `CrossMatch.strong_view` fed the parameters torchio
    drew (recorded from each transform's `get_params`): bias field, then gamma, then blur; and the shipped config
    holds the same probabilities and ranges. Needs torchio, the official data pipeline's library."""
    tio = pytest.importorskip("torchio", reason="torchio (imported by the official la_heart.py) is not installed")
    require_checkout(official_dir, REPO)
    la_heart = official_module(official_dir, REPO, "dataloaders.la_heart", code_dir=CODE)
    tree = ast.parse((official_dir / REPO / CODE / "dataloaders" / "la_heart.py").read_text(encoding="utf-8"))
    getitem = next(n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef) and n.name == "__getitem__")
    ifs = [n for n in getitem.body if isinstance(n, ast.If) and ast.unparse(n.test).startswith("random.random() <")]
    assert len(ifs) == 4 and all("img_s1" in ast.unparse(n) for n in ifs[:2])  # s1 (:104-109), s2 (:111-116) alike
    assert [ast.unparse(a) for a in ifs[:2]] == [ast.unparse(b).replace("img_s2", "img_s1") for b in ifs[2:]]
    p_bias, p_blur = (ast.literal_eval(n.test.comparators[0]) for n in ifs[:2])
    ns = {"tiot": la_heart.tiot}
    bias_t, gamma_t, blur_t = (eval(compile(ast.Expression(s.value.func), "la_heart.py", "eval"), ns)
                               for s in ifs[0].body + ifs[1].body)
    assert isinstance(bias_t, tio.RandomBiasField) and isinstance(gamma_t, tio.RandomGamma)
    assert isinstance(blur_t, tio.RandomBlur)

    cfg = build_config("crossmatch", "la", 3, [112, 112, 80])
    s = cfg["method"]["strong"]
    assert (s["bias_field_p"], s["blur_p"]) == (p_bias, p_blur)
    assert tuple(bias_t.coefficients_range) == (-s["bias_coefficients"], s["bias_coefficients"])
    assert bias_t.order == s["bias_order"] and tuple(gamma_t.log_gamma_range) == tuple(s["log_gamma"])
    assert tuple(blur_t.std_ranges) == tuple(s["blur_std"]) * 3

    drawn: dict = {}
    for name, t in (("bias", bias_t), ("gamma", gamma_t), ("blur", blur_t)):
        real = t.get_params
        monkeypatch.setattr(t, "get_params", lambda *a, _r=real, _n=name, **k: drawn.setdefault(_n, _r(*a, **k)))
    torch.manual_seed(2)
    image = torch.randn(1, 24, 24, 16)  # torchio's bias field transposes x and y: square in x, y
    expected = blur_t(gamma_t(bias_t(image)))
    m = build_method("crossmatch", cfg, 1, 2, dim=3)
    lo_c, hi_c = bias_t.coefficients_range
    (lo_g, hi_g), (lo_b, hi_b) = gamma_t.log_gamma_range, blur_t.std_ranges[:2]
    units = ([0.0] + [(c - lo_c) / (hi_c - lo_c) for c in drawn["bias"]]
             + [(float(np.log(drawn["gamma"])) - lo_g) / (hi_g - lo_g)]
             + [0.0] + [(float(sd) - lo_b) / (hi_b - lo_b) for sd in drawn["blur"]])
    draws = _Script(units)
    ours = m.strong_view(image, draws)
    assert draws.i == len(units)
    torch.testing.assert_close(ours, expected.float(), atol=1e-5, rtol=1e-4)
