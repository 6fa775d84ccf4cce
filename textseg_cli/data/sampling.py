"""Two-stream patch sampling from volumes preloaded in memory.

Labeled and unlabeled cases cycle independently (each in seeded shuffled passes, like the field's
TwoStreamBatchSampler); each draw is a random crop of the patch size, done by array slicing. Volumes
smaller than the patch are zero-padded symmetrically once, when loaded. All randomness comes from one
dedicated `numpy.random.Generator`, whose state (with the cycle positions) is checkpointed so a resumed
run draws exactly the patches the uninterrupted run would have drawn.

Unlabeled cases are loaded with `load_case(id, with_label=False)`: their label files are never opened.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np
import torch

from textseg_cli.data.augment import random_rot_flip
from textseg_cli.data.augment_lvit import random_generator
from textseg_cli.data.batch import Batch
from textseg_cli.data.prepared import PreparedDataset
from textseg_cli.errors import ConfigError, DataError


def pad_to(image: np.ndarray, label: np.ndarray | None, min_size: Sequence[int]):
    """Zero-pad (C, *spatial) image and (*spatial) label symmetrically up to at least `min_size`."""
    spatial = image.shape[1:]
    pads = []
    for s, m in zip(spatial, min_size):
        extra = max(0, int(m) - s)
        pads.append((extra // 2, extra - extra // 2))
    if not any(a or b for a, b in pads):
        return image, label
    image = np.pad(image, [(0, 0)] + pads, mode="constant")
    if label is not None:
        label = np.pad(label, pads, mode="constant")
    return image, label


class CaseCycle:
    """Endless sequence of case indices: shuffled passes over 0..n-1."""
    def __init__(self, n: int):
        self.n = n
        self.order: list[int] = []
        self.pos = 0

    def next(self, rng: np.random.Generator) -> int:
        if self.pos >= len(self.order):
            self.order = rng.permutation(self.n).tolist()
            self.pos = 0
        self.pos += 1
        return self.order[self.pos - 1]

    def state_dict(self) -> dict[str, Any]:
        return {"order": list(self.order), "pos": self.pos, "n": self.n}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state["n"] != self.n:
            raise DataError(f"checkpoint sampler saw {state['n']} cases, this run has {self.n}")
        self.order, self.pos = list(state["order"]), int(state["pos"])


@dataclass
class Augment:
    flip: bool = False
    rot90: bool = False
    rotflip: bool = False  # the official LA scripts' RandomRotFlip on the volume, before the crop (data/augment.py)
    lvit: bool = False  # LViT's RandomGenerator (data/augment_lvit.py), after the crop


class TwoStreamSampler:
    """Draws `Batch`es of `batch_labeled` labeled and `batch_unlabeled` unlabeled random patches."""

    def __init__(self, images_l: list[np.ndarray], labels_l: list[np.ndarray], images_u: list[np.ndarray],
                 patch_size: Sequence[int], batch_labeled: int, batch_unlabeled: int, seed: int | Sequence[int],
                 augment: Augment | None = None, ids_l: Sequence[str] = (), ids_u: Sequence[str] = (),
                 texts_l: Sequence[str | None] | None = None, texts_u: Sequence[str | None] | None = None,
                 label_targets: Callable[[np.ndarray], dict[str, np.ndarray] | None] | None = None):
        if not images_l:
            raise DataError("no labeled training cases")
        self.patch = [int(p) for p in patch_size]
        self.augment = augment or Augment()
        if self.augment.lvit and len(self.patch) != 2:
            raise ConfigError("data.augment.lvit is LViT's 2D augmentation; this data set is "
                              f"{len(self.patch)}D")
        # rot90 swaps the first two axes of a patch, so volumes must cover the larger of the two
        need = list(self.patch)
        if (self.augment.rot90 or self.augment.rotflip) and len(need) >= 2:
            need[0] = need[1] = max(need[0], need[1])
        padded = [pad_to(i, l, need) for i, l in zip(images_l, labels_l)]
        self.images_l = [p[0] for p in padded]
        self.labels_l = [p[1] for p in padded]
        self.images_u = [pad_to(i, None, need)[0] for i in images_u]
        self.batch_l, self.batch_u = int(batch_labeled), int(batch_unlabeled) if images_u else 0
        self.ids_l, self.ids_u = list(ids_l), list(ids_u)
        self.texts_l, self.texts_u = texts_l, texts_u
        self.label_targets = label_targets  # the method's maps derived from each labeled patch (Batch.extra)
        self.rng = np.random.default_rng(seed)
        self.cycle_l = CaseCycle(len(self.images_l))
        self.cycle_u = CaseCycle(max(1, len(self.images_u)))

    # --- drawing -----------------------------------------------------------------------------
    def _crop(self, image: np.ndarray, label: np.ndarray | None):
        if self.augment.rotflip:  # whole volume first, then the crop, as the official Compose order
            image, label = random_rot_flip(image, label, self.rng, channel_axis=True)
        k = int(self.rng.integers(4)) if self.augment.rot90 else 0
        size = list(self.patch)
        if k % 2 == 1:  # crop the transposed window so the rotated patch has the patch shape
            size[0], size[1] = size[1], size[0]
        starts = [int(self.rng.integers(0, s - p + 1)) for s, p in zip(image.shape[1:], size)]
        sl = tuple(slice(a, a + p) for a, p in zip(starts, size))
        img = image[(slice(None),) + sl]
        lab = label[sl] if label is not None else None
        if k:
            img = np.rot90(img, k, axes=(1, 2))
            lab = np.rot90(lab, k, axes=(0, 1)) if lab is not None else None
        if self.augment.flip:
            for ax in range(len(size)):
                if self.rng.random() < 0.5:
                    img = np.flip(img, axis=ax + 1)
                    lab = np.flip(lab, axis=ax) if lab is not None else None
        if self.augment.lvit:
            img, lab = random_generator(img, lab, self.rng)
        return img, lab

    def next_batch(self) -> Batch:
        imgs_l, labs_l, ids_l, txt_l = [], [], [], []
        for _ in range(self.batch_l):
            i = self.cycle_l.next(self.rng)
            img, lab = self._crop(self.images_l[i], self.labels_l[i])
            imgs_l.append(img)
            labs_l.append(lab)
            ids_l.append(self.ids_l[i] if self.ids_l else str(i))
            txt_l.append(self.texts_l[i] if self.texts_l else None)
        imgs_u, ids_u, txt_u = [], [], []
        for _ in range(self.batch_u):
            i = self.cycle_u.next(self.rng)
            img, _ = self._crop(self.images_u[i], None)
            imgs_u.append(img)
            ids_u.append(self.ids_u[i] if self.ids_u else str(i))
            txt_u.append(self.texts_u[i] if self.texts_u else None)
        extra: dict[str, list[np.ndarray]] = {}
        for lab in labs_l if self.label_targets is not None else ():
            for k, v in (self.label_targets(lab) or {}).items():
                extra.setdefault(k, []).append(v)
        c = self.images_l[0].shape[0]
        image_u = (torch.from_numpy(np.ascontiguousarray(np.stack(imgs_u))) if imgs_u
                   else torch.zeros((0, c, *self.patch), dtype=torch.float32))
        return Batch(
            image_l=torch.from_numpy(np.ascontiguousarray(np.stack(imgs_l))),
            label_l=torch.from_numpy(np.ascontiguousarray(np.stack(labs_l))).long(),
            image_u=image_u, ids_l=ids_l, ids_u=ids_u,
            text_l=txt_l if self.texts_l else None, text_u=txt_u if self.texts_u else None,
            extra={k: torch.from_numpy(np.ascontiguousarray(np.stack(v))) for k, v in extra.items()},
        )

    # --- checkpointing -------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {"rng": self.rng.bit_generator.state, "cycle_l": self.cycle_l.state_dict(),
                "cycle_u": self.cycle_u.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.rng.bit_generator.state = state["rng"]
        self.cycle_l.load_state_dict(state["cycle_l"])
        self.cycle_u.load_state_dict(state["cycle_u"])


def load_training_cases(ds: PreparedDataset, labeled_ids: Sequence[str], unlabeled_ids: Sequence[str],
                        progress_cb=None):
    """Preload images (and labels of labeled cases only) as float32/uint8 arrays."""
    images_l, labels_l, images_u = [], [], []
    for cid in labeled_ids:
        if not ds.has_label(cid):
            raise DataError(f"case '{cid}' is among the labeled cases but has no label file; "
                            "put image-only cases after the labeled ones in splits.train", ds.root / "dataset.json")
        case = ds.load_case(cid, with_label=True)
        images_l.append(case.image.astype(np.float32, copy=False))
        labels_l.append(case.label)
        if progress_cb:
            progress_cb()
    for cid in unlabeled_ids:
        case = ds.load_case(cid, with_label=False)  # never opens the label file
        images_u.append(case.image.astype(np.float32, copy=False))
        if progress_cb:
            progress_cb()
    return images_l, labels_l, images_u
