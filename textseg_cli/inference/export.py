"""`textseg export RUN`: the trained network as a TorchScript file plus plain weights, checked by loading back.

Writes to `OUT` (default `RUN/export/`):

    model.torchscript.pt   (--format torchscript) torch.jit.trace of `method.predict_proba(x, decoder)` on one
                           patch: input (1, C, *patch) float32 preprocessed like the training data, output
                           (1, K, *patch) softmax probabilities; load with `torch.jit.load(path)` (no textseg;
                           PyTorch now deprecates TorchScript and warns there: prefer --format torch-export)
    model.pt2              (--format torch-export) the same as a `torch.export` program (TorchScript's successor
                           in PyTorch); load with `torch.export.load(path).module()`
    weights.pt             `method.state_dict()`; load with `textseg_cli.runs.load.load_run(RUN)` or
                           `build_method(name, config, in_channels, num_classes, dim=...)` + `load_state_dict`
    export.json            method class, decoder, patch/stride, class and channel names, the preprocessing
                           chain to apply first (dataset.json `preprocessing`), and the load-back check
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from textseg_cli.errors import ConfigError
from textseg_cli.inference.settings import InferenceSettings
from textseg_cli.runs.load import load_run
from textseg_cli.storage.files import atomic_path, atomic_write_json
from textseg_cli.storage.outputs import prepare_output_dir

FORMATS = ("torchscript", "torch-export")


class _Probabilities(nn.Module):
    def __init__(self, method: nn.Module, decoder: Any):
        super().__init__()
        self.method, self.decoder = method, decoder

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.method.predict_proba(x, self.decoder)


def export_run(run_dir: str | Path, out: str | Path | None = None, fmt: str = "torchscript",
               checkpoint: str = "best", decoder: int | str | None = None, force: bool = False,
               atol: float = 1e-4) -> dict[str, Any]:
    """Export a run (see module docstring); returns the export.json record. The traced model is loaded back
    and compared with the method on a fixed seeded input; a difference above `atol` is an error."""

    if fmt not in FORMATS:
        raise ConfigError(f"--format {fmt!r}: expected one of {', '.join(FORMATS)}")
    run = load_run(run_dir, checkpoint, device="cpu")
    method, ds = run.method.eval(), run.dataset
    inf = InferenceSettings.from_config(run.config, decoder=decoder, ndim=ds.dim)
    if inf.patch_size is None:
        raise ConfigError("the run records no patch size (inference.patch_size / data.patch_size) to trace with")
    patch = inf.patch_size
    out = Path(out) if out is not None else Path(run_dir) / "export"
    prepare_output_dir(out, force=force)
    wrapper = _Probabilities(method, inf.decoder).eval()
    x = torch.randn((1, ds.in_channels) + patch, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        ref = wrapper(x)
    with warnings.catch_warnings():
        # PyTorch marks TorchScript deprecated: every torch.jit.trace/save/load raises a FutureWarning. --format
        # torchscript asks for exactly that file (it loads without textseg, also from C++), and the load-back check
        # must read the file written, so those deprecations and only those are silenced; --format torch-export is
        # the successor and needs no filter. Other warnings (e.g. the model's own while traced) stay visible.
        warnings.filterwarnings("ignore", message=r"`torch\.jit\.\w+` is deprecated", category=FutureWarning)
        if fmt == "torchscript":
            ts_path = out / "model.torchscript.pt"
            with torch.no_grad():
                traced = torch.jit.trace(wrapper, x, check_trace=False)
            with atomic_path(ts_path) as tmp:
                torch.jit.save(traced, str(tmp))
            loaded = torch.jit.load(str(ts_path), map_location="cpu").eval()
        else:
            ts_path = out / "model.pt2"
            with torch.no_grad():
                program = torch.export.export(wrapper, (x,))
            with atomic_path(ts_path, suffix=".pt2") as tmp:
                torch.export.save(program, str(tmp))
            loaded = torch.export.load(str(ts_path)).module()
        with torch.inference_mode():
            diff = float((loaded(x) - ref).abs().max())
    with atomic_path(out / "weights.pt") as tmp:
        torch.save(method.state_dict(), tmp)
    if not diff <= atol:
        raise ConfigError(f"the exported model differs from the run's by {diff:.3g} (> {atol}); "
                          "this method does not trace (data-dependent control flow)", ts_path)
    record = {
        "format": fmt, "file": ts_path.name, "weights": "weights.pt", "run_dir": str(Path(run_dir).resolve()),
        "checkpoint": str(run.checkpoint_path), "iteration": run.iteration,
        "method": run.config["method"]["name"], "method_class": f"{type(method).__module__}.{type(method).__name__}",
        "decoder": inf.decoder, "input": [1, ds.in_channels, *patch], "output": [1, ds.num_classes, *patch],
        "output_kind": "softmax probabilities", "patch_size": list(patch), "stride": list(inf.stride),
        "class_names": ds.class_names, "channel_names": ds.spec.get("channel_names"),
        "preprocessing": ds.spec.get("preprocessing"), "spacing": ds.spec.get("spacing"),
        "load_back_check": {"input": "torch.randn(input, seed 0)", "max_abs_diff": diff, "atol": atol},
    }
    atomic_write_json(out / "export.json", record)
    return record
