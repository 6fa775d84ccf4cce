"""Splits: validation carving and the field's labeled-subset convention."""

from __future__ import annotations

import math
import random
from typing import Sequence

from textseg_cli.data.names import check_case_ids
from textseg_cli.errors import ConfigError, DataError


def parse_labeled(value: str | int | None, n_train: int) -> int:
    """'8' -> 8, '10%' -> round(10% of n_train); None -> all training cases labeled."""
    if value is None:
        return n_train
    text = str(value).strip()
    try:
        if text.endswith("%"):
            pct = float(text[:-1])
            if not 0 < pct <= 100:
                raise ValueError
            n = int(math.floor(n_train * pct / 100 + 0.5))
        else:
            n = int(text)
    except ValueError:
        raise ConfigError(f"--labeled {value!r}: expected a count like 8 or a percentage like 10%") from None
    if not 1 <= n <= n_train:
        raise ConfigError(f"--labeled {value!r} gives {n} cases; the training split has {n_train}")
    return n


def labeled_subset(train_ids: Sequence[str], labeled: str | int | None) -> tuple[list[str], list[str]]:
    """The first N cases of the training list in its standard order are labeled, the rest unlabeled."""
    n = parse_labeled(labeled, len(train_ids))
    return list(train_ids[:n]), list(train_ids[n:])


def carve_validation(train_ids: Sequence[str], n_val: int, seed: int, keep_first: int = 0) -> tuple[list[str], list[str]]:
    """Move `n_val` seeded-random training cases to validation, keeping the standard order of the rest.

    `keep_first` protects the head of the list (the labeled subset of the convention) from being drawn.
    """
    if n_val <= 0:
        return list(train_ids), []
    pool = list(train_ids[keep_first:])
    if n_val > len(pool):
        raise ConfigError(f"--val {n_val} asks for more cases than the {len(pool)} available")
    val = set(random.Random(seed).sample(pool, n_val))
    return [c for c in train_ids if c not in val], [c for c in train_ids if c in val]


def apply_fold(ds, fold: int | None) -> None:
    """Make fold `fold` of a prepared set's `extra.folds` (`prep custom --folds K`) its train/val split,
    in memory; None leaves the splits as they are."""
    if fold is None:
        return
    folds = (ds.spec.get("extra") or {}).get("folds") or []
    if not folds:
        raise ConfigError(f"--fold {fold}: {ds.root} records no folds (prepare it with --folds K)")
    if not 0 <= int(fold) < len(folds):
        raise ConfigError(f"--fold {fold}: expected 0 to {len(folds) - 1} ({len(folds)} folds)")
    chosen = folds[int(fold)]
    where = ds.root / "dataset.json"
    if not isinstance(chosen, dict) or not all(isinstance(chosen.get(k), list) for k in ("train", "val")):
        raise DataError(f"extra.folds[{fold}] must hold 'train' and 'val' lists of case ids", where)
    known = set(ds.case_ids)
    for key in ("train", "val"):
        check_case_ids(chosen[key], where)
        unknown = [c for c in chosen[key] if c not in known]
        if unknown:
            raise DataError(f"extra.folds[{fold}].{key} names unknown case(s) {unknown[:10]}", where)
    ds.spec["splits"] = {**ds.spec["splits"], "train": list(chosen["train"]), "val": list(chosen["val"])}
