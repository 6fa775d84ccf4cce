"""`textseg export RUN`: the trained network as a file that runs without textseg, a `predict.py` that segments a
NIfTI with it as `textseg predict` does, and plain weights; every file is checked by loading it back.

Writes to `OUT` (default `RUN/export/`):

    model.pt2              (--format torch-export) a `torch.export` program with dynamic shapes: any
                           batch and any spatial size that is a multiple of the network's `inference.multiple`
                           (16 for the V-Net/U-Net family); load with `torch.export.load(path).module()`
    model.onnx             (--format onnx; the `onnx` extra) the same through `torch.onnx.export(dynamo=True)`,
                           dynamic axes alike; run with onnxruntime
    model.torchscript.pt   (--format torchscript, the default; for C++) `torch.jit.trace` at (sw_batch, C, *patch);
                           `export.json` `dynamic` says whether the trace also holds at another shape (checked) or
                           must be fed that shape (PyTorch deprecates TorchScript and warns on load)
    predict.py             self-contained (torch + numpy + nibabel; SimpleITK optional): replays the data set's
                           preprocessing, the run's sliding windows, argmax and post-processing, and writes the mask
                           on the input's grid (`python predict.py IMAGE.nii.gz --out MASK.nii.gz`)
    weights.pt             `method.state_dict()`; load with `textseg_cli.runs.load.load_run(RUN)` or
                           `build_method(name, config, in_channels, num_classes, dim=...)` + `load_state_dict`
    export.json            method, decoder, input/output, dynamic shapes, class and channel names, the inference
                           settings and preprocessing chain predict.py replays, and the load-back checks

Model input: (B, C, *spatial) float32 preprocessed like the training data; output: (B, K, *spatial) softmax
probabilities, float32. The load-back check runs the exported file and the run's method on two seeded inputs, the
traced shape and a second one (other batch, each axis one multiple larger); a difference above `atol` is an error.
"""

from __future__ import annotations

import contextlib
import math
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from textseg_cli.errors import ConfigError
from textseg_cli.inference import export_predict_template, replay
from textseg_cli.inference.postprocessing import read_postprocessing
from textseg_cli.inference.settings import InferenceSettings, resolve_preset
from textseg_cli.runs.load import load_run
from textseg_cli.storage.files import atomic_path, atomic_write_json, atomic_write_text
from textseg_cli.storage.outputs import prepare_output_dir

FORMATS = ("torchscript", "torch-export", "onnx")
FILES = {"torchscript": "model.torchscript.pt", "torch-export": "model.pt2", "onnx": "model.onnx"}
MAX_BLOCKS = 4096  # upper bound of each dynamic spatial axis, in multiples (16 x 4096 voxels: no practical limit)


class _Probabilities(nn.Module):
    def __init__(self, method: nn.Module, decoder: Any):
        super().__init__()
        self.method, self.decoder = method, decoder

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.method.predict_proba(x, self.decoder)


def _size_oblivious() -> contextlib.AbstractContextManager:
    """Export without specialising an axis of one multiple (a 16-voxel axis has size 1 at the V-Net bottleneck,
    which torch.export would otherwise pin); a no-op where this PyTorch lacks the switch."""
    try:
        import torch.fx.experimental._config as fx_config  # torch's own private switch, probed
    except ImportError:  # pragma: no cover - older/newer PyTorch
        return contextlib.nullcontext()
    if not hasattr(fx_config, "backed_size_oblivious"):  # pragma: no cover
        return contextlib.nullcontext()
    return fx_config.patch(backed_size_oblivious=True)


def _dynamic_shapes(patch: tuple[int, ...], multiple: int, spatial: bool) -> dict[str, dict[int, Any]]:
    """Batch free; with `spatial` each spatial axis `multiple` x a free count when the patch is such a multiple,
    else automatic."""
    Dim = torch.export.Dim
    shapes: dict[int, Any] = {0: Dim("batch", min=1, max=65536)}
    for i, p in enumerate(patch if spatial else ()):
        if p % multiple == 0:
            shapes[i + 2] = multiple * Dim(f"blocks{i}", min=1, max=MAX_BLOCKS)
        else:
            shapes[i + 2] = Dim.AUTO
    return {"x": shapes}


def _export(fmt: str, wrapper: nn.Module, x: torch.Tensor, path: Path, multiple: int, spatial: bool = True) -> Callable:
    """Write `path` and return the loaded-back callable; `spatial` False keeps the spatial axes at x's."""
    patch = tuple(x.shape[2:])
    if fmt == "torchscript":
        with torch.no_grad():
            traced = torch.jit.trace(wrapper, x, check_trace=False)
        with atomic_path(path) as tmp:
            torch.jit.save(traced, str(tmp))
        return torch.jit.load(str(path), map_location="cpu").eval()
    if fmt == "torch-export":
        with torch.no_grad(), _size_oblivious():
            program = torch.export.export(wrapper, (x,), dynamic_shapes=_dynamic_shapes(patch, multiple, spatial))
        with atomic_path(path, suffix=".pt2") as tmp:
            torch.export.save(program, str(tmp))
        return torch.export.load(str(path)).module()
    try:
        import onnxruntime as ort  # optional extra, only for --format onnx
    except ImportError:
        raise ConfigError("--format onnx needs onnx, onnxscript and onnxruntime: pip install 'textseg-cli[onnx]'") from None
    with torch.no_grad(), _size_oblivious(), warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # onnxscript's own deprecations, not the user's
        program = torch.onnx.export(wrapper, (x,), dynamo=True, dynamic_shapes=_dynamic_shapes(patch, multiple, spatial),
                                    input_names=["x"], output_names=["probabilities"], verbose=False)
    with atomic_path(path, suffix=".onnx") as tmp:
        program.save(str(tmp))
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])

    def run_onnx(t: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(session.run(None, {"x": t.numpy()})[0])
    return run_onnx


def _diff(loaded: Callable, wrapper: nn.Module, x: torch.Tensor) -> float:
    with torch.inference_mode():
        ref = wrapper(x)
        got = loaded(x)
    if tuple(got.shape) != tuple(ref.shape):
        return math.inf
    return float((got - ref).abs().max())


def export_run(run_dir: str | Path, out: str | Path | None = None, fmt: str = "torchscript",
               checkpoint: str = "best", decoder: int | str | None = None, force: bool = False,
               atol: float = 1e-4, inference: str | None = None) -> dict[str, Any]:
    """Export a run (see module docstring); returns the export.json record. `inference` (paper | best | sliding |
    whole, default the run's) sets the windows, blending, TTA and post-processing predict.py replays."""

    if fmt not in FORMATS:
        raise ConfigError(f"--format {fmt!r}: expected one of {', '.join(FORMATS)}")
    run = load_run(run_dir, checkpoint, device="cpu")
    method, ds = run.method.eval(), run.dataset
    record_pp = read_postprocessing(run_dir) if resolve_preset(run.config, inference) == "best" else None
    inf = InferenceSettings.from_config(run.config, decoder=decoder, ndim=ds.dim, mode=inference,
                                        postprocessing=record_pp)
    if inf.patch_size is None:
        raise ConfigError("the run records no patch size (inference.patch_size / data.patch_size) to trace with")
    patch, multiple = inf.patch_size, int(inf.multiple)
    sw_batch = int(inf.sw_batch_size or (1 if inf.mode == "whole" else 4))
    out = Path(out) if out is not None else Path(run_dir) / "export"
    prepare_output_dir(out, force=force)
    wrapper = _Probabilities(method, inf.decoder).eval()
    # checked: the windows predict.py sends, and a second shape; TorchScript is traced at the first, torch.export
    # and ONNX at a batch of 2 and at least 2 multiples per axis (a size of 1 there would be pinned, not dynamic)
    batch = sw_batch
    x = torch.randn((batch, ds.in_channels) + patch, generator=torch.Generator().manual_seed(0))
    second = torch.randn((batch + 1, ds.in_channels) + tuple(p + multiple for p in patch),
                         generator=torch.Generator().manual_seed(1))
    example = x if fmt == "torchscript" else torch.randn(
        (2, ds.in_channels) + tuple(max(p, 2 * multiple) if p % multiple == 0 else p for p in patch),
        generator=torch.Generator().manual_seed(2))
    path = out / FILES[fmt]
    with warnings.catch_warnings():
        # PyTorch marks TorchScript deprecated: every torch.jit.trace/save/load raises a FutureWarning. --format
        # torchscript asks for exactly that file (it loads without textseg, also from C++), and the load-back check
        # must read the file written, so those deprecations and only those are silenced; --format torch-export is
        # the successor and needs no filter. Other warnings (e.g. the model's own while traced) stay visible.
        warnings.filterwarnings("ignore", message=r"`torch\.jit\.\w+` is deprecated", category=FutureWarning)
        try:
            loaded = _export(fmt, wrapper, example, path, multiple)
            fixed_why = None
            try:
                diff = _diff(loaded, wrapper, x)
            except Exception as exc:  # a guard of the dynamic program refuses the patch itself (e.g. 16^3 in V-Net)
                if fmt == "torchscript":
                    raise
                fixed_why = f"the dynamic program refuses the patch ({type(exc).__name__}); spatial axes fixed"
                loaded = _export(fmt, wrapper, torch.cat([x[:1], x[:1]]), path, multiple, spatial=False)
                diff = _diff(loaded, wrapper, x)
        except ConfigError:
            raise
        except Exception as exc:  # the exporter's refusal (data-dependent control flow, unsupported op)
            raise ConfigError(f"{fmt} cannot export this method ({type(exc).__name__}: {str(exc).splitlines()[0]})"
                              "; try another --format") from exc
        if fixed_why is not None:  # still check another batch at the patch
            second = torch.randn((batch + 1, ds.in_channels) + patch, generator=torch.Generator().manual_seed(1))
        try:
            diff2 = _diff(loaded, wrapper, second)
        except Exception as exc:  # a trace that holds at its own shape only
            diff2, fixed_why = None, f"{type(exc).__name__} at {list(second.shape)}"
    if diff2 is not None and not diff2 <= atol:
        if fmt != "torchscript":
            raise ConfigError(f"the exported model differs from the run's by {diff2:.3g} (> {atol}) at shape "
                              f"{list(second.shape)}", path)
        diff2, fixed_why = None, f"differs by {diff2:.3g} at {list(second.shape)}"
    with atomic_path(out / "weights.pt") as tmp:
        torch.save(method.state_dict(), tmp)
    if not diff <= atol:
        raise ConfigError(f"the exported model differs from the run's by {diff:.3g} (> {atol}); "
                          "this method does not trace (data-dependent control flow)", path)
    dynamic = fixed_why is None
    batch_dynamic = dynamic or (fmt != "torchscript" and diff2 is not None)
    try:
        chain: dict[str, Any] | None = replay.replay_processing(ds.spec.get("preprocessing") or [],
                                                                 ds.root / "dataset.json").settings()
        replay_error = None if ds.dim == 3 else "predict.py replays preprocessing for 3D data sets only"
    except replay.ReplayError as exc:
        chain, replay_error = None, str(exc)
    record = {
        "format": fmt, "file": path.name, "weights": "weights.pt", "predict": "predict.py",
        "run_dir": str(Path(run_dir).resolve()), "checkpoint": str(run.checkpoint_path), "iteration": run.iteration,
        "method": run.config["method"]["name"], "method_class": f"{type(method).__module__}.{type(method).__name__}",
        "decoder": inf.decoder, "dim": ds.dim, "in_channels": ds.in_channels, "num_classes": ds.num_classes,
        "input": list(x.shape), "output": [batch, ds.num_classes, *patch], "output_kind": "softmax probabilities",
        "dynamic": {"batch": batch_dynamic, "spatial": dynamic, "multiple": multiple if dynamic else None,
                    "checked_shape": list(second.shape) if diff2 is not None else None,
                    "fixed_because": fixed_why},
        "patch_size": list(patch), "stride": list(inf.stride or ()),
        "inference": {"preset": inf.preset, "mode": inf.mode, "patch_size": list(patch),
                      "stride": list(inf.stride or ()), "sw_batch_size": sw_batch, "blend": inf.blend,
                      "tta": inf.tta, "lcc_classes": None if inf.lcc_classes is None else list(inf.lcc_classes),
                      "precision": "fp32"},
        "class_names": ds.class_names, "channel_names": ds.spec.get("channel_names"),
        "preprocessing": ds.spec.get("preprocessing"), "spacing": ds.spec.get("spacing"),
        "replay": chain, "replay_error": replay_error,
        "load_back_check": {"input": "torch.randn(input, seed 0)", "traced_at": list(example.shape), "max_abs_diff": diff, "atol": atol,
                            "second_input": f"torch.randn({list(second.shape)}, seed 1)", "second_max_abs_diff": diff2},
    }
    atomic_write_json(out / "export.json", record)
    atomic_write_text(out / "predict.py", Path(export_predict_template.__file__).read_text(encoding="utf-8"))
    return record
