"""Numeric precision of training and inference: one rule for `train`, validation, `eval`, `predict` and `bench`.

`resolve_precision(requested, device)` turns `auto | fp32 | bf16` into what runs:

- `auto` → bf16 autocast on CUDA GPUs that support bf16 and on CPUs with bf16 units (AVX512-BF16 or
  AMX, e.g. AMD Zen 4, Intel Sapphire Rapids); fp32 everywhere else;
- `bf16` → bf16 autocast even without bf16 units (correct, but slower than fp32 there);
- `fp32` → no autocast.

Channels-last(-3d) memory goes with bf16 on a CPU (oneDNN's bf16 kernels want it) and with every CUDA run.
Under CPU bf16 autocast the loss-side ops that CUDA autocast runs in float32 but CPU autocast does not
(softmax, log-softmax, sigmoid, exp, log, pow, sums and means) are run in float32 (`Float32Losses`), so
losses and metrics are computed in fp32 on either device.

A run's inference precision (validation, `eval`, `predict`) is `inference.precision` when set to fp32 or
bf16; `auto` follows the training request (`train.precision`, where `train.amp: false` means fp32), resolved
on the device that predicts. So a run trained in fp32 is validated and evaluated in fp32.

Each command resolves its precisions once, at its entry where the device is known (`training_precision`,
`inference_precision`: `train` in engine/setup.py, `eval`/`predict` where they resolve the device, `bench`
per device), and passes the `Precision` objects down; the layers below never resolve again.
"""

from __future__ import annotations

import contextlib
import functools
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from textseg_cli.errors import ConfigError

PRECISIONS = ("auto", "fp32", "bf16")


def cpu_has_bf16() -> bool:
    """True when this CPU has bf16 arithmetic units (AVX512-BF16 or AMX-BF16) usable by oneDNN.
    Environment variable TEXTSEG_CPU_BF16=0 (or 1) overrides the detection, e.g. for toy-sized runs, which
    are slower in bf16, or for a test suite that should keep `auto` at fp32."""
    env = os.environ.get("TEXTSEG_CPU_BF16", "").strip()
    if env in ("0", "1"):
        return env == "1"
    return _cpu_detects_bf16()


@functools.lru_cache(maxsize=1)
def _cpu_detects_bf16() -> bool:
    checks = (getattr(torch.cpu, "_is_avx512_bf16_supported", None), getattr(torch.cpu, "_is_amx_tile_supported", None))
    for check in checks:
        try:
            if check is not None and check():
                return True
        except RuntimeError:
            pass
    try:  # older torch: read the flags
        flags = Path("/proc/cpuinfo").read_text(encoding="utf-8")
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def _cuda_has_bf16(device: torch.device) -> bool:
    try:
        return bool(torch.cuda.is_bf16_supported())
    except (RuntimeError, AssertionError):
        return False


@dataclass(frozen=True)
class Precision:
    """What runs: `name` is "bf16" or "fp32"; `requested` what was asked for; `reason` one line why."""

    name: str
    device_type: str
    requested: str
    reason: str

    @property
    def bf16(self) -> bool:
        return self.name == "bf16"

    @property
    def channels_last(self) -> bool:
        """Channels-last(-3d) memory: always on CUDA, with bf16 on a CPU."""
        return self.device_type == "cuda" or self.bf16

    def autocast(self) -> contextlib.AbstractContextManager:
        """bf16 autocast (plus float32 loss ops on a CPU), or nothing for fp32."""
        if not self.bf16:
            return contextlib.nullcontext()
        if self.device_type == "cpu":
            return _cpu_bf16()
        return torch.autocast(self.device_type, dtype=torch.bfloat16)

    def record(self) -> dict[str, Any]:
        """The entry written to env.json / meta.json."""
        return {"precision": self.name, "requested": self.requested, "channels_last": self.channels_last,
                "device": self.device_type, "reason": self.reason}


def check_precision(requested: str | None, what: str = "--precision") -> str:
    value = "auto" if requested in (None, "") else str(requested).lower()
    if value not in PRECISIONS:
        raise ConfigError(f"{what} {requested!r}: expected one of {', '.join(PRECISIONS)}")
    return value


def resolve_precision(requested: str | None, device: torch.device | str, what: str = "--precision") -> Precision:
    """The precision that runs on `device` for `requested` (auto | fp32 | bf16)."""
    req = check_precision(requested, what)
    dev = torch.device(device)
    if req == "fp32":
        return Precision("fp32", dev.type, req, "fp32 requested")
    if req == "bf16":
        return Precision("bf16", dev.type, req, "bf16 requested")
    if dev.type == "cuda":
        if _cuda_has_bf16(dev):
            return Precision("bf16", "cuda", req, "auto: the GPU supports bf16")
        return Precision("fp32", "cuda", req, "auto: the GPU has no bf16 support")
    if dev.type == "cpu":
        if cpu_has_bf16():
            return Precision("bf16", "cpu", req, "auto: the CPU has bf16 units (AVX512-BF16/AMX)")
        return Precision("fp32", "cpu", req, "auto: the CPU has no bf16 units")
    return Precision("fp32", dev.type, req, f"auto: fp32 on {dev.type}")


def training_request(cfg: dict[str, Any]) -> str:
    """`train.precision` of a run config; `train.amp: false` (older configs' switch) means fp32."""
    tr = cfg.get("train") or {}
    if tr.get("amp") is False:
        return "fp32"
    return check_precision(tr.get("precision"), "train.precision")


def inference_request(cfg: dict[str, Any], override: str | None = None) -> str:
    """The precision a run predicts with: `override` (a --precision flag), else `inference.precision`
    when fp32/bf16, else (auto) the training request. Resolve it on the predicting device."""
    if override not in (None, ""):
        return check_precision(override)
    inf = check_precision((cfg.get("inference") or {}).get("precision"), "inference.precision")
    return inf if inf != "auto" else training_request(cfg)


def training_precision(cfg: dict[str, Any], device: torch.device | str) -> Precision:
    """What a run trains in on `device` (`training_request`), resolved once by the command's entry."""
    return resolve_precision(training_request(cfg), device, "train.precision")


def inference_precision(cfg: dict[str, Any], device: torch.device | str, override: str | None = None) -> Precision:
    """What a run validates/evaluates/predicts in on `device` (`inference_request`, `override` a --precision
    flag), resolved once by the command's entry."""
    return resolve_precision(inference_request(cfg, override), device, "inference.precision")


# --- float32 loss ops under CPU bf16 autocast -----------------------------------------------------------

def _fp32_funcs() -> frozenset:
    T = torch.Tensor
    names = ("softmax", "log_softmax", "sigmoid", "exp", "log", "pow", "sum", "mean", "logsumexp", "norm")
    funcs = {getattr(torch, n) for n in names} | {getattr(T, n) for n in names}
    funcs |= {F.softmax, F.log_softmax, F.logsigmoid, F.normalize, T.__pow__, torch.sigmoid}
    return frozenset(funcs)


_FP32_FUNCS = _fp32_funcs()
_CONVS = frozenset({torch.conv2d, torch.conv3d, F.conv2d, F.conv3d})
_JOINS = frozenset({torch.stack, torch.cat, torch.concat, torch.concatenate})


def _up(x: Any) -> Any:
    return x.float() if isinstance(x, torch.Tensor) and x.dtype == torch.bfloat16 else x


def _is_half(x: Any) -> bool:
    return isinstance(x, torch.Tensor) and x.dtype == torch.float16


class Float32Losses(TorchFunctionMode):
    """Runs softmax/sigmoid/exp/log/pow/sum/mean on float32 inputs while CPU autocast is on — the ops CUDA
    autocast keeps in float32 — so a loss computed from bf16 logits is a float32 loss on both devices.

    Also runs convolutions whose input has a spatial axis of size <= 2 in float32: oneDNN's bf16 weight
    gradient is wrong there (torch 2.14 CPU, measured: off by 70 % to 1e36 for a 3x3x3 conv on 2x2x2 or
    2x8x8 inputs) — the V-Net bottleneck of a 16- or 32-voxel patch. Such convs cost next to nothing.
    And joins float16 tensors (e.g. cached CLIP features) as float32: CPU autocast cannot promote float16
    in stack/cat ("Unexpected floating ScalarType in at::autocast::prioritize")."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if torch.is_autocast_enabled("cpu"):
            if func in _FP32_FUNCS:
                args = tuple(_up(a) for a in args)
            elif func in _JOINS and args and any(_is_half(t) for t in args[0]):
                args = ([t.float() if _is_half(t) else t for t in args[0]],) + tuple(args[1:])
            elif func in _CONVS and args and isinstance(args[0], torch.Tensor) and min(args[0].shape[2:]) <= 2:
                with torch.autocast("cpu", enabled=False):
                    return func(*(a.float() if isinstance(a, torch.Tensor) else a for a in args), **kwargs)
        return func(*args, **kwargs)


@contextlib.contextmanager
def _cpu_bf16() -> Iterator[None]:
    with torch.autocast("cpu", dtype=torch.bfloat16), Float32Losses():
        yield


def to_channels_last(module: torch.nn.Module) -> torch.nn.Module:
    """Convert the 4D/5D parameters (conv weights) of `module` to channels-last(-3d), in place."""
    for p in module.parameters():
        if p.dim() in (4, 5):
            p.data = channels_last(p.data)
    return module


def channels_last(t: torch.Tensor) -> torch.Tensor:
    if t.dim() == 5:
        return t.contiguous(memory_format=torch.channels_last_3d)
    if t.dim() == 4:
        return t.contiguous(memory_format=torch.channels_last)
    return t
