"""Config parity (issue 26): every hyperparameter of textseg's shipped configs against the official source.

The textseg side is the config a user gets: `runs.config.build_config` as `textseg train --method M` resolves it,
under each data-set profile the method ships (`configs/<method>.yaml` `datasets:`) or an experiment preset runs it
on (`experiments.presets.preset_spec`, with the preset's `set` items where it adds any). Profiles without an
official script of their own keep the method's script values. The official side is read from the official files
themselves with `ast` (argparse defaults, assignments, literal arguments of named calls, signature defaults, the
lr-update lines) or, for `train.sh`, from its command line: no official value is restated here. A row that
textseg reads otherwise on purpose (docs/fidelity.md) asserts textseg's documented value and that the official
value differs, so a change on either side fails. Code constants (BCP's region weights) are checked by running the
code (`test_bcp_region_weights_follow_the_official_calls`); the code fallbacks `hp.get(key, default)` equal the
shipped values by tests/test_config_fallbacks.py.

No training here: the whole file runs in a few seconds.
"""

from __future__ import annotations

import ast
import functools
import operator
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import pytest
import torch
import yaml

from parity_helpers import require_checkout
from textseg_cli.data.batch import Batch
from textseg_cli.experiments.presets import PRESETS, preset_spec
from textseg_cli.methods import bcp as bcp_module
from textseg_cli.methods.base import StepContext
from textseg_cli.methods.registry import build_method, list_methods
from textseg_cli.runs.config import build_config, method_config

pytestmark = pytest.mark.parity

_MISS = object()
_BINOPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
           ast.Pow: operator.pow, ast.FloorDiv: operator.floordiv}


# --- reading official files ----------------------------------------------------------------------------------------

@functools.lru_cache(maxsize=None)
def _tree(path: Path) -> ast.Module:
    return ast.parse(path.read_text(encoding="utf-8"), filename=str(path))


def _num(node: ast.AST) -> Any:
    """A literal (number, string, bool, list) including constant arithmetic such as `2/3` or `-1500`."""
    if isinstance(node, ast.Constant):
        return node.value
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
        return -_num(node.operand)
    if isinstance(node, ast.BinOp) and type(node.op) in _BINOPS:
        return _BINOPS[type(node.op)](_num(node.left), _num(node.right))
    if isinstance(node, (ast.List, ast.Tuple)):
        return [_num(e) for e in node.elts]
    raise ValueError(f"not a literal: {ast.dump(node)[:80]}")


def _try(pick: Callable[[ast.AST], ast.AST], node: ast.AST) -> Any:
    try:
        return _num(pick(node))
    except (AttributeError, IndexError, TypeError, ValueError):
        return _MISS


def _unique(found: list, where: str) -> Any:
    assert found, f"{where}: not found in the official file"
    assert all(f == found[0] for f in found), f"{where}: several different values {found}"
    return found[0]


def _name(node: ast.AST) -> str | None:
    return node.id if isinstance(node, ast.Name) else node.attr if isinstance(node, ast.Attribute) else None


def _scope(tree: ast.AST, within: str | None) -> ast.AST:
    if within is None:
        return tree
    hits = [n for n in ast.walk(tree) if isinstance(n, (ast.ClassDef, ast.FunctionDef)) and n.name == within]
    assert len(hits) == 1, f"{within}: {len(hits)} definitions"
    return hits[0]


@dataclass(frozen=True)
class Src:
    """Where an official value lives and how to read it; `get(root)` returns it."""
    where: str
    read: Callable[[Path], Any] = field(compare=False)
    files: tuple[str, ...] = ()

    def get(self, root: Path) -> Any:
        for f in self.files:  # the checkout at the commit the method classes name (skip, or fail when strict)
            require_checkout(root, f.split("/")[0])
        return self.read(root)


def arg(file: str, flag: str) -> Src:
    """`parser.add_argument(flag, type=T, default=D)` → T(D)."""
    def read(root):
        found = []
        for n in ast.walk(_tree(root / file)):
            if (isinstance(n, ast.Call) and _name(n.func) == "add_argument" and n.args
                    and isinstance(n.args[0], ast.Constant) and n.args[0].value == flag):
                kw = {k.arg: k.value for k in n.keywords}
                value = _num(kw["default"])
                typ = _name(kw["type"]) if "type" in kw else None
                found.append({"int": int, "float": float}.get(typ, lambda v: v)(value))
        return _unique(found, f"{file} {flag}")
    return Src(f"{file} add_argument('{flag}')", read, (file,))


def assign(file: str, name: str, pick: Callable = lambda v: v, within: str | None = None) -> Src:
    """The value assigned to `name` (a name, an attribute `x.name`, or one element of a tuple assignment),
    through `pick` (an AST path into the right-hand side); assignments where `pick` finds no literal are skipped."""
    def read(root):
        found = []
        for n in ast.walk(_scope(_tree(root / file), within)):
            if not isinstance(n, ast.Assign):
                continue
            for t in n.targets:
                if _name(t) == name:
                    found.append(_try(pick, n.value))
                elif isinstance(t, ast.Tuple) and isinstance(n.value, ast.Tuple):
                    found += [_try(pick, v) for e, v in zip(t.elts, n.value.elts) if _name(e) == name]
        return _unique([f for f in found if f is not _MISS], f"{file} {name} =")
    return Src(f"{file} `{name} = …`", read, (file,))


def call(file: str, func: str, pos: int | None = None, kw: str | None = None, pick: Callable = lambda v: v,
         within: str | None = None, absent: Any = _MISS) -> Src:
    """A literal argument of the calls of `func` (positional `pos` or keyword `kw`) through `pick`; with `absent`,
    the value when the keyword is not passed (the callee's own default, named in the row's note)."""
    def read(root):
        found = []
        for n in ast.walk(_scope(_tree(root / file), within)):
            if not (isinstance(n, ast.Call) and _name(n.func) == func):
                continue
            if kw is not None:
                node = next((k.value for k in n.keywords if k.arg == kw), None)
                if node is None:
                    if absent is not _MISS:
                        found.append(absent)
                    continue
            else:
                node = n.args[pos] if len(n.args) > pos else None
                if node is None:
                    continue
            found.append(_try(pick, node))
        return _unique([f for f in found if f is not _MISS], f"{file} {func}({kw or pos})")
    return Src(f"{file} {func}({kw + '=' if kw else f'arg {pos}'}…)", read, (file,))


def calls_in_order(file: str, within: str, func: str, pos: int) -> Src:
    """Positional argument `pos` of each call of `func` inside `within`, in source order (e.g. decoder modes)."""
    def read(root):
        calls = [n for n in ast.walk(_scope(_tree(root / file), within))
                 if isinstance(n, ast.Call) and _name(n.func) == func]
        calls.sort(key=lambda n: (n.lineno, n.col_offset))
        return [_num(n.args[pos]) for n in calls]
    return Src(f"{file} {within}: {func}(arg {pos}) in order", read, (file,))


def signature(file: str, func: str, param: str) -> Src:
    """The default of `param` in `def func(...)`."""
    def read(root):
        found = []
        for n in ast.walk(_tree(root / file)):
            if isinstance(n, ast.FunctionDef) and n.name == func:
                a = n.args
                names = [p.arg for p in a.args]
                defaults = dict(zip(names[len(names) - len(a.defaults):], a.defaults))
                if param in defaults:  # e.g. the one __init__ of several that has it
                    found.append(_num(defaults[param]))
        return _unique(found, f"{file} def {func}({param}=)")
    return Src(f"{file} def {func}({param}=…)", read, (file,))


def coefficient(file: str, target: str, term: str) -> Src:
    """The literal factor of `term` in the assignment to `target` (`x = a + 0.5 * term`): 1 when the term stands
    alone, 0 when the expression leaves it out."""
    def factor(expr: ast.AST) -> Any:
        for n in ast.walk(expr):
            if isinstance(n, ast.BinOp) and isinstance(n.op, ast.Mult):
                for a, b in ((n.left, n.right), (n.right, n.left)):
                    if _name(a) == term:
                        return _num(b)
        return 1 if any(_name(n) == term for n in ast.walk(expr)) else 0

    def read(root):
        found = [factor(n.value) for n in ast.walk(_tree(root / file))
                 if isinstance(n, ast.Assign) and any(_name(t) == target for t in n.targets)]
        return _unique(found, f"{file} {target} = …")
    return Src(f"{file} factor of `{term}` in `{target} = …`", read, (file,))


def dict_value(file: str, key: str) -> Src:
    """The literal value of `key` in the dict displays of the file (e.g. an optimiser's parameter group)."""
    def read(root):
        found = [_num(v) for n in ast.walk(_tree(root / file)) if isinstance(n, ast.Dict)
                 for k, v in zip(n.keys, n.values) if isinstance(k, ast.Constant) and k.value == key]
        return _unique(found, f"{file} {{'{key}': …}}")
    return Src(f"{file} {{'{key}': …}}", read, (file,))


def shell_flag(file: str, flag: str) -> Src:
    """The value every command line of a shell script passes for `flag`."""
    def read(root):
        found = [float(v) for v in re.findall(rf"{re.escape(flag)}\s+([-+0-9.eE]+)", (root / file).read_text("utf-8"))]
        return _unique(found, f"{file} {flag}")
    return Src(f"{file} `{flag} …`", read, (file,))


def yaml_value(file: str, key: str) -> Src:
    """A top-level key of an official YAML config."""
    def read(root):
        data = yaml.safe_load((root / file).read_text(encoding="utf-8"))
        assert key in data, f"{file}: no {key}"
        return data[key]
    return Src(f"{file} {key}:", read, (file,))


def called(file: str, func: str, value: Any = True) -> Src:
    """`value` when the file calls `func` (e.g. RandomRotFlip() in the training transform, optim.Adam)."""
    def read(root):
        hit = any(isinstance(n, ast.Call) and _name(n.func) == func for n in ast.walk(_tree(root / file)))
        assert hit, f"{file}: no call of {func}"
        return value
    return Src(f"{file} calls {func}()", read, (file,))


def lr_rule(file: str, key: str) -> Src:
    """The learning-rate rule of the training loop, read from its `lr_ = …` updates: schedule (constant when lr_
    never changes, step `base·γ ** (t // s)` or `lr_ ·= γ` under `t % s == 0`, poly `base·(1 − t/T) ** p`, linear
    `base·(1 − t/T)`), power, step_size, step_gamma."""
    def read(root):
        tree = _tree(root / file)
        rule: dict[str, Any] = {"schedule": "constant"}
        parents = {c: p for p in ast.walk(tree) for c in ast.iter_child_nodes(p)}
        for n in ast.walk(tree):
            if not (isinstance(n, ast.Assign) and any(_name(t) == "lr_" for t in n.targets)):
                continue
            v = n.value
            if isinstance(v, ast.BinOp) and isinstance(v.op, ast.Mult) and isinstance(v.right, ast.BinOp) \
                    and isinstance(v.right.op, ast.Pow):
                base, exp = v.right.left, v.right.right
                if isinstance(exp, ast.BinOp) and isinstance(exp.op, ast.FloorDiv):  # base_lr * γ ** (t // s)
                    rule.update(schedule="step", step_gamma=_num(base), step_size=_num(exp.right))
                else:  # base_lr * (1 - t / T) ** p
                    rule.update(schedule="poly", power=_num(exp))
            elif isinstance(v, ast.BinOp) and isinstance(v.op, ast.Mult) and isinstance(v.right, ast.BinOp) \
                    and isinstance(v.right.op, ast.Sub):  # base_lr * (1 - t / T)
                rule.update(schedule="linear")
            elif isinstance(v, ast.BinOp) and _name(v.left) == "lr_" and isinstance(v.right, ast.Constant):
                test = parents[n].test  # if iter_num % s == 0 ...: lr_ = lr_ * γ
                mods = [m for m in ast.walk(test) if isinstance(m, ast.BinOp) and isinstance(m.op, ast.Mod)]
                rule.update(schedule="step", step_gamma=_num(v.right), step_size=_num(mods[0].right))
        assert key in rule, f"{file}: lr rule {rule} has no {key}"
        return rule[key]
    return Src(f"{file} lr_ updates ({key})", read, (file,))


def derived(fn: Callable[..., Any], *parts: Src, how: str) -> Src:
    return Src(f"{how} [{'; '.join(p.where for p in parts)}]", lambda root: fn(*(p.get(root) for p in parts)),
               tuple(f for p in parts for f in p.files))


# --- the table -----------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Row:
    method: str
    key: str                     # dotted path in the resolved textseg config
    src: Src
    transform: Callable[[Any], Any] = lambda v: v  # official unit → textseg's (documented in `note`)
    profiles: tuple[str, ...] | None = None        # None: every profile the method is run under
    documented: dict[str, Any] | None = None       # profile → textseg's value where docs/fidelity.md states a
    note: str = ""                                 # deliberate difference (the official value must differ)


UAMT, SUP = "UA-MT/code/train_LA_meanteacher_certainty_unlabel.py", "UA-MT/code/train_LA.py"
MCNET, MCNET_NET, MCNET_LOSS = "MC-Net/code/train_mcnet_3d.py", "MC-Net/code/networks/VNet.py", \
    "MC-Net/code/utils/losses.py"
DTC = "DTC/code/train_la_dtc.py"
URPC = "SSL4MIS/code/train_uncertainty_rectified_pyramid_consistency_3D.py"
CPS = "SSL4MIS/code/train_cross_pseudo_supervision_3D.py"
BCP, BCP_UTILS = "BCP/code/LA_BCP_train.py", "BCP/code/utils/BCP_utils.py"
BCP_PAN, BCP_PAN_LOSS, BCP_PAN_DATA = "BCP/code/pancreas/train_pancreas.py", "BCP/code/pancreas/losses.py", \
    "BCP/code/pancreas/dataloaders.py"
MCF = "MCF/code/train_MCF.py"
MLRP, MLRP_NET = "MLRP/code/train_Mutual_Reliable.py", "MLRP/code/networks/VNet.py"
VCLIP, VCLIP_NET, VCLIP_LOSS, VCLIP_SH = "VCLIPSeg/code/train_3d.py", "VCLIPSeg/code/networks/VNet_clip.py", \
    "VCLIPSeg/code/utils/losses.py", "VCLIPSeg/train.sh"
TS_TRAIN, TS_TRAINER, TS_COOP, TS_LOSS = "Text-SemiSeg/train.py", "Text-SemiSeg/trainer.py", \
    "Text-SemiSeg/model/CoOp.py", "Text-SemiSeg/utils/losses.py"
LVIT_CFG, LVIT_TRAIN = "LViT/Config.py", "LViT/train_model.py"
ADMT = "AD-MT/code/train_post_3d_aut.py"
ADMT_YML = {"la": "AD-MT/cfgs/config_3d_la_aut.yml", "pancreas": "AD-MT/cfgs/config_3d_pan_aut.yml"}
CM, CM_SH = "CrossMatch/LA/code/train_cross_match.py", "CrossMatch/LA/code/train.sh"


def _admt(profile: str) -> list[Row]:
    """AD-MT: the script takes its settings from cfgs/config_3d_<la|pan>_aut.yml (--cfg)."""
    yml = ADMT_YML[profile]
    rows = [(k, yaml_value(yml, y)) for k, y in [
        ("method.ema_decay", "ema_decay"), ("method.conf_threshold", "conf_threshold"),
        ("method.consistency.weight", "consistency"), ("method.consistency.rampup", "consistency_rampup"),
        ("method.cutmix_prob", "cutmix_prob"), ("method.period", "alt_param_updating_period_iters"),
        ("method.period_random", "alt_flag_updating_period_random"),
        ("method.conflict_mode", "alt_flag_conflict_mode"),
        ("method.conflict_student_more", "alt_flag_conflict_stu_use_more"),
        ("method.conflict_weight", "alt_param_conflict_weight"),
        ("method.ensemble_temperature", "alt_param_ensemble_temp"),
        ("train.iterations", "max_iterations"), ("train.batch_labeled", "labeled_bs"), ("optim.lr", "base_lr")]]
    rows += [("train.batch_unlabeled", _unlabeled(yaml_value(yml, "batch_size"), yaml_value(yml, "labeled_bs"))),
             ("optim.schedule", derived(lambda poly: "poly" if poly else "constant", yaml_value(yml, "poly"),
                                        how="poly: True → the poly lr_ line")),
             ("optim.poly_power", lr_rule(ADMT, "power")),
             ("method.consistency.per", call(ADMT, "get_current_consistency_weight", **_per)),
             ("optim.momentum", call(ADMT, "SGD", kw="momentum")),
             ("optim.weight_decay", call(ADMT, "SGD", kw="weight_decay"))]
    return [Row("ad-mt", k, src, profiles=(profile,)) for k, src in rows]

_per = dict(pos=0, pick=lambda a: a.right)  # get_current_consistency_weight(iter_num // 150): the 150
_unlabeled = functools.partial(derived, operator.sub, how="batch_size − labeled_bs (the script's batch holds both)")


def _common(method: str, script: str, iters: str = "--max_iterations", documented: dict | None = None,
            sgd: bool = True, **cons: Src) -> list[Row]:
    """Rows every SSL script has: consistency weight/ramp/per, iterations, batch, lr, SGD momentum/decay."""
    rows = [Row(method, "method.consistency.weight", arg(script, "--consistency")),
            Row(method, "method.consistency.rampup", arg(script, "--consistency_rampup"),
                documented=(documented or {}).get("rampup")),
            Row(method, "method.consistency.per", call(script, "get_current_consistency_weight", **_per)),
            Row(method, "train.iterations", arg(script, iters), documented=(documented or {}).get("iterations")),
            Row(method, "train.batch_labeled", arg(script, "--labeled_bs")),
            Row(method, "train.batch_unlabeled", _unlabeled(arg(script, "--batch_size"), arg(script, "--labeled_bs"))),
            Row(method, "optim.lr", arg(script, "--base_lr"))]
    if sgd:
        rows += [Row(method, "optim.momentum", call(script, "SGD", kw="momentum")),
                 Row(method, "optim.weight_decay", call(script, "SGD", kw="weight_decay"))]
    rows += [Row(method, "optim.schedule", lr_rule(script, "schedule"))]
    return [r for r in rows if r.key not in cons] + [Row(method, k, s) for k, s in cons.items()]


_LA_ONLY = ("la",)
# URPC / CPS have no LA script; their LA profile takes the LA baselines' budget and ramp (docs/fidelity.md URPC
# and CPS "weight" rows, configs/urpc.yaml / cps.yaml header): documented per-profile differences.
_SSL4MIS_LA = {"rampup": {"la": 40}, "iterations": {"la": 6000}}

ROWS: list[Row] = [
    # supervised-only baseline (UA-MT's train_LA.py: labeled batches only)
    Row("sup", "train.iterations", arg(SUP, "--max_iterations")),
    Row("sup", "train.batch_labeled", arg(SUP, "--batch_size")),
    Row("sup", "method.ce_weight", assign(SUP, "loss", pick=lambda v: v.left)),  # loss = 0.5*(ce + dice)
    Row("sup", "method.dice_weight", assign(SUP, "loss", pick=lambda v: v.left)),
    Row("sup", "optim.lr", arg(SUP, "--base_lr")),
    Row("sup", "optim.momentum", call(SUP, "SGD", kw="momentum")),
    Row("sup", "optim.weight_decay", call(SUP, "SGD", kw="weight_decay")),
    *[Row("sup", f"optim.{k}", lr_rule(SUP, k)) for k in ("schedule", "step_size", "step_gamma")],
    Row("sup", "data.patch_size", assign(SUP, "patch_size"), profiles=_LA_ONLY),
    Row("sup", "data.augment.rotflip", called(SUP, "RandomRotFlip"), profiles=_LA_ONLY),
    # UA-MT
    *_common("uamt", UAMT),
    Row("uamt", "method.ema_decay", arg(UAMT, "--ema_decay")),
    Row("uamt", "method.noise_std", call(UAMT, "clamp", pos=0, pick=lambda a: a.right)),  # randn_like(x) * 0.1
    Row("uamt", "method.noise_clip", call(UAMT, "clamp", pos=2)),
    Row("uamt", "method.noise_clip", call(UAMT, "clamp", pos=1), transform=operator.neg, note="lower bound −clip"),
    Row("uamt", "method.threshold_start", assign(UAMT, "threshold", pick=lambda v: v.left.left)),  # (0.75+…)·ln2
    Row("uamt", "method.mc_passes", assign(UAMT, "T")),
    Row("uamt", "method.mc_batch_repeat", assign(UAMT, "volume_batch_r", pick=lambda v: v.args[0])),  # .repeat(2, …)
    Row("uamt", "optim.step_size", lr_rule(UAMT, "step_size")),
    Row("uamt", "optim.step_gamma", lr_rule(UAMT, "step_gamma")),
    Row("uamt", "data.patch_size", assign(UAMT, "patch_size"), profiles=_LA_ONLY),
    Row("uamt", "data.augment.rotflip", called(UAMT, "RandomRotFlip"), profiles=_LA_ONLY),
    # MC-Net / MC-Net+ (one script; --model mcnet3d_v1 / mcnet3d_v2 picks the network)
    *[r for m in ("mcnet", "mcnet+") for r in [
        *_common(m, MCNET, iters="--max_iteration"),
        Row(m, "method.consistency.temperature", arg(MCNET, "--temperature")),
        Row(m, "method.sup_weight", arg(MCNET, "--lamda")),
        Row(m, "method.dice.smooth", signature(MCNET_LOSS, "Binary_dice_loss", "ep")),
        Row(m, "data.augment.rotflip", called(MCNET, "RandomRotFlip"), profiles=_LA_ONLY)]],
    Row("mcnet", "method.up_modes", calls_in_order(MCNET_NET, "MCNet3d_v1", "Decoder", 6)),
    Row("mcnet+", "method.up_modes", calls_in_order(MCNET_NET, "MCNet3d_v2", "Decoder", 6)),
    # DTC
    *_common("dtc", DTC),
    Row("dtc", "method.sdf_sharpness", call(DTC, "sigmoid", pos=0, pick=lambda a: a.left), transform=operator.neg,
        note="torch.sigmoid(-1500*outputs_tanh): k = −(the literal)"),
    Row("dtc", "method.beta", arg(DTC, "--beta")),
    Row("dtc", "method.ce_weight", coefficient(DTC, "supervised_loss", "loss_seg")),  # CE logged, not optimised
    Row("dtc", "optim.step_size", lr_rule(DTC, "step_size")),
    Row("dtc", "optim.step_gamma", lr_rule(DTC, "step_gamma")),
    Row("dtc", "data.augment.rotflip", called(DTC, "RandomRotFlip"), profiles=_LA_ONLY),
    # URPC, CPS (SSL4MIS 3D scripts)
    *_common("urpc", URPC, documented=_SSL4MIS_LA),
    Row("urpc", "optim.poly_power", lr_rule(URPC, "power")),
    Row("urpc", "data.augment.rotflip", called(URPC, "RandomRotFlip")),
    *_common("cps", CPS, documented=_SSL4MIS_LA),
    Row("cps", "optim.poly_power", lr_rule(CPS, "power")),
    Row("cps", "data.augment.rotflip", called(CPS, "RandomRotFlip")),
    # BCP, LA script (both phases in one run; BraTS, with no script of its own, runs the LA values)
    *[Row("bcp", k, s, profiles=("la", "brats")) for k, s in [
        ("method.pretrain_iterations", arg(BCP, "--pre_max_iteration")),
        ("optim.step_offset", arg(BCP, "--pre_max_iteration")),  # self_train restarts iter_num at 0
        ("train.iterations", derived(operator.add, arg(BCP, "--pre_max_iteration"), arg(BCP, "--self_max_iteration"),
                                     how="pre-training + self-training iterations")),
        ("method.cuboid_ratio", arg(BCP, "--mask_ratio")),
        ("method.unlabeled_weight", arg(BCP, "--u_weight")),
        ("method.ema_decay", call(BCP, "update_ema_variables", pos=2)),
        ("method.pseudo_threshold", signature(BCP, "get_cut_mask", "thres")),
        ("method.pseudo_lcc", derived(bool, call(BCP, "get_cut_mask", kw="nms"), how="nms=1 → LCC")),
        ("train.batch_labeled", arg(BCP, "--labeled_bs")),
        ("train.batch_unlabeled", _unlabeled(arg(BCP, "--batch_size"), arg(BCP, "--labeled_bs"))),
        ("optim.lr", arg(BCP, "--base_lr")),
        ("optim.momentum", call(BCP, "SGD", kw="momentum")),
        ("optim.weight_decay", call(BCP, "SGD", kw="weight_decay")),
        ("optim.schedule", lr_rule(BCP, "schedule")),
        ("optim.step_size", lr_rule(BCP, "step_size")),
        ("optim.step_gamma", lr_rule(BCP, "step_gamma")),
        ]],
    Row("bcp", "data.augment.rotflip", called(BCP, "RandomRotFlip"), profiles=_LA_ONLY),
    # BCP, Pancreas-CT script (code/pancreas/)
    Row("bcp", "method.cuboid_size", assign(BCP_PAN, "patch_size"), transform=lambda v: [v] * 3,
        profiles=("pancreas",), note="generate_mask(img, patch_size): a 64³ cube"),
    Row("bcp", "method.unlabeled_weight", signature(BCP_PAN_LOSS, "mix_loss", "u_weight"), profiles=("pancreas",),
        note="the mix_loss calls pass no u_weight: its default is what ran"),
    Row("bcp", "method.unlabeled_weight", assign(BCP_PAN, "u_weight"), profiles=("pancreas",),
        documented={"pancreas": 0.5}, note="declared u_weight = 1.5, never passed (configs/bcp.yaml, fidelity.md)"),
    Row("bcp", "method.ema_decay", assign(BCP_PAN, "alpha"), profiles=("pancreas",)),
    Row("bcp", "optim.lr", assign(BCP_PAN, "lr"), profiles=("pancreas",)),
    Row("bcp", "optim.name", called(BCP_PAN_DATA, "Adam", "adam"), profiles=("pancreas",)),
    Row("bcp", "optim.weight_decay", call(BCP_PAN_DATA, "Adam", kw="weight_decay", absent=0.0),
        profiles=("pancreas",), note="optim.Adam(net.parameters(), lr=lr): torch's default weight_decay 0"),
    Row("bcp", "optim.schedule", lr_rule(BCP_PAN, "schedule"), profiles=("pancreas",)),
    Row("bcp", "train.batch_labeled", assign(BCP_PAN, "batch_size"), transform=lambda b: 2 * b,
        profiles=("pancreas",), note="two labeled loaders (a, b) of batch_size each"),
    Row("bcp", "train.batch_unlabeled", assign(BCP_PAN, "batch_size"), transform=lambda b: 2 * b,
        profiles=("pancreas",), note="two unlabeled loaders of batch_size each"),
    # MCF
    *_common("mcf", MCF),
    Row("mcf", "method.disagreement_weight", coefficient(MCF, "v_supervised_loss", "v_mse")),
    Row("mcf", "method.disagreement_weight", coefficient(MCF, "r_supervised_loss", "r_mse")),
    Row("mcf", "method.consistency.temperature", assign(MCF, "T")),
    Row("mcf", "optim.step_size", lr_rule(MCF, "step_size")),
    Row("mcf", "optim.step_gamma", lr_rule(MCF, "step_gamma")),
    # MLRP
    *_common("mlrp", MLRP, iters="--max_iteration"),
    Row("mlrp", "method.dice_weight", arg(MLRP, "--lamda")),
    Row("mlrp", "method.up_modes", calls_in_order(MLRP_NET, "MCNet3d_v1", "Decoder", 6)),
    Row("mlrp", "data.augment.rotflip", called(MLRP, "RandomRotFlip"), profiles=_LA_ONLY),
    # VCLIPSeg
    *_common("vclipseg", VCLIP, iters="--max_iteration"),
    Row("vclipseg", "method.sup_weight", arg(VCLIP, "--lamda")),
    Row("vclipseg", "method.reg_weight", shell_flag(VCLIP_SH, "--sim_w")),
    Row("vclipseg", "method.reg_weight", arg(VCLIP, "--sim_w")),
    Row("vclipseg", "method.dice.smooth", signature(VCLIP_LOSS, "Binary_dice_loss", "ep")),
    Row("vclipseg", "method.up_modes", calls_in_order(VCLIP_NET, "VCLIPSeg", "Decoder_Prototype", 6)),
    Row("vclipseg", "data.augment.rotflip", called(VCLIP, "RandomRotFlip"), profiles=_LA_ONLY),
    # Text-SemiSeg (train.py holds the arguments, trainer.py the loop)
    *_common("text-semiseg", TS_TRAIN, sgd=False,
             **{"method.consistency.per": call(TS_TRAINER, "get_current_consistency_weight", **_per),
                "optim.schedule": lr_rule(TS_TRAINER, "schedule")}),
    Row("text-semiseg", "optim.momentum", dict_value(TS_TRAINER, "momentum")),
    Row("text-semiseg", "optim.weight_decay", dict_value(TS_TRAINER, "weight_decay")),
    Row("text-semiseg", "method.dca_start", arg(TS_TRAIN, "--mixed_iterations")),
    Row("text-semiseg", "method.csa_weight", arg(TS_TRAIN, "--cog_weight")),
    Row("text-semiseg", "method.text.n_ctx", arg(TS_TRAIN, "--n_ctx")),
    Row("text-semiseg", "method.text.init_std", call(TS_COOP, "normal_", kw="std")),
    Row("text-semiseg", "method.pseudo_threshold", signature(TS_TRAINER, "get_cut_mask", "thres")),
    Row("text-semiseg", "method.pseudo_lcc", signature(TS_TRAINER, "get_cut_mask", "nms"), transform=bool),
    Row("text-semiseg", "method.dice.smooth", assign(TS_LOSS, "smooth")),
    # AD-MT (settings in its cfgs/*.yml, one per data set)
    *_admt("la"), *_admt("pancreas"),
    Row("ad-mt", "data.augment.rotflip", signature("AD-MT/code/dataloaders/dataset_3d.py", "__init__", "flag_rot"),
        profiles=_LA_ONLY, note="WeakStrongAugment(flag_rot=not flag_pancreas): RandomRotFlip on LA"),
    # CrossMatch (LA/code/train.sh runs train_cross_match.py; Pancreas, with no script of its own, runs the LA values)
    Row("crossmatch", "optim.lr", shell_flag(CM_SH, "--base_lr")),
    Row("crossmatch", "train.iterations", shell_flag(CM_SH, "--max_iterations"), transform=lambda v: int(v) + 1,
        note="the loop stops after iter_num > max_iterations: max_iterations + 1 steps (:415-421)"),
    Row("crossmatch", "method.conf_thresh", shell_flag(CM_SH, "--conf_thresh")),
    Row("crossmatch", "method.pert_gap", arg(CM, "--pert_gap")),
    Row("crossmatch", "method.pert_type", arg(CM, "--pert_type")),
    Row("crossmatch", "method.temperature", arg(CM, "--temperature")),
    Row("crossmatch", "method.eta", arg(CM, "--eta")),
    Row("crossmatch", "method.image_weight", coefficient(CM, "loss", "loss_u_s1")),
    Row("crossmatch", "method.image_weight", coefficient(CM, "loss", "loss_u_s2")),
    Row("crossmatch", "train.batch_labeled", arg(CM, "--batch_size")),
    Row("crossmatch", "optim.weight_decay", call(CM, "AdamW", kw="weight_decay")),
    Row("crossmatch", "optim.schedule", lr_rule(CM, "schedule")),
    Row("crossmatch", "optim.poly_power", lr_rule(CM, "power")),
    Row("crossmatch", "optim.poly_iterations", assign(CM, "lr_", pick=lambda v: v.right.left.right.right)),
    Row("crossmatch", "data.augment.rotflip", called(CM, "RandomRotFlip"), profiles=_LA_ONLY),
    Row("crossmatch", "method.conf_thresh", arg(CM, "--conf_thresh")),
    Row("crossmatch", "train.batch_unlabeled", arg(CM, "--batch_size"), transform=lambda b: 2 * b,
        note="two unlabeled loaders of batch_size each (the images and their CutMix partners)"),
    Row("crossmatch", "optim.name", called(CM, "AdamW", "adamw")),
    Row("crossmatch", "data.patch_size", assign(CM, "patch_size"), profiles=_LA_ONLY),
    # LViT's U-Net (Config.py holds the settings, train_model.py the loss/optimiser)
    Row("lvit-unet", "seed", assign(LVIT_CFG, "seed")),
    Row("lvit-unet", "train.epochs", assign(LVIT_CFG, "epochs")),
    Row("lvit-unet", "train.batch_labeled", assign(LVIT_CFG, "batch_size")),
    Row("lvit-unet", "optim.lr", assign(LVIT_CFG, "learning_rate")),
    Row("lvit-unet", "val.patience", assign(LVIT_CFG, "early_stopping_patience")),
    Row("lvit-unet", "method.dice_weight", call(LVIT_TRAIN, "WeightedDiceBCE", kw="dice_weight")),
    Row("lvit-unet", "method.bce_weight", call(LVIT_TRAIN, "WeightedDiceBCE", kw="BCE_weight")),
    Row("lvit-unet", "optim.name", called(LVIT_TRAIN, "Adam", "adam")),
    Row("lvit-unet", "optim.weight_decay", call(LVIT_TRAIN, "Adam", kw="weight_decay", absent=0.0),
        note="torch.optim.Adam(…, lr=lr): torch's default weight_decay 0"),
    Row("lvit-unet", "optim.schedule", called(LVIT_TRAIN, "CosineAnnealingWarmRestarts", "cosine_restarts")),
    Row("lvit-unet", "optim.restart_period", call(LVIT_TRAIN, "CosineAnnealingWarmRestarts", kw="T_0")),
    Row("lvit-unet", "optim.eta_min", call(LVIT_TRAIN, "CosineAnnealingWarmRestarts", kw="eta_min")),
]

WITH_OFFICIAL_CODE = tuple(n for n, c in list_methods().items() if c.official_code
                           and not c.official_code.lower().startswith("none"))
_DIM_PATCH = {"monuseg": (2, [224, 224])}  # the preset's dry-run shape (experiments/presets.py)


def profiles_of(method: str) -> tuple[str, ...]:
    """Profiles a user runs `method` under: the presets that list it and the profiles its config ships."""
    found = {name for name in PRESETS if any(m["method"] == method for m in preset_spec(name)["methods"])}
    found |= {p for p in (method_config(method).get("datasets") or {}) if not p.startswith("synthetic")}
    return tuple(sorted(found))


def _preset_sets(method: str, profile: str) -> list[str] | None:
    """The `--set` items the experiment preset of `profile` adds to `method` (None: not in that preset)."""
    if profile not in PRESETS:
        return None
    entry = next((m for m in preset_spec(profile)["methods"] if m["method"] == method), None)
    return None if entry is None else list(entry.get("set") or [])


def variants(method: str, profile: str) -> tuple[str, ...]:
    """`train` (textseg train --method M under the profile) and, where the preset adds `--set` items, `preset`."""
    return ("train", "preset") if _preset_sets(method, profile) else ("train",)


@functools.lru_cache(maxsize=None)
def resolved(method: str, profile: str, variant: str = "train") -> dict:
    dim, patch = _DIM_PATCH.get(profile, (3, [96, 96, 96]))
    sets = _preset_sets(method, profile) if variant == "preset" else []
    return build_config(method, profile, dim, patch, sets=sets or [])


def _lookup(cfg: dict, key: str) -> Any:
    node: Any = cfg
    for part in key.split("."):
        assert isinstance(node, dict) and part in node, f"textseg config has no {key}"
        node = node[part]
    return node


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, bool) or isinstance(b, bool):
        return bool(a) == bool(b) and type(a) is type(b)
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return a == pytest.approx(b, rel=1e-12, abs=0.0)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return a == b


CASES = [(r, p, v) for r in ROWS for p in (r.profiles or profiles_of(r.method)) for v in variants(r.method, p)]


def test_every_method_with_official_code_has_rows():
    """The table covers each method whose class names an official repository, under every profile it runs."""
    assert {"uamt", "mcnet", "mcnet+", "dtc", "urpc", "cps", "bcp", "mcf", "mlrp", "vclipseg", "text-semiseg",
            "lvit-unet", "sup", "ad-mt", "crossmatch"} <= set(WITH_OFFICIAL_CODE)
    for m in WITH_OFFICIAL_CODE:
        assert {r.key for r in ROWS if r.method == m} >= {"optim.lr"}, m
        covered = {p for r, p, _ in CASES if r.method == m}
        assert covered == set(profiles_of(m)), (m, covered, profiles_of(m))
    assert {r.method for r in ROWS} == set(WITH_OFFICIAL_CODE)


@pytest.mark.parametrize("row,profile,variant", CASES,
                         ids=[f"{r.method}-{p}-{v}-{r.key}-{i}" for i, (r, p, v) in enumerate(CASES)])
def test_config_matches_official_source(official_dir, row: Row, profile: str, variant: str):
    ours = _lookup(resolved(row.method, profile, variant), row.key)
    official = row.transform(row.src.get(official_dir))
    where = f"{row.method} [{profile}, {variant}] {row.key}: textseg {ours!r}, official {official!r} ({row.src.where})"
    documented = (row.documented or {}).get(profile, _MISS)
    if documented is _MISS:
        assert _same(ours, official), where + (f"; {row.note}" if row.note else "")
    else:  # a deliberate, documented difference: both sides pinned
        assert _same(ours, documented), f"{where}; docs/fidelity.md documents textseg's {documented!r}"
        assert not _same(official, documented), f"{where}: the official value now equals textseg's; drop the row's " \
                                                 "`documented` entry and the fidelity.md note"


# --- code constants: BCP's region weights --------------------------------------------------------------------------

def _official_mix_weights(root: Path) -> list[tuple[float, float]]:
    """(weight of the mask = 1 region, weight of the mask = 0 region) of each `mix_loss` call of LA_BCP_train.py's
    self-training, in order: the keywords passed (args.X → its argparse default) over mix_loss's signature defaults,
    swapped when `unlab=True` as the body does (`if unlab: image_weight, patch_weight = u_weight, l_weight`)."""
    utils = _tree(root / BCP_UTILS)
    fn = next(n for n in ast.walk(utils) if isinstance(n, ast.FunctionDef) and n.name == "mix_loss")
    swap = [n for n in ast.walk(fn) if isinstance(n, ast.If) and _name(n.test) == "unlab"]
    assert len(swap) == 1 and ast.unparse(swap[0].body[0]) == "image_weight, patch_weight = (u_weight, l_weight)"
    assert any(ast.unparse(n) == "image_weight, patch_weight = (l_weight, u_weight)" for n in fn.body)
    names = [p.arg for p in fn.args.args]
    defaults = {k: _num(v) for k, v in zip(names[len(names) - len(fn.args.defaults):], fn.args.defaults)}
    out = []
    calls = [n for n in ast.walk(_tree(root / BCP)) if isinstance(n, ast.Call) and _name(n.func) == "mix_loss"]
    for c in sorted(calls, key=lambda n: n.lineno):
        kw = dict(defaults)
        for k in c.keywords:
            is_arg = isinstance(k.value, ast.Attribute) and _name(k.value.value) == "args"
            kw[k.arg] = arg(BCP, f"--{k.value.attr}").get(root) if is_arg else _num(k.value)
        w = (kw["l_weight"], kw["u_weight"])
        out.append(w[::-1] if kw["unlab"] else w)
    return out


def test_bcp_region_weights_follow_the_official_calls(official_dir, monkeypatch):
    """One self-training step of textseg's BCP with its shipped LA config: the weights its two mixed losses give the
    region of each mask value equal those of the official calls (LA_BCP_train.py:254-255 over BCP_utils.mix_loss),
    so swapping the two region weights or changing α in the code fails here."""
    require_checkout(official_dir, "BCP")
    expected = _official_mix_weights(official_dir)
    assert len(expected) == 2
    cfg = resolved("bcp", "la")
    cfg = {**cfg, "method": {**cfg["method"], "backbone": {**cfg["method"]["backbone"], "n_filters": 2}},
           "train": {**cfg["train"], "iterations": cfg["method"]["pretrain_iterations"] + 1}}
    m = build_method("bcp", cfg, 1, 2, dim=3, patch_size=[16, 16, 16])
    seen: list[tuple[float, float]] = []
    real = bcp_module.mix_loss

    def recording(logits, outside, inside, mask, w_outside, w_inside):
        seen.append((float(w_outside), float(w_inside)))
        return real(logits, outside, inside, mask, w_outside, w_inside)

    monkeypatch.setattr(bcp_module, "mix_loss", recording)
    g = torch.Generator().manual_seed(0)
    batch = Batch(torch.randn(4, 1, 16, 16, 16, generator=g), (torch.rand(4, 16, 16, 16, generator=g) > 0.5).long(),
                  torch.randn(4, 1, 16, 16, 16, generator=g))
    it = int(cfg["method"]["pretrain_iterations"])
    out = m.training_step(batch, StepContext(iteration=it, max_iterations=it + 1, device=torch.device("cpu")))
    assert float(out["phase"]) == 2.0
    assert seen == [tuple(float(x) for x in w) for w in expected], (seen, expected)
