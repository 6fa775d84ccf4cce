"""`textseg bench --reference monai`: textseg's sliding window and metrics beside MONAI's, in one run.

MONAI (`pip install 'textseg-cli[monai]'`) is the reference most readers know; every figure here is a ratio
measured side by side in one process, with the outputs compared.

Sliding window. The same network (the method built from seed 0, random weights) and the same random volume go
through `monai.inferers.sliding_window_inference` and through textseg (`inference.predict.predict_case`):

- `textseg`: `predict_case` as `textseg eval/predict` run it (BatchNorm folded, channels-last, `sw_batch_size`
  windows per pass, the precision given);
- `monai_same`: MONAI's window loop around exactly textseg's per-window predictor (the same folded copy,
  memory format and autocast): only the window machinery differs, so its output must equal textseg's;
- `monai_plain`: MONAI's loop around the plain network in fp32 (`method.predict_proba`, no folding, contiguous
  tensors): how a MONAI script would call it.

Windows: MONAI places `ceil((size - roi) / interval) + 1` windows per axis at `min(i * interval, size - roi)`
(`monai.inferers.utils._get_scan_interval`, interval = int(roi · (1 - overlap))) and pads an axis smaller than
the roi symmetrically with the odd voxel high — textseg's rule (the literature's `test_all_case`). So
`overlap = 1 - (stride + 0.5) / roi` per axis gives interval = stride exactly (the + 0.5 keeps int() from
rounding 17.999… down). MONAI's `mode="constant"` averages overlapping windows with a count map, as textseg
does; textseg has no gaussian weighting, so only constant mode is compared (MONAI's `mode="gaussian"` weights
window centres higher and would not give the literature's numbers).

Metrics. Dice and HD95 of synthetic prediction/reference pairs (ellipsoids, anisotropic spacing, distances in
mm) with textseg (`metrics.case.evaluate_case`, equal to medpy) and with `monai.metrics.DiceMetric` and
`HausdorffDistanceMetric(percentile=95)`. Dice agrees exactly on non-empty masks (both empty: textseg 1,
MONAI NaN with its default `ignore_empty`). HD95 differs by definition: both take the same surfaces (the mask
minus its face-connected erosion, within a one-voxel margin of the union's bounding box) and the same Euclidean
distances in mm, but medpy/textseg take the 95th percentile of the two directed distance sets pooled, MONAI the
larger of the two directed 95th percentiles (`directed=False`). So MONAI ≥ textseg; the report also gives
textseg's own distances reduced MONAI's way (`hd95_max_directed`), which must equal MONAI's value.
"""

from __future__ import annotations

import math
import statistics
import warnings
from typing import Any, Callable, Sequence

import numpy as np
import torch

from textseg_cli.bench.benchmark import (
    _case_text,
    _timed,
    default_stride,
    method_config,
)
from textseg_cli.bench.roofline import default_volume, roofline_precisions
from textseg_cli.console import console
from textseg_cli.errors import ConfigError
from textseg_cli.inference.fusion import fused_for_inference
from textseg_cli.inference.predict import predict_case
from textseg_cli.inference.settings import InferenceSettings
from textseg_cli.inference.sliding_window import window_starts
from textseg_cli.methods.registry import build_method, list_methods
from textseg_cli.metrics.case import evaluate_case
from textseg_cli.metrics.surface import surface_distances
from textseg_cli.runtime.device import resolve_device
from textseg_cli.runtime.environment import cpu_model
from textseg_cli.runtime.precision import Precision
from textseg_cli.storage.files import atomic_write_json
from textseg_cli.storage.outputs import guard_output_file

INSTALL_HINT = "--reference monai needs MONAI: pip install 'textseg-cli[monai]'"


def import_monai():
    """The `monai` module, or ConfigError (exit 2) with the install hint when it is not installed."""
    try:
        import monai  # an optional dependency: imported only when --reference monai asks for it
        import monai.inferers
        import monai.metrics
    except ImportError:
        raise ConfigError(INSTALL_HINT) from None
    return monai


def monai_overlap(patch: Sequence[int], stride: Sequence[int]) -> tuple[float, ...]:
    """MONAI's per-axis `overlap` whose scan interval int(roi · (1 - overlap)) equals textseg's `stride`."""
    for p, s in zip(patch, stride):
        if not 1 <= s <= p:
            raise ConfigError(f"--stride {list(stride)}: MONAI's windows cannot leave gaps; each stride must be "
                              f"between 1 and the patch {list(patch)}")
    return tuple(1.0 - (s + 0.5) / p for p, s in zip(patch, stride))


def _predictor(method, prec: Precision, dim: int, decoder=None) -> Callable[[torch.Tensor], torch.Tensor]:
    """textseg's per-window predictor (as `predict_case` builds it): folded BatchNorm, channels-last, autocast."""
    model = fused_for_inference(method)
    fmt = torch.channels_last_3d if dim == 3 else torch.channels_last
    model.to(memory_format=fmt)

    def predict(batch: torch.Tensor) -> torch.Tensor:
        with prec.autocast():
            return model.predict_proba(batch.contiguous(memory_format=fmt), decoder).float().contiguous()

    return predict


def _medians(fns: Sequence[Callable[[], Any]], dev: torch.device, repeats: int) -> list[tuple[float, Any]]:
    """Per function: median seconds of `repeats` calls and its last result. The calls alternate (a, b, a, b, ...)
    so a change in the machine's load hits every variant alike."""
    results: list[Any] = [None] * len(fns)
    times: list[list[float]] = [[] for _ in fns]
    for _ in range(repeats):
        for i, fn in enumerate(fns):
            def call(i: int = i, fn: Callable[[], Any] = fn) -> None:
                results[i] = fn()
            times[i].append(_timed(call, dev))
    return [(statistics.median(t), r) for t, r in zip(times, results)]


def compare_sliding(method, image: torch.Tensor, patch: tuple[int, ...], stride: tuple[int, ...],
                    sw_batch_size: int, precs: Sequence[Precision], dev: torch.device, repeats: int,
                    plain: bool = True) -> dict[str, Any]:
    """Seconds and outputs of textseg's and MONAI's sliding windows on `image` (C, *spatial); see the module
    docstring. Per precision: `textseg_s`, `monai_same_s`, their ratio and the max |difference| of the
    probabilities; `plain` adds MONAI around the plain fp32 network, compared with textseg's fp32 output."""
    monai = import_monai()
    swi = monai.inferers.sliding_window_inference
    overlap = monai_overlap(patch, stride)
    method.to(dev).eval()
    x = image.to(dev, torch.float32)
    out: dict[str, Any] = {"overlap": list(overlap), "mode": "constant", "padding_mode": "constant",
                           "gaussian": "not compared: textseg has no gaussian window weighting", "by_precision": {}}

    def pl_run():  # MONAI around the plain network, fp32, as a MONAI script calls it
        return swi(x[None], patch, sw_batch_size, lambda b: method.predict_proba(b), overlap=overlap,
                   mode="constant")[0]

    fp32_probs = pl = None
    for i, prec in enumerate(precs):
        settings = InferenceSettings(mode="sliding", patch_size=patch, stride=stride, sw_batch_size=sw_batch_size,
                                     precision=prec)
        predict = _predictor(method, prec, len(patch))

        def ts_run(settings=settings):
            return predict_case(method, x, settings, dev)

        def mo_run(predict=predict):
            return swi(x[None], patch, sw_batch_size, predict, overlap=overlap, mode="constant")[0]

        fns = [ts_run, mo_run] + ([pl_run] if plain and i == 0 else [])  # the plain run alternates with the first
        with torch.inference_mode():
            for fn in fns:
                fn()  # warm-up: the folded copy, oneDNN primitives
            timed = _medians(fns, dev, repeats)
        (ts_s, ts_probs), (mo_s, mo_probs) = timed[:2]
        if len(timed) > 2:
            pl = timed[2]
        diff = (ts_probs.float() - mo_probs.float().to(ts_probs.device)).abs()
        out["by_precision"][prec.name] = {
            "textseg_s": ts_s, "monai_same_s": mo_s, "monai_over_textseg": mo_s / ts_s,
            "max_abs_diff": float(diff.max()), "mask_disagreement": float(
                (ts_probs.argmax(0) != mo_probs.to(ts_probs.device).argmax(0)).float().mean())}
        if prec.name == "fp32":
            fp32_probs = ts_probs
    if pl is not None:
        pl_s, pl_probs = pl
        entry: dict[str, Any] = {"s": pl_s}
        for name, r in out["by_precision"].items():
            entry[f"over_textseg_{name}"] = pl_s / r["textseg_s"]
        if fp32_probs is not None:
            entry["max_abs_diff_vs_textseg_fp32"] = float((fp32_probs - pl_probs.to(fp32_probs.device)).abs().max())
        out["monai_plain_fp32"] = entry
    return out


# --- metrics ---------------------------------------------------------------------------------------------

def synthetic_pairs(n: int, shape: Sequence[int], seed: int = 0) -> list[tuple[np.ndarray, np.ndarray]]:
    """`n` (prediction, reference) label maps: a reference ellipsoid and a shifted, resized, noisy prediction."""
    rng = np.random.default_rng(seed)
    grid = np.meshgrid(*(np.arange(s, dtype=np.float32) for s in shape), indexing="ij")
    pairs = []
    for _ in range(n):
        centre = [s * rng.uniform(0.4, 0.6) for s in shape]
        axes = [s * rng.uniform(0.15, 0.3) for s in shape]
        ref = sum(((g - c) / a) ** 2 for g, c, a in zip(grid, centre, axes)) <= 1.0
        shift = [c + s * rng.uniform(-0.05, 0.05) for c, s in zip(centre, shape)]
        scale = [a * rng.uniform(0.85, 1.15) for a in axes]
        pred = sum(((g - c) / a) ** 2 for g, c, a in zip(grid, shift, scale)) <= 1.0
        pred ^= rng.random(shape) < 0.002  # scattered false positives/negatives: a long distance tail
        pairs.append((pred.astype(np.uint8), ref.astype(np.uint8)))
    return pairs


def compare_metrics(pairs: Sequence[tuple[np.ndarray, np.ndarray]], spacing: Sequence[float],
                    repeats: int) -> dict[str, Any]:
    """Dice and HD95 (mm) of `pairs` with textseg and with MONAI: per-case values, the largest differences and
    the seconds of each (median of `repeats` passes over all pairs)."""
    monai = import_monai()
    spacing = [float(s) for s in spacing]
    dice_metric = monai.metrics.DiceMetric(include_background=False, reduction="none")
    hd_metric = monai.metrics.HausdorffDistanceMetric(include_background=False, percentile=95, reduction="none")

    def textseg_pass():
        return [evaluate_case(p, r, 2, spacing, metrics=("dice", "hd95"))[0] for p, r in pairs]

    def monai_pass():
        rows = []
        for p, r in pairs:
            yp = torch.nn.functional.one_hot(torch.from_numpy(p).long(), 2).movedim(-1, 0)[None]
            yr = torch.nn.functional.one_hot(torch.from_numpy(r).long(), 2).movedim(-1, 0)[None]
            rows.append((float(dice_metric(yp, yr)[0, 0]), float(hd_metric(yp, yr, spacing=spacing)[0, 0])))
        return rows

    cpu = torch.device("cpu")
    with warnings.catch_warnings():  # MONAI 1.5+ warns about its own deprecated argument on every call
        warnings.simplefilter("ignore", FutureWarning)
        (ts_s, ts_rows), (mo_s, mo_rows) = _medians([textseg_pass, monai_pass], cpu, repeats)
    directed = []
    for p, r in pairs:
        sd = surface_distances(p, r, spacing)
        directed.append(max(float(np.percentile(sd.pred_to_ref, 95)), float(np.percentile(sd.ref_to_pred, 95))))
    cases = [{"dice_textseg": t["dice"], "dice_monai": m[0], "hd95_textseg": t["hd95"], "hd95_monai": m[1],
              "hd95_max_directed": d} for t, m, d in zip(ts_rows, mo_rows, directed)]
    return {
        "cases": len(pairs), "shape": list(pairs[0][0].shape) if pairs else None, "spacing": spacing,
        "textseg_s": ts_s, "monai_s": mo_s, "monai_over_textseg": mo_s / ts_s,
        "dice_max_abs_diff": max(abs(c["dice_textseg"] - c["dice_monai"]) for c in cases),
        "hd95_max_abs_diff": max(abs(c["hd95_textseg"] - c["hd95_monai"]) for c in cases),
        "hd95_monai_minus_textseg_mean": statistics.fmean(c["hd95_monai"] - c["hd95_textseg"] for c in cases),
        "hd95_max_directed_vs_monai_max_abs_diff": max(abs(c["hd95_max_directed"] - c["hd95_monai"])
                                                       for c in cases),
        "per_case": cases,
    }


# --- the report ------------------------------------------------------------------------------------------

def run_monai_reference(method: str = "mcnet", patch: Sequence[int] = (112, 112, 80), device: str | None = None,
                        volume: Sequence[int] | None = None, stride: Sequence[int] | None = None,
                        sw_batch_size: int = 4, precision: str = "auto", repeats: int = 3, in_channels: int = 1,
                        num_classes: int = 2, sets: Sequence[str] = (), metric_cases: int = 8,
                        metric_shape: Sequence[int] | None = None, spacing: Sequence[float] = (0.8, 0.8, 2.0),
                        json_out=None, force: bool = False, log: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Sliding window and metrics side by side with MONAI (module docstring); returns (and optionally writes as
    JSON) the report. `precision`: auto (fp32, plus bf16 where the device has bf16 units), fp32, bf16 or
    fp32,bf16. The metrics run on `metric_cases` synthetic pairs of `metric_shape` (default: the volume)."""
    import_monai()
    if method not in list_methods():
        raise ConfigError(f"unknown method '{method}'; available: {', '.join(list_methods()) or 'none registered'}")
    patch = tuple(int(p) for p in patch)
    volume = tuple(int(v) for v in volume) if volume is not None else default_volume(patch)
    stride = tuple(int(s) for s in stride) if stride is not None else default_stride(patch)
    if len(volume) != len(patch) or len(stride) != len(patch):
        raise ConfigError(f"--volume {list(volume)} and --stride {list(stride)} need one size per axis of --patch "
                          f"{list(patch)}")
    if repeats < 1 or metric_cases < 1:
        raise ConfigError("--repeats must be >= 1")
    if json_out is not None:
        guard_output_file(json_out, force)
    dev = torch.device(resolve_device(device or "cpu"))
    log = log or (lambda msg: None)
    precs = roofline_precisions(precision, dev)
    cfg = method_config(method, patch, sets)
    torch.manual_seed(0)
    m = build_method(method, cfg, in_channels, num_classes, dim=len(patch), quiet_warnings=True)
    if callable(getattr(m, "set_case_text", None)):
        m.set_case_text(_case_text(0))
    image = torch.rand((in_channels,) + volume, generator=torch.Generator().manual_seed(1))
    windows = math.prod(len(window_starts(max(v, p), p, s)) for v, p, s in zip(volume, patch, stride))
    log(f"sliding window on {list(volume)}, patch {list(patch)}, stride {list(stride)} ({windows} windows): "
        f"textseg vs MONAI, {', '.join(p.name for p in precs)}, median of {repeats}")
    sliding = compare_sliding(m, image, patch, stride, sw_batch_size, precs, dev, repeats)
    shape = tuple(int(s) for s in metric_shape) if metric_shape is not None else volume
    log(f"metrics: Dice and HD95 of {metric_cases} synthetic pairs of {list(shape)}, spacing {list(spacing)} mm")
    metrics = compare_metrics(synthetic_pairs(metric_cases, shape), list(spacing)[:len(shape)], repeats)
    report = {"reference": "monai", "monai": import_monai().__version__, "torch": torch.__version__,
              "method": method, "patch": list(patch), "volume": list(volume), "stride": list(stride),
              "windows": windows, "sw_batch_size": sw_batch_size, "repeats": repeats, "device": str(dev),
              "device_name": torch.cuda.get_device_name(dev) if dev.type == "cuda" else cpu_model(),
              "threads": torch.get_num_threads(), "sliding": sliding, "metrics": metrics}
    if json_out is not None:
        atomic_write_json(json_out, report)
    return report


def print_monai(report: dict[str, Any], out=None) -> None:
    """One line per comparison: seconds ratio and agreement."""
    out = out or console
    sw = report["sliding"]
    out.print(f"sliding window, {report['windows']} windows of {report['patch']} on {report['volume']} "
              f"(MONAI mode=constant, overlap {[round(o, 4) for o in sw['overlap']]}; gaussian not compared: "
              f"textseg has no gaussian weighting), median of {report['repeats']}:", highlight=False)
    for name, r in sw["by_precision"].items():
        out.print(f"  {name}: textseg {r['textseg_s']:.3g} s, MONAI same predictor {r['monai_same_s']:.3g} s "
                  f"-> MONAI/textseg {r['monai_over_textseg']:.2f}x; max |diff| {r['max_abs_diff']:.2e}, "
                  f"mask disagreement {r['mask_disagreement']:.2e}", highlight=False)
    if "monai_plain_fp32" in sw:
        p = sw["monai_plain_fp32"]
        ratios = ", ".join(f"{v:.2f}x textseg {k.rsplit('_', 1)[-1]}" for k, v in p.items()
                           if k.startswith("over_textseg_"))
        diff = p.get("max_abs_diff_vs_textseg_fp32")
        out.print(f"  MONAI around the plain fp32 network: {p['s']:.3g} s ({ratios})"
                  + ("" if diff is None else f"; max |diff| vs textseg fp32 {diff:.2e}"), highlight=False)
    mt = report["metrics"]
    out.print(f"metrics, {mt['cases']} pairs of {mt['shape']}, spacing {mt['spacing']} mm: textseg "
              f"{mt['textseg_s']:.3g} s, MONAI {mt['monai_s']:.3g} s -> MONAI/textseg {mt['monai_over_textseg']:.2f}x; "
              f"Dice max |diff| {mt['dice_max_abs_diff']:.2e}; HD95 max |diff| {mt['hd95_max_abs_diff']:.3g} mm "
              f"(MONAI - textseg mean {mt['hd95_monai_minus_textseg_mean']:+.3g} mm: max of directed 95th "
              f"percentiles vs pooled; textseg reduced MONAI's way differs by "
              f"{mt['hd95_max_directed_vs_monai_max_abs_diff']:.2e})", highlight=False)
