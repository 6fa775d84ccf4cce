"""`textseg bench --roofline`: how close a training step and a sliding-window pass come to this machine's peak.

Three steps, all in one process so every figure is a ratio measured side by side:

1. **Peak.** The FLOP/s this machine reaches, as torch runs it (oneDNN on a CPU, cuBLAS/cuDNN on CUDA), per
   dtype: a large square GEMM (`torch.matmul`, n × n × n) and, forward only, the two 3D convolutions of the
   method's own network that bound it — the *widest* (most input × output channels: the V-Net bottleneck,
   256 → 256 at 1/16 of the patch) and the *heaviest* (most FLOPs per call: 16 → 16 at the full patch; its
   arithmetic intensity is 16× lower). fp32 tensors are contiguous; bf16 tensors are bf16 and channels-last,
   the layout textseg's bf16 rule uses. The peak of a dtype is the best of the three; each is measured before
   and after the timed steps and keeps its faster median (on a shared machine: the best this run saw).
2. **FLOPs.** `torch.utils.flop_counter.FlopCounterMode` counts one training step — the forward pass of the
   method's networks, the loss (the FLOPs of `training_step` outside any network), the backward pass and the
   optimiser step — and one sliding-window pass over a volume. It counts matrix products and convolutions
   only: elementwise work (BatchNorm, ReLU, softmax, the SGD update) counts 0, so the loss and optimiser
   phases report no FLOP/s, only their share of the step's time.
3. **Time per phase.** A real training step of the method as `engine.loop.Trainer._step` runs it (the
   method's config, its optimiser, its augmentation, bf16 autocast and channels-last under bf16): data
   (`TwoStreamSampler` crops of random volumes → device), forward (time inside the method's top-level modules,
   found by hooks), loss (the rest of `training_step`), backward, optimiser (`zero_grad`, `step`,
   `on_after_optimizer_step`). Medians over `steps` steps after one warm-up step; the sliding-window pass is
   `inference.predict.predict_case` (BatchNorm folded, channels-last, 4 windows per pass), median of
   `repeats`.

Achieved FLOP/s of a phase = its counted FLOPs / its median seconds; the fraction is that over the dtype's
peak. `compile_net=True` also times a second copy of the method (same seed) whose trainable top-level modules are
wrapped in `torch.compile`, its steps alternating with the eager copy's (the optimisation experiment of
docs/performance.md#roofline; compilation happens in the warm-up step, reported as `first_step_s`).
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
import torch.nn as nn
from rich.table import Table
from torch.utils.flop_counter import FlopCounterMode

from textseg_cli.bench.benchmark import (
    _case_text,
    _random_batch,
    _sync,
    _timed,
    default_stride,
    method_config,
)
from textseg_cli.console import console
from textseg_cli.data.sampling import Augment, TwoStreamSampler
from textseg_cli.engine.optim import build_optimizer
from textseg_cli.errors import ConfigError
from textseg_cli.inference.predict import predict_case
from textseg_cli.inference.settings import InferenceSettings
from textseg_cli.methods.base import StepContext
from textseg_cli.methods.registry import build_method, list_methods
from textseg_cli.runtime.device import resolve_device
from textseg_cli.runtime.environment import cpu_model
from textseg_cli.runtime.precision import (
    Precision,
    channels_last,
    cpu_has_bf16,
    resolve_precision,
    to_channels_last,
)
from textseg_cli.storage.files import atomic_write_json
from textseg_cli.storage.outputs import guard_output_file

PHASES = ("data", "forward", "loss", "backward", "optimizer")
_CONV_TYPES = (nn.Conv2d, nn.Conv3d)
_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def default_volume(patch: Sequence[int]) -> tuple[int, ...]:
    """The volume the sliding window is timed on: LA's 140×140×88 for its patch, else 1.25× the patch."""
    patch = tuple(int(p) for p in patch)
    return (140, 140, 88) if patch == (112, 112, 80) else tuple(p + p // 4 for p in patch)


def roofline_precisions(requested: str, dev: torch.device) -> list[Precision]:
    """`auto`: fp32, plus bf16 where the device has bf16 units (CPU: AVX512-BF16/AMX, `cpu_has_bf16`; CUDA:
    `resolve_precision`'s check); else the comma-separated list given (fp32, bf16)."""
    if requested == "auto":
        out = [resolve_precision("fp32", dev)]
        auto = resolve_precision("auto", dev)
        if auto.bf16 and (dev.type != "cpu" or cpu_has_bf16()):
            out.append(auto)
        return out
    names = [p.strip().lower() for p in requested.split(",") if p.strip()]
    if not names or any(n not in _DTYPES for n in names):
        raise ConfigError(f"--precision {requested!r}: with --roofline expected auto, fp32, bf16 or fp32,bf16")
    return [resolve_precision(n, dev) for n in dict.fromkeys(names)]


def _median_seconds(fn: Callable[[], Any], dev: torch.device, repeats: int) -> float:
    fn()  # warm-up: oneDNN primitive creation, allocator growth
    return statistics.median(_timed(fn, dev) for _ in range(repeats))


def _counted_flops(fn: Callable[[], Any]) -> int:
    with FlopCounterMode(display=False) as counter:
        fn()
    return int(counter.get_total_flops())


# --- peak ------------------------------------------------------------------------------------------------

def measure_gemm(n: int, dtype: str, dev: torch.device, repeats: int) -> dict[str, Any]:
    """FLOP/s of `torch.matmul` of two n × n matrices of `dtype` (2n³ FLOPs)."""
    gen = torch.Generator().manual_seed(0)
    a = torch.rand((n, n), generator=gen).to(dev, _DTYPES[dtype])
    b = torch.rand((n, n), generator=gen).to(dev, _DTYPES[dtype])
    sec = _median_seconds(lambda: torch.matmul(a, b), dev, repeats)
    flops = 2 * n ** 3
    return {"kernel": "gemm", "shape": [n, n, n], "dtype": dtype, "flops": flops, "s": sec, "flops_per_s": flops / sec}


def network_convs(method, batch, dev: torch.device) -> list[dict[str, Any]]:
    """Every distinct convolution one `training_step` of `method` runs on `batch` (fp32, no grad): its
    configuration, input shape and FLOPs per call, found by forward hooks."""
    seen: dict[tuple, dict[str, Any]] = {}

    def hook(mod, args, _out):
        x = args[0]
        key = (type(mod).__name__, mod.in_channels, mod.out_channels, mod.kernel_size, mod.stride, mod.padding,
               mod.groups, tuple(x.shape))
        if key not in seen:
            out_vox = int(np.prod(_out.shape[2:]))
            flops = 2 * x.shape[0] * mod.in_channels // mod.groups * mod.out_channels * int(np.prod(mod.kernel_size))
            seen[key] = {"type": type(mod).__name__, "in_channels": mod.in_channels,
                         "out_channels": mod.out_channels, "kernel": list(mod.kernel_size),
                         "stride": list(mod.stride), "padding": list(mod.padding), "groups": mod.groups,
                         "input": list(x.shape), "flops": flops * out_vox}

    handles = [m.register_forward_hook(hook) for m in method.modules() if isinstance(m, _CONV_TYPES)]
    try:
        with torch.no_grad():
            method.train()
            method.training_step(batch, StepContext(iteration=0, max_iterations=1, device=dev))
    finally:
        for h in handles:
            h.remove()
    return list(seen.values())


def bounding_convs(convs: Sequence[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """The widest (most in × out channels, then the largest input) and the heaviest (most FLOPs) convolution."""
    if not convs:
        return {}
    widest = max(convs, key=lambda c: (c["in_channels"] * c["out_channels"], int(np.prod(c["input"]))))
    heaviest = max(convs, key=lambda c: c["flops"])
    return {"conv_widest": widest, "conv_heaviest": heaviest}


def measure_conv(conv: dict[str, Any], dtype: str, dev: torch.device, repeats: int) -> dict[str, Any]:
    """Forward FLOP/s of one convolution of `network_convs` alone, random weights and input of `dtype`
    (bf16: channels-last, as textseg's bf16 rule runs it)."""
    ndim = len(conv["input"]) - 2
    cls = nn.Conv3d if ndim == 3 else nn.Conv2d
    mod = cls(conv["in_channels"], conv["out_channels"], conv["kernel"], stride=conv["stride"],
              padding=conv["padding"], groups=conv["groups"]).to(dev, _DTYPES[dtype]).eval()
    x = torch.rand(conv["input"], generator=torch.Generator().manual_seed(0)).to(dev, _DTYPES[dtype])
    if dtype == "bf16" or dev.type == "cuda":
        mod, x = to_channels_last(mod), channels_last(x)
    with torch.no_grad():
        flops = _counted_flops(lambda: mod(x))
        sec = _median_seconds(lambda: mod(x), dev, repeats)
    return {"kernel": f"conv {conv['in_channels']}->{conv['out_channels']} k{conv['kernel'][0]}",
            "shape": conv["input"], "dtype": dtype, "flops": flops, "s": sec, "flops_per_s": flops / sec}


def measure_peaks(dtypes: Sequence[str], convs: dict[str, dict[str, Any]], dev: torch.device, gemm_size: int,
                  repeats: int, log: Callable[[str], None],
                  previous: dict[str, dict[str, Any]] | None = None) -> dict[str, dict[str, Any]]:
    """Per dtype: the GEMM and the bounding convolutions measured, and `peak_flops_per_s` the best of them.
    With `previous` (an earlier call's result in the same run), each kernel keeps the faster of the two
    measurements: on a shared machine the peak is the best this run saw, before or after the timed steps."""
    out: dict[str, dict[str, Any]] = {}
    for dtype in dtypes:
        log(f"[peak {dtype}] GEMM {gemm_size}^3 and {len(convs)} convolution(s), median of {repeats}")
        kernels = {"gemm": measure_gemm(gemm_size, dtype, dev, repeats)}
        for name, conv in convs.items():
            kernels[name] = measure_conv(conv, dtype, dev, repeats)
        for name, k in kernels.items():
            before = ((previous or {}).get(dtype) or {}).get("kernels", {}).get(name)
            k["measurements_flops_per_s"] = ([before["flops_per_s"]] if before else []) + [k["flops_per_s"]]
            if before is not None and before["flops_per_s"] > k["flops_per_s"]:
                k["s"], k["flops_per_s"] = before["s"], before["flops_per_s"]
        best = max(kernels, key=lambda k: kernels[k]["flops_per_s"])
        peak = kernels[best]["flops_per_s"]
        for k in kernels.values():
            k["fraction_of_peak"] = k["flops_per_s"] / peak
        out[dtype] = {"peak_flops_per_s": peak, "peak_kernel": best, "kernels": kernels}
    return out


# --- one training step, phase by phase -------------------------------------------------------------------

class _ModuleClock:
    """Seconds spent inside the top-level modules of a method (its networks, encoders, EMA teachers), the
    outermost call only, by forward pre/post hooks; everything else in `training_step` is the loss."""

    def __init__(self, method: nn.Module, dev: torch.device):
        self.dev, self.depth, self.t0, self.seconds = dev, 0, 0.0, 0.0
        self.handles = []
        for child in method.children():
            self.handles.append(child.register_forward_pre_hook(self._enter))
            self.handles.append(child.register_forward_hook(self._leave))

    def _enter(self, *_):
        if self.depth == 0:
            _sync(self.dev)
            self.t0 = time.perf_counter()
        self.depth += 1

    def _leave(self, *_):
        self.depth -= 1
        if self.depth == 0:
            _sync(self.dev)
            self.seconds += time.perf_counter() - self.t0

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def _top_level_flops(counter: FlopCounterMode) -> int:
    """FLOPs counted inside modules called from outside any module (the method's networks in `training_step`)."""
    return sum(sum(ops.values()) for name, ops in counter.get_flop_counts().items()
               if name != "Global" and "." not in name)


def _sampler(cfg: dict[str, Any], method, volume: tuple[int, ...], patch: tuple[int, ...], in_channels: int,
             num_classes: int, n_l: int, n_u: int) -> TwoStreamSampler:
    """The training sampler over random volumes: the method's augmentation, crops of `patch`."""
    rng = np.random.default_rng(0)
    size = tuple(max(v, p) for v, p in zip(volume, patch))
    images_l = [rng.random((in_channels,) + size, dtype=np.float32) for _ in range(max(1, n_l))]
    labels_l = [rng.integers(0, num_classes, size, dtype=np.uint8) for _ in range(max(1, n_l))]
    images_u = [rng.random((in_channels,) + size, dtype=np.float32) for _ in range(n_u)]
    aug = Augment(**{k: bool(v) for k, v in ((cfg.get("data") or {}).get("augment") or {}).items()})
    return TwoStreamSampler(images_l, labels_l, images_u, patch, n_l, n_u, seed=0, augment=aug,
                            texts_l=[_case_text(i) for i in range(len(images_l))],
                            texts_u=[_case_text(len(images_l) + i) for i in range(len(images_u))],
                            label_targets=method.label_targets)


def _compile_children(method: nn.Module) -> None:
    """Wrap each top-level module that has trainable parameters in `torch.compile` (in place)."""
    for name, child in list(method.named_children()):
        if any(p.requires_grad for p in child.parameters()):
            setattr(method, name, torch.compile(child))


class _TrainingRun:
    """One freshly built method (seed 0) stepping as `engine.loop.Trainer._step` does under `prec`; `step` times
    its phases. The FLOPs per phase are counted on one eager step at construction, before any compilation (a
    compiled graph hides its ops from the counter)."""

    def __init__(self, method_name: str, cfg: dict[str, Any], patch: tuple[int, ...], batch: tuple[int, int],
                 volume: tuple[int, ...], prec: Precision, dev: torch.device, total: int, in_channels: int,
                 num_classes: int, compile_net: bool):
        torch.manual_seed(0)
        self.method = build_method(method_name, cfg, in_channels, num_classes, dim=len(patch),
                                   quiet_warnings=True).to(dev)
        self.use_cl = prec.channels_last and bool((cfg.get("train") or {}).get("channels_last", True))
        if self.use_cl:
            to_channels_last(self.method)
        self.optimizer = build_optimizer(self.method.param_groups(), cfg["optim"])
        self.sampler = _sampler(cfg, self.method, volume, patch, in_channels, num_classes, *batch)
        self.prec, self.dev, self.total, self.compiled = prec, dev, total, compile_net
        self.method.train()
        b = self._draw()
        with FlopCounterMode(display=False) as fc:
            loss = self._forward_loss(b, 0)
        self.flops = {"data": 0, "forward": _top_level_flops(fc)}
        self.flops["loss"] = int(fc.get_total_flops()) - self.flops["forward"]
        self.flops["backward"] = _counted_flops(lambda: loss.float().backward())
        self.flops["optimizer"] = _counted_flops(lambda: self._optimizer_step(0))
        if compile_net:
            _compile_children(self.method)
        self.clock = _ModuleClock(self.method, dev)
        self.times: dict[str, list[float]] = {p: [] for p in PHASES}

    def _draw(self):
        b = self.sampler.next_batch().to(self.dev)
        if self.use_cl:
            b.image_l, b.image_u = channels_last(b.image_l), channels_last(b.image_u)
        return b

    def _ctx(self, it: int) -> StepContext:
        return StepContext(iteration=it, max_iterations=self.total, device=self.dev)

    def _forward_loss(self, b, it: int):
        with self.prec.autocast():
            return self.method.training_step(b, self._ctx(it))["loss"]

    def _optimizer_step(self, it: int) -> None:
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)  # here rather than before backward: the same work per step
        self.method.on_after_optimizer_step(self._ctx(it))

    def step(self, it: int, record: bool = True) -> float:
        """One training step; with `record`, its phase times are kept. Returns the step's seconds."""
        dev, stamps = self.dev, []
        for phase in ("data", "forward_loss", "backward", "optimizer"):
            _sync(dev)
            stamps.append(time.perf_counter())
            if phase == "data":
                b = self._draw()
            elif phase == "forward_loss":
                self.clock.seconds = 0.0
                loss = self._forward_loss(b, it)
            elif phase == "backward":
                loss.float().backward()
            else:
                self._optimizer_step(it)
        _sync(dev)
        stamps.append(time.perf_counter())
        data, fwd_loss, bwd, opt = (b - a for a, b in zip(stamps, stamps[1:]))
        if record:
            fwd = self.clock.seconds
            for phase, sec in zip(PHASES, (data, fwd, fwd_loss - fwd, bwd, opt)):
                self.times[phase].append(sec)
        return stamps[-1] - stamps[0]

    def summary(self, first_step_s: float) -> dict[str, Any]:
        self.clock.remove()
        n = len(self.times["data"])
        phases: dict[str, Any] = {}
        for p in PHASES:
            sec = statistics.median(self.times[p])
            f = self.flops[p]
            phases[p] = {"s": sec, "flops": f, "flops_per_s": f / sec if f and sec > 0 else None}
        step_s = statistics.median(sum(self.times[p][i] for p in PHASES) for i in range(n))
        for p in PHASES:
            phases[p]["share_of_step"] = phases[p]["s"] / step_s
        step_flops = sum(self.flops.values())
        return {"phases": phases, "step_s": step_s, "step_flops": step_flops,
                "step_flops_per_s": step_flops / step_s, "channels_last": self.use_cl, "compiled": self.compiled,
                "first_step_s": first_step_s,
                "params": sum(p.numel() for p in self.method.parameters() if p.requires_grad)}


def measure_training(method_name: str, cfg: dict[str, Any], patch: tuple[int, ...], batch: tuple[int, int],
                     volume: tuple[int, ...], prec: Precision, dev: torch.device, steps: int, in_channels: int,
                     num_classes: int, variants: Sequence[bool] = (False,),
                     log: Callable[[str], None] | None = None) -> list[dict[str, Any]]:
    """Per variant (False: eager, True: the networks under `torch.compile`): median seconds per phase of `steps`
    training steps after one warm-up step (which compiles), and the FLOPs per phase of one step. The variants'
    timed steps alternate (eager, compiled, eager, ...) so a change in the machine's load hits them alike. A
    variant whose warm-up raises (a compiler failure) is reported as {"compiled": True, "error": ...}."""
    log = log or (lambda msg: None)
    runs: list[_TrainingRun | None] = []
    out: list[dict[str, Any]] = [{} for _ in variants]
    first: list[float] = []
    for i, compiled in enumerate(variants):
        run = _TrainingRun(method_name, cfg, patch, batch, volume, prec, dev, steps + 2, in_channels, num_classes,
                           compiled)
        try:
            first.append(run.step(1, record=False))  # warm-up (and compilation)
        except Exception as exc:  # noqa: BLE001 - an experiment: a compiler failure is a result, not a crash
            if not compiled:
                raise
            msg = f"{type(exc).__name__}: {(str(exc).splitlines() or [''])[0][:500]}"
            log(f"[{prec.name} + torch.compile] failed: {msg}")
            run.clock.remove()
            out[i], run = {"compiled": True, "error": msg}, None
            first.append(float("nan"))
        runs.append(run)
    for it in range(2, steps + 2):
        for run in runs:
            if run is not None:
                run.step(it)
    for i, run in enumerate(runs):
        if run is not None:
            out[i] = run.summary(first[i])
    return out


def measure_sliding(method_name: str, cfg: dict[str, Any], patch: tuple[int, ...], volume: tuple[int, ...],
                    stride: tuple[int, ...], sw_batch_size: int, prec: Precision, dev: torch.device, repeats: int,
                    in_channels: int, num_classes: int) -> dict[str, Any]:
    """FLOPs and median seconds of one `predict_case` sliding-window pass of a freshly built method (seed 0)."""
    torch.manual_seed(0)
    method = build_method(method_name, cfg, in_channels, num_classes, dim=len(patch), quiet_warnings=True).to(dev)
    if callable(getattr(method, "set_case_text", None)):
        method.set_case_text(_case_text(0))
    image = torch.rand((in_channels,) + volume, generator=torch.Generator().manual_seed(1))
    settings = InferenceSettings(mode="sliding", patch_size=patch, stride=stride, sw_batch_size=sw_batch_size,
                                 precision=prec)
    flops = _counted_flops(lambda: predict_case(method, image, settings, dev))  # also the warm-up
    times = [_timed(lambda: predict_case(method, image, settings, dev), dev) for _ in range(repeats)]
    sec = statistics.median(times)
    return {"s": sec, "flops": flops, "flops_per_s": flops / sec}


# --- the report ------------------------------------------------------------------------------------------

def run_roofline(method: str = "mcnet", patch: Sequence[int] = (112, 112, 80), batch: tuple[int, int] = (2, 2),
                 steps: int = 3, repeats: int = 3, device: str | None = None, volume: Sequence[int] | None = None,
                 stride: Sequence[int] | None = None, sw_batch_size: int = 4, precision: str = "auto",
                 gemm_size: int = 2048, in_channels: int = 1, num_classes: int = 2, sets: Sequence[str] = (),
                 sliding: bool = True, compile_net: bool = False, json_out: str | Path | None = None,
                 force: bool = False, log: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Peak FLOP/s, FLOPs per phase and fractions of peak of `method` (see the module docstring); returns (and
    optionally writes as JSON) the report. `precision`: auto (fp32, and bf16 where the device has bf16 units),
    or fp32, bf16, fp32,bf16. `compile_net` also times the step with the networks under `torch.compile`, in the
    same run, and reports its fractions beside the eager ones."""
    if method not in list_methods():
        raise ConfigError(f"unknown method '{method}'; available: {', '.join(list_methods()) or 'none registered'}")
    patch = tuple(int(p) for p in patch)
    if len(patch) not in (2, 3):
        raise ConfigError(f"--patch needs 2 or 3 sizes, got {list(patch)}")
    volume = tuple(int(v) for v in volume) if volume is not None else default_volume(patch)
    stride = tuple(int(s) for s in stride) if stride is not None else default_stride(patch)
    for name, val in (("--stride", stride), ("--volume", volume)):
        if len(val) != len(patch):
            raise ConfigError(f"{name} {list(val)} must have as many sizes as --patch {list(patch)}")
    if steps < 1 or repeats < 1 or gemm_size < 16:
        raise ConfigError("--iterations and --repeats must be >= 1 and --gemm-size >= 16")
    if json_out is not None:
        guard_output_file(json_out, force)
    dev = torch.device(resolve_device(device or "cpu"))
    log = log or (lambda msg: None)
    cfg = method_config(method, patch, sets)
    n_l, n_u = (int(b) for b in batch)
    precs = roofline_precisions(precision, dev)

    torch.manual_seed(0)
    probe = build_method(method, cfg, in_channels, num_classes, dim=len(patch), quiet_warnings=True).to(dev)
    convs = bounding_convs(network_convs(probe, _random_batch(in_channels, num_classes, patch, n_l, n_u, dev), dev))
    del probe
    dtypes = [p.name for p in precs]
    first = measure_peaks(dtypes, convs, dev, gemm_size, repeats, log)

    rows = []
    for prec in precs:
        variants = [False, True] if compile_net else [False]
        log(f"[{prec.name}] training{' eager vs torch.compile, alternating' if compile_net else ''}: 1 warm-up + "
            f"{steps} step(s) of {n_l}+{n_u} x {list(patch)}")
        trains = measure_training(method, cfg, patch, (n_l, n_u), volume, prec, dev, steps, in_channels,
                                  num_classes, variants=variants, log=log)
        for compiled, train in zip(variants, trains):
            row: dict[str, Any] = {"precision": prec.name, "precision_detail": prec.record(), "compiled": compiled}
            if "error" in train:
                row["compile_error"] = train["error"]
            else:
                row["train"] = train
            rows.append(row)
        if compile_net and "train" in rows[-1]:
            rows[-1]["train"]["speedup_vs_eager"] = rows[-2]["train"]["step_s"] / rows[-1]["train"]["step_s"]
        if sliding:
            log(f"[{prec.name}] sliding window on {list(volume)}, stride {list(stride)}: {repeats} pass(es)")
            rows[-len(variants)]["sliding"] = measure_sliding(method, cfg, patch, volume, stride, sw_batch_size, prec,
                                                              dev, repeats, in_channels, num_classes)
    peaks = measure_peaks(dtypes, convs, dev, gemm_size, repeats, log, previous=first)  # again, after the steps
    rows_done = [r for r in rows if "train" in r]
    for row in rows_done:
        peak = peaks[row["precision"]]["peak_flops_per_s"]
        for ph in row["train"]["phases"].values():
            ph["fraction_of_peak"] = ph["flops_per_s"] / peak if ph["flops_per_s"] else None
        row["train"]["fraction_of_peak"] = row["train"]["step_flops_per_s"] / peak
        if "sliding" in row:
            row["sliding"]["fraction_of_peak"] = row["sliding"]["flops_per_s"] / peak

    report = {"method": method, "patch": list(patch), "batch": {"labeled": n_l, "unlabeled": n_u},
              "volume": list(volume), "stride": list(stride), "sw_batch_size": sw_batch_size, "steps": steps,
              "repeats": repeats, "gemm_size": gemm_size, "device": str(dev),
              "device_name": torch.cuda.get_device_name(dev) if dev.type == "cuda" else cpu_model(),
              "threads": torch.get_num_threads(), "torch": torch.__version__, "convs": convs, "peaks": peaks,
              "results": rows,
              "note": "FlopCounterMode counts matmul/convolution FLOPs only; elementwise phases report time shares"}
    if json_out is not None:
        atomic_write_json(json_out, report)
    return report


def _fmt_flops(v: float | None) -> str:
    return "-" if v is None else f"{v / 1e9:.3g} G"


def print_roofline(report: dict[str, Any], out=None) -> None:
    """Two Rich tables: the peak kernels per dtype, then per phase time, share, FLOPs, FLOP/s and fraction."""
    out = out or console
    b = report["batch"]
    peak_t = Table(title=f"Peak on {report['device_name']} ({report['threads']} threads), median of "
                         f"{report['repeats']}")
    for col in ("dtype", "kernel", "shape", "GFLOP", "GFLOP/s", "of peak"):
        peak_t.add_column(col, justify="left" if col in ("dtype", "kernel", "shape") else "right")
    for dtype, entry in report["peaks"].items():
        for k in entry["kernels"].values():
            peak_t.add_row(dtype, k["kernel"], "x".join(map(str, k["shape"])), f"{k['flops'] / 1e9:.3g}",
                           f"{k['flops_per_s'] / 1e9:.4g}", f"{k['fraction_of_peak']:.2f}")
    out.print(peak_t)
    t = Table(title=f"{report['method']}: {b['labeled']}+{b['unlabeled']} x {report['patch']}, median of "
                    f"{report['steps']} step(s); sliding window on {report['volume']} stride {report['stride']}")
    for col in ("run", "phase", "s", "share", "FLOPs", "GFLOP/s", "of peak"):
        t.add_column(col, justify="left" if col in ("run", "phase") else "right")
    notes: list[str] = []
    for row in report["results"]:
        run = row["precision"] + (" compiled" if row["compiled"] else "")
        if "train" not in row:
            notes.append(f"[{run}] {row.get('compile_error', 'not measured')}")
            continue
        tr = row["train"]
        for name, ph in tr["phases"].items():
            t.add_row(run, name, f"{ph['s']:.3g}", f"{ph['share_of_step']:.1%}", _fmt_flops(ph["flops"] or None),
                      "-" if ph["flops_per_s"] is None else f"{ph['flops_per_s'] / 1e9:.4g}",
                      "-" if ph["fraction_of_peak"] is None else f"{ph['fraction_of_peak']:.3f}")
        t.add_row(run, "[b]step[/]", f"{tr['step_s']:.3g}", "100%", _fmt_flops(tr["step_flops"]),
                  f"{tr['step_flops_per_s'] / 1e9:.4g}", f"{tr['fraction_of_peak']:.3f}")
        if "sliding" in row:
            sw = row["sliding"]
            t.add_row(run, "sliding window", f"{sw['s']:.3g}", "-", _fmt_flops(sw["flops"]),
                      f"{sw['flops_per_s'] / 1e9:.4g}", f"{sw['fraction_of_peak']:.3f}")
        if tr.get("speedup_vs_eager") is not None:
            notes.append(f"[{run}] step {tr['speedup_vs_eager']:.2f}x eager (first step incl. compilation "
                         f"{tr['first_step_s']:.1f} s)")
    out.print(t)
    for line in notes:
        out.print(line, highlight=False)
