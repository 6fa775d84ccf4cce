"""Drawing the next training batches in a background thread while the current step computes.

`BatchPrefetcher` wraps a `TwoStreamSampler`: one worker thread crops the next `depth` batches (numpy
slicing releases the GIL for the copies) and, for a CUDA run, copies them into pinned memory so the
host-to-device copy is asynchronous. Batches are drawn in the same order from the same generator, so
they are bit-identical to the sampler's own; `state_dict()` is the sampler's state before the first
batch not yet handed out, so a checkpoint resumes exactly where the training loop (not the thread) was.
One thread is enough: a crop of 2+2 patches of 112x112x80 takes milliseconds, a training step far longer.
"""

from __future__ import annotations

import collections
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import torch

from textseg_cli.data.batch import Batch
from textseg_cli.errors import ConfigError


def _pinned(batch: Batch) -> Batch:
    pin = lambda t: t.pin_memory() if isinstance(t, torch.Tensor) else t  # noqa: E731
    return Batch(pin(batch.image_l), pin(batch.label_l), pin(batch.image_u), batch.ids_l, batch.ids_u,
                 batch.text_l, batch.text_u, {k: pin(v) for k, v in batch.extra.items()})


class BatchPrefetcher:
    """`next_batch()` / `state_dict()` / `load_state_dict()` like the sampler it wraps, `depth` batches ahead."""

    def __init__(self, sampler, depth: int = 2, pin_memory: bool = False):
        self.sampler = sampler
        self.depth = max(1, int(depth))
        self.pin_memory = bool(pin_memory)
        self._pool: ThreadPoolExecutor | None = None
        self._queue: collections.deque[Future] = collections.deque()

    def _draw(self) -> tuple[dict[str, Any], Batch]:
        state = self.sampler.state_dict()
        batch = self.sampler.next_batch()
        return state, _pinned(batch) if self.pin_memory else batch

    def _fill(self) -> None:
        if self._pool is None:  # started lazily: a resumed run loads its state first
            self._pool = ThreadPoolExecutor(1, thread_name_prefix="textseg-prefetch")
        while len(self._queue) < self.depth:
            self._queue.append(self._pool.submit(self._draw))

    def next_batch(self) -> Batch:
        self._fill()
        _, batch = self._queue.popleft().result()
        self._fill()
        return batch

    def state_dict(self) -> dict[str, Any]:
        if self._queue:
            return self._queue[0].result()[0]
        return self.sampler.state_dict()

    def _drain(self) -> None:
        while self._queue:
            self._queue.popleft().result()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._drain()
        self.sampler.load_state_dict(state)

    def close(self) -> None:
        self._drain()
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None


def prefetch_depth(setting: Any, device: torch.device) -> int:
    """`train.prefetch`: "auto" → 2 batches ahead on CUDA, none on CPU (the cores are busy computing);
    an integer N → N batches ahead (0 = off); true/false → 2/0."""
    if setting in (None, "auto"):
        return 2 if device.type == "cuda" else 0
    if isinstance(setting, bool):
        return 2 if setting else 0
    try:
        value = int(setting)
    except (TypeError, ValueError):
        raise ConfigError(f"train.prefetch {setting!r}: expected auto, true, false or a number of batches") from None
    return max(0, value)


def with_prefetch(sampler, setting: Any, device: torch.device):
    """The sampler, or a `BatchPrefetcher` around it (pinned memory on CUDA) as `train.prefetch` says."""
    depth = prefetch_depth(setting, device)
    if depth == 0:
        return sampler
    return BatchPrefetcher(sampler, depth, pin_memory=device.type == "cuda")
