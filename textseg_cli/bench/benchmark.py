"""`textseg bench`: training speed, peak memory and inference time of a method on random data.

No data set is needed: a random two-stream batch of the chosen patch size drives the method's own
`training_step` (forward + loss), backward and an SGD step, and a random volume is segmented with
the literature's sliding window and with one whole-volume pass. Each figure is the median of
`repeats` timed runs after one untimed warm-up.

Methods with a cache of frozen-encoder features (tgcnet's CLIP) are timed with the cache on and off:
the batch repeats every iteration, so after the warm-up the cached run serves every CLIP feature from
memory, as in every epoch after the first.
"""

from __future__ import annotations

import ctypes
import gc
import platform
import resource
import statistics
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from rich.table import Table

from textseg_cli.bench.reference import (
    reference_sliding_window,
    reference_train_step,
)
from textseg_cli.console import console
from textseg_cli.data.batch import Batch
from textseg_cli.errors import ConfigError
from textseg_cli.inference.predict import predict_case
from textseg_cli.inference.settings import InferenceSettings
from textseg_cli.inference.sliding_window import window_starts
from textseg_cli.methods.base import StepContext
from textseg_cli.methods.registry import build_method, list_methods
from textseg_cli.runs.config import build_config
from textseg_cli.runs.config import default_stride as half_patch_stride
from textseg_cli.runtime.device import resolve_device
from textseg_cli.runtime.environment import cpu_model
from textseg_cli.runtime.precision import (
    Precision,
    channels_last,
    resolve_precision,
    to_channels_last,
)
from textseg_cli.storage.files import atomic_write_json
from textseg_cli.storage.outputs import guard_output_file

# The sliding-window strides the papers use for these patch sizes (LA; Pancreas-CT).
LITERATURE_STRIDES: dict[tuple[int, ...], tuple[int, ...]] = {
    (112, 112, 80): (18, 18, 4),
    (96, 96, 96): (16, 16, 16),
}


def default_stride(patch: Sequence[int]) -> tuple[int, ...]:
    """The papers' stride for their patch sizes (LITERATURE_STRIDES), else the run default (half the patch,
    rounded up: `textseg_cli.runs.config.default_stride`, as `textseg train` records it)."""
    patch = tuple(int(p) for p in patch)
    return LITERATURE_STRIDES.get(patch) or half_patch_stride(patch)


def method_config(name: str, patch: Sequence[int], sets: Sequence[str] = ()) -> dict[str, Any]:
    """The run config `textseg train` would resolve for `name` (packaged defaults, no data-set profile
    unless `sets` names one with data.profile=...)."""
    return build_config(name, None, len(patch), [int(p) for p in patch], sets=list(sets))


def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def _timed(fn: Callable[[], Any], dev: torch.device) -> float:
    _sync(dev)
    t0 = time.perf_counter()
    fn()
    _sync(dev)
    return time.perf_counter() - t0


def _reset_peak_rss() -> None:
    """Return freed heap to the OS and restart the peak-RSS count (Linux: VmHWM), so each variant's
    peak is its own; elsewhere the process-wide peak is reported."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
        Path("/proc/self/clear_refs").write_text("5")
    except (OSError, AttributeError):
        pass


def _peak_rss_mb() -> float:
    try:
        for line in Path("/proc/self/status").read_text(encoding="utf-8").splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return rss / (1024 * 1024) if platform.system() == "Darwin" else rss / 1024


def _feature_caches(method) -> list:
    """Modules of `method` that cache frozen-encoder features (they expose `use_cache`)."""
    return [m for m in method.modules() if hasattr(m, "use_cache") and hasattr(m, "cache")]


def _case_text(i: int) -> str:
    return f"case {i}: two lesions, upper left and lower right."


def _random_batch(in_channels: int, num_classes: int, patch: tuple[int, ...], n_l: int, n_u: int, dev: torch.device):

    gen = torch.Generator().manual_seed(0)
    return Batch(image_l=torch.rand((n_l, in_channels) + patch, generator=gen),
                 label_l=torch.randint(0, num_classes, (n_l,) + patch, generator=gen),
                 image_u=torch.rand((n_u, in_channels) + patch, generator=gen),
                 ids_l=[f"l{i}" for i in range(n_l)], ids_u=[f"u{i}" for i in range(n_u)],
                 text_l=[_case_text(i) for i in range(n_l)], text_u=[_case_text(n_l + i) for i in range(n_u)]).to(dev)


def _bench_training(method, batch, dev: torch.device, iterations: int, repeats: int, prec: Precision,
                    reference: bool = False) -> dict[str, Any]:
    """Median seconds per step of `method`: textseg's step under `prec` (channels-last and bf16 autocast as
    resolved), or with `reference` the papers' step (fp32, contiguous;
    `textseg_cli.bench.reference.reference_train_step`). Keys get a "ref_" prefix for the reference."""
    method.to(dev)
    if dev.type == "cuda":
        torch.backends.cudnn.benchmark = True
    if not reference and prec.channels_last:
        to_channels_last(method)
        batch.image_l, batch.image_u = channels_last(batch.image_l), channels_last(batch.image_u)
    method.train()
    opt = torch.optim.SGD(method.param_groups(), lr=0.01, momentum=0.9, weight_decay=1e-4)
    total = (1 + repeats) * iterations
    step_no = [0]

    def step() -> None:
        ctx = StepContext(iteration=step_no[0], max_iterations=total, device=dev)
        if reference:
            reference_train_step(method, batch, opt, ctx)
        else:
            with prec.autocast():
                out = method.training_step(batch, ctx)
            out["loss"].float().backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            method.on_after_optimizer_step(ctx)
        step_no[0] += 1

    def run() -> None:
        for _ in range(iterations):
            step()

    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    run()  # warm-up: cudnn autotuning, allocator growth, feature caches filled
    times = [_timed(run, dev) for _ in range(repeats)]
    med = statistics.median(times)
    peak = torch.cuda.max_memory_allocated(dev) / 2**20 if dev.type == "cuda" else _peak_rss_mb()
    pre = "ref_" if reference else ""
    return {f"{pre}train_it_per_s": iterations / med, f"{pre}train_s_per_it": med / iterations,
            f"{pre}train_images_per_s": iterations * batch.image_l.shape[0] / med, f"{pre}train_times_s": times,
            f"{pre}train_peak_mem_mb": peak}


def _bench_inference(method, volume: tuple[int, ...], patch, stride, sw_batch_size: int, dev: torch.device,
                     repeats: int, modes: Sequence[str], precisions: Sequence[Precision]) -> dict[str, Any]:
    """Median seconds per volume for each mode under `precisions[0]` (the resolved --precision); a second entry
    (fp32, with --reference when the first is bf16) times sliding windows at fp32 too ("sliding_fp32_*")."""
    image = torch.rand((method.in_channels,) + volume, generator=torch.Generator().manual_seed(1))
    method.eval()
    if callable(getattr(method, "set_case_text", None)):
        method.set_case_text(_case_text(0))
    out: dict[str, Any] = {"windows": int(torch.tensor([len(window_starts(max(v, p), p, s))
                                                        for v, p, s in zip(volume, patch, stride)]).prod())}
    resolved = precisions[0]
    variants = [(mode, resolved) for mode in modes]
    if len(precisions) > 1 and "sliding" in modes and resolved.name != precisions[1].name:
        variants.insert(1, ("sliding", precisions[1]))  # the fp32 ratio is measured in the same run
    for mode, prec in variants:
        settings = InferenceSettings(mode=mode, patch_size=tuple(patch), stride=tuple(stride),
                                     sw_batch_size=sw_batch_size, precision=prec)
        if dev.type == "cuda":
            torch.cuda.reset_peak_memory_stats(dev)
        else:
            _reset_peak_rss()
        run = lambda: predict_case(method, image, settings, dev)  # noqa: E731
        if dev.type == "cuda":
            run()  # warm-up (cudnn autotuning); on CPU a warm-up would only double a long wait
        times = [_timed(run, dev) for _ in range(repeats)]
        key = mode if prec is resolved else f"{mode}_{prec.name}"
        out[f"{key}_s"] = statistics.median(times)
        out[f"{key}_times_s"] = times
        out[f"{key}_peak_mem_mb"] = (torch.cuda.max_memory_allocated(dev) / 2**20 if dev.type == "cuda"
                                     else _peak_rss_mb())
    if "sliding_s" in out and "whole_s" in out:
        out["whole_speedup"] = out["sliding_s"] / out["whole_s"]
    return out


def _bench_reference_sliding(method, volume: tuple[int, ...], patch, stride, dev: torch.device,
                             repeats: int) -> dict[str, Any]:
    """The papers' window loop (`textseg_cli.bench.reference.reference_sliding_window`) on the same random volume."""

    image = torch.rand((method.in_channels,) + volume, generator=torch.Generator().manual_seed(1)).numpy()
    if callable(getattr(method, "set_case_text", None)):
        method.set_case_text(_case_text(0))
    method.to(dev)
    times = [_timed(lambda: reference_sliding_window(method, image, patch, stride), dev) for _ in range(repeats)]
    return {"ref_sliding_s": statistics.median(times), "ref_sliding_times_s": times,
            "ref_sliding_peak_mem_mb": (torch.cuda.max_memory_allocated(dev) / 2**20 if dev.type == "cuda"
                                        else _peak_rss_mb())}


def run_benchmark(method: str = "mcnet", patch: Sequence[int] = (112, 112, 80), batch: tuple[int, int] = (2, 2),
                  iterations: int = 5, repeats: int = 3, device: str | None = None,
                  volume: Sequence[int] | None = (140, 140, 88), stride: Sequence[int] | None = None,
                  sw_batch_size: int = 4, in_channels: int = 1, num_classes: int = 2, train: bool = True,
                  inference_modes: Sequence[str] = ("sliding", "whole"), precision: str = "auto",
                  sets: Sequence[str] = (), feature_cache: str = "both", json_out: str | Path | None = None,
                  force: bool = False, log: Callable[[str], None] | None = None,
                  reference: bool = False) -> dict[str, Any]:
    """Benchmark `method` on random data; returns (and optionally writes as JSON) the figures.

    `device` None benchmarks the CPU and, when available, CUDA. Training: `iterations` steps of a batch
    of `batch` = (labeled, unlabeled) patches per timed run. Inference: one `volume` with sliding windows
    (`stride` defaults to the literature's for LA/Pancreas patches, else half the patch) and whole-volume.
    Memory: CUDA peak allocated by torch; on CPU the process's peak resident set size. `precision`
    (auto | fp32 | bf16, `textseg_cli.runtime.precision`) applies to training and inference. `reference` also
    times the papers' training step and sliding-window loop (`textseg_cli.bench.reference`) on a fresh
    copy of the method built from the same seed, and reports textseg's speed-ups over them
    (`*_speedup_vs_reference`); sliding windows are then also timed at fp32 when `precision` resolves to bf16.
    `sets` are `--set` config overrides (e.g. method.clip_model=tiny). `feature_cache` ("both", "on",
    "off") applies to methods that cache frozen-encoder features; each variant is a freshly built method.
    """

    if method not in list_methods():
        raise ConfigError(f"unknown method '{method}'; available: {', '.join(list_methods()) or 'none registered'}")
    patch = tuple(int(p) for p in patch)
    if len(patch) not in (2, 3):
        raise ConfigError(f"--patch needs 2 or 3 sizes, got {list(patch)}")
    stride = tuple(int(s) for s in stride) if stride is not None else default_stride(patch)
    volume = tuple(int(v) for v in volume) if volume is not None else None
    for name, val in (("--stride", stride), ("--volume", volume)):
        if val is not None and len(val) != len(patch):
            raise ConfigError(f"{name} {list(val)} must have as many sizes as --patch {list(patch)}")
    if iterations < 1 or repeats < 1:
        raise ConfigError("--iterations and --repeats must be >= 1")
    if feature_cache not in ("both", "on", "off"):
        raise ConfigError(f"--feature-cache {feature_cache!r}: expected both, on or off")
    if json_out is not None:
        guard_output_file(json_out, force)
    if device is None:
        devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    else:
        if device not in ("cpu", "cuda"):
            raise ConfigError(f"--device must be cpu or cuda, got {device!r}")
        devices = [str(resolve_device(device))]  # refuses cuda on a machine without CUDA
    log = log or (lambda msg: None)
    cfg = method_config(method, patch, sets)
    n_l, n_u = (int(b) for b in batch)

    results = []
    for dev_name in devices:
        dev = torch.device(dev_name)
        prec = resolve_precision(precision, dev)  # once per device, passed to training and inference
        precisions = [prec] + ([resolve_precision("fp32", dev)] if reference and prec.bf16 else [])
        for cache in (["on", "off"] if feature_cache == "both" else [feature_cache]):
            hardware = torch.cuda.get_device_name(dev) if dev.type == "cuda" else cpu_model()
            row: dict[str, Any] = {"device": dev_name, "feature_cache": None, "device_name": hardware,
                                   "threads": torch.get_num_threads(), "precision": prec.name,
                                   "precision_detail": prec.record(),
                                   "memory": "torch peak allocated" if dev.type == "cuda" else "process peak RSS"}
            for ref in ([True, False] if reference else [False]):
                _reset_peak_rss()
                torch.manual_seed(0)
                m = build_method(method, cfg, in_channels, num_classes, dim=len(patch), quiet_warnings=True)
                caches = _feature_caches(m)
                for c in caches:
                    c.use_cache = cache == "on"
                label = dev_name + (f", cache {cache}" if caches else "")
                row["label"], row["feature_cache"] = label, cache if caches else None
                who = "papers' reference" if ref else f"textseg {prec.name}"
                if train:
                    log(f"[{label}] training ({who}): {repeats} x {iterations} iteration(s) of {n_l}+{n_u} x "
                        f"{list(patch)}")
                    row.update(_bench_training(m, _random_batch(in_channels, num_classes, patch, n_l, n_u, dev),
                                               dev, iterations, repeats, prec, reference=ref))
                if volume is not None and ref and "sliding" in inference_modes:
                    log(f"[{label}] inference on {list(volume)} ({who}): sliding x {repeats}")
                    _reset_peak_rss()
                    row.update(_bench_reference_sliding(m, volume, patch, stride, dev, repeats))
                elif volume is not None and inference_modes and not ref:
                    log(f"[{label}] inference on {list(volume)}: {', '.join(inference_modes)} x {repeats}")
                    row.update(_bench_inference(m, volume, patch, stride, sw_batch_size, dev, repeats,
                                                inference_modes, precisions))
                if caches and not ref:  # proof the switch took: a cache that is on serves hits, one that is off none
                    row["feature_cache_hits"] = sum(c.cache.hits for c in caches)
                    row["feature_cache_misses"] = sum(c.cache.misses for c in caches)
                del m, caches
                if dev.type == "cuda":
                    torch.cuda.empty_cache()
            if reference and train:
                row["train_speedup_vs_reference"] = row["ref_train_s_per_it"] / row["train_s_per_it"]
            for key in ("sliding", "sliding_fp32"):
                if "ref_sliding_s" in row and f"{key}_s" in row:
                    row[f"{key}_speedup_vs_reference"] = row["ref_sliding_s"] / row[f"{key}_s"]
            results.append(row)
            if row["feature_cache"] is None:
                break  # nothing to switch: one run per device

    report = {"method": method, "patch": list(patch), "batch": {"labeled": n_l, "unlabeled": n_u},
              "volume": list(volume) if volume else None, "stride": list(stride), "sw_batch_size": sw_batch_size,
              "precision": precision, "reference": reference, "iterations": iterations, "repeats": repeats,
              "in_channels": in_channels, "num_classes": num_classes, "torch": torch.__version__, "results": results}
    if json_out is not None:
        atomic_write_json(json_out, report)
    return report


def print_benchmark(report: dict[str, Any]) -> None:
    """Print a benchmark report as a Rich table: one row per measure, one column per device (medians)."""


    b = report["batch"]
    title = (f"{report['method']}: patch {report['patch']}, batch {b['labeled']}+{b['unlabeled']}, "
             f"volume {report['volume']}, stride {report['stride']}; median of {report['repeats']}")
    table = Table(title=title)
    table.add_column("measure")
    for row in report["results"]:
        table.add_column(row.get("label", row["device"]), justify="right")
    measures = [("device_name", "hardware"), ("threads", "threads"), ("precision", "precision"),
                ("train_it_per_s", "train it/s"), ("train_s_per_it", "train s/it"),
                ("ref_train_s_per_it", "papers' step s/it (fp32)"), ("train_speedup_vs_reference", "train speed-up"),
                ("train_images_per_s", "train images/s"), ("train_peak_mem_mb", "train peak MiB"),
                ("ref_train_peak_mem_mb", "papers' step peak MiB"), ("windows", "windows"),
                ("sliding_s", "sliding s/volume"), ("sliding_fp32_s", "sliding fp32 s/volume"),
                ("ref_sliding_s", "papers' loop s/volume"), ("sliding_speedup_vs_reference", "sliding speed-up"),
                ("sliding_fp32_speedup_vs_reference", "sliding fp32 speed-up"),
                ("whole_s", "whole s/volume"), ("whole_speedup", "whole speed-up"), ("memory", "memory measured")]
    for key, label in measures:
        values = [row.get(key) for row in report["results"]]
        if all(v is None for v in values):
            continue
        table.add_row(label, *("-" if v is None else f"{v:.3g}" if isinstance(v, float) else str(v) for v in values))
    console.print(table)
    print_ratios(report, console)


def print_ratios(report: dict[str, Any], console) -> None:
    """One line per speed-up over the papers' reference measured in the run (`--reference`)."""
    for row in report["results"]:
        for key, what in (("train", "training step"), ("sliding", "sliding window"),
                          ("sliding_fp32", "sliding window at fp32")):
            ratio = row.get(f"{key}_speedup_vs_reference")
            if ratio is not None:
                console.print(f"[{row['label']}] {what}: {ratio:.2f}x the papers' "
                              f"{'step' if key == 'train' else 'loop'}", highlight=False)
