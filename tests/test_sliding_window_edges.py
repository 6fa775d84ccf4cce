"""Edges of the window and whole-volume inference that the mutation check (scripts/mutation.sh sliding_window)
found untested: stride 1, padding modes, low-precision outputs, whole-volume padding and its fallbacks."""

from __future__ import annotations

import pytest
import torch

from textseg_cli.errors import ConfigError
from textseg_cli.inference.sliding_window import sliding_window_inference, whole_volume_inference, window_starts


def _identity(x: torch.Tensor) -> torch.Tensor:  # (B, 1, *s) -> probabilities (B, 2, *s) that echo the input
    return torch.cat([1 - x, x], dim=1)


def _window_mean(x: torch.Tensor) -> torch.Tensor:  # each window's mean intensity everywhere: sees the padding
    m = x.mean(dim=tuple(range(1, x.dim())), keepdim=True).expand_as(x)
    return torch.cat([1 - m, m], dim=1)


def test_stride_one_visits_every_offset_and_zero_is_refused():
    assert window_starts(5, 3, 1) == [0, 1, 2]
    assert window_starts(3, 3, 1) == [0]
    with pytest.raises(ConfigError, match=">= 1"):
        window_starts(5, 3, 0)


def test_padding_mode_reaches_the_windows():
    ones = torch.ones(1, 6, 6, 6)
    rep = sliding_window_inference(_window_mean, ones, 8, 4, pad_mode="replicate")
    const = sliding_window_inference(_window_mean, ones, 8, 4)
    assert rep.shape == (2, 6, 6, 6) and torch.allclose(rep[1], torch.ones(6, 6, 6))
    assert float(const[1].max()) < 1.0  # zeros came in with the constant padding


def test_low_precision_outputs_accumulate_in_float32():
    x = torch.rand(1, 10, 9, 7)
    out = sliding_window_inference(lambda t: _identity(t).to(torch.bfloat16), x, 6, 3)
    assert out.dtype == torch.float32
    assert torch.allclose(out[1], x[0], atol=1e-2)


def test_whole_volume_pads_to_the_multiple_and_crops_back():
    x = torch.rand(1, 17, 20, 9)
    seen = []

    def fn(t):
        seen.append(tuple(t.shape))
        return _identity(t).to(torch.bfloat16)

    out = whole_volume_inference(fn, x, multiple=16)
    assert seen == [(1, 1, 32, 32, 16)]
    assert out.shape == (2, 17, 20, 9) and out.dtype == torch.float32
    assert torch.allclose(out[1], x[0], atol=1e-2)


def test_whole_volume_falls_back_to_windows_when_too_large_or_out_of_memory():
    x = torch.rand(1, 12, 12, 8)
    with pytest.warns(RuntimeWarning, match="max_voxels"):
        big = whole_volume_inference(_identity, x, multiple=16, max_voxels=100, patch_size=8, stride=4)
    assert torch.allclose(big, sliding_window_inference(_identity, x, 8, 4))
    calls = []

    def oom_once(t):
        calls.append(tuple(t.shape))
        if len(calls) == 1:
            raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return _identity(t)

    with pytest.warns(RuntimeWarning, match="out of memory"):
        out = whole_volume_inference(oom_once, x, multiple=16, patch_size=8, stride=4)
    assert calls[0] == (1, 1, 16, 16, 16) and all(c[2:] == (8, 8, 8) for c in calls[1:])
    assert torch.allclose(out, sliding_window_inference(_identity, x, 8, 4))

    def broken(t):
        raise RuntimeError("shape mismatch in layer 3")

    with pytest.raises(RuntimeError, match="shape mismatch"):
        whole_volume_inference(broken, x)


def test_whole_volume_defaults_multiple_16_and_the_fallback_window():
    x = torch.rand(1, 17, 20, 9)
    seen = []
    whole_volume_inference(lambda t: (seen.append(tuple(t.shape)), _identity(t))[1], x)
    assert seen == [(1, 1, 32, 32, 16)]  # default multiple 16 (the V-Net family's four downsamplings)
    assert whole_volume_inference(_identity, x, max_voxels=32 * 32 * 16).shape == (2, 17, 20, 9)  # equal: no fallback
    with pytest.warns(RuntimeWarning, match=r"sliding windows \[96, 96, 96\] stride \[48, 48, 48\]"):
        whole_volume_inference(_identity, x, max_voxels=32 * 32 * 16 - 1)
