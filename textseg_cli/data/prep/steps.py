"""The configurable processing chain shared by the benchmark preparers, plus input checks.

One `Processing` value describes every step and its parameters; `apply_processing` runs them in a fixed
order (resample -> crop -> window -> percentile clip -> normalise) and `Processing.record()` lists them
for dataset.json in that order. Windowing and clipping are voxel-wise, so doing them after the crop
gives the same values as before it, while masks for cropping (body, non-zero) still see raw intensities.
"""

from __future__ import annotations

import json
import math
import random
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import SimpleITK as sitk

from textseg_cli.data import preprocessing as pp
from textseg_cli.data.io import (
    apply_nan_policy,
    nonfinite_in,
    read_sitk,
    read_sitk_image,
)
from textseg_cli.data.names import check_case_ids
from textseg_cli.errors import ConfigError, DataError
from textseg_cli.storage.files import read_text

CROP_MODES = ("none", "nonzero", "body", "label")
NORMALIZE_MODES = ("zscore", "zscore-nonzero", "none")


@dataclass(frozen=True)
class Processing:
    target_spacing: tuple[float | None, float | None, float | None] | None = None
    window: tuple[float, float] | None = None  # (level, width) -> [0, 1]
    window_name: str | None = None
    clip: tuple[float | None, float | None] | None = None  # (lower, upper) percentiles
    clip_over: str = "all"  # "all" | "nonzero" voxels
    crop: str = "none"
    crop_axes: tuple[bool, bool, bool] = (True, True, True)
    crop_min_size: tuple[int, int, int] = (0, 0, 0)
    crop_margin: tuple[int, int, int] = (0, 0, 0)
    body_threshold: float = -500.0
    normalize: str = "zscore"

    def __post_init__(self):
        if self.crop not in CROP_MODES:
            raise ConfigError(f"--crop {self.crop!r}: expected one of {', '.join(CROP_MODES)}")
        if self.normalize not in NORMALIZE_MODES:
            raise ConfigError(f"--normalize {self.normalize!r}: expected one of {', '.join(NORMALIZE_MODES)}")
        if self.clip_over not in ("all", "nonzero"):
            raise ConfigError(f"clip_over {self.clip_over!r}: expected 'all' or 'nonzero'")

    def settings(self) -> dict[str, Any]:
        return asdict(self)

    def record(self) -> list[dict[str, Any]]:
        """The steps in the order they are applied, with parameters, for dataset.json."""
        steps: list[dict[str, Any]] = []
        if self.target_spacing is not None:
            steps.append({"step": "resample", "params": {"spacing_mm": list(self.target_spacing),
                                                         "image": "sitk B-spline (order 3)",
                                                         "label": "nearest neighbour", "library": "SimpleITK"}})
        if self.crop != "none":
            params: dict[str, Any] = {"around": self.crop, "axes": "".join(a for a, on in zip("xyz", self.crop_axes) if on),
                                      "min_size": list(self.crop_min_size), "margin": list(self.crop_margin)}
            if self.crop == "body":
                params["threshold_hu"] = self.body_threshold
            steps.append({"step": "crop", "params": params})
        if self.window is not None:
            lvl, wid = self.window
            steps.append({"step": "window", "params": {"level": lvl, "width": wid, "preset": self.window_name,
                                                       "range": [lvl - wid / 2, lvl + wid / 2], "scaled_to": [0, 1]}})
        if self.clip is not None:
            steps.append({"step": "clip_percentile", "params": {"lower": self.clip[0], "upper": self.clip[1],
                                                                "over": self.clip_over}})
        if self.normalize == "zscore":
            steps.append({"step": "zscore", "params": {"over": "all voxels of the cropped volume", "per_channel": True}})
        elif self.normalize == "zscore-nonzero":
            steps.append({"step": "zscore", "params": {"over": "non-zero voxels", "background": 0, "per_channel": True}})
        return steps


def parse_spacing(value: Any) -> tuple[float | None, float | None, float | None] | None:
    """'1' -> (1,1,1); '0.8,0.8,1' -> tuple; None/'none'/'off' -> None (no resampling)."""
    if value is None:
        return None
    if isinstance(value, (int, float)):
        parts: list[Any] = [value] * 3
    elif isinstance(value, str):
        text = value.strip().lower()
        if text in ("", "none", "off", "native"):
            return None
        parts = text.replace(",", " ").split()
    else:
        parts = list(value)
    if len(parts) == 1:
        parts = parts * 3
    try:
        out = tuple(None if str(p).lower() in ("none", "keep") else float(p) for p in parts)
    except ValueError:
        raise ConfigError(f"--spacing {value!r}: expected one number (mm) or three like 1,1,2.5") from None
    if len(out) != 3 or any(v is not None and v <= 0 for v in out):
        raise ConfigError(f"--spacing {value!r}: expected one or three positive numbers (mm)")
    return out  # type: ignore[return-value]


def window_setting(window: Any = None, preset: str | None = None) -> tuple[tuple[float, float] | None, str | None]:
    """Resolve --window L W / --window-preset NAME (or a Python value: name or (L, W)) to ((L, W), name)."""
    if window is not None and preset is not None:
        raise ConfigError("give either --window L W or --window-preset NAME, not both")
    if preset is not None:
        return pp.parse_window(preset), (preset.lower() if pp.parse_window(preset) else None)
    if isinstance(window, str) and window.strip().lower() in pp.WINDOW_PRESETS:
        return pp.parse_window(window), window.strip().lower()
    return pp.parse_window(window), None


# --- geometry and label checks ---------------------------------------------------------------------

@dataclass
class Loaded:
    """A source case in memory: image (C, x, y, z), label (x, y, z) or None, physical geometry (LPS)."""
    image: np.ndarray
    label: np.ndarray | None
    spacing: tuple[float, float, float]
    origin: tuple[float, float, float] = (0.0, 0.0, 0.0)
    direction: tuple[float, ...] | None = None
    warnings: list[str] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)


def read_image(path: str | Path) -> tuple[np.ndarray, tuple[float, ...], tuple[float, ...], tuple[float, ...]]:
    """Read NIfTI/NRRD/MHA with SimpleITK -> (array (C, x, y, z), spacing, origin, direction) in 3D terms.

    4D files (MSD multi-modal) become channels; vector images too.
    """
    vol = read_sitk(path)
    arr = vol.array
    spacing, origin, direction = vol.spacing, vol.origin, vol.direction
    if arr.ndim == 3:
        arr = arr[None]
    elif arr.ndim == 4 and len(spacing) == 4:  # 4D scalar image: (x, y, z, t) -> channels first
        arr = np.moveaxis(arr, -1, 0)
        direction = tuple(np.asarray(direction, dtype=float).reshape(4, 4)[:3, :3].ravel())
    elif arr.ndim != 4:
        raise DataError(f"expected a 3D volume (optionally with channels), got an array of shape {arr.shape}", path)
    return arr, tuple(spacing[:3]), tuple(origin[:3]), tuple(direction)


def check_geometry(case_id: str, what: str, ref: dict[str, Any], other: dict[str, Any], where: Any = None,
                   spacing_rtol: float = 1e-3, origin_atol: float = 1e-2, direction_atol: float = 1e-3) -> None:
    """Raise DataError naming the case if `other` (shape/spacing/origin/direction) differs from `ref`."""
    problems = []
    if tuple(ref["shape"]) != tuple(other["shape"]):
        problems.append(f"size {tuple(other['shape'])} vs {tuple(ref['shape'])}")
    if not np.allclose(other["spacing"], ref["spacing"], rtol=spacing_rtol, atol=1e-5):
        problems.append(f"spacing {_fmt(other['spacing'])} vs {_fmt(ref['spacing'])}")
    if ref.get("origin") is not None and other.get("origin") is not None and \
            not np.allclose(other["origin"], ref["origin"], atol=max(origin_atol, 1e-3 * max(ref["spacing"]))):
        problems.append(f"origin {_fmt(other['origin'])} vs {_fmt(ref['origin'])}")
    if ref.get("direction") is not None and other.get("direction") is not None and \
            not np.allclose(other["direction"], ref["direction"], atol=direction_atol):
        problems.append(f"direction {_fmt(other['direction'])} vs {_fmt(ref['direction'])}")
    if problems:
        raise DataError(f"case '{case_id}': {what} geometry differs from the image: " + "; ".join(problems), where)


def _fmt(v) -> str:
    return "(" + ", ".join(f"{float(x):.4g}" for x in v) + ")"


def check_label_values(case_id: str, label: np.ndarray, allowed: Sequence[int], where: Any = None,
                       strict: bool = True) -> tuple[np.ndarray, list[str]]:
    """Validate label values; return (uint8 label, warnings).

    Non-integer values are always an error (a resampled or float-saved mask would be silently wrong).
    Values outside `allowed` are an error when strict, else a warning (caller maps them).
    """
    warnings: list[str] = []
    lab = np.asarray(label)
    if lab.dtype.kind == "f":
        if not np.all(np.isfinite(lab)) or not np.array_equal(lab, np.round(lab)):
            raise DataError(f"case '{case_id}': label holds non-integer values (interpolated mask?)", where)
    values = np.unique(lab).astype(np.int64)
    bad = sorted(set(values.tolist()) - set(int(a) for a in allowed))
    if bad:
        msg = f"case '{case_id}': unexpected label value(s) {bad} (expected {sorted(int(a) for a in allowed)})"
        if strict:
            raise DataError(msg, where)
        warnings.append(msg)
    if values.min(initial=0) < 0 or values.max(initial=0) > 255:
        raise DataError(f"case '{case_id}': label values {values.min()}..{values.max()} do not fit uint8", where)
    return lab.astype(np.uint8), warnings


# --- the chain -------------------------------------------------------------------------------------

@dataclass
class Processed:
    image: np.ndarray  # (C, x, y, z) float32
    label: np.ndarray | None
    spacing: tuple[float, float, float]
    origin: tuple[float, float, float]
    direction: tuple[float, ...] | None
    crop_box: list[tuple[int, int]] | None
    stats: dict[str, Any]


def _crop_box(proc: Processing, image: np.ndarray, label: np.ndarray | None, case_id: str) -> list[tuple[int, int]]:
    shape = image.shape[1:]
    if proc.crop == "label":
        if label is None:
            raise DataError(f"case '{case_id}': cropping around the label needs a label")
        mask = label > 0
        if not mask.any():
            raise DataError(f"case '{case_id}': empty label, cannot crop around it")
    elif proc.crop == "nonzero":
        mask = pp.nonzero_mask(image)
    else:  # body
        mask = pp.body_mask(image[0], proc.body_threshold)
    if not mask.any():
        raise DataError(f"case '{case_id}': nothing to crop to ({proc.crop} mask is empty)")
    box = pp.expand_box(pp.bbox(mask), shape, proc.crop_margin, proc.crop_min_size)
    return [b if on else (0, n) for b, on, n in zip(box, proc.crop_axes, shape)]


def apply_processing(case_id: str, loaded: Loaded, proc: Processing) -> Processed:
    image, label = loaded.image.astype(np.float32, copy=False), loaded.label
    spacing, origin, direction = tuple(loaded.spacing), tuple(loaded.origin), loaded.direction
    if proc.target_spacing is not None:
        new_image, new_spacing = pp.resample(image, spacing, proc.target_spacing, origin=origin, direction=direction)
        if label is not None:
            label, _ = pp.resample(label, spacing, proc.target_spacing, is_label=True, origin=origin, direction=direction)
        image, spacing = new_image, new_spacing
    box = None
    if proc.crop != "none":
        box = _crop_box(proc, image, label, case_id)
        image = np.ascontiguousarray(image[(slice(None),) + tuple(slice(lo, hi) for lo, hi in box)])
        if label is not None:
            label = np.ascontiguousarray(pp.crop(label, box))
        d = np.eye(3) if direction is None else np.asarray(direction, dtype=float).reshape(3, 3)
        shift = np.array([lo for lo, _ in box], dtype=float) * np.asarray(spacing, dtype=float)
        origin = tuple(float(v) for v in np.asarray(origin, dtype=float) + d @ shift)
    channels = []
    for ch in image:
        if proc.window is not None:
            ch = pp.apply_window(ch, *proc.window)
        if proc.clip is not None:
            ch = pp.clip_percentiles(ch, proc.clip[0], proc.clip[1], mask=(ch != 0) if proc.clip_over == "nonzero" else None)
        channels.append(ch)
    image = np.stack(channels).astype(np.float32)
    p = np.percentile(image, [0, 0.5, 50, 99.5, 100])
    stats = {"prenorm_min": float(p[0]), "prenorm_p0.5": float(p[1]), "prenorm_p50": float(p[2]),
             "prenorm_p99.5": float(p[3]), "prenorm_max": float(p[4])}
    if proc.normalize == "zscore":
        image = np.stack([pp.zscore(ch) for ch in image])
    elif proc.normalize == "zscore-nonzero":
        image = np.stack([pp.zscore_nonzero(ch) for ch in image])
    return Processed(image, label, tuple(float(s) for s in spacing), origin, direction, box, stats)


# --- splits ----------------------------------------------------------------------------------------

def parse_split_counts(spec: Any, n: int, names: Sequence[str] = ("train", "val", "test")) -> dict[str, int]:
    """'48,15' (train,test) or '250,25,60' (train,val,test); fractions like '0.8,0.2' are scaled to n.

    'auto': 10 % (at least one) validation from 2 cases on, so every set that can have one gets a
    best-on-validation checkpoint, and 20 % test as long as a training case remains (2 cases: 1/1/0,
    3: 1/1/1, 4: 2/1/1, 10: 7/1/2). A single case is all training: `textseg train` then runs without
    validation (it says so; no best.pt, eval/predict use last.pt)."""
    if isinstance(spec, str) and spec.strip().lower() == "auto":
        n_val = max(1, int(math.floor(0.1 * n + 0.5))) if n >= 2 else 0
        n_test = min(int(math.floor(0.2 * n + 0.5)), n - n_val - 1) if n >= 2 else 0
        return dict(zip(names, (n - n_val - n_test, n_val, n_test)))
    parts = spec.replace(",", " ").split() if isinstance(spec, str) else list(spec)
    try:
        vals = [float(p) for p in parts]
    except ValueError:
        raise ConfigError(f"--split {spec!r}: expected counts like 48,15 or 250,25,60") from None
    if len(vals) == 2:
        vals = [vals[0], 0.0, vals[1]]
    if len(vals) != 3 or any(v < 0 for v in vals):
        raise ConfigError(f"--split {spec!r}: expected TRAIN,TEST or TRAIN,VAL,TEST")
    if all(v <= 1 for v in vals) and math.isclose(sum(vals), 1.0, abs_tol=1e-6):
        counts = [int(math.floor(v * n + 0.5)) for v in vals]
        counts[0] = n - counts[1] - counts[2]
    else:
        counts = [int(v) for v in vals]
        if any(c != v for c, v in zip(counts, vals)):
            raise ConfigError(f"--split {spec!r}: counts must be whole numbers")
    if sum(counts) != n:
        raise ConfigError(f"--split {spec!r} asks for {sum(counts)} cases but {n} were found; "
                          "pass --split with counts that add up, fractions like 0.8,0.2, or --split-file")
    return dict(zip(names, counts))


def seeded_split(case_ids: Sequence[str], counts: dict[str, int], seed: int) -> dict[str, list[str]]:
    """Shuffle the sorted ids with `seed` and cut them into train/val/test; train keeps the shuffled order
    (its head is the labeled subset), val/test are sorted for readability."""

    ids = sorted(case_ids)
    random.Random(seed).shuffle(ids)
    ntr, nva = counts["train"], counts["val"]
    return {"train": ids[:ntr], "val": sorted(ids[ntr:ntr + nva]), "test": sorted(ids[ntr + nva:])}


def load_split_file(path: str | Path, case_ids: Sequence[str]) -> dict[str, list[str]]:
    """Users' own split: a folder with train/val/test .txt|.list files (one id per line), or a JSON/YAML
    mapping {train: [...], val: [...], test: [...]}. Every id must be a known case."""

    path = Path(path)
    splits: dict[str, list[str]] = {}
    if path.is_dir():
        for name in ("train", "val", "test"):
            for ext in (".txt", ".list", ""):
                f = path / f"{name}{ext}"
                if f.is_file():
                    splits[name] = [ln.strip() for ln in read_text(f, ConfigError).splitlines() if ln.strip()]
                    break
    elif path.is_file():
        text = read_text(path, ConfigError)  # not UTF-8: names the split file
        try:
            data = json.loads(text) if path.suffix == ".json" else __import__("yaml").safe_load(text)
        except Exception as exc:
            raise ConfigError(f"unreadable split file ({exc})", path) from exc
        if not isinstance(data, dict):
            raise ConfigError("split file must map split names (train/val/test) to lists of case ids", path)
        splits = {str(k): [str(v) for v in (vals or [])] for k, vals in data.items()}
    else:
        raise ConfigError("split file or folder not found", path)
    if "train" not in splits:
        raise ConfigError("split file has no 'train' list", path)
    known = set(case_ids)
    seen: dict[str, str] = {}
    for name, ids in splits.items():
        check_case_ids(ids, path)  # other people's file: its IDs become file names
        unknown = [i for i in ids if i not in known]
        if unknown:
            raise ConfigError(f"split '{name}' names unknown case(s) {unknown[:5]}", path)
        for i in ids:
            if i in seen:
                raise ConfigError(f"case '{i}' is in both '{seen[i]}' and '{name}'", path)
            seen[i] = name
    splits.setdefault("val", [])
    splits.setdefault("test", [])
    return splits


# --- loading image/label files with geometry checks -----------------------------------------------

LABEL_GEOMETRY_MODES = ("check", "resample", "image")


def split_channels(img) -> list:
    """A SimpleITK image -> list of 3D scalar images (4D files and vector pixels become channels)."""

    if img.GetNumberOfComponentsPerPixel() > 1:
        return [sitk.VectorIndexSelectionCast(img, i) for i in range(img.GetNumberOfComponentsPerPixel())]
    if img.GetDimension() == 4:
        size = list(img.GetSize())
        return [sitk.Extract(img, size[:3] + [0], [0, 0, 0, t]) for t in range(size[3])]
    if img.GetDimension() == 3:
        return [img]
    raise DataError(f"expected a 3D image, got {img.GetDimension()}D")


def geometry_of(img) -> dict[str, Any]:
    return {"shape": tuple(img.GetSize()), "spacing": tuple(img.GetSpacing()), "origin": tuple(img.GetOrigin()),
            "direction": tuple(img.GetDirection())}


def sitk_array(img) -> np.ndarray:

    return np.ascontiguousarray(np.transpose(sitk.GetArrayFromImage(img), (2, 1, 0)))


def load_sitk_case(case_id: str, channels: Sequence, label, *, label_path: Any = None,
                   label_geometry: str = "check", image_path: Any = None, nan_policy: str = "refuse",
                   nonfinite: int = 0) -> Loaded:
    """Check that all channels and the label share one voxel grid; return a Loaded case.

    label_geometry: 'check' (mismatch is an error), 'resample' (map the label onto the image grid through
    physical coordinates, nearest neighbour; for labels saved with another orientation but correct headers),
    'image' (the sizes must match; the label takes the image's header; for labels with a wrong header).
    """

    if label_geometry not in LABEL_GEOMETRY_MODES:
        raise ConfigError(f"--label-geometry {label_geometry!r}: expected one of {', '.join(LABEL_GEOMETRY_MODES)}")
    ref = geometry_of(channels[0])
    for i, ch in enumerate(channels[1:], start=1):
        check_geometry(case_id, f"channel {i}", ref, geometry_of(ch), image_path)
    warnings: list[str] = []
    lab = None
    if label is not None:
        if label.GetDimension() != 3 or label.GetNumberOfComponentsPerPixel() != 1:
            raise DataError(f"case '{case_id}': label must be a 3D scalar image", label_path)
        geo = geometry_of(label)
        if label_geometry == "check":
            check_geometry(case_id, "label", ref, geo, label_path)
        else:
            try:
                check_geometry(case_id, "label", ref, geo, label_path)
            except DataError as exc:
                if label_geometry == "image":
                    if tuple(geo["shape"]) != tuple(ref["shape"]):
                        raise
                    label = sitk.Image(label)
                    label.CopyInformation(channels[0])
                    warnings.append(f"{exc} -> label header replaced by the image's (--label-geometry image)")
                else:
                    label = sitk.Resample(label, channels[0], sitk.Transform(), sitk.sitkNearestNeighbor, 0.0,
                                          label.GetPixelID())
                    warnings.append(f"{exc} -> label resampled onto the image grid (--label-geometry resample)")
        lab = sitk_array(label)
    image = np.stack([sitk_array(ch).astype(np.float32) for ch in channels])

    image, note = apply_nan_policy(image, nan_policy, case_id, image_path, known=nonfinite)
    warnings += [note] if note else []
    return Loaded(image, lab, tuple(float(s) for s in ref["spacing"]), tuple(float(o) for o in ref["origin"]),
                  tuple(float(d) for d in ref["direction"]), warnings)


def load_files(case_id: str, images: Sequence[str | Path], label: str | Path | None, *,
               channels: Sequence[int] | None = None, label_geometry: str = "check",
               nan_policy: str = "refuse") -> Loaded:
    """Read image file(s) (several files or a 4D file give channels; `channels` selects some) and a label."""
    chans, nonfinite = [], 0
    for p in images:
        img = read_sitk_image(p, case_id)
        nonfinite += nonfinite_in(img)
        chans += split_channels(img)
    if channels is not None:
        bad = [c for c in channels if not 0 <= c < len(chans)]
        if bad:
            raise DataError(f"case '{case_id}': channel(s) {bad} requested, the image has {len(chans)}", images[0])
        chans = [chans[c] for c in channels]
    lab = read_sitk_image(label, case_id) if label is not None else None
    return load_sitk_case(case_id, chans, lab, label_path=label, label_geometry=label_geometry, image_path=images[0],
                          nan_policy=nan_policy, nonfinite=nonfinite)


def default_patch_size(shapes: Sequence[Sequence[int]], cap: int = 96) -> list[int]:
    """Training patch default: min(cap, median extent rounded down to a multiple of 16) per axis."""
    med = np.median(np.array([s[:3] for s in shapes]), axis=0) if shapes else np.array([cap] * 3)
    return [int(max(16, min(cap, (int(m) // 16) * 16))) for m in med]


def processing_from_options(*, spacing: Any = None, window: Any = None, window_preset: str | None = None,
                            clip: Any = None, clip_over: str = "all", crop: str = "none", crop_margin: Any = 0,
                            body_threshold: float = -500.0, normalize: str = "zscore") -> Processing:
    """Build a Processing from CLI-style options shared by `prep msd`, `prep lung` and `prep custom`.

    clip: None, an upper percentile (99.9) or (lower, upper); crop_margin: one int or three.
    """
    win, win_name = window_setting(window, window_preset)
    if clip is None or clip == "none":
        clip_t = None
    elif isinstance(clip, (int, float)):
        clip_t = (None, float(clip))
    else:
        parts = clip.replace(",", " ").split() if isinstance(clip, str) else list(clip)
        try:
            vals = [float(p) for p in parts]
        except ValueError:
            raise ConfigError(f"--clip {clip!r}: expected an upper percentile like 99.9 or LOWER,UPPER") from None
        clip_t = (None, vals[0]) if len(vals) == 1 else (vals[0], vals[1])
    margin = (int(crop_margin),) * 3 if isinstance(crop_margin, (int, float, str)) else tuple(int(m) for m in crop_margin)
    return Processing(target_spacing=parse_spacing(spacing), window=win, window_name=win_name, clip=clip_t,
                      clip_over=clip_over, crop=crop, crop_margin=margin, body_threshold=body_threshold,
                      normalize=normalize)


def make_splits(case_ids: Sequence[str], *, split: Any, split_file: str | Path | None, seed: int) -> dict[str, list[str]]:
    """--split-file wins; otherwise a seeded split with the --split counts or fractions ('auto': see
    `parse_split_counts`)."""
    if split_file is not None:
        return load_split_file(split_file, case_ids)
    return seeded_split(case_ids, parse_split_counts(split, len(case_ids)), seed)


def make_folds(pool: Sequence[str], k: int, seed: int) -> list[dict[str, list[str]]]:
    """K seeded cross-validation folds over `pool` (the labeled non-test cases): fold i validates on the
    i-th of K near-equal chunks of the shuffled pool and trains on the rest (nnU-Net's splits_final.json)."""

    if k < 2 or k > len(pool):
        raise ConfigError(f"--folds {k}: expected 2 to {len(pool)} (the labeled non-test cases)")
    ids = sorted(pool)
    random.Random(seed).shuffle(ids)
    chunks = [ids[i::k] for i in range(k)]
    return [{"train": [c for c in ids if c not in set(chunk)], "val": sorted(chunk)} for chunk in chunks]
