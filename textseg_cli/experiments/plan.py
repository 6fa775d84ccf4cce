"""`textseg plan`: a training plan for the user's own prepared data set, as a config YAML for `train --config`.

The plan starts from a fingerprint of the data (`fingerprint`: spacings, shapes, per-channel intensity statistics
over the foreground as nnU-Net's fingerprint extractor collects them, foreground size per class, labelled and
unlabelled counts) and chooses, each with the reason the table and the YAML show:

- the target spacing: the median spacing, or, for strongly anisotropic data, nnU-Net's rule (`target_spacing`);
- the patch and batch: the median shape at the target spacing rounded down to the network's patch multiple,
  its largest axis shrunk in steps of that multiple until a trial forward + backward + optimiser step of the
  method fits the device's memory (`MemoryProbe`), with at least 2 images per stream;
- the iterations and validation interval: what fits the time budget, from seconds per iteration timed at the
  chosen size and the time of one validation (windows per validation case x one timed forward pass).

Only the training and validation cases (splits train + val) enter the fingerprint: the test split's images and
labels are never read. Unlabelled cases contribute their shape and spacing only (their label files do not exist
or are never opened). The papers' presets are untouched: a plan is a user-level `--config` layer.
"""

from __future__ import annotations

import contextlib
import ctypes
import datetime as _dt
import gc
import math
import resource
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
import yaml
from rich.table import Table

from textseg_cli import __version__
from textseg_cli.console import progress
from textseg_cli.data.batch import Batch
from textseg_cli.data.prepared import PreparedDataset, load_prepared
from textseg_cli.engine.optim import build_optimizer
from textseg_cli.errors import ConfigError, DataError
from textseg_cli.evaluation.validation import validation_settings
from textseg_cli.inference.sliding_window import window_starts
from textseg_cli.methods.base import StepContext
from textseg_cli.methods.registry import list_methods
from textseg_cli.runs.checks import MIN_PATCH, network_of, patch_multiple
from textseg_cli.runs.config import build_config
from textseg_cli.runs.load import build_run_method
from textseg_cli.runtime.device import resolve_device
from textseg_cli.runtime.environment import hardware_name
from textseg_cli.runtime.precision import (
    channels_last,
    inference_precision,
    to_channels_last,
    training_precision,
)
from textseg_cli.storage.files import atomic_write_json, atomic_write_text
from textseg_cli.storage.outputs import guard_output_file

DEFAULT_METHOD = "mcnet"  # the default of `textseg bench` too: a two-stream (2+2) V-Net method of the main tables
MAX_FG_SAMPLES = 10_000  # foreground voxels per case and channel entering the intensity statistics (as nnU-Net)
ANISOTROPY = 3.0  # nnU-Net's anisotropy threshold
CPU_RAM_SHARE = 0.5  # of MemAvailable: see `memory_limit`
CUDA_SHARE = 0.85  # of the GPU memory free at planning time
MIN_BATCH = 2  # images per stream
MAX_BATCH = 8
BATCH_VOXEL_SHARE = 0.05  # nnU-Net: one batch covers at most 5 % of the data set's voxels
VAL_SHARE = 0.15  # of the budget spent validating, at most
MAX_VALIDATIONS = 10
FIT_AFTER_MAX = 20  # steps a planned run times before refitting its length (fit_after)
MARGIN = 0.05  # of the budget kept for start-up (loading the cases, building the method) and checkpoints
VAL_OVERHEAD = 1.1  # window blending, copies and the argmax on top of the timed forward passes
TIMED_STEPS = 3
MIN_ITERATIONS = 10  # fewer fit the budget: an error
MIN_USEFUL_ITERATIONS = 500  # default --min-iterations: below it a larger patch gives way to more iterations
TIME_FLOOR_UNITS = 4  # the time shrink stops at 4 units a side (64 voxels for the V-Net family)


# --- fingerprint ---------------------------------------------------------------------------------------------
@dataclass
class Fingerprint:
    """What the plan knows about the data (`record()` is what --json writes)."""
    name: str
    dim: int
    channel_names: list[str]
    class_names: list[str]
    case_ids: list[str]  # splits train + val: the cases the fingerprint read
    n_labeled: int
    n_unlabeled: int
    spacings: list[list[float]]
    shapes: list[list[int]]
    intensity: list[dict[str, float]]  # per channel, over the pooled foreground samples
    foreground: list[dict[str, float]]  # per foreground class
    samples_per_case: int = MAX_FG_SAMPLES

    @property
    def median_spacing(self) -> list[float]:
        return [float(v) for v in np.median(np.array(self.spacings, dtype=float), axis=0)]

    @property
    def median_shape(self) -> list[float]:
        return [float(v) for v in np.median(np.array(self.shapes, dtype=float), axis=0)]

    def record(self) -> dict[str, Any]:
        return {"name": self.name, "dim": self.dim, "channels": self.channel_names, "classes": self.class_names,
                "cases": len(self.case_ids), "labeled": self.n_labeled, "unlabeled": self.n_unlabeled,
                "median_spacing": self.median_spacing, "median_shape": self.median_shape,
                "spacings": self.spacings, "shapes": self.shapes, "intensity": self.intensity,
                "foreground": self.foreground, "samples_per_case": self.samples_per_case}


def even_sample(values: np.ndarray, k: int) -> np.ndarray:
    """At most `k` values, evenly spaced over the array (deterministic, unlike nnU-Net's seeded random draw:
    the same data always give the same statistics)."""
    if values.size <= k:
        return values
    return values[np.linspace(0, values.size - 1, k).round().astype(np.int64)]


def intensity_stats(values: np.ndarray) -> dict[str, float]:
    """nnU-Net's per-channel foreground statistics (mean, median, std, min, max, 0.5 and 99.5 percentiles)."""
    if values.size == 0:
        return {}
    v = values.astype(np.float64)
    return {"mean": float(v.mean()), "median": float(np.median(v)), "std": float(v.std()), "min": float(v.min()),
            "max": float(v.max()), "percentile_00_5": float(np.percentile(v, 0.5)),
            "percentile_99_5": float(np.percentile(v, 99.5))}


def fingerprint(ds: PreparedDataset, max_samples: int = MAX_FG_SAMPLES, show_progress: bool = False) -> Fingerprint:
    """Fingerprint of splits train + val of a prepared set. Spacing and shape come from dataset.json; labelled
    cases are read for the foreground statistics (at most `max_samples` evenly spaced foreground voxels per case
    and channel, pooled over cases); unlabelled cases are not read at all."""
    ids: list[str] = []
    for split in ("train", "val"):
        for cid in ds.spec["splits"].get(split) or []:
            if cid not in ids:
                ids.append(cid)
    if not ids:
        raise DataError("splits train and val are empty: nothing to plan for", ds.root / "dataset.json")
    entries = {c["id"]: c for c in ds.spec["cases"]}
    spacings, shapes = [], []
    for cid in ids:
        e = entries[cid]
        if not e.get("shape") or not e.get("spacing"):
            raise DataError(f"case '{cid}' records no shape/spacing (prepared by an old textseg? redo `textseg prep`)",
                            ds.root / "dataset.json")
        shapes.append([int(v) for v in e["shape"][: ds.dim]])
        spacings.append([float(v) for v in e["spacing"][: ds.dim]])
    labeled = [cid for cid in ids if ds.has_label(cid)]
    samples: list[list[np.ndarray]] = [[] for _ in range(ds.in_channels)]
    counts = np.zeros((len(labeled), ds.num_classes), dtype=np.int64)
    case_voxels, voxel_mm = np.zeros(len(labeled)), np.zeros(len(labeled))
    bar = progress(transient=True) if show_progress else contextlib.nullcontext()
    with bar:
        task = bar.add_task("fingerprint", total=len(labeled), info="") if show_progress else None
        for i, cid in enumerate(labeled):
            _fingerprint_case(ds, cid, i, max_samples, samples, counts, case_voxels, voxel_mm)
            if show_progress:
                bar.update(task, advance=1, info=cid)
    intensity = [{"channel": name, **intensity_stats(np.concatenate(s) if s else np.zeros(0))}
                 for name, s in zip(ds.spec["channel_names"], samples)]
    foreground = []
    for k, name in enumerate(ds.class_names[1:], start=1):
        present = counts[:, k] > 0 if len(labeled) else np.zeros(0, bool)
        foreground.append({
            "class": name, "cases_with_class": int(present.sum()),
            "median_voxels": float(np.median(counts[present, k])) if present.any() else 0.0,
            "median_fraction": float(np.median(counts[present, k] / case_voxels[present])) if present.any() else 0.0,
            "median_volume_ml": float(np.median(counts[present, k] * voxel_mm[present]) / 1000.0)
            if present.any() else 0.0})
    return Fingerprint(ds.name, ds.dim, list(ds.spec["channel_names"]), ds.class_names, ids, len(labeled),
                       len(ids) - len(labeled), spacings, shapes, intensity, foreground, max_samples)


def _fingerprint_case(ds: PreparedDataset, cid: str, i: int, max_samples: int, samples: list[list[np.ndarray]],
                      counts: np.ndarray, case_voxels: np.ndarray, voxel_mm: np.ndarray) -> None:
    """Add labelled case `cid` (row `i`) to the foreground samples and class counts."""
    case = ds.load_case(cid, with_label=True)
    fg = case.label > 0
    for c in range(case.image.shape[0]):
        samples[c].append(even_sample(case.image[c][fg], max_samples))
    counts[i] = np.bincount(case.label.ravel(), minlength=ds.num_classes)[: ds.num_classes]
    case_voxels[i], voxel_mm[i] = case.label.size, float(np.prod(case.spacing))


# --- spacing and patch -------------------------------------------------------------------------------------------
def target_spacing(spacings: Sequence[Sequence[float]], shapes: Sequence[Sequence[int]]) -> tuple[list[float], str]:
    """The median spacing; nnU-Net's anisotropy rule replaces it on the low-resolution axis by the 10th
    percentile of that axis's spacings (never below the other axes' largest spacing) when that axis's median
    spacing is more than 3x every other axis's AND its median size in voxels is less than a third of every
    other axis's (thick slices of few voxels: the median would throw away resolution most cases have)."""
    sp, sh = np.array(spacings, dtype=float), np.array(shapes, dtype=float)
    target, size = np.median(sp, axis=0), np.median(sh, axis=0)
    if len(target) < 2:
        return [float(v) for v in target], "median spacing"
    worst = int(np.argmax(target))
    others = [i for i in range(len(target)) if i != worst]
    aniso_spacing = target[worst] > ANISOTROPY * max(target[others])
    aniso_voxels = size[worst] * ANISOTROPY < min(size[others])
    if not (aniso_spacing and aniso_voxels):
        why = "median spacing over the cases"
        if aniso_spacing:
            why += f" (axis {worst} is > {ANISOTROPY:g}x coarser, but has enough voxels: nnU-Net keeps the median)"
        return [float(v) for v in target], why
    low = max(float(np.percentile(sp[:, worst], 10)), float(max(target[others])))
    out = [float(v) for v in target]
    out[worst] = low
    return out, (f"median spacing, but axis {worst} is > {ANISOTROPY:g}x coarser than the others with < 1/"
                 f"{ANISOTROPY:g} of their voxels: its 10th percentile {low:.4g} (nnU-Net's anisotropy rule)")


def shape_at(shapes: Sequence[Sequence[int]], spacings: Sequence[Sequence[float]],
             target: Sequence[float]) -> list[int]:
    """Median per axis of each case's shape resampled to `target` (size x spacing / target)."""
    resampled = np.array(shapes, dtype=float) * np.array(spacings, dtype=float) / np.array(target, dtype=float)
    return [int(round(v)) for v in np.median(resampled, axis=0)]


def patch_unit(cfg: dict[str, Any]) -> int:
    """The step of patch sides: the network's multiple (`runs.checks.patch_multiple`), and at least MIN_PATCH
    for networks that take any size (steps of one voxel would mean hundreds of trials)."""
    k = patch_multiple(cfg)
    return k if k >= MIN_PATCH else k * math.ceil(MIN_PATCH / k)


def start_patch(median_shape: Sequence[int], unit: int) -> list[int]:
    """The median shape rounded down to multiples of `unit`, each side at least one unit (smaller cases are
    zero-padded by the sampler)."""
    return [max(unit, int(s) // unit * unit) for s in median_shape]


def shrink(patch: Sequence[int], unit: int) -> list[int] | None:
    """The next smaller candidate: the largest side (the first of equals) less one unit; None at the minimum."""
    p = list(patch)
    axis = int(np.argmax(p))
    if p[axis] - unit < unit:
        return None
    p[axis] -= unit
    return p


# --- measuring -----------------------------------------------------------------------------------------------
def _rss_field(name: str) -> float | None:
    try:
        for line in Path("/proc/self/status").read_text(encoding="utf-8").splitlines():
            if line.startswith(name + ":"):
                return int(line.split()[1]) * 1024.0
    except OSError:
        pass
    return None


def _rss_now() -> float:
    return _rss_field("VmRSS") or 0.0


def _rss_peak() -> float:
    peak = _rss_field("VmHWM")
    return peak if peak is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024.0


def _reset_rss_peak() -> None:
    """Return freed heap to the OS and restart the peak count (Linux: VmHWM), so each trial's peak is its own."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
        Path("/proc/self/clear_refs").write_text("5")
    except (OSError, AttributeError):
        pass


def mem_available() -> float | None:
    """MemAvailable of /proc/meminfo in bytes (None elsewhere)."""
    try:
        for line in Path("/proc/meminfo").read_text(encoding="utf-8").splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024.0
    except OSError:
        pass
    return None


def data_bytes(ds: PreparedDataset, ids: Sequence[str]) -> float:
    """RAM the trainer's preloaded cases take (float32 images, uint8 labels; `data.sampling.load_training_cases`)."""
    total = 0.0
    entries = {c["id"]: c for c in ds.spec["cases"]}
    for cid in ids:
        vox = float(np.prod(entries[cid]["shape"][: ds.dim]))
        total += vox * 4 * ds.in_channels + (vox if ds.has_label(cid) else 0)
    return total


def memory_limit(dev: torch.device, ds: PreparedDataset, ids: Sequence[str],
                 memory_gb: float | None) -> tuple[float, str]:
    """Bytes a training step may take on `dev`, and why.

    CUDA: 85 % of the memory free now (torch.cuda.mem_get_info), compared with torch.cuda.max_memory_allocated
    (the allocator's cache and the CUDA context come on top). CPU: half of MemAvailable, less the cases the
    trainer preloads, compared with the rise of the process's peak resident set (VmHWM) during the trial: the
    machine's RAM is shared with other processes, the allocator's fragmentation grows over thousands of steps,
    and validation holds a volume and its probabilities besides."""
    if memory_gb is not None:
        if memory_gb <= 0:
            raise ConfigError(f"--memory-gb {memory_gb}: expected a positive number")
        return memory_gb * 2**30, f"--memory-gb {memory_gb:g}"
    if dev.type == "cuda":
        free, total = torch.cuda.mem_get_info(dev)
        return CUDA_SHARE * free, (f"{CUDA_SHARE:.0%} of the {free / 2**30:.1f} GiB free of {total / 2**30:.1f} GiB "
                                   "(torch peak allocated; allocator cache and context on top)")
    avail = mem_available()
    if avail is None:
        raise ConfigError("cannot read the available RAM (/proc/meminfo); pass --memory-gb")
    cached = data_bytes(ds, ids)
    limit = CPU_RAM_SHARE * avail - cached
    if limit <= 0:
        raise ConfigError(f"the training cases alone take {cached / 2**30:.1f} GiB of the {avail / 2**30:.1f} GiB "
                          "of RAM available; free memory or pass --memory-gb")
    return limit, (f"{CPU_RAM_SHARE:.0%} of {avail / 2**30:.1f} GiB RAM available, less {cached / 2**30:.2f} GiB of "
                   "preloaded cases (process peak RSS; the RAM is shared and grows with fragmentation)")


@dataclass
class Trial:
    patch: list[int]
    batch: tuple[int, int]
    peak_bytes: float
    step_s: list[float] = field(default_factory=list)
    fits: bool = True


class Probe:
    """Trial steps of the method on `dev` with the run config a plan would write: memory and speed.

    A trial builds the method exactly as `textseg train` does (`runs.load.build_run_method`, the configured
    optimiser, precision and channels-last), feeds it random patches of the candidate size (with the method's
    own label-derived targets, e.g. DTC's signed distance), and runs forward + loss + backward + optimiser step."""

    def __init__(self, ds: PreparedDataset, method: str, dev: torch.device, config_for: Callable[..., dict]):
        self.ds, self.method, self.dev, self.config_for = ds, method, dev, config_for

    def _batch(self, cfg, model, patch, bl, bu) -> Batch:
        gen = torch.Generator().manual_seed(0)
        c, k = self.ds.in_channels, self.ds.num_classes
        label = torch.randint(0, k, (bl, *patch), generator=gen)
        extra: dict[str, list] = {}
        for lab in label.numpy():
            for key, v in (model.label_targets(lab) or {}).items():
                extra.setdefault(key, []).append(v)
        text = [f"case {i}" for i in range(bl + bu)]
        return Batch(torch.rand((bl, c, *patch), generator=gen), label, torch.rand((bu, c, *patch), generator=gen),
                     [f"l{i}" for i in range(bl)], [f"u{i}" for i in range(bu)], text[:bl], text[bl:],
                     {key: torch.from_numpy(np.stack(v)) for key, v in extra.items()}).to(self.dev)

    def _sync(self) -> None:
        if self.dev.type == "cuda":
            torch.cuda.synchronize(self.dev)

    def trial(self, patch: Sequence[int], bl: int, bu: int, steps: int = 1, warmup: int = 0,
              limit: float | None = None) -> Trial:
        """Peak memory of `warmup + steps` steps and the seconds of the last `steps` of them. A trial that runs
        out of memory, or whose peak passes `limit` after a step, stops there and does not fit."""
        patch = [int(p) for p in patch]
        cfg = self.config_for(patch, bl, bu)
        gc.collect()
        if self.dev.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(self.dev)
            base = 0.0
        else:
            _reset_rss_peak()
            base = _rss_now()
        peak = lambda: (torch.cuda.max_memory_allocated(self.dev) if self.dev.type == "cuda"  # noqa: E731
                        else _rss_peak() - base)
        times: list[float] = []
        model = opt = batch = None
        try:
            torch.manual_seed(0)
            model = build_run_method(cfg, self.ds).to(self.dev)
            prec = training_precision(cfg, self.dev)
            cl = prec.channels_last and bool(cfg["train"].get("channels_last", True))
            if cl:
                to_channels_last(model)
            model.train()
            opt = build_optimizer(model.param_groups(), cfg["optim"])
            batch = self._batch(cfg, model, patch, bl, bu)
            if cl:
                batch.image_l, batch.image_u = channels_last(batch.image_l), channels_last(batch.image_u)
            total = warmup + steps
            for i in range(total):
                ctx = StepContext(iteration=i, max_iterations=max(total, 1000), device=self.dev)
                self._sync()
                t0 = time.perf_counter()
                with prec.autocast():
                    out = model.training_step(batch, ctx)
                opt.zero_grad(set_to_none=True)
                out["loss"].float().backward()
                opt.step()
                model.on_after_optimizer_step(ctx)
                self._sync()
                if i >= warmup:
                    times.append(time.perf_counter() - t0)
                if limit is not None and peak() > limit:
                    return Trial(patch, (bl, bu), peak(), times, fits=False)
            self.model, self.cfg, self.patch = model, cfg, patch  # for the validation timing of this size
            return Trial(patch, (bl, bu), peak(), times, fits=limit is None or peak() <= limit)
        except torch.cuda.OutOfMemoryError:
            return Trial(patch, (bl, bu), math.inf, times, fits=False)
        except RuntimeError as exc:  # the CPU allocator: "DefaultCPUAllocator: can't allocate memory"
            if "can't allocate" not in str(exc) and "out of memory" not in str(exc).lower():
                raise
            return Trial(patch, (bl, bu), math.inf, times, fits=False)
        finally:
            del opt, batch
            gc.collect()
            if self.dev.type == "cuda":
                torch.cuda.empty_cache()

    def validation_case_s(self, volume: Sequence[int]) -> tuple[float, str]:
        """Seconds to validate one case of shape `volume`: the number of forward passes validation makes
        (windows / sw_batch_size with the run's validation stride; one pass in whole-volume mode) times one
        timed forward pass of the model of the last fitting trial, x1.1 for blending and copies."""
        cfg, model = self.cfg, self.model
        settings = validation_settings(cfg, inference_precision(cfg, self.dev))
        patch = list(settings.patch_size)
        if settings.mode == "whole":
            shape = [int(math.ceil(v / settings.multiple) * settings.multiple) for v in volume]
            n_pass, sw, what = 1, 1, f"one whole-volume pass of {shape}"
        else:
            n_win = int(np.prod([len(window_starts(max(v, p), p, s)) for v, p, s in zip(volume, patch,
                                                                                         settings.stride)]))
            sw = int(settings.sw_batch_size or 4)
            n_pass, shape = math.ceil(n_win / sw), patch
            what = (f"{n_win} windows of {patch} (stride {list(settings.stride)}) in {n_pass} passes of {sw}")
        x = torch.rand((sw, self.ds.in_channels, *shape), generator=torch.Generator().manual_seed(1)).to(self.dev)
        prec = settings.precision
        if prec.channels_last and settings.channels_last:
            x = channels_last(x)
        model.eval()
        times = []
        with torch.no_grad():
            for i in range(3 if self.dev.type == "cuda" else 2):
                self._sync()
                t0 = time.perf_counter()
                with prec.autocast():
                    model.predict_proba(x, settings.decoder)
                self._sync()
                times.append(time.perf_counter() - t0)
        model.train()
        per_pass = statistics.median(times[1:])
        return n_pass * per_pass * VAL_OVERHEAD, f"{what}, {per_pass:.3g} s each, x{VAL_OVERHEAD:g}"


# --- the time budget -----------------------------------------------------------------------------------------
@dataclass
class Schedule:
    iterations: int
    val_every: int
    validations: int
    max_cases: int | None
    seconds: float  # what the arithmetic expects the run to take
    reason_iterations: str
    reason_val: str


def fit_after(iterations: int) -> int:
    """Steps a planned run times before it refits its length to the budget: 5 % of the planned iterations,
    between 2 and FIT_AFTER_MAX (the first step is warm-up and not timed)."""
    return max(2, min(FIT_AFTER_MAX, iterations // 20))


def fit_budget(budget_s: float, s_per_it: float, s_per_case: float, n_val_cases: int) -> Schedule:
    """Iterations and validation interval within `budget_s`: MARGIN of it kept for start-up and checkpoints,
    at most VAL_SHARE of it validating (at most MAX_VALIDATIONS full validations, the last at the end; when
    not even one fits, validation on the first cases that fit, or off), the rest iterations of `s_per_it`."""
    usable = budget_s * (1 - MARGIN)
    val_budget = VAL_SHARE * usable
    full = s_per_case * n_val_cases
    max_cases = None
    if n_val_cases == 0:
        n_val, why_val = 0, "no validation cases (splits.val is empty): no best.pt, eval uses last.pt"
    elif full <= val_budget:
        n_val = min(MAX_VALIDATIONS, int(val_budget // full))
        why_val = (f"{n_val} validation(s) of {n_val_cases} cases x {s_per_case:.3g} s = {n_val * full:.3g} s, "
                   f"within {VAL_SHARE:.0%} of the budget (at most {MAX_VALIDATIONS}); the last one at the end")
    elif s_per_case <= val_budget:
        max_cases = int(val_budget // s_per_case)
        n_val, full = 1, s_per_case * max_cases
        why_val = (f"one validation of {n_val_cases} cases ({n_val_cases * s_per_case:.0f} s) exceeds "
                   f"{VAL_SHARE:.0%} of the budget: one at the end on the first {max_cases} (val.max_cases)")
    else:
        n_val, full = 0, 0.0
        why_val = (f"one validation case takes {s_per_case:.3g} s, more than {VAL_SHARE:.0%} of the budget: "
                   "validation off (no best.pt; eval uses last.pt)")
    iterations = int((usable - n_val * full) // s_per_it)
    if iterations < MIN_ITERATIONS:
        raise ConfigError(f"--budget-min {budget_s / 60:g}: only {max(iterations, 0)} iteration(s) of {s_per_it:.3g} s "
                          f"fit (at least {MIN_ITERATIONS} needed); give a larger budget")
    every = iterations // n_val if n_val else 0
    if n_val:
        iterations = every * n_val  # validations at every, 2 every, ..., the end: none uncounted
    seconds = iterations * s_per_it + n_val * full
    why_it = (f"({budget_s:.0f} s budget - {MARGIN:.0%} start-up margin - {n_val * full:.3g} s validation) / "
              f"{s_per_it:.3g} s per iteration" + (f", rounded to {n_val} x {every}" if n_val else ""))
    return Schedule(iterations, every, n_val, max_cases, seconds, why_it, why_val)


# --- the plan -----------------------------------------------------------------------------------------------
@dataclass
class Plan:
    data: str
    method: str
    device: str
    hardware: str
    budget_min: float
    fingerprint: Fingerprint
    target_spacing: list[float]
    median_shape: list[int]  # at the target spacing
    config: dict[str, Any]  # the YAML: a --config layer
    reasons: list[tuple[str, str, str]]  # (setting, value, reason)
    measured: dict[str, Any]

    def record(self) -> dict[str, Any]:
        return {"textseg_version": __version__, "data": self.data, "method": self.method, "device": self.device,
                "hardware": self.hardware, "budget_min": self.budget_min, "target_spacing": self.target_spacing,
                "median_shape_at_target": self.median_shape, "config": self.config,
                "reasons": [{"setting": s, "value": v, "reason": r} for s, v, r in self.reasons],
                "measured": self.measured, "fingerprint": self.fingerprint.record()}

    def yaml_text(self) -> str:
        head = [f"textseg plan {__version__} for {self.data} ({self.fingerprint.name}), method {self.method}, "
                f"{self.device} ({self.hardware}), budget {self.budget_min:g} min, "
                f"{_dt.datetime.now(_dt.timezone.utc).isoformat(timespec='seconds')}",
                f"use: textseg train --method {self.method} --data {self.data} --config THIS_FILE "
                "(or an experiment file's methods[].config)", ""]
        head += [f"{s} = {v}: {r}" for s, v, r in self.reasons]
        body = yaml.safe_dump(self.config, sort_keys=False, default_flow_style=None, width=100)
        return "".join(f"# {line}\n".replace("# \n", "#\n") for line in head) + body


def _dotted(cfg: dict[str, Any], key: str) -> Any:
    node: Any = cfg
    for k in key.split("."):
        node = (node or {}).get(k)
    return node


def make_plan(data: str | Path, *, method: str = DEFAULT_METHOD, device: str | None = None, budget_min: float = 60.0,
              s_per_it: float | None = None, s_per_val_case: float | None = None, memory_gb: float | None = None,
              threads: int | None = None, min_iterations: int = MIN_USEFUL_ITERATIONS,
              log: Callable[[str], None] | None = None, probe: Probe | None = None) -> Plan:
    """Plan a training of `method` on a prepared folder within `budget_min` minutes on `device`.

    s_per_it / s_per_val_case: measured seconds (a previous plan's, `textseg bench`'s) used instead of timing
    trial steps / a validation forward pass; memory_gb: the memory a step may take (default: `memory_limit`).
    min_iterations: when fewer iterations of the memory-fitting patch fit the budget, the patch shrinks further
    (not below TIME_FLOOR_UNITS units a side) until this many fit; 0 keeps the largest patch memory allows.
    Returns the Plan; `write_plan` writes its YAML (and JSON record)."""
    show = log is not None
    log = log or (lambda msg: None)
    if not budget_min or budget_min <= 0 or not math.isfinite(budget_min):
        raise ConfigError(f"--budget-min {budget_min!r}: expected a positive number of minutes")
    for opt, v in (("--s-per-it", s_per_it), ("--s-per-val-case", s_per_val_case)):
        if v is not None and not (v > 0 and math.isfinite(v)):
            raise ConfigError(f"{opt} {v!r}: expected a positive number of seconds")
    if method not in list_methods():
        raise ConfigError(f"unknown method '{method}'; available: {', '.join(list_methods())}")
    if min_iterations is None or min_iterations < 0:
        raise ConfigError(f"--min-iterations {min_iterations!r}: expected 0 or more")
    if threads is not None:
        if threads < 1:
            raise ConfigError(f"--threads {threads}: expected at least 1")
        torch.set_num_threads(int(threads))
    ds = load_prepared(data)
    dev = resolve_device(device)
    base = build_config(method, ds.name, ds.dim, ds.patch_size)
    dims = list_methods()[method].dims
    if ds.dim not in dims:
        raise ConfigError(f"{method} trains on {' or '.join(f'{d}D' for d in dims)} images; {ds.name} has dim {ds.dim}")
    fp = fingerprint(ds, show_progress=show)
    reasons: list[tuple[str, str, str]] = []
    target, why_spacing = target_spacing(fp.spacings, fp.shapes)
    at_target = all(np.allclose(s, target, rtol=1e-3) for s in fp.spacings)
    reasons.append(("target spacing", "x".join(f"{v:.4g}" for v in target),
                    why_spacing + ("; the prepared cases are at it already" if at_target else
                                   f"; the cases are not all at it: re-prepare with --spacing "
                                   f"{','.join(f'{v:.4g}' for v in target)} for the patch below to mean this")))
    median = shape_at(fp.shapes, fp.spacings, target)
    unit = patch_unit(base)
    net = network_of(base)
    two_streams = int(base["train"]["batch_unlabeled"]) > 0
    official = {k: _dotted(base, k) for k in ("data.patch_size", "train.batch_labeled", "train.batch_unlabeled",
                                              "train.iterations", "val.every")}

    def overrides(patch, bl, bu) -> dict[str, Any]:
        return {"data": {"patch_size": [int(p) for p in patch]},
                "train": {"batch_labeled": int(bl), "batch_unlabeled": int(bu)}}

    def config_for(patch, bl, bu) -> dict[str, Any]:
        return build_config(method, ds.name, ds.dim, ds.patch_size, user_config=overrides(patch, bl, bu))

    probe = probe or Probe(ds, method, dev, config_for)
    limit, why_limit = memory_limit(dev, ds, fp.case_ids, memory_gb)
    per_b = 2 if two_streams else 1
    streams = (lambda b: (b, b)) if two_streams else (lambda b: (b, 0))

    # memory: a line through two small trials predicts each candidate; the first predicted to fit is measured
    small = [[unit] * ds.dim, [2 * unit] * ds.dim]
    fits = [probe.trial(p, *streams(MIN_BATCH)) for p in small]
    vox = [per_b * MIN_BATCH * float(np.prod(p)) for p in small]
    slope = max(0.0, (fits[1].peak_bytes - fits[0].peak_bytes) / (vox[1] - vox[0]))
    fixed = max(0.0, fits[0].peak_bytes - slope * vox[0])
    predict = lambda patch, b: fixed + slope * per_b * b * float(np.prod(patch))  # noqa: E731
    first = start_patch(median, unit)
    patch: list[int] | None = first
    chosen: Trial | None = None
    shrunk = 0
    while patch is not None:
        if predict(patch, MIN_BATCH) <= limit:
            log(f"trial step at patch {patch}, batch {'+'.join(map(str, streams(MIN_BATCH)))}")
            t = probe.trial(patch, *streams(MIN_BATCH), limit=limit)
            if t.fits:
                chosen = t
                break
        patch, shrunk = shrink(patch, unit), shrunk + 1
    if chosen is None:
        raise ConfigError(f"{method} does not fit in {limit / 2**30:.2f} GiB ({why_limit}) even at patch "
                          f"{small[0]} with batches of {MIN_BATCH}; pass --memory-gb, free memory or use a GPU")
    patch = chosen.patch
    why_patch = (f"median shape at target spacing {median} rounded down to multiples of {unit} ({net})"
                 + (f", largest side shrunk {shrunk} time(s) by {unit} until a trial step fitted" if shrunk
                    else ", fits as it is")
                 + f"; trial peak {chosen.peak_bytes / 2**30:.2f} GiB of {limit / 2**30:.2f} GiB ({why_limit})")
    # batch: more images only when the patch was not shrunk (nnU-Net), within 5 % of the data's voxels
    total_vox = float(sum(np.prod(s) for s in np.array(fp.shapes, float) * np.array(fp.spacings) / np.array(target)))
    b = MIN_BATCH
    if shrunk:
        why_b = f"{MIN_BATCH} per stream (the minimum): the patch had to shrink to fit"
    else:
        cap = int(BATCH_VOXEL_SHARE * total_vox // (per_b * float(np.prod(patch))))
        while b < min(MAX_BATCH, cap) and predict(patch, b + 1) <= limit:
            t = probe.trial(patch, *streams(b + 1), limit=limit)
            if not t.fits:
                break
            b, chosen = b + 1, t
        if b > MIN_BATCH:
            why_b = (f"{b} per stream: the largest that fits (trial peak {chosen.peak_bytes / 2**30:.2f} GiB) with "
                     f"one batch within {BATCH_VOXEL_SHARE:.0%} of the data's voxels (at most {MAX_BATCH}; nnU-Net)")
        elif cap <= MIN_BATCH:
            why_b = (f"{MIN_BATCH} per stream (the minimum): one batch of more would pass {BATCH_VOXEL_SHARE:.0%} of "
                     "the data's voxels (nnU-Net's rule)")
        else:
            why_b = f"{MIN_BATCH} per stream (the minimum): a larger batch does not fit in memory"
    bl, bu = streams(b)

    # time: seconds per iteration at the chosen size and per validation case, then the budget
    budget_s = budget_min * 60.0
    val_cfg = config_for(patch, bl, bu)
    val_ids = ds.spec["splits"].get(val_cfg["val"]["split"]) or []
    max_cases = val_cfg["val"].get("max_cases")
    n_val = len(val_ids) if not max_cases else min(len(val_ids), int(max_cases))

    def timed(p: list[int]) -> tuple[float, str, float, str]:
        if s_per_it is None:
            log(f"timing {TIMED_STEPS} steps at patch {p}, batch {bl}+{bu}")
            t = probe.trial(p, bl, bu, steps=TIMED_STEPS, warmup=1 if dev.type == "cpu" else 2)
            s_it, why_it = statistics.median(t.step_s), f"median of {TIMED_STEPS} timed trial steps after warm-up"
        else:
            s_it, why_it = float(s_per_it), "--s-per-it (given, not timed)"
        if s_per_val_case is None and n_val:
            if p != getattr(probe, "patch", p) or not hasattr(probe, "model"):
                probe.trial(p, bl, bu)
            log(f"timing a validation forward pass at patch {p}")
            s_case, why_case = probe.validation_case_s(median)
        else:
            s_case, why_case = float(s_per_val_case or 0.0), "--s-per-val-case (given, not timed)"
        return s_it, why_it, s_case, why_case

    def iterations(s_it: float, s_case: float) -> int:
        try:
            return fit_budget(budget_s, s_it, s_case, n_val).iterations
        except ConfigError:
            return 0

    s_it, why_sit, s_case, why_case = timed(patch)
    memory_patch, memory_it, time_shrunk = list(patch), iterations(s_it, s_case), 0
    floor = [min(s, TIME_FLOOR_UNITS * unit) for s in start_patch(median, unit)]
    while min_iterations and s_per_it is None and iterations(s_it, s_case) < min_iterations:
        # the first smaller candidate predicted (s/it in proportion to voxels) to give min_iterations, then measured
        cand, pick = shrink(patch, unit), None
        while cand is not None and all(c >= f for c, f in zip(cand, floor)):
            pick = cand
            if iterations(s_it * float(np.prod(cand)) / float(np.prod(patch)), s_case) >= min_iterations:
                break
            cand = shrink(cand, unit)
        if pick is None:
            break
        time_shrunk += sum(1 for _ in _shrink_steps(patch, pick, unit))
        patch = pick
        s_it, why_sit, s_case, why_case = timed(patch)
    if time_shrunk:
        why_patch += (f"; then shrunk {time_shrunk} more time(s) for time: at {memory_patch} only {memory_it} "
                      f"iteration(s) fit the budget, fewer than --min-iterations {min_iterations}"
                      + (f" (not below {floor}: smaller patches lose context)"
                         if iterations(s_it, s_case) < min_iterations else ""))
    elif min_iterations and s_per_it is None and iterations(s_it, s_case) < min_iterations:
        why_patch += (f"; only {iterations(s_it, s_case)} iterations fit (< --min-iterations {min_iterations}), "
                      f"but the patch is at its floor {floor}")
    sched = fit_budget(budget_s, s_it, s_case, n_val)

    reasons.append(("data.patch_size", str(patch), why_patch))
    reasons.append(("train.batch_labeled", str(bl), why_b))
    reasons.append(("train.batch_unlabeled", str(bu), "as many unlabelled as labelled images (the method's own "
                    "configs pair them)" if two_streams else f"{method} trains on labelled images only"))
    cfg: dict[str, Any] = {"data": {"patch_size": patch},
                           "train": {"iterations": sched.iterations, "batch_labeled": bl, "batch_unlabeled": bu,
                                     "time_budget_min": float(budget_min),
                                     "fit_budget_after": fit_after(sched.iterations),
                                     "fit_budget_reserve_s": round(sched.seconds - sched.iterations * s_it
                                                                   + MARGIN * budget_s, 1)},
                           "val": {"every": sched.val_every}}
    if base["train"].get("epochs") is not None:
        cfg["train"]["epochs"] = None
    if sched.max_cases is not None:
        cfg["val"]["max_cases"] = sched.max_cases
    reasons.append(("train.iterations", str(sched.iterations),
                    sched.reason_iterations + f"; {s_it:.3g} s/it: {why_sit}"))
    reasons.append(("val.every", str(sched.val_every),
                    sched.reason_val + (f"; {s_case:.3g} s per case: {why_case}" if n_val else "")))
    if sched.max_cases is not None:
        reasons.append(("val.max_cases", str(sched.max_cases), "validation cases that fit the validation share"))
    reasons.append(("train.time_budget_min", f"{budget_min:g}", "the engine stops cleanly (last.pt saved) before a "
                    "validation round or step that would pass the budget, if the run is slower than measured"))
    reasons.append(("train.fit_budget_after", str(cfg["train"]["fit_budget_after"]),
                    "every this many steps the run times its recent steps and refits train.iterations to end at the "
                    "budget (a trial "
                    "step alone is not the loop: the machine, the data path and the allocator differ), keeping "
                    f"train.fit_budget_reserve_s = {cfg['train']['fit_budget_reserve_s']:g} s for validation and the "
                    f"{MARGIN:.0%} start-up margin"))
    scaled = _scaled_schedule(base, sched.iterations, reasons)
    if scaled:
        cfg["optim"] = scaled
    measured = {"memory_limit_bytes": limit, "memory_limit": why_limit, "trial_peak_bytes": chosen.peak_bytes,
                "memory_model": {"fixed_bytes": fixed, "bytes_per_voxel_image": slope},
                "memory_patch": memory_patch, "memory_patch_iterations": memory_it, "min_iterations": min_iterations,
                "s_per_it": s_it, "s_per_it_source": why_sit, "s_per_val_case": s_case,
                "s_per_val_case_source": why_case if n_val else None, "val_cases": n_val,
                "expected_seconds": sched.seconds, "budget_seconds": budget_s,
                "official": official, "threads": torch.get_num_threads()}
    return Plan(str(data), method, str(dev), hardware_name(str(dev)), float(budget_min), fp, target, median, cfg,
                reasons, measured)


def _shrink_steps(start: list[int], end: list[int], unit: int):
    """The shrink steps from `start` to `end` (for counting them)."""
    p = list(start)
    while p != list(end) and p is not None:
        p = shrink(p, unit)
        yield p


def _scaled_schedule(base: dict[str, Any], iterations: int, reasons: list) -> dict[str, Any]:
    """optim keys counted in iterations, scaled to the planned length so the lr changes at the same fractions of
    the run as in the configured one (a step schedule of 2,500 in a 6,000-iteration config decays twice, in any
    length); the method's own ramp-ups are left as they are."""
    official = int(base["train"]["iterations"] or 1)
    ratio = iterations / max(1, official)
    opt, scaled = base["optim"], {}
    if opt["schedule"] == "step":
        scaled["step_size"] = max(1, round(int(opt["step_size"]) * ratio))
    if opt["schedule"] == "poly" and opt.get("poly_iterations"):
        scaled["poly_iterations"] = max(1, round(int(opt["poly_iterations"]) * ratio))
    if int(opt.get("warmup_iterations") or 0):
        scaled["warmup_iterations"] = max(1, round(int(opt["warmup_iterations"]) * ratio))
    for k, v in scaled.items():
        reasons.append((f"optim.{k}", str(v), f"{opt[k]} in the configured {official} iterations, scaled x{ratio:.3g} "
                        f"to {iterations}: the lr changes at the same fractions of the run; the method's own "
                        "ramp-ups are unchanged"))
    return scaled


def write_plan(plan: Plan, out: str | Path, json_out: str | Path | None = None, force: bool = False) -> Path:
    """Write the plan's YAML (`--config` layer with reasons as comments) and, optionally, its JSON record."""
    out = guard_output_file(out, force)
    if json_out is not None:
        guard_output_file(json_out, force)
    atomic_write_text(out, plan.yaml_text())
    if json_out is not None:
        atomic_write_json(json_out, plan.record())
    return out


def plan_table(plan: Plan) -> Table:
    """The plan as a Rich table: data facts, then each setting with its value and one reason."""
    fp = plan.fingerprint
    table = Table(title=f"plan: {plan.method} on {fp.name}, {plan.device} ({plan.hardware}), "
                        f"{plan.budget_min:g} min", show_lines=False)
    table.add_column("setting")
    table.add_column("value", justify="right")
    table.add_column("reason / source")
    table.add_row("cases", f"{len(fp.case_ids)}", f"splits train + val ({fp.n_labeled} labelled, {fp.n_unlabeled} "
                  "unlabelled); the test split is not read")
    table.add_row("median spacing", "x".join(f"{v:.4g}" for v in fp.median_spacing), "dataset.json, per case")
    table.add_row("median shape", "x".join(f"{v:g}" for v in fp.median_shape), "dataset.json, per case")
    for st in fp.intensity:
        if len(st) > 1:
            table.add_row(f"intensity {st['channel']}", f"{st['mean']:.3g} ± {st['std']:.3g}",
                          f"foreground: median {st['median']:.3g}, 0.5-99.5 % [{st['percentile_00_5']:.3g}, "
                          f"{st['percentile_99_5']:.3g}], min {st['min']:.3g}, max {st['max']:.3g}")
    for fg in fp.foreground:
        table.add_row(f"class {fg['class']}", f"{fg['median_fraction']:.2%}",
                      f"median share of the volume; {fg['median_volume_ml']:.3g} ml, in {fg['cases_with_class']} "
                      f"of {fp.n_labeled} labelled cases")
    table.add_row("shape at target", "x".join(map(str, plan.median_shape)), "median of each case resampled")
    for setting, value, reason in plan.reasons:
        table.add_row(setting, value, reason)
    m = plan.measured
    table.add_row("expected time", f"{m['expected_seconds'] / 60:.1f} min",
                  f"of {plan.budget_min:g} min: iterations x s/it + validations (start-up margin not counted)")
    return table
