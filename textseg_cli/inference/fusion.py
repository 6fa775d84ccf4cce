"""Folding BatchNorm into the preceding convolution for inference.

In eval mode a BatchNorm is a fixed per-channel affine map, so `BN(conv(x))` equals one convolution
with rescaled weights and a shifted bias. Folding removes one full pass over every feature map,
which on a CPU makes a V-Net forward pass about 8 % faster. The result is numerically equal up to
float rounding (~1e-7).
"""

from __future__ import annotations

import copy
import weakref

import torch.nn as nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_DECONVS = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
_BNS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


def _foldable(conv: nn.Module, bn: nn.Module) -> bool:
    return (isinstance(conv, _CONVS + _DECONVS) and type(bn) in _BNS and bn.track_running_stats
            and bn.running_mean is not None and bn.num_features == conv.out_channels)


def fuse_conv_bn(module: nn.Module) -> tuple[nn.Module, int]:
    """An eval-mode copy of `module` where every (transposed) conv directly followed by a BatchNorm
    inside an `nn.Sequential` is folded into one conv (the BatchNorm becomes `nn.Identity`).

    Only sequential containers are touched, so custom forward code keeps its meaning. Returns the
    copy and the number of folded pairs; `module` itself is unchanged. The copy shares every parameter
    and buffer with `module` (frozen towers, EMA teachers, unfolded layers): only folded convs are new.
    """
    shared = {id(t): t for t in (*module.parameters(), *module.buffers())}
    fused = copy.deepcopy(module, memo=dict(shared)).eval()
    count = 0
    for seq in fused.modules():
        if not isinstance(seq, nn.Sequential):
            continue
        names = list(seq._modules)
        for first, second in zip(names, names[1:]):
            conv, bn = seq._modules[first], seq._modules[second]
            if _foldable(conv, bn):
                seq._modules[first] = fuse_conv_bn_eval(conv, bn, transpose=isinstance(conv, _DECONVS))
                seq._modules[second] = nn.Identity()
                count += 1
    return fused, count


_CACHE: "weakref.WeakKeyDictionary[nn.Module, tuple[tuple, nn.Module]]" = weakref.WeakKeyDictionary()


def fused_for_inference(module: nn.Module) -> nn.Module:
    """`fuse_conv_bn(module)`, cached until any parameter or buffer of `module` changes in place
    (optimizer steps, `load_state_dict` and BatchNorm statistics all bump tensor version counters)."""
    key = tuple((t.data_ptr(), t._version, t.device) for t in (*module.parameters(), *module.buffers()))
    hit = _CACHE.get(module)
    if hit is not None and hit[0] == key:
        return hit[1]
    fused, _ = fuse_conv_bn(module)
    _CACHE[module] = (key, fused)
    return fused


def release_inference_copy(module: nn.Module) -> None:
    """Drop the cached folded copy of `module` (the trainer calls it after each validation, so the copy
    does not hold device memory while training runs)."""
    _CACHE.pop(module, None)
