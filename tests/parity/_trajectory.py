"""Helpers of the trajectory parity tests (test_trajectory_parity.py): run textseg's real training loop (the
engine's `Trainer`, built from the shipped config) and an official training script (its own source, executed) on
one batch sequence and one stream of random draws, and snapshot both at chosen iterations.

How the official script runs: its source is executed as `__main__` with its code folder first on sys.path (the
same-named modules of other checkouts evicted, as `parity_helpers.official_module`), argparse reading the argv the
test gives, and an import hook that hands the script stand-ins for what touches the outside world only: the
DataLoader (replaced by the test's batches), the data-set classes, logging, tensorboard, tqdm, shutil and
torchvision's image helpers. Source edits are limited to hard-coded patch sizes (in the script, or in a helper
module via `module_edits`) and the lengths the test scales identically on both sides (ramp divisor, lr step,
phase length, evaluation interval); each must match the source (a changed script fails loudly). Module
attributes can be wrapped (e.g. the network class with a smaller `n_filters`) for the duration of the run.

How the two sides see the same draws (`shared_draws`): `torch.randn_like` and channel/element dropout draw from
private generators seeded identically for each side, so both get the same noise and the same dropout masks as
long as they make the same kinds of draws in the same order per kind (the global RNG order between kinds may
differ: UA-MT's script draws the teacher noise before the student's forward, textseg after).
"""

from __future__ import annotations

import builtins
import contextlib
import dataclasses
import os
import queue
import sys
import threading
import types
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from parity_helpers import _REPO_MODULE_ROOTS
from textseg_cli.data.batch import Batch
from textseg_cli.data.prep.synthetic import prep_synthetic
from textseg_cli.data.prepared import load_prepared
from textseg_cli.engine.distributed import Dist
from textseg_cli.engine.loop import Trainer
from textseg_cli.methods.base import Method
from textseg_cli.runs.config import build_config
from textseg_cli.runtime.precision import inference_precision, training_precision

# --- snapshots ---------------------------------------------------------------------------------------------


@dataclass
class Snapshot:
    """The state after `iteration` optimiser steps: networks' state dicts, SGD momentum buffers and learning
    rates (by parameter name; a side may use one optimiser per network or one for all), the loss terms of the
    last step, and Adam/AdamW state (`adam`, empty under SGD)."""
    iteration: int
    nets: dict[str, dict[str, torch.Tensor]]
    momentum: dict[str, dict[str, torch.Tensor]]
    lr: dict[str, dict[str, float]]
    terms: dict[str, float] = field(default_factory=dict)
    # Adam/AdamW state by network and parameter name: {key: tensor} for the keys of ADAM_STATE it holds
    adam: dict[str, dict[str, dict[str, torch.Tensor]]] = field(default_factory=dict)


ADAM_STATE = ("step", "exp_avg", "exp_avg_sq", "max_exp_avg_sq")  # what Adam/AdamW keep per parameter


def _value(v: Any) -> float:
    return float(v.detach().item()) if isinstance(v, torch.Tensor) else float(v)


def _optimizers(opt: torch.optim.Optimizer | list[torch.optim.Optimizer]) -> list[torch.optim.Optimizer]:
    return list(opt) if isinstance(opt, (list, tuple)) else [opt]


def _opt_state(opt: torch.optim.Optimizer | list[torch.optim.Optimizer], p: torch.Tensor) -> dict[str, Any]:
    for o in _optimizers(opt):
        if p in o.state:
            return o.state[p]
    return {}


def take(iteration: int, nets: dict[str, nn.Module], optimizer: torch.optim.Optimizer | list[torch.optim.Optimizer],
         terms: dict[str, Any] | None = None) -> Snapshot:
    states = {k: {n: t.detach().clone() for n, t in m.state_dict().items()} for k, m in nets.items()}
    momentum = {k: {n: _opt_state(optimizer, p)["momentum_buffer"].detach().clone()
                    for n, p in m.named_parameters() if "momentum_buffer" in _opt_state(optimizer, p)}
                for k, m in nets.items()}
    lr_of = {id(p): float(g["lr"]) for o in _optimizers(optimizer) for g in o.param_groups for p in g["params"]}
    lr = {k: {n: lr_of[id(p)] for n, p in m.named_parameters() if id(p) in lr_of} for k, m in nets.items()}
    adam = {k: {n: {key: torch.as_tensor(_opt_state(optimizer, p)[key]).detach().clone() for key in ADAM_STATE
                    if key in _opt_state(optimizer, p)}
                for n, p in m.named_parameters() if any(key in _opt_state(optimizer, p) for key in ADAM_STATE)}
            for k, m in nets.items()}
    return Snapshot(iteration, states, momentum, lr, {k: _value(v) for k, v in (terms or {}).items()},
                    {k: v for k, v in adam.items() if v})


def load_by_order(state: dict[str, torch.Tensor], dst: nn.Module) -> dict[str, str]:
    """dst ← an official state dict, entries paired in registration order (as `parity_helpers.copy_by_order`,
    checked on the leaf name and the shape); returns {official name: textseg name}."""
    d_items = list(dst.state_dict().items())
    assert len(state) == len(d_items), f"{len(state)} official vs {len(d_items)} textseg entries"
    mapping, new = {}, {}
    for (sn, sv), (dn, dv) in zip(state.items(), d_items):
        assert sn.rsplit(".", 1)[-1] == dn.rsplit(".", 1)[-1] and sv.shape == dv.shape, (sn, dn, sv.shape, dv.shape)
        mapping[sn], new[dn] = dn, sv.clone()
    dst.load_state_dict(new)
    return mapping


def compare(official: Snapshot, ours: Snapshot, mapping: dict[str, dict[str, str]], term_map: dict[str, str],
            rtol: float, atol: float) -> list[str]:
    """Every mismatch (beyond rtol/atol) between the two snapshots, as readable lines: weights and buffers of
    each network, momentum buffers, lr, loss terms (term_map: {official name: textseg name})."""
    bad: list[str] = []

    def check(what: str, a: torch.Tensor, b: torch.Tensor) -> None:
        a, b = a.detach(), b.detach()
        if a.shape != b.shape:
            bad.append(f"{what}: shape {tuple(a.shape)} vs {tuple(b.shape)}")
            return
        if not a.is_floating_point():
            if not torch.equal(a, b):
                bad.append(f"{what}: {a.tolist()} vs {b.tolist()}")
            return
        diff = (a - b).abs()
        if not torch.isfinite(diff).all() or (diff > atol + rtol * b.abs()).any():  # a NaN never compares equal
            rel = float((diff / b.abs().clamp_min(1e-300)).max())
            bad.append(f"{what}: max |Δ| {float(diff.max()):.3e}, max rel {rel:.3e}")

    it = ours.iteration
    for on, tn in term_map.items():
        a, b = ours.terms.get(tn), official.terms.get(on)
        if a is None or b is None:
            bad.append(f"it {it} term {tn}/{on} missing ({a}, {b})")
        elif not abs(a - b) <= atol + rtol * abs(b):  # NaN on either side is a mismatch
            bad.append(f"it {it} term {tn}: {a!r} vs official {on} {b!r}")
    for net, names in mapping.items():
        lr_bad = [(tn, ours.lr.get(net, {}).get(tn), official.lr.get(net, {}).get(on)) for on, tn in names.items()
                  if on in official.lr.get(net, {}) or tn in ours.lr.get(net, {})]
        lr_bad = [x for x in lr_bad if x[1] is None or x[2] is None or abs(x[1] - x[2]) > rtol * abs(x[2])]
        if lr_bad:
            bad.append(f"it {it} lr of {len(lr_bad)} {net} parameters, e.g. {lr_bad[0][0]}: {lr_bad[0][1]} vs "
                       f"official {lr_bad[0][2]}")
        for on, tn in names.items():
            check(f"it {it} {net}.{tn}", ours.nets[net][tn], official.nets[net][on])
            if on in official.momentum.get(net, {}) or tn in ours.momentum.get(net, {}):
                if on not in official.momentum.get(net, {}) or tn not in ours.momentum.get(net, {}):
                    bad.append(f"it {it} momentum {net}.{tn}: present on one side only")
                else:
                    check(f"it {it} momentum {net}.{tn}", ours.momentum[net][tn], official.momentum[net][on])
            a_ours, a_off = ours.adam.get(net, {}).get(tn, {}), official.adam.get(net, {}).get(on, {})
            for key in ADAM_STATE:  # Adam/AdamW state (absent under SGD on both sides)
                if (key in a_ours) != (key in a_off):
                    bad.append(f"it {it} {key} {net}.{tn}: present on one side only")
                elif key in a_ours:
                    check(f"it {it} {key} {net}.{tn}", a_ours[key], a_off[key])
    return bad


# --- one stream of draws -----------------------------------------------------------------------------------


class _Draws:
    """The two generators of `shared_draws`: `state()` before one side's step, `restore(state)` before the
    other's, so both steps start from the same draws."""

    def __init__(self, *gens: torch.Generator):
        self.gens = gens

    def state(self) -> list[torch.Tensor]:
        return [g.get_state() for g in self.gens]

    def restore(self, state: list[torch.Tensor]) -> None:
        for g, st in zip(self.gens, state):
            g.set_state(st)


@contextlib.contextmanager
def shared_draws(seed: int, randint: bool = False) -> Iterator[_Draws]:
    """While active: `torch.randn_like` draws from a private generator, F.dropout/dropout2d/dropout3d draw their
    masks from another (same semantics as torch's: keep with 1 − p, scale by 1/(1 − p); whole channels for the
    2d/3d kinds), and `Tensor.float()` leaves float64 tensors as they are (textseg upcasts low-precision logits
    with .float(); in this float64 run that would be a downcast to float32 on textseg's side only).

    randint: `torch.randint` without a generator and `np.random.randint` both draw from a third private
    generator, as torch.randint(low, high) (e.g. a cuboid's corner: BCP's code draws it with numpy, textseg
    with torch), so the same bounds give both sides the same integers and different bounds (a changed cuboid
    size) different ones."""
    g_noise = torch.Generator().manual_seed(seed)
    g_drop = torch.Generator().manual_seed(seed + 1)
    g_int = torch.Generator().manual_seed(seed + 2)
    saved = {"randn_like": torch.randn_like, "randint": torch.randint}
    np_randint = np.random.randint
    orig_randint = torch.randint
    saved_f = {k: getattr(F, k) for k in ("dropout", "dropout2d", "dropout3d")}
    had_float = "float" in torch.Tensor.__dict__
    orig_float = torch.Tensor.float

    def randn_like(x, *, dtype=None, layout=None, device=None, requires_grad=False, memory_format=None):
        return torch.randn(x.shape, generator=g_noise, dtype=dtype or x.dtype)

    def make_dropout(channelwise: bool):
        def dropout(input, p=0.5, training=True, inplace=False):
            if not training or p == 0:
                return input
            shape = tuple(input.shape[:2]) + (1,) * (input.dim() - 2) if channelwise else tuple(input.shape)
            keep = torch.empty(shape, dtype=input.dtype).bernoulli_(1 - p, generator=g_drop)
            return input * keep / (1 - p)
        return dropout

    def as_float(self, *a, **k):
        return self if self.dtype == torch.float64 else orig_float(self, *a, **k)

    def torch_randint(*a, generator=None, **k):
        return orig_randint(*a, generator=g_int if generator is None else generator, **k)

    def numpy_randint(low, high=None, size=None, dtype=int):
        low, high = (0, low) if high is None else (low, high)
        if size is None:
            return int(orig_randint(int(low), int(high), (1,), generator=g_int))
        shape = (size,) if isinstance(size, int) else tuple(size)
        return orig_randint(int(low), int(high), shape, generator=g_int).numpy().astype(dtype)

    torch.randn_like = randn_like
    if randint:
        torch.randint, np.random.randint = torch_randint, numpy_randint
    F.dropout, F.dropout2d, F.dropout3d = make_dropout(False), make_dropout(True), make_dropout(True)
    torch.Tensor.float = as_float
    try:
        yield _Draws(g_noise, g_drop, g_int)
    finally:
        torch.randn_like, torch.randint, np.random.randint = saved["randn_like"], saved["randint"], np_randint
        for k, v in saved_f.items():
            setattr(F, k, v)
        if had_float:
            torch.Tensor.float = orig_float
        else:
            del torch.Tensor.float


# --- batches -----------------------------------------------------------------------------------------------


def make_batches(n: int, patch: tuple[int, ...], bl: int = 2, bu: int = 2, seed: int = 0) -> list[Batch]:
    """`n` two-stream batches (float64 images, long labels): a random box per labeled case, images = label +
    Gaussian noise (so the segmentation loss falls), unlabeled images built the same way."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        labels = torch.zeros(bl + bu, *patch, dtype=torch.long)
        for b in range(bl + bu):
            lo = [int(torch.randint(0, s // 2, (1,), generator=g)) for s in patch]
            labels[(b, *[slice(a, a + s // 2) for a, s in zip(lo, patch)])] = 1
        images = labels[:, None].double() + 0.5 * torch.randn(bl + bu, 1, *patch, generator=g, dtype=torch.float64)
        out.append(Batch(images[:bl], labels[:bl], images[bl:]))
    return out


def as_official(batch: Batch) -> dict[str, torch.Tensor]:
    """The script's `sampled_batch`: labeled then unlabeled images; unlabeled labels are zeros (never read by
    the loss; only drawn to tensorboard images, which are stubbed)."""
    bu = batch.image_u.shape[0]
    zeros = torch.zeros(bu, *batch.label_l.shape[1:], dtype=torch.long)
    return {"image": torch.cat([batch.image_l, batch.image_u]), "label": torch.cat([batch.label_l, zeros])}


# --- the official script -----------------------------------------------------------------------------------


class _Null:
    """Accepts any call or attribute (loggers, writers, data-set classes the test replaces)."""

    def __init__(self, *a, **k):
        pass

    def __call__(self, *a, **k):
        return _Null()

    def __getattr__(self, name):
        return _Null()


class _Tqdm:
    def __init__(self, iterable, *a, **k):
        self.iterable = iterable

    def __iter__(self):
        return iter(self.iterable)

    def __getattr__(self, name):
        return _Null()


def _module(name: str, **attrs) -> types.ModuleType:
    m = types.ModuleType(name)
    m.__dict__.update(attrs)
    return m


class _Loader:
    """The script's DataLoader: the test's batches from `cursor[0]` on, one epoch. Before handing out batch k
    (counted over all loaders, so a script with two training phases, each building its own DataLoader, sees
    one sequence), and when asked for a batch after the last one, it calls `on_step(namespace, k)`: the state
    after k steps (the script updates everything before fetching the next batch). namespace: the globals of
    the frame iterating the loader, overlaid with its locals (a phase function's model and optimizer).

    epoch_length: an epoch-based script's loader (LViT's), iterated once per epoch: each pass hands out at most
    this many batches (its `len()`), and the next pass continues the sequence; a pass ends without reporting,
    so the state after an epoch is reported when the next pass fetches its first batch (after what the script
    does between epochs, e.g. a validation pass that steps the lr scheduler)."""

    def __init__(self, batches: list[Any], on_step: Callable[[dict[str, Any], int], None],
                 cursor: list[int], epoch_length: int | None = None):
        self.batches, self.on_step, self.cursor = batches, on_step, cursor
        self.epoch_length = epoch_length

    def __len__(self) -> int:
        return len(self.batches) - self.cursor[0] if self.epoch_length is None else self.epoch_length

    def __iter__(self):
        handed = 0
        while True:
            if self.epoch_length is not None and handed == self.epoch_length:
                return
            handed += 1
            caller = sys._getframe(1)
            self.on_step({**caller.f_globals, **caller.f_locals}, self.cursor[0])
            if self.cursor[0] >= len(self.batches):  # asked for one more: the state after the last step is out
                return
            self.cursor[0] += 1
            yield self.batches[self.cursor[0] - 1]


def _evict() -> None:
    for name in list(sys.modules):
        if name.split(".")[0] in _REPO_MODULE_ROOTS:
            del sys.modules[name]


@contextlib.contextmanager
def _script_env(code_dir: Path, cwd: Path, argv: list[str], wraps: dict[str, dict[str, Callable]]):
    """code_dir first on sys.path (other checkouts' same-named modules evicted before and after), cwd, argv,
    os.environ and cudnn flags restored afterwards; `wraps`: {module: {attr: f(original) → replacement}}."""
    old_cwd, old_argv, old_env = os.getcwd(), sys.argv, dict(os.environ)
    old_cudnn = (torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic)
    _evict()
    sys.path.insert(0, str(code_dir))
    try:
        for mod, attrs in wraps.items():
            m = __import__(mod, fromlist=["_"])
            for attr, wrap in attrs.items():
                setattr(m, attr, wrap(getattr(m, attr)))
        os.chdir(cwd)
        sys.argv = argv
        yield
    finally:
        os.chdir(old_cwd)
        sys.argv = old_argv
        os.environ.clear()
        os.environ.update(old_env)
        torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic = old_cudnn
        sys.path.remove(str(code_dir))
        _evict()


def _edited_module(code_dir: Path, name: str, edits: list[tuple[str, str]]) -> types.ModuleType:
    """Official module `name` of `code_dir`, executed from its source with `edits`, registered in sys.modules
    (evicted with the others when the run ends) and on its parent package."""
    path = code_dir / (name.replace(".", "/") + ".py")
    src = path.read_text(encoding="utf-8")
    for old, new in edits:
        assert old in src, f"{path.name}: {old!r} not found (the official code changed?)"
        src = src.replace(old, new)
    parent, _, leaf = name.rpartition(".")
    m = types.ModuleType(name)
    m.__file__ = str(path)
    if parent:
        m.__package__ = parent
    exec(compile(src, str(path), "exec"), m.__dict__)
    sys.modules[name] = m
    if parent:
        setattr(__import__(parent, fromlist=["_"]), leaf, m)
    return m


def run_official(script: Path, argv: list[str], *, batches: list[Batch], cwd: Path,
                 on_step: Callable[[dict[str, Any], int], None], edits: list[tuple[str, str]] = (),
                 wraps: dict[str, dict[str, Callable]] | None = None,
                 import_wraps: dict[str, dict[str, Callable]] | None = None,
                 stubs: dict[str, Any] | None = None,
                 module_edits: dict[str, list[tuple[str, str]]] | None = None,
                 as_batch: Callable[[Batch], Any] = as_official,
                 data_loader: Callable[..., Any] | None = None) -> dict[str, Any]:
    """Execute the official training `script` (its code folder on sys.path) on `batches`, calling
    `on_step(namespace, k)` whenever k steps are done (k = 0 before the first batch, from the loader; k =
    len(batches) from the loader as well when the script asks for one more batch, else with the globals after
    the script ends); returns the script's globals.

    edits: (old, new) source replacements, each required to occur; wraps: {module: {attr: f(original)}},
    module attributes replaced during the run (seen by the official modules' own code); import_wraps: the same
    seen only by the script's `from module import attr` (for a class whose methods name themselves, e.g.
    `super(VNet, self)`, which a replaced module attribute would break); stubs: {module name: object the
    script's import of that name receives}, on top of the common stand-ins (DataLoader, logging, tensorboardX,
    tqdm, shutil, torchvision); module_edits: {official module: [(old, new)]}, that module of the code folder
    loaded from its source with these replacements (each required to occur), for hard-coded patch sizes
    outside the script; as_batch: a test batch → the script's `sampled_batch` (default `as_official`);
    data_loader: the script's DataLoader(*a, **k), called as data_loader(training, *a, **k) where
    training(epoch_length=None) builds the loader of the test's batches (`_Loader`); it may return another
    loader instead (a validation loader). Default: every DataLoader is training(None)."""
    src = script.read_text(encoding="utf-8")
    for old, new in edits:
        assert old in src, f"{script.name}: {old!r} not found (the official script changed?)"
        src = src.replace(old, new)
    g: dict[str, Any] = {"__name__": "__main__", "__file__": str(script)}
    official_batches, cursor = [as_batch(b) for b in batches], [0]
    common = {
        "torch.utils.data": _module("torch.utils.data",
                                    DataLoader=lambda *a, **k: (
                                        data_loader(lambda epoch_length=None: _Loader(
                                            official_batches, on_step, cursor, epoch_length), *a, **k)
                                        if data_loader is not None else _Loader(official_batches, on_step, cursor))),
        "logging": _module("logging", basicConfig=_Null(), getLogger=_Null(), StreamHandler=_Null(),
                           info=_Null(), INFO=20),
        "tensorboardX": _module("tensorboardX", SummaryWriter=_Null),
        "tqdm": _module("tqdm", tqdm=_Tqdm),
        "shutil": _module("shutil", copytree=_Null(), rmtree=_Null(), ignore_patterns=_Null(),
                             copy=_Null()),
        "torchvision": _module("torchvision", transforms=_Null()),
        "torchvision.utils": _module("torchvision.utils", make_grid=_Null()),
    }
    table = {**common, **(stubs or {})}
    real_import = builtins.__import__

    def hooked(name, globals=None, locals=None, fromlist=(), level=0):
        if level == 0 and name in table and (fromlist or "." not in name):
            return table[name]
        if level == 0 and fromlist and name in (import_wraps or {}):
            real = real_import(name, globals, locals, fromlist, level)
            proxy = _module(name, **vars(real))
            for attr, wrap in import_wraps[name].items():
                setattr(proxy, attr, wrap(getattr(real, attr)))
            return proxy
        return real_import(name, globals, locals, fromlist, level)

    g["__builtins__"] = {**vars(builtins), "__import__": hooked}
    with _script_env(script.parent, cwd, [script.name, *argv], wraps or {}):
        for mod, mod_edits in (module_edits or {}).items():
            table[mod] = _edited_module(script.parent, mod, mod_edits)
        exec(compile(src, str(script), "exec"), g)
    on_step(g, len(batches))
    return g


# --- textseg's loop ----------------------------------------------------------------------------------------


class ReplaySampler:
    """Stands in for the Trainer's TwoStreamSampler: the test's batches, in order, with the method's
    `label_targets` of each labeled patch in `Batch.extra` as that sampler makes them (e.g. DTC's SDF maps)."""

    def __init__(self, batches: list[Batch], label_targets: Callable[[Any], dict[str, Any] | None] | None = None):
        self.batches, self.i, self.label_targets = batches, 0, label_targets

    def next_batch(self) -> Batch:
        b = self.batches[self.i]
        self.i += 1
        extra: dict[str, list[np.ndarray]] = {}
        for lab in b.label_l.numpy() if self.label_targets is not None else ():
            for k, v in (self.label_targets(lab) or {}).items():
                extra.setdefault(k, []).append(v)
        if extra:
            b = dataclasses.replace(b, extra={k: torch.from_numpy(np.stack(v)) for k, v in extra.items()})
        return b

    def state_dict(self) -> dict[str, int]:
        return {"i": self.i}

    def close(self) -> None:
        pass


# engine settings of this test (not hyper-parameters): float64 on CPU needs precision fp32 (no bf16 autocast),
# no channels-last, no prefetch thread, no validation, no tensorboard; 2 of the 4 training cases labeled
RUN_SETS = ["train.precision=fp32", "train.channels_last=false", "train.prefetch=0", "train.tensorboard=false",
            "val.every=0", "val.at_start=false", "data.labeled=2"]


def tiny_dataset(root: Path, patch: tuple[int, int, int]) -> Path:
    """A prepared synthetic set the Trainer can open (4 training cases of `patch`); its images are never
    read by the loop (the sampler is replaced), only checked to exist."""
    prep_synthetic(root, n_cases=6, size=patch, n_classes=1, seed=0, n_val=1, n_test=1, patch_size=patch)
    return root


def shipped_config(method: str, sets: list[str] = (), dataset: tuple[str, int] = ("la", 3)) -> dict[str, Any]:
    """The config `textseg train --method M` resolves on LA (the published setting; `dataset`: another data
    set's (name, dim), e.g. ("monuseg", 2)), with `sets` on top."""
    return build_config(method, dataset[0], dataset[1], None, sets=list(sets))


class _Stop(Exception):
    """Ends the official script early (the textseg side failed)."""


def _sync(off_nets: dict[str, nn.Module], off_opt: torch.optim.Optimizer | list[torch.optim.Optimizer],
          our_nets: dict[str, nn.Module],
          our_opt: torch.optim.Optimizer, mapping: dict[str, dict[str, str]]) -> None:
    """textseg's networks (weights and buffers) and momentum buffers ← the official's (a parameter without an
    official momentum buffer, e.g. under a phase's fresh optimiser, loses textseg's)."""
    with torch.no_grad():
        for key, names in mapping.items():
            osd, tsd = off_nets[key].state_dict(), our_nets[key].state_dict()
            oparams, tparams = dict(off_nets[key].named_parameters()), dict(our_nets[key].named_parameters())
            for on, tn in names.items():
                tsd[tn].copy_(osd[on])
                if on not in oparams:
                    continue
                buf = _opt_state(off_opt, oparams[on]).get("momentum_buffer")
                if buf is not None:
                    our_opt.state[tparams[tn]]["momentum_buffer"] = buf.detach().clone()
                elif tparams[tn] in our_opt.state:
                    our_opt.state[tparams[tn]].pop("momentum_buffer", None)
                for key in ADAM_STATE:  # Adam/AdamW state, where the official optimiser has it
                    value = _opt_state(off_opt, oparams[on]).get(key)
                    if value is not None:
                        our_opt.state[tparams[tn]][key] = (value.detach().clone() if isinstance(value, torch.Tensor)
                                                           else value)


def names_by_order(state: dict[str, torch.Tensor], dst: nn.Module) -> dict[str, str]:
    """{official name: textseg name} of two state dicts paired in registration order (checked as
    `load_by_order`), without loading."""
    d_items = list(dst.state_dict().items())
    assert len(state) == len(d_items), f"{len(state)} official vs {len(d_items)} textseg entries"
    for (sn, sv), (dn, dv) in zip(state.items(), d_items):
        assert sn.rsplit(".", 1)[-1] == dn.rsplit(".", 1)[-1] and sv.shape == dv.shape, (sn, dn, sv.shape, dv.shape)
    return {sn: dn for sn, dn in zip(state, (dn for dn, _ in d_items))}


def lockstep(*, script: Path, argv: list[str], cwd: Path, official_parts: Callable, method: str, data_dir: Path,
             run_dir: Path, sets: list[str], textseg_nets: Callable[[Method], dict[str, nn.Module]],
             batches: list[Batch], term_map: dict[str, str] | Callable[[int], dict[str, str]], seed: int,
             rtol: float, atol: float, phase_starts: tuple[int, ...] = (), randint: bool = False,
             skip: tuple[str, ...] = (),
             reorder: Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]] | None = None,
             dataset: tuple[str, int] = ("la", 3),
             **official_kw) -> tuple[list[str], Trainer]:
    """Run the official script (in a worker thread, paused whenever a step is done) and textseg's Trainer
    (`Trainer.run`, this thread) step by step on `batches`: textseg's step k, then the official's step k from
    the same draws (`shared_draws`, rewound), then every weight, buffer, momentum buffer, lr and loss term is
    compared, and textseg's networks and momentum are set to the official's before the next step.

    Why re-synchronised: both sides compute the same sums in different orders (~1e-16 apart after one step),
    and these small training runs amplify such differences ~10× every few iterations (two free-running float64
    runs part at 1e-9 by iteration ~10 and completely by ~50, for two runs of the same code as well), so a
    trajectory can only be compared tightly one step at a time. Nothing else is synchronised: the iteration
    counters, lr schedules, ramps, EMA decays and the Trainer's own loop run independently on each side.

    official_parts(namespace) → (networks {key: module}, optimizer, loss terms {name: value}); textseg_nets(method)
    → networks under the same keys. The official networks present at the start (incl. a separately initialised
    EMA teacher) are loaded first; a network that appears later (a phase's teacher) is paired by order when it
    appears, compared from the next step on, and never loaded: textseg initialises it itself. term_map: {official
    name: textseg name}, or a function of the iteration giving it (phases log different terms).

    phase_starts: iterations k at which the official script starts a new phase (its own networks, loaded from a
    checkpoint, and a fresh optimiser) and reports the state after k steps from that phase's beginning: there the
    networks present before are compared (weights, buffers) and the lr, not the loss terms (none yet) or the
    momentum (the official's fresh optimiser has none), and textseg's momentum is synchronised to none as well.
    randint: as `shared_draws`; skip: name prefixes of official state-dict entries with no textseg counterpart
    (heads the script never calls; their parameters get no gradient); reorder: official state dict → the same
    entries in textseg's registration order, where the two register heads in different orders; dataset: the
    (name, dim) textseg's config is resolved for (`shipped_config`; default LA, 3D).
    Returns (mismatch lines, the trainer)."""
    to_main: queue.Queue = queue.Queue()
    to_official: queue.Queue = queue.Queue()

    def on_step(g: dict[str, Any], k: int) -> None:
        to_main.put(("step", k, g))
        if to_official.get() == "stop":
            raise _Stop

    def worker() -> None:
        try:
            run_official(script, argv, batches=batches, cwd=cwd, on_step=on_step, **official_kw)
        except _Stop:
            pass
        except BaseException as exc:  # noqa: BLE001 - handed to the main thread
            to_main.put(("error", exc, None))

    def wait() -> tuple[int, dict[str, Any]]:
        kind, k, g = to_main.get(timeout=600)
        if kind == "error":
            raise k
        return k, g

    terms_at = term_map if callable(term_map) else (lambda _k: term_map)

    def kept(net: nn.Module) -> dict[str, torch.Tensor]:
        state = {n: t for n, t in net.state_dict().items() if not n.startswith(skip)}
        return reorder(state) if reorder is not None else state

    bad: list[str] = []
    thread = threading.Thread(target=worker, daemon=True)
    with shared_draws(seed, randint=randint) as draws:
        thread.start()
        try:
            k, g = wait()
            assert k == 0
            ds = load_prepared(data_dir)
            cfg = shipped_config(method, [*RUN_SETS, f"train.iterations={len(batches)}", *sets], dataset)
            dev = torch.device("cpu")
            trainer = Trainer(cfg, ds, run_dir, dev, Dist(), quiet=True, precision=training_precision(cfg, dev),
                              val_precision=inference_precision(cfg, dev))
            trainer.sampler = ReplaySampler(batches, trainer.method.label_targets)
            off_nets, _, _ = official_parts(g)
            ours = textseg_nets(trainer.method)
            mapping = {key: load_by_order(kept(off_nets[key]), ours[key]) for key in off_nets}
            step = trainer._step

            def lockstep_step() -> dict[str, float]:
                state = draws.state()
                terms = step()
                it = trainer.iteration + 1  # the loop increments after _step returns
                mine = take(it, textseg_nets(trainer.method), trainer.optimizer, terms)
                draws.restore(state)
                to_official.put("go")
                k, g = wait()
                assert k == it, (k, it)
                nets, opt, off_terms = official_parts(g)
                known = {key: names for key, names in mapping.items() if key in nets}
                theirs = take(k, nets, opt, off_terms)
                if k in phase_starts:
                    assert not theirs.momentum or not any(theirs.momentum.values()), "a phase's fresh optimiser"
                    for snap in (theirs, mine):
                        snap.momentum = {}
                    bad.extend(compare(theirs, mine, known, {}, rtol, atol))
                else:
                    bad.extend(compare(theirs, mine, known, terms_at(k), rtol, atol))
                _sync(nets, opt, textseg_nets(trainer.method), trainer.optimizer, known)
                for key in nets.keys() - mapping.keys():
                    mapping[key] = names_by_order(kept(nets[key]), textseg_nets(trainer.method)[key])
                return terms

            trainer._step = lockstep_step
            trainer.run()
            to_official.put("stop")  # the final report (after the script's end, or its request of one more batch)
        finally:
            if thread.is_alive():
                to_official.put("stop")
            thread.join(timeout=60)
    return bad, trainer
