"""One command's inference settings: built once at the command's entry and handed to every `predict_case` call.

`InferenceSettings.from_config(cfg, ...)` reads a run's resolved config (its `inference` section; the patch falls
back to `data.patch_size`), applies the command's choices (`--inference`, `--decoder`, `--precision`, ...) and,
given the predicting device, resolves the precision there once (`runtime.precision.inference_precision`).
`textseg eval`, `textseg predict`, `textseg export`, validation during training and `textseg bench` each build
one. A stride the config leaves open is `default_stride(patch)` — half the patch, rounded up — the one rule,
kept in `runs/config.py` because the run config records the stride it resolves (`runs` sits below `inference`).

Two named presets (`--inference paper|best`): `paper` (the default) predicts as the methods' official test
scripts do — the papers' windows averaged with constant weights, LCC per method protocol — so tables stay
comparable; `best` adds nnU-Net's inference: mirroring test-time augmentation (`tta`), Gaussian window weights
(`blend`) and the post-processing chosen on the run's validation cases (`inference/postprocessing.py`,
RUN/postprocessing.json). `--tta/--no-tta` and `--blend` override either preset.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import numpy as np
import torch

from textseg_cli.errors import ConfigError
from textseg_cli.inference.postprocessing import apply_lcc, describe, lcc_classes
from textseg_cli.inference.protocol import resolve_lcc
from textseg_cli.inference.sliding_window import BLEND_MODES
from textseg_cli.runs.config import INFERENCE_MODES, default_stride
from textseg_cli.runtime.precision import (
    Precision,
    check_precision,
    inference_precision,
    inference_request,
)

__all__ = ["INFERENCE_CHOICES", "INFERENCE_PRESETS", "NO_RECORD", "InferenceSettings", "parse_decoder",
           "resolve_preset", "spatial_tuple"]

INFERENCE_PRESETS = ("paper", "best")
INFERENCE_CHOICES = INFERENCE_PRESETS + tuple(INFERENCE_MODES)  # what `--inference` accepts
NO_RECORD = ("--inference best: the run has no postprocessing.json (textseg eval RUN --choose-postprocessing); "
             "none applied")


def spatial_tuple(value: Any, ndim: int | None, key: str) -> tuple[int, ...]:
    """`value` (an integer, or one per spatial axis) as a tuple of `ndim` positive integers; ConfigError names
    `inference.<key>`. With `ndim` None a sequence keeps its length and a lone integer is refused."""
    if isinstance(value, (int, np.integer)):
        if ndim is None:
            raise ConfigError(f"inference.{key} {value!r}: give one size per spatial axis, e.g. [112, 112, 80]")
        return (int(value),) * ndim
    try:
        out = tuple(int(v) for v in value)
    except (TypeError, ValueError):
        raise ConfigError(f"inference.{key} must be an integer or a list of integers, got {value!r}") from None
    if (ndim is not None and len(out) != ndim) or not out or min(out) < 1:
        raise ConfigError(f"inference.{key} must hold {ndim or 'one per axis,'} positive integers, got {list(out)}")
    return out


def resolve_preset(cfg: Mapping[str, Any], inference: str | None) -> str:
    """The preset a command runs: `--inference paper|best` when given, else the run's `inference.preset`, else paper."""
    if inference in INFERENCE_PRESETS:
        return str(inference)
    return str((cfg.get("inference") or {}).get("preset") or "paper")


def parse_decoder(decoder: int | str) -> int | str:
    """`--decoder 1` arrives as "1": a decoder index; names such as "mean" stay strings."""
    if isinstance(decoder, str) and decoder.strip().lstrip("-").isdigit():
        return int(decoder)
    return decoder


@dataclass(frozen=True)
class InferenceSettings:
    """How one command predicts. Build it once (`from_config`, or `from_section` for a plain `inference` dict)
    and pass the same object to every `predict_case` call.

    mode: "sliding" windows or one "whole"-volume pass. patch_size/stride: the windows (whole-volume mode uses
    them when it falls back to windows); a stride left None with a patch becomes `default_stride(patch)`.
    sw_batch_size: windows per forward pass (None: 4 for sliding windows, 1 for whole-volume's fallback).
    decoder: passed to `method.predict_proba`. precision: the resolved `Precision` (what runs), or a request
    (auto | fp32 | bf16) that `predict_case` resolves on its device. lcc/lcc_source: whether `textseg eval`
    keeps the largest connected component, and why (`inference.protocol.resolve_lcc`); validation and
    `textseg predict` write and score the raw argmax. channels_last/fuse_bn: memory format and BatchNorm
    folding of the forward pass. out_device: where probabilities accumulate ("cpu" keeps them off the GPU).
    max_voxels/multiple: whole-volume mode's size limit and padding multiple.
    preset: "paper" (the official protocol) or "best" (what `tta`, `blend` and `lcc_classes` default to).
    tta: mirroring test-time augmentation (all flips of the spatial axes, probabilities averaged).
    blend: window weights, "constant" (the papers) or "gaussian" (sigma = patch / 8).
    lcc_classes: None, or the classes whose largest component is kept (the post-processing chosen on validation,
    replayed by `best`): then `eval` and `predict` both apply it (`postprocess`).
    """

    mode: str = "sliding"
    patch_size: tuple[int, ...] | None = None
    stride: tuple[int, ...] | None = None
    sw_batch_size: int | None = None
    decoder: int | str | None = None
    precision: Precision | str = "auto"
    lcc: bool = False
    lcc_source: str = "default (no post-processing)"
    channels_last: bool = True
    fuse_bn: bool = True
    out_device: str | None = None
    max_voxels: int | None = None
    multiple: int = 16
    preset: str = "paper"
    tta: bool = False
    blend: str = "constant"
    lcc_classes: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        if self.preset not in INFERENCE_PRESETS:
            raise ConfigError(f"inference preset must be one of {list(INFERENCE_PRESETS)}, got {self.preset!r}")
        if self.blend not in BLEND_MODES:
            raise ConfigError(f"--blend must be one of {list(BLEND_MODES)}, got {self.blend!r}")
        if self.lcc_classes is not None:
            object.__setattr__(self, "lcc_classes", tuple(int(c) for c in self.lcc_classes))
        if self.mode not in INFERENCE_MODES:
            raise ConfigError(f"inference.mode must be one of {list(INFERENCE_MODES)}, got {self.mode!r}")
        if not isinstance(self.precision, Precision):
            object.__setattr__(self, "precision", check_precision(self.precision, "inference.precision"))
        patch = None if self.patch_size is None else spatial_tuple(self.patch_size, None, "patch_size")
        ndim = len(patch) if patch is not None else None
        stride = None if self.stride is None else spatial_tuple(self.stride, ndim, "stride")
        if stride is None and patch is not None:
            stride = default_stride(patch)
        object.__setattr__(self, "patch_size", patch)
        object.__setattr__(self, "stride", stride)
        if self.sw_batch_size is not None and int(self.sw_batch_size) < 1:
            raise ConfigError(f"inference.sw_batch_size must be >= 1, got {self.sw_batch_size}")
        if int(self.multiple) < 1:
            raise ConfigError(f"inference.multiple must be >= 1, got {self.multiple}")

    @classmethod
    def from_section(cls, section: Mapping[str, Any] | None, ndim: int | None = None) -> InferenceSettings:
        """Settings from a plain `inference` section (the run config's, or a dict a caller writes); unknown keys
        are ignored. `ndim` expands a single-integer patch or stride to every spatial axis."""
        sec = dict(section or {})
        patch, stride = sec.get("patch_size"), sec.get("stride")
        if ndim is None and patch is not None and not isinstance(patch, (int, np.integer)):
            ndim = len(tuple(patch))
        sw, max_voxels = sec.get("sw_batch_size"), sec.get("max_voxels")
        preset = sec.get("preset") or "paper"
        return cls(
            preset=preset,
            tta=bool(sec["tta"]) if sec.get("tta") is not None else preset == "best",
            blend=sec.get("blend") or ("gaussian" if preset == "best" else "constant"),
            mode=sec.get("mode") or "sliding",
            patch_size=None if patch is None else spatial_tuple(patch, ndim, "patch_size"),
            stride=None if stride is None else spatial_tuple(stride, ndim, "stride"),
            sw_batch_size=int(sw) if sw else None,
            decoder=sec.get("decoder"),
            precision=sec.get("precision") or "auto",
            channels_last=sec.get("channels_last", True) is not False,
            fuse_bn=sec.get("fuse_bn", True) is not False,
            out_device=sec.get("out_device") or None,
            max_voxels=None if max_voxels is None else int(max_voxels),
            multiple=int(sec.get("multiple") or 16),
        )

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any], *, device: torch.device | str | None = None,
                    mode: str | None = None, decoder: int | str | None = None,
                    precision: Precision | str | None = None, stride: Sequence[int] | None = None,
                    sw_batch_size: int | None = None, out_device: str | None = None, lcc: bool | None = None,
                    lcc_source: str | None = None, method: str | None = None,
                    ndim: int | None = None, preset: str | None = None, tta: bool | None = None,
                    blend: str | None = None, postprocessing: Mapping[str, Any] | None = None) -> InferenceSettings:
        """A run's settings: its resolved config's `inference` section (patch: `data.patch_size` when unset)
        with a command's choices applied (None keeps the run's value; `mode` is `--inference`).

        precision: a resolved `Precision` is kept as it is; else the request (a --precision flag, or the run's
        rule `inference_request`) is resolved on `device` — once, here — or kept as a request without a device.
        lcc: None follows the method's evaluation protocol (`resolve_lcc`); `lcc_source` given: taken as the
        reason for `lcc` as it is. method: the name for the protocol (default: the config's method).
        mode may also name a preset (`--inference paper|best`: the run's mode is kept). preset "best": `tta` and
        `blend` default to mirroring and "gaussian", and, unless `lcc` or `lcc_source` is given, the
        `postprocessing` record (RUN/postprocessing.json, `read_postprocessing`) sets `lcc_classes` (none
        recorded: no post-processing, and `lcc_source` says so). tta/blend given: they win over the preset.
        """
        inf = dict(cfg.get("inference") or {})
        if mode in INFERENCE_PRESETS:
            preset, mode = mode, None
        if preset is not None:
            if preset not in INFERENCE_PRESETS:
                raise ConfigError(f"--inference must be one of {list(INFERENCE_CHOICES)}, got {preset!r}")
            inf["preset"] = preset
            inf.pop("tta", None), inf.pop("blend", None)  # the preset's own defaults, unless given below
        if tta is not None:
            inf["tta"] = bool(tta)
        if blend is not None:
            inf["blend"] = blend
        if inf.get("patch_size") is None:
            inf["patch_size"] = (cfg.get("data") or {}).get("patch_size")
        if mode is not None:
            if mode not in INFERENCE_MODES:
                raise ConfigError(f"--inference must be one of {list(INFERENCE_CHOICES)}, got {mode!r}")
            inf["mode"] = mode
        if decoder is not None:
            inf["decoder"] = parse_decoder(decoder)
        for key, value in (("stride", stride), ("sw_batch_size", sw_batch_size), ("out_device", out_device)):
            if value is not None:
                inf[key] = value
        if isinstance(precision, Precision):
            prec: Precision | str = precision
        elif device is not None:
            prec = inference_precision(dict(cfg), device, precision)
        else:
            prec = inference_request(dict(cfg), precision)
        inf["precision"] = "auto"  # checked by from_section; the resolved value replaces it below
        if method is None:
            entry = cfg.get("method")
            method = entry.get("name") if isinstance(entry, Mapping) else entry
        base = cls.from_section(inf, ndim)
        classes: tuple[int, ...] | None = None
        if base.preset == "best" and lcc is None and lcc_source is None:
            if postprocessing is None:
                lcc_on, why, classes = False, NO_RECORD, None
            else:
                classes = lcc_classes(postprocessing)
                lcc_on, why = bool(classes), f"postprocessing.json, chosen on validation: {describe(postprocessing)}"
        else:
            lcc_on, why = (bool(lcc), lcc_source) if lcc_source is not None else resolve_lcc(lcc, method)
        return dataclasses.replace(base, precision=prec, lcc=lcc_on, lcc_source=why, lcc_classes=classes)

    @property
    def precision_request(self) -> str:
        """The precision asked for (auto | fp32 | bf16), resolved or not."""
        return self.precision.requested if isinstance(self.precision, Precision) else str(self.precision)

    def record(self) -> dict[str, Any]:
        """The settings as meta.json / predict.json record them (`precision` is the request; what ran is
        recorded beside it). LCC is recorded by `textseg eval`, the one command that applies it."""
        return {"mode": self.mode, "patch_size": None if self.patch_size is None else list(self.patch_size),
                "stride": None if self.stride is None else list(self.stride), "sw_batch_size": self.sw_batch_size,
                "decoder": self.decoder, "precision": self.precision_request, "channels_last": self.channels_last,
                "fuse_bn": self.fuse_bn, "out_device": self.out_device, "max_voxels": self.max_voxels,
                "multiple": self.multiple, "preset": self.preset, "tta": self.tta, "blend": self.blend,
                "postprocessing": None if self.lcc_classes is None else {"lcc_classes": list(self.lcc_classes),
                                                                         "source": self.lcc_source}}

    @property
    def tag(self) -> str:
        """'' for the papers' protocol; else what differs, for output folder names: '-best', '-tta', '-gaussian',
        '-best-notta', ..."""
        best = self.preset == "best"
        parts = ["best"] if best else []
        if self.tta != best:
            parts.append("tta" if self.tta else "notta")
        if self.blend != ("gaussian" if best else "constant"):
            parts.append(self.blend)
        return "".join(f"-{p}" for p in parts)

    def postprocess(self, mask: np.ndarray) -> np.ndarray:
        """The post-processing chosen on validation (`lcc_classes`), applied to a label map; unchanged without."""
        return mask if self.lcc_classes is None else apply_lcc(mask, self.lcc_classes)
