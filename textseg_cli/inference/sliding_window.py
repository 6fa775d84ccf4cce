"""Sliding-window and whole-volume inference on one image (2D or 3D).

Windows are placed as the semi-supervised literature's `test_all_case` places them (UA-MT, MC-Net,
BCP, ...), so Dice numbers are comparable with the papers: per axis
`ceil((size - patch) / stride) + 1` windows starting at `min(stride * i, size - patch)`; an axis
smaller than the patch is zero-padded symmetrically (extra voxel on the high side) and cropped back;
softmax probabilities of overlapping windows are averaged with a count map.
"""

from __future__ import annotations

import itertools
import math
import warnings
from typing import Callable, Sequence

import torch
import torch.nn.functional as F

from textseg_cli.errors import ConfigError
from textseg_cli.runs.config import default_stride

PredictFn = Callable[[torch.Tensor], torch.Tensor]  # (B, C, *patch) -> probabilities (B, K, *patch)

# Default fallback windows for whole-volume inference when no patch size is given.
_FALLBACK_PATCH = {2: 256, 3: 96}


def window_starts(size: int, patch: int, stride: int) -> list[int]:
    """Start offsets of the windows along one axis of length `size` (>= patch after padding)."""
    if stride < 1:
        raise ConfigError(f"inference stride must be >= 1, got {stride}")
    if size <= patch:
        return [0]
    steps = math.ceil((size - patch) / stride) + 1
    return [min(stride * i, size - patch) for i in range(steps)]


def symmetric_pad_amounts(shape: Sequence[int], target: Sequence[int]) -> list[tuple[int, int]]:
    """(low, high) padding per axis that brings `shape` up to at least `target`; odd extra goes high."""
    out = []
    for s, t in zip(shape, target):
        extra = max(0, int(t) - int(s))
        out.append((extra // 2, extra - extra // 2))
    return out


def _pad(image: torch.Tensor, pads: list[tuple[int, int]], mode: str) -> torch.Tensor:
    if not any(lo or hi for lo, hi in pads):
        return image
    flat: list[int] = []
    for lo, hi in reversed(pads):  # F.pad wants the last axis first
        flat += [lo, hi]
    if mode == "constant":
        return F.pad(image, flat, mode="constant", value=0.0)
    # reflect/replicate/circular need a batch dimension for 3D inputs
    return F.pad(image[None], flat, mode=mode)[0]


def _crop_back(t: torch.Tensor, pads: list[tuple[int, int]], shape: Sequence[int]) -> torch.Tensor:
    if not any(lo or hi for lo, hi in pads):
        return t
    return t[(slice(None),) + tuple(slice(lo, lo + s) for (lo, _), s in zip(pads, shape))]


def _as_tuple(value: int | Sequence[int], ndim: int, what: str) -> tuple[int, ...]:
    if isinstance(value, int):
        return (value,) * ndim
    value = tuple(int(v) for v in value)
    if len(value) != ndim:
        raise ConfigError(f"inference {what} {list(value)} has {len(value)} values; the image has {ndim} spatial axes")
    return value


def sliding_window_inference(predict_fn: PredictFn, image: torch.Tensor, patch_size: int | Sequence[int],
                             stride: int | Sequence[int] | None = None, sw_batch_size: int = 4,
                             out_device: torch.device | str | None = None,
                             pad_mode: str = "constant") -> torch.Tensor:
    """Averaged probabilities (K, *spatial) of `predict_fn` over overlapping windows of `image`.

    `image` is (C, *spatial); `predict_fn` gets (B, C, *patch) crops on `image.device`, B <= sw_batch_size,
    and returns probabilities (B, K, *patch). The accumulation buffers live on `out_device` (default: the
    image's device); putting them on the CPU keeps a large volume's K x volume buffer off the GPU.
    `stride` None is `textseg_cli.runs.config.default_stride(patch)` (half the patch, rounded up).
    """
    if image.ndim not in (3, 4):
        raise ConfigError(f"sliding-window inference expects (C, x, y) or (C, x, y, z), got shape {tuple(image.shape)}")
    spatial = tuple(image.shape[1:])
    ndim = len(spatial)
    patch = _as_tuple(patch_size, ndim, "patch_size")
    strides = _as_tuple(stride, ndim, "stride") if stride is not None else default_stride(patch)
    sw_batch_size = max(1, int(sw_batch_size))
    out_device = torch.device(out_device) if out_device is not None else image.device

    pads = symmetric_pad_amounts(spatial, patch)
    padded = _pad(image, pads, pad_mode)
    padded_shape = tuple(padded.shape[1:])
    starts = list(itertools.product(*(window_starts(s, p, st) for s, p, st in zip(padded_shape, patch, strides))))

    scores: torch.Tensor | None = None
    counts = torch.zeros((1,) + padded_shape, dtype=torch.float32, device=out_device)
    for i in range(0, len(starts), sw_batch_size):
        group = starts[i:i + sw_batch_size]
        slices = [(slice(None),) + tuple(slice(s, s + p) for s, p in zip(start, patch)) for start in group]
        crops = torch.stack([padded[sl] for sl in slices])
        probs = predict_fn(crops)
        if probs.shape[0] != len(group) or tuple(probs.shape[2:]) != patch:
            raise ConfigError(f"predict_fn returned shape {tuple(probs.shape)} for input {tuple(crops.shape)}; "
                              f"expected (B, K, *patch)")
        probs = probs.to(device=out_device, dtype=torch.float32)
        if scores is None:
            scores = torch.zeros((probs.shape[1],) + padded_shape, dtype=torch.float32, device=out_device)
        for sl, p in zip(slices, probs):
            scores[sl] += p
            counts[sl] += 1.0
    assert scores is not None  # at least one window always exists
    scores /= counts
    return _crop_back(scores, pads, spatial)


def _is_oom(exc: BaseException) -> bool:
    msg = str(exc).lower()
    return isinstance(exc, torch.cuda.OutOfMemoryError) or "out of memory" in msg or "can't allocate memory" in msg


def whole_volume_inference(predict_fn: PredictFn, image: torch.Tensor, multiple: int = 16,
                           max_voxels: int | None = None, patch_size: int | Sequence[int] | None = None,
                           stride: int | Sequence[int] | None = None, sw_batch_size: int = 1,
                           out_device: torch.device | str | None = None) -> torch.Tensor:
    """Probabilities (K, *spatial) from one forward pass over the whole image.

    The V-Net family is fully convolutional, so one pass over the volume padded (symmetrically, with
    zeros) to a multiple of `multiple` (2^number of downsamplings) replaces the overlapping windows.
    When the padded volume exceeds `max_voxels`, or the pass runs out of memory, it falls back to
    `sliding_window_inference` with `patch_size`/`stride` (default 96³ / 256², stride `default_stride`)
    and warns.
    """
    spatial = tuple(image.shape[1:])
    ndim = len(spatial)
    target = [int(math.ceil(s / multiple) * multiple) for s in spatial]
    pads = symmetric_pad_amounts(spatial, target)
    voxels = math.prod(target)
    reason = None
    if max_voxels is not None and voxels > max_voxels:
        reason = f"padded volume {target} has {voxels} voxels > max_voxels {max_voxels}"
    else:
        try:
            probs = predict_fn(_pad(image, pads, "constant")[None])[0]
            out_device = torch.device(out_device) if out_device is not None else image.device
            return _crop_back(probs, pads, spatial).to(device=out_device, dtype=torch.float32)
        except (torch.cuda.OutOfMemoryError, RuntimeError) as exc:
            if not _is_oom(exc):
                raise
            reason = f"out of memory on volume {target}"
            del exc
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
    patch = _as_tuple(patch_size, ndim, "patch_size") if patch_size is not None else (_FALLBACK_PATCH[ndim],) * ndim
    strides = _as_tuple(stride, ndim, "stride") if stride is not None else default_stride(patch)
    warnings.warn(f"whole-volume inference: {reason}; falling back to sliding windows {list(patch)} "
                  f"stride {list(strides)}", RuntimeWarning, stacklevel=2)
    return sliding_window_inference(predict_fn, image, patch, strides, sw_batch_size=sw_batch_size,
                                    out_device=out_device)
