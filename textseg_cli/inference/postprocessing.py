"""Post-processing chosen on validation: keep a class's largest connected component only where that helps.

nnU-Net's `determine_postprocessing` compares, per foreground class, the mean validation Dice of the predictions
with and without "remove all but the largest component" and keeps the step only when it raises the mean
(strictly). `choose_lcc` does the same on a run's validation cases (label maps: LCC of one class turns only that
class's voxels into background, so each class is decided on its own; nnU-Net's extra "whole foreground as one
region" trial is not made). `textseg eval RUN --choose-postprocessing` records the decision in
`RUN/postprocessing.json` (`write_postprocessing`, atomic); `--inference best` replays it in `eval` and `predict`
(`read_postprocessing`, `lcc_classes`). The papers' protocol (`--inference paper`) never reads it.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from textseg_cli.errors import DataError
from textseg_cli.metrics.case import evaluate_case
from textseg_cli.metrics.postprocess import lcc_per_class
from textseg_cli.storage.files import atomic_write_json, read_json

__all__ = ["POSTPROCESSING_FILE", "apply_lcc", "choose_lcc", "describe", "lcc_classes", "read_postprocessing",
           "write_postprocessing"]

POSTPROCESSING_FILE = "postprocessing.json"
FORMAT = "textseg-postprocessing-1"


def apply_lcc(mask: np.ndarray, classes: Sequence[int] | None) -> np.ndarray:
    """`mask` with the largest connected component of each class in `classes` kept (others untouched)."""
    return lcc_per_class(mask, classes) if classes else np.asarray(mask)


def _mean(values: list[float]) -> float | None:
    finite = [v for v in values if v is not None and math.isfinite(v)]
    return float(np.mean(finite)) if finite else None


def choose_lcc(pairs: Iterable[tuple[str, np.ndarray, np.ndarray]], num_classes: int,
               class_names: Sequence[str] | None = None, empty_policy: str = "nan") -> dict[str, Any]:
    """Per foreground class, whether keeping only its largest connected component raises the mean Dice over
    `pairs` (case id, predicted label map, reference label map): kept only if the mean with LCC is strictly
    higher, as nnU-Net decides. Dice per case under `empty_policy`, mean over the cases whose Dice is finite.
    Returns the record `write_postprocessing` stores: `classes` (one entry per class: class, name, lcc,
    dice_without, dice_with) and `cases` (the case ids)."""
    names = list(class_names or [])
    without: dict[int, list[float]] = {c: [] for c in range(1, num_classes)}
    with_lcc: dict[int, list[float]] = {c: [] for c in range(1, num_classes)}
    cases: list[str] = []
    for cid, pred, ref in pairs:
        pred, ref = np.asarray(pred), np.asarray(ref)
        cases.append(str(cid))
        for row in evaluate_case(pred, ref, num_classes, empty_policy=empty_policy, metrics=("dice",)):
            without[row["class"]].append(float(row["dice"]))
        kept = lcc_per_class(pred, range(1, num_classes))
        for row in evaluate_case(kept, ref, num_classes, empty_policy=empty_policy, metrics=("dice",)):
            with_lcc[row["class"]].append(float(row["dice"]))
    if not cases:
        raise DataError("no validation case to choose the post-processing on")
    classes = []
    for c in range(1, num_classes):
        before, after = _mean(without[c]), _mean(with_lcc[c])
        keep = before is not None and after is not None and after > before
        classes.append({"class": c, "name": names[c - 1] if c - 1 < len(names) else f"class{c}", "lcc": bool(keep),
                        "dice_without": before, "dice_with": after})
    return {"format": FORMAT, "rule": "keep a class's largest connected component only if it raises that class's "
                                      "mean validation Dice (nnU-Net's determine_postprocessing)",
            "empty_policy": empty_policy, "classes": classes, "cases": cases}


def write_postprocessing(run_dir: str | Path, record: Mapping[str, Any]) -> Path:
    """Write `record` (from `choose_lcc`, plus what the caller adds) to RUN/postprocessing.json, atomically."""
    path = Path(run_dir) / POSTPROCESSING_FILE
    atomic_write_json(path, dict(record))
    return path


def read_postprocessing(run_dir: str | Path) -> dict[str, Any] | None:
    """RUN/postprocessing.json, or None when the run has none; a malformed file is a DataError naming it."""
    path = Path(run_dir) / POSTPROCESSING_FILE
    if not path.is_file():
        return None
    rec = read_json(path)
    ok = isinstance(rec, dict) and isinstance(rec.get("classes"), list) and all(
        isinstance(c, dict) and isinstance(c.get("class"), int) and isinstance(c.get("lcc"), bool)
        for c in rec["classes"])
    if not ok:
        raise DataError("not a post-processing record (expected {'classes': [{'class': 1, 'lcc': true}, ...]}); "
                        "write it again with `textseg eval RUN --choose-postprocessing`", path)
    return rec


def lcc_classes(record: Mapping[str, Any] | None) -> tuple[int, ...]:
    """The classes whose largest connected component the record keeps (empty: none, or no record)."""
    return tuple(int(c["class"]) for c in (record or {}).get("classes") or [] if c.get("lcc"))


def describe(record: Mapping[str, Any]) -> str:
    """One line: per class, the decision and the Dice numbers that made it."""
    def pct(v: float | None) -> str:
        return "n/a" if v is None else f"{100 * v:.2f}"
    return "; ".join(f"{c.get('name', c['class'])}: LCC {'on' if c['lcc'] else 'off'} "
                     f"(Dice {pct(c.get('dice_without'))} -> {pct(c.get('dice_with'))})"
                     for c in record.get("classes") or [])
