"""Benchmark-only restatements of the papers' training step and sliding-window loop (`textseg bench --reference`).

They exist so every speed claim is a ratio measured side by side in one run; nothing else uses them.

- `reference_sliding_window`: the loop of the literature's `test_single_case` (UA-MT, MC-Net
  `code/utils/test_patch.py:104-165`, BCP, ...): numpy padding (odd voxel high), nested x/y/z loops, one
  window per forward pass of the whole network in float32 (a multi-decoder network runs all its
  decoders and the first output is kept, as `y = model(test_patch); y = y[0]` there), softmax, a copy to
  numpy, accumulation into a score map and a count map, division, crop.
- `reference_train_step`: the published loop's step (MC-Net `code/train_mcnet_3d.py:131-166`): the
  method's own loss in float32 with contiguous (NCDHW) tensors, `zero_grad`, `backward`, SGD `step`.
  The loss is the method's `training_step`, equal to the published objective (tests/parity).
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import torch


def _papers_forward(method, x: torch.Tensor, decoder) -> torch.Tensor:
    """Logits as the published test scripts get them: the full network, all decoders, one output kept."""
    net = getattr(method, "net", None)
    if net is not None and hasattr(net, "decoders"):
        outputs = net(x)
        idx = method._decoder_index(decoder) if hasattr(method, "_decoder_index") else 0
        return outputs[0 if idx == "mean" else idx]
    return method.predict_logits(x, decoder)


def reference_sliding_window(method, image: np.ndarray, patch: Sequence[int], stride: Sequence[int],
                             decoder=None) -> np.ndarray:
    """Averaged probabilities (K, *spatial) of `method` on `image` (C, *spatial), window by window in fp32."""
    method.eval()
    spatial = image.shape[1:]
    lows, pads = [], []
    for s, p in zip(spatial, patch):
        extra = max(0, p - s)
        lows.append(extra // 2)
        pads.append((extra // 2, extra - extra // 2))
    img = np.pad(image, [(0, 0)] + pads, mode="constant", constant_values=0)
    full = img.shape[1:]
    counts_per_axis = [math.ceil((f - p) / st) + 1 for f, p, st in zip(full, patch, stride)]
    score = None
    cnt = np.zeros(full, dtype=np.float32)
    for idx in np.ndindex(*counts_per_axis):
        starts = [min(st * i, f - p) for i, st, f, p in zip(idx, stride, full, patch)]
        box = tuple(slice(a, a + p) for a, p in zip(starts, patch))
        crop = np.ascontiguousarray(img[(slice(None),) + box])[None].astype(np.float32)
        with torch.no_grad():
            out = torch.softmax(_papers_forward(method, torch.from_numpy(crop), decoder), dim=1)
        out = out.cpu().numpy()[0]
        if score is None:
            score = np.zeros((out.shape[0],) + full, dtype=np.float32)
        score[(slice(None),) + box] += out
        cnt[box] += 1
    score = score / cnt[None]
    return score[(slice(None),) + tuple(slice(lo, lo + s) for lo, s in zip(lows, spatial))]


def reference_train_step(method, batch, optimizer, ctx) -> float:
    """One published-style step: fp32, contiguous tensors, loss → zero_grad → backward → step."""
    out = method.training_step(batch, ctx)
    optimizer.zero_grad()
    out["loss"].backward()
    optimizer.step()
    method.on_after_optimizer_step(ctx)
    return float(out["loss"].detach())
