"""Sliding-window / whole-volume inference against a literal port of the literature's `test_all_case`."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn as nn

from textseg_cli.inference.sliding_window import (sliding_window_inference, whole_volume_inference,
                                                  window_starts)


def _net(dim: int, in_ch: int = 1, classes: int = 3, kernel: int = 3, seed: int = 0):
    """A conv net whose output near a window border depends on where the window sits."""
    torch.manual_seed(seed)
    conv = (nn.Conv3d if dim == 3 else nn.Conv2d)(in_ch, classes, kernel, padding=kernel // 2)
    conv.eval()

    def predict(x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return torch.softmax(conv(x), dim=1)

    return predict


def _reference_3d(predict, image: np.ndarray, patch, stride) -> np.ndarray:
    """UA-MT / MC-Net `test_single_case`, written as the papers' code does it (numpy, nested loops)."""
    _, w, h, d = image.shape
    pad = [max(0, p - s) for p, s in zip(patch, (w, h, d))]
    lo = [p // 2 for p in pad]
    img = np.pad(image, [(0, 0)] + [(l, p - l) for l, p in zip(lo, pad)], mode="constant", constant_values=0)
    _, ww, hh, dd = img.shape
    sx = math.ceil((ww - patch[0]) / stride[0]) + 1
    sy = math.ceil((hh - patch[1]) / stride[1]) + 1
    sz = math.ceil((dd - patch[2]) / stride[2]) + 1
    score_map, cnt = None, np.zeros(img.shape[1:], dtype=np.float32)
    for x in range(sx):
        xs = min(stride[0] * x, ww - patch[0])
        for y in range(sy):
            ys = min(stride[1] * y, hh - patch[1])
            for z in range(sz):
                zs = min(stride[2] * z, dd - patch[2])
                crop = img[:, xs:xs + patch[0], ys:ys + patch[1], zs:zs + patch[2]]
                out = predict(torch.from_numpy(np.ascontiguousarray(crop))[None].float())[0].numpy()
                if score_map is None:
                    score_map = np.zeros((out.shape[0],) + img.shape[1:], dtype=np.float32)
                score_map[:, xs:xs + patch[0], ys:ys + patch[1], zs:zs + patch[2]] += out
                cnt[xs:xs + patch[0], ys:ys + patch[1], zs:zs + patch[2]] += 1
    score_map = score_map / cnt[None]
    return score_map[:, lo[0]:lo[0] + w, lo[1]:lo[1] + h, lo[2]:lo[2] + d]


def _reference_2d(predict, image: np.ndarray, patch, stride) -> np.ndarray:
    _, w, h = image.shape
    pad = [max(0, p - s) for p, s in zip(patch, (w, h))]
    lo = [p // 2 for p in pad]
    img = np.pad(image, [(0, 0)] + [(l, p - l) for l, p in zip(lo, pad)], mode="constant", constant_values=0)
    _, ww, hh = img.shape
    score_map, cnt = None, np.zeros(img.shape[1:], dtype=np.float32)
    for x in range(math.ceil((ww - patch[0]) / stride[0]) + 1):
        xs = min(stride[0] * x, ww - patch[0])
        for y in range(math.ceil((hh - patch[1]) / stride[1]) + 1):
            ys = min(stride[1] * y, hh - patch[1])
            out = predict(torch.from_numpy(np.ascontiguousarray(img[:, xs:xs + patch[0], ys:ys + patch[1]]))[None])[0]
            if score_map is None:
                score_map = np.zeros((out.shape[0],) + img.shape[1:], dtype=np.float32)
            score_map[:, xs:xs + patch[0], ys:ys + patch[1]] += out.numpy()
            cnt[xs:xs + patch[0], ys:ys + patch[1]] += 1
    score_map = score_map / cnt[None]
    return score_map[:, lo[0]:lo[0] + w, lo[1]:lo[1] + h]


def test_window_starts_match_literature():
    assert window_starts(144, 112, 18) == [0, 18, 32]  # LA x/y: last window clamped to the border
    assert window_starts(88, 80, 4) == [0, 4, 8]
    assert window_starts(96, 96, 16) == [0]
    assert window_starts(100, 96, 16) == [0, 4]
    assert window_starts(50, 96, 16) == [0]  # smaller than the patch: padded first


@pytest.mark.parametrize("shape,patch,stride", [
    ((1, 21, 17, 9), (8, 8, 4), (3, 5, 2)),    # sizes not multiples of the stride
    ((2, 6, 13, 3), (8, 8, 4), (2, 4, 2)),     # smaller than the patch on two axes (odd padding on one)
    ((1, 8, 8, 4), (8, 8, 4), (3, 3, 3)),      # exactly one window
])
@pytest.mark.parametrize("sw_batch_size", [1, 4])
def test_sliding_window_3d_equals_reference(shape, patch, stride, sw_batch_size):
    rng = np.random.default_rng(1)
    image = rng.standard_normal(shape).astype(np.float32)
    predict = _net(3, in_ch=shape[0])
    ref = _reference_3d(predict, image, patch, stride)
    out = sliding_window_inference(predict, torch.from_numpy(image), patch, stride, sw_batch_size=sw_batch_size)
    assert out.shape == (3,) + shape[1:]
    np.testing.assert_allclose(out.numpy(), ref, atol=1e-5)
    np.testing.assert_allclose(out.sum(0).numpy(), 1.0, atol=1e-5)  # still a distribution per voxel


@pytest.mark.parametrize("shape,patch,stride", [((1, 23, 11), (8, 8), (5, 3)), ((3, 5, 19), (8, 8), (2, 7))])
def test_sliding_window_2d_equals_reference(shape, patch, stride):
    image = np.random.default_rng(2).standard_normal(shape).astype(np.float32)
    predict = _net(2, in_ch=shape[0])
    out = sliding_window_inference(predict, torch.from_numpy(image), patch, stride, sw_batch_size=3)
    np.testing.assert_allclose(out.numpy(), _reference_2d(predict, image, patch, stride), atol=1e-5)


def test_windows_are_batched_and_buffer_device_respected():
    calls = []
    predict = _net(3)

    def counting(x):
        calls.append(x.shape[0])
        return predict(x)

    image = torch.randn(1, 14, 14, 10)
    out = sliding_window_inference(counting, image, (8, 8, 4), (3, 3, 3), sw_batch_size=4, out_device="cpu")
    # 3 x 3 x 3 = 27 windows in groups of 4
    assert calls == [4] * 6 + [3]
    assert out.device.type == "cpu" and out.dtype == torch.float32


def test_bad_predict_shape_is_reported():
    from textseg_cli.errors import ConfigError

    with pytest.raises(ConfigError, match="expected"):
        sliding_window_inference(lambda x: x[:, :, :4], torch.randn(1, 10, 10, 6), (8, 8, 4), 2)


def test_whole_volume_pads_to_multiple_and_crops_back():
    seen = []
    pointwise = _net(3, kernel=1)  # no spatial context: whole volume == sliding window exactly

    def predict(x):
        seen.append(tuple(x.shape[2:]))
        return pointwise(x)

    image = torch.randn(1, 21, 17, 9)
    out = whole_volume_inference(predict, image, multiple=16)
    assert seen == [(32, 32, 16)]
    assert out.shape == (3, 21, 17, 9)
    np.testing.assert_allclose(out.numpy(), sliding_window_inference(pointwise, image, (8, 8, 4), 3).numpy(),
                               atol=1e-5)


def test_whole_volume_falls_back_to_windows():
    predict = _net(3)
    image = torch.randn(1, 12, 12, 6)
    expected = sliding_window_inference(predict, image, (8, 8, 4), (4, 4, 2))
    with pytest.warns(RuntimeWarning, match="max_voxels"):
        out = whole_volume_inference(predict, image, multiple=4, max_voxels=100, patch_size=(8, 8, 4), stride=(4, 4, 2))
    np.testing.assert_allclose(out.numpy(), expected.numpy(), atol=1e-6)

    def oom_on_large(x):
        if x.shape[2] > 8:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return predict(x)

    with pytest.warns(RuntimeWarning, match="out of memory"):
        out = whole_volume_inference(oom_on_large, image, multiple=4, patch_size=(8, 8, 4), stride=(4, 4, 2))
    np.testing.assert_allclose(out.numpy(), expected.numpy(), atol=1e-6)

    def other_error(x):
        raise RuntimeError("shape mismatch")

    with pytest.raises(RuntimeError, match="shape mismatch"):
        whole_volume_inference(other_error, image)


def _positional_net(dim: int, patch, in_ch: int = 1, classes: int = 3, seed: int = 0):
    """A conv net plus a fixed bias that depends on the absolute voxel position inside the window: unlike a
    plain conv (translation-equivariant, zero padding either side looks the same) it sees where the odd
    padding voxel went."""
    conv_predict = _net(dim, in_ch, classes, seed=seed)
    grids = torch.meshgrid(*(torch.linspace(0, 1, p) for p in patch), indexing="ij")
    ramp = sum((i + 1) * g for i, g in enumerate(grids))
    bias = torch.stack([k * 2.0 * ramp for k in range(classes)])[None]

    def predict(x: torch.Tensor) -> torch.Tensor:
        probs = conv_predict(x)
        return torch.softmax(torch.log(probs) + bias, dim=1)

    return predict


@pytest.mark.parametrize("shape", [(1, 7, 9, 3), (1, 20, 5, 6)])
def test_sliding_window_odd_padding_with_a_position_sensitive_net(shape):
    patch, stride = (8, 8, 4), (3, 3, 2)
    image = np.random.default_rng(5).standard_normal(shape).astype(np.float32)
    predict = _positional_net(3, patch)
    ref = _reference_3d(predict, image, patch, stride)
    out = sliding_window_inference(predict, torch.from_numpy(image), patch, stride, sw_batch_size=3)
    np.testing.assert_allclose(out.numpy(), ref, atol=1e-5)
    # the same loop with the odd voxel padded on the low side gives a clearly different answer
    lows = [(p - s) - (p - s) // 2 if s < p else 0 for s, p in zip(shape[1:], patch)]
    pads = [(lo, max(0, p - s) - lo) for lo, s, p in zip(lows, shape[1:], patch)]
    padded = np.pad(image, [(0, 0)] + pads)
    wrong = _reference_3d(predict, padded, patch, stride)[(slice(None),) + tuple(slice(lo, lo + s) for lo, s in
                                                                                zip(lows, shape[1:]))]
    assert np.abs(wrong - ref).max() > 1e-2


def test_sliding_window_small_vnet_equals_reference():
    """A V-Net's stride-2 downsampling makes its output depend on the window's position parity."""
    from textseg_cli.models.registry import build_model

    torch.manual_seed(0)
    net = build_model("vnet", 1, 2, n_filters=2, normalization="batchnorm", dim=3).eval()

    def predict(x):
        with torch.no_grad():
            return torch.softmax(net(x), dim=1)

    image = np.random.default_rng(3).standard_normal((1, 21, 13, 17)).astype(np.float32)
    patch, stride = (16, 16, 16), (5, 7, 3)
    ref = _reference_3d(predict, image, patch, stride)
    out = sliding_window_inference(predict, torch.from_numpy(image), patch, stride, sw_batch_size=4)
    np.testing.assert_allclose(out.numpy(), ref, atol=1e-5)
