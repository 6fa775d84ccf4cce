"""The prepared-data format: one folder per data set with NIfTI files and a `dataset.json`.

Layout::

    <out>/dataset.json
    <out>/images/<case>.nii.gz    float32, (x, y, z) or (x, y, z, C); 2D sets: (x, y) or (x, y, C)
    <out>/labels/<case>.nii.gz    uint8 class indices, same grid; absent for image-only cases

`dataset.json` keys (FORMAT = "textseg-prepared/1"):
    format, name, dim (2|3), modality, channel_names, class_names (background first),
    spacing (typical spacing), patch_size (training default), cases [{id, image, label|null,
    shape, spacing, text?}], splits {train (standard order), val, test}, labeled {rule, ...},
    preprocessing [{step, params}], source {layout, paths}, tool_version, created, seed, extra.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from textseg_cli.data.io import read_nifti
from textseg_cli.data.names import case_id_problems, check_case_id
from textseg_cli.errors import DataError
from textseg_cli.storage.files import read_json

FORMAT = "textseg-prepared/1"
REQUIRED_KEYS = ("format", "name", "dim", "modality", "channel_names", "class_names", "cases", "splits",
                 "preprocessing", "source", "tool_version")


@dataclass
class Case:
    id: str
    image: np.ndarray  # float32, (C, x, y[, z])
    label: np.ndarray | None  # uint8, (x, y[, z]) or None when not requested / image-only
    spacing: tuple[float, ...]
    text: str | None = None
    meta: dict[str, Any] = field(default_factory=dict)


class PreparedDataset:
    """A validated prepared folder. Loads cases lazily; `load_case(id, with_label=False)` never
    touches the label file, so unlabeled training cases stay unread."""

    def __init__(self, root: str | Path, spec: dict[str, Any]):
        self.root = Path(root)
        self.spec = spec
        self._cases = {c["id"]: c for c in spec["cases"]}

    # --- facts -----------------------------------------------------------------
    @property
    def name(self) -> str:
        return self.spec["name"]

    @property
    def dim(self) -> int:
        return int(self.spec["dim"])

    @property
    def class_names(self) -> list[str]:
        return list(self.spec["class_names"])

    @property
    def num_classes(self) -> int:
        return len(self.spec["class_names"])

    @property
    def in_channels(self) -> int:
        return len(self.spec["channel_names"])

    @property
    def patch_size(self) -> list[int] | None:
        return self.spec.get("patch_size")

    @property
    def case_ids(self) -> list[str]:
        return list(self._cases)

    def split(self, name: str) -> list[str]:
        splits = self.spec["splits"]
        if name not in splits:
            raise DataError(f"no split '{name}' (have {sorted(k for k in splits)})", self.root / "dataset.json")
        return list(splits[name])

    def has_label(self, case_id: str) -> bool:
        return self._entry(case_id).get("label") is not None

    def text(self, case_id: str) -> str | None:
        return self._entry(case_id).get("text")

    def _entry(self, case_id: str) -> dict[str, Any]:
        try:
            return self._cases[case_id]
        except KeyError:
            raise DataError(f"unknown case '{case_id}'", self.root / "dataset.json") from None

    # --- loading -----------------------------------------------------------------
    def image_path(self, case_id: str) -> Path:
        return self.root / self._entry(case_id)["image"]

    def label_path(self, case_id: str) -> Path | None:
        rel = self._entry(case_id).get("label")
        return None if rel is None else self.root / rel

    def load_case(self, case_id: str, with_label: bool = True) -> Case:
        entry = self._entry(case_id)
        vol = read_nifti(self.root / entry["image"], dtype=np.float32)
        img = vol.array
        if img.ndim == self.dim:  # single channel
            img = img[None]
        else:  # channels stored last
            img = np.moveaxis(img, -1, 0)
        label = None
        if with_label:
            lp = self.label_path(case_id)
            if lp is None:
                raise DataError(f"case '{case_id}' has no label (image-only case)", self.root / "dataset.json")
            label = read_nifti(lp).array
            if label.shape != img.shape[1:]:
                raise DataError(f"label shape {label.shape} differs from image shape {img.shape[1:]}", lp)
            label = label.astype(np.uint8, copy=False)
        return Case(case_id, np.ascontiguousarray(img), label, tuple(vol.spacing[: self.dim]), entry.get("text"),
                    {k: v for k, v in entry.items() if k not in ("id", "image", "label", "text")})

    def validate_files(self, check_contents: bool = False) -> None:
        """Check every referenced file exists (and optionally loads with matching geometry)."""
        for cid, entry in self._cases.items():
            for key in ("image", "label"):
                rel = entry.get(key)
                if rel is None:
                    continue
                if not (self.root / rel).exists():
                    raise DataError(f"case '{cid}': {key} file missing", self.root / rel)
            if check_contents:
                case = self.load_case(cid, with_label=entry.get("label") is not None)
                if case.label is not None:
                    bad = np.setdiff1d(np.unique(case.label), np.arange(self.num_classes))
                    if bad.size:
                        raise DataError(f"case '{cid}': label values {bad.tolist()} outside 0..{self.num_classes - 1}",
                                        self.label_path(cid))


def validate_spec(spec: Any, where: Path) -> dict[str, Any]:
    if not isinstance(spec, dict):
        raise DataError("dataset.json must hold a JSON object", where)
    missing = [k for k in REQUIRED_KEYS if k not in spec]
    if missing:
        raise DataError(f"missing field(s) {missing}", where)
    if spec["format"] != FORMAT:
        raise DataError(f"field 'format' is {spec['format']!r}, expected {FORMAT!r}", where)
    if spec["dim"] not in (2, 3):
        raise DataError(f"field 'dim' is {spec['dim']!r}, expected 2 or 3", where)
    if not isinstance(spec["class_names"], list) or len(spec["class_names"]) < 2:
        raise DataError("field 'class_names' must list background and at least one class", where)
    if not isinstance(spec["cases"], list):
        raise DataError("field 'cases' must be a list", where)
    if not isinstance(spec["splits"], dict):
        raise DataError("field 'splits' must map split names to lists of case ids", where)
    ids = set()
    for i, c in enumerate(spec["cases"]):
        if not isinstance(c, dict) or "id" not in c or "image" not in c:
            raise DataError(f"cases[{i}] needs 'id' and 'image'", where)
        check_case_id(c["id"], where)  # IDs become file names (eval, predict, export-data): no '/', '..'
        if c["id"] in ids:
            raise DataError(f"case '{c['id']}' listed twice", where)
        ids.add(c["id"])
    for split, members in spec["splits"].items():
        if not isinstance(members, list):
            if split in SPLIT_NAMES:
                raise DataError(f"field 'splits.{split}' must be a list of case ids, got {type(members).__name__} "
                                f"{members!r:.60}", where)
            continue
        unknown = [m for m in members if not isinstance(m, str) or m not in ids]
        if unknown:
            raise DataError(f"split '{split}' names unknown case(s) {unknown[:5]}", where)
        twice = sorted({m for m in members if members.count(m) > 1})
        if twice:
            raise DataError(f"split '{split}' lists case(s) {twice[:5]} more than once", where)
    check_split_overlap(spec["splits"], where)
    return spec


SPLIT_NAMES = ("train", "val", "test")


def check_split_overlap(splits: dict[str, Any], where: Path) -> None:
    """A case in two of train/val/test leaks evaluation data into training (or scores a case twice)."""
    named = {k: set(v) for k, v in splits.items() if k in SPLIT_NAMES and isinstance(v, list)}
    for i, a in enumerate(SPLIT_NAMES):
        for b in SPLIT_NAMES[i + 1:]:
            both = sorted(named.get(a, set()) & named.get(b, set()))
            if both:
                raise DataError(f"case(s) {both[:5]} are in both splits '{a}' and '{b}'"
                                f"{f' ({len(both)} in all)' if len(both) > 5 else ''}; each case belongs to one "
                                "split", where)


def case_id_report(root: str | Path) -> list[str]:
    """One line per unsafe or repeated case ID of a prepared folder's dataset.json (`textseg prep check`
    lists them all; loading stops at the first file). Empty when the IDs are fine or the file has no case list."""
    spec = read_json(Path(root) / "dataset.json")
    cases = spec.get("cases") if isinstance(spec, dict) else None
    if not isinstance(cases, list):
        return []
    return case_id_problems([c.get("id") for c in cases if isinstance(c, dict) and "id" in c])


def load_prepared(root: str | Path, check_files: bool = True) -> PreparedDataset:
    """Open and validate a prepared folder; errors name the folder, file or case at fault."""
    root = Path(root)
    if not root.is_dir():
        raise DataError("prepared data folder not found", root)
    spec_path = root / "dataset.json"
    if not spec_path.exists():
        raise DataError("no dataset.json here; run `textseg prep ...` first", root)
    spec = read_json(spec_path)
    ds = PreparedDataset(root, validate_spec(spec, spec_path))
    if check_files:
        ds.validate_files()
    return ds
