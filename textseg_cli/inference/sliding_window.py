"""Sliding-window and whole-volume inference on one image (2D or 3D).

Windows are placed as the semi-supervised literature's `test_all_case` places them (UA-MT, MC-Net,
BCP, ...), so Dice numbers are comparable with the papers: per axis
`ceil((size - patch) / stride) + 1` windows starting at `min(stride * i, size - patch)`; an axis
smaller than the patch is zero-padded symmetrically (extra voxel on the high side) and cropped back;
softmax probabilities of overlapping windows are averaged with a count map.

Two options beyond the papers' protocol (`--inference best`, docs/inference.md): `blend="gaussian"` weights each
window's probabilities by a Gaussian importance map (sigma = patch / 8 per axis, as nnU-Net and MONAI's
`mode="gaussian"`), and `mirrored(predict_fn, ndim)` averages the softmax probabilities over every flip combination
of the spatial axes (nnU-Net v2's mirroring test-time augmentation), batched through the same forward passes.
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
BLEND_MODES = ("constant", "gaussian")
GAUSSIAN_SIGMA_SCALE = 0.125  # sigma = patch / 8 per axis (nnU-Net, MONAI)


def gaussian_importance(patch: Sequence[int], sigma_scale: float = GAUSSIAN_SIGMA_SCALE,
                        device: torch.device | str | None = None) -> torch.Tensor:
    """Window weights (*patch), float32: the product over axes of exp(-x^2 / (2 sigma^2)), x measured from the
    window centre ((p - 1) / 2, so even sizes stay symmetric), sigma = sigma_scale * p; weights below
    max(min, 1e-3) are raised to it so that no voxel of a window weighs zero. This is MONAI's
    `compute_importance_map(mode="gaussian")`; nnU-Net's map has the same shape (scaling cancels in the
    weighted average)."""
    weights: torch.Tensor | None = None
    for i, p in enumerate(int(v) for v in patch):
        x = torch.arange(-(p - 1) / 2.0, (p - 1) / 2.0 + 1, dtype=torch.float32, device=device)
        g = torch.exp(x ** 2 / (-2 * (p * float(sigma_scale)) ** 2))
        weights = g if weights is None else weights.unsqueeze(-1) * g[(None,) * i]
    assert weights is not None
    return torch.clamp_(weights, min=max(float(weights.min()), 1e-3))


def mirror_axes_combinations(ndim: int) -> list[tuple[int, ...]]:
    """Flip combinations of the spatial axes (0-based), identity first, then every non-empty subset by size
    in `itertools.combinations` order: 2^ndim in all (8 in 3D, 4 in 2D), nnU-Net v2's order."""
    axes = range(ndim)
    return [()] + [c for k in range(1, ndim + 1) for c in itertools.combinations(axes, k)]


def mirrored(predict_fn: PredictFn, ndim: int, max_batch: int | None = None) -> PredictFn:
    """`predict_fn` with mirroring test-time augmentation: each crop (B, C, *patch) is flipped along every
    combination of spatial axes, the flipped crops go through `predict_fn` stacked along the batch (at most
    max(B, max_batch) per pass, so the forward batch stays the window batch), the probabilities are flipped
    back and averaged (softmax probabilities, summed in `mirror_axes_combinations` order)."""
    combos = mirror_axes_combinations(ndim)

    def fn(batch: torch.Tensor) -> torch.Tensor:
        b = batch.shape[0]
        flipped = torch.cat([torch.flip(batch, [a + 2 for a in c]) if c else batch for c in combos])
        step = max(b, int(max_batch or b))
        probs = torch.cat([predict_fn(flipped[i:i + step]) for i in range(0, flipped.shape[0], step)])
        total: torch.Tensor | None = None
        for k, c in enumerate(combos):
            p = probs[k * b:(k + 1) * b]
            p = torch.flip(p, [a + 2 for a in c]) if c else p
            total = p.clone() if total is None else total.add_(p)
        assert total is not None
        return total.div_(len(combos))

    return fn


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
                             pad_mode: str = "constant", blend: str = "constant") -> torch.Tensor:
    """Averaged probabilities (K, *spatial) of `predict_fn` over overlapping windows of `image`.

    `image` is (C, *spatial); `predict_fn` gets (B, C, *patch) crops on `image.device`, B <= sw_batch_size,
    and returns probabilities (B, K, *patch). The accumulation buffers live on `out_device` (default: the
    image's device); putting them on the CPU keeps a large volume's K x volume buffer off the GPU.
    `stride` None is `textseg_cli.runs.config.default_stride(patch)` (half the patch, rounded up).
    `blend`: "constant" (the papers: every window voxel weighs 1) or "gaussian" (`gaussian_importance`).
    """
    if blend not in BLEND_MODES:
        raise ConfigError(f"inference blend must be one of {list(BLEND_MODES)}, got {blend!r}")
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
    weight = gaussian_importance(patch, device=out_device)[None] if blend == "gaussian" else None
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
        if weight is not None:
            probs = probs * weight
        for sl, p in zip(slices, probs):
            scores[sl] += p
            if weight is None:
                counts[sl] += 1.0
            else:
                counts[sl] += weight
    assert scores is not None  # at least one window always exists
    scores /= counts
    return _crop_back(scores, pads, spatial)


def _is_oom(exc: BaseException) -> bool:
    msg = str(exc).lower()
    return isinstance(exc, torch.cuda.OutOfMemoryError) or "out of memory" in msg or "can't allocate memory" in msg


def whole_volume_inference(predict_fn: PredictFn, image: torch.Tensor, multiple: int = 16,
                           max_voxels: int | None = None, patch_size: int | Sequence[int] | None = None,
                           stride: int | Sequence[int] | None = None, sw_batch_size: int = 1,
                           out_device: torch.device | str | None = None, blend: str = "constant") -> torch.Tensor:
    """Probabilities (K, *spatial) from one forward pass over the whole image.

    The V-Net family is fully convolutional, so one pass over the volume padded (symmetrically, with
    zeros) to a multiple of `multiple` (2^number of downsamplings) replaces the overlapping windows.
    When the padded volume exceeds `max_voxels`, or the pass runs out of memory, it falls back to
    `sliding_window_inference` with `patch_size`/`stride` (default 96³ / 256², stride `default_stride`)
    and warns (`blend` weights the fallback's windows).
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
                                    out_device=out_device, blend=blend)
