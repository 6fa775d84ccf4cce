"""Preparer for the LViT release layout (QaTa-COV19, MosMedData+, MoNuSeg).

Layout::

    <src>/{Train,Val,Test}_Folder/img/<image>.(png|tif|...)
    <src>/{Train,Val,Test}_Folder/labelcol/<image or mask_<image>>.(png|...)   binary, foreground > 0
    <src>/{Train,Val,Test}_Folder/<Split>_text.xlsx                          columns Image, Description

Quirks handled: spreadsheet rows are matched to images by file *stem* (MoNuSeg's test sheet names
`.png` files while the images are `.tif`); QaTa keys rows and masks by `mask_<image>`; some QaTa
releases ship one `Train_Val_text.xlsx` shared by train and val (in the source root or a split folder).

2D arrays are stored as (row, column) of the picture as released, so `Image.fromarray(arr)` shows it
upright and "upper left" in a description means small row and column indices.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from PIL import Image

from textseg_cli.console import err_console, progress
from textseg_cli.data.names import canonical_name
from textseg_cli.data.prep.writer import PreparedWriter, volume_qc
from textseg_cli.errors import DataError

SPLITS = {"train": "Train", "val": "Val", "test": "Test"}
IMAGE_SUFFIXES = {".png", ".tif", ".tiff", ".jpg", ".jpeg", ".bmp"}
SHARED_SHEET = "Train_Val_text"
MASK_PREFIX = "mask_"


@dataclass
class _Item:
    split: str
    image: Path
    mask: Path
    text: str | None


def _warn(msg: str) -> None:
    err_console.print(f"[yellow]warning:[/] {msg}", highlight=False, soft_wrap=True)


def _find_dir(parent: Path, name: str) -> Path | None:
    """Child folder `name`, matched case-insensitively (releases differ in capitalisation)."""
    for p in parent.iterdir() if parent.is_dir() else ():
        if p.is_dir() and p.name.lower() == name.lower():
            return p
    return None


def _sheet_file(folder: Path, stem: str) -> Path | None:
    for suffix in (".xlsx", ".xls", ".csv"):
        for p in folder.iterdir() if folder.is_dir() else ():
            if p.is_file() and p.name.lower() == f"{stem}{suffix}".lower():
                return p
    return None


def read_text_sheet(path: Path) -> dict[str, tuple[str, str]]:
    """Rows of an LViT text spreadsheet as {image stem: (file name as written, description)}.

    Keys drop the extension and a leading `mask_` (QaTa keys rows by the mask file name).
    """

    try:
        df = pd.read_csv(path) if path.suffix.lower() == ".csv" else pd.read_excel(path)
    except Exception as exc:  # openpyxl / xlrd raise many types for broken files
        raise DataError(f"unreadable spreadsheet ({type(exc).__name__}: {exc})", path) from exc
    cols = {str(c).strip().lower(): c for c in df.columns}
    missing = [c for c in ("image", "description") if c not in cols]
    if missing:
        raise DataError(f"missing column(s) {[m.capitalize() for m in missing]}; found {list(map(str, df.columns))}",
                        path)
    rows: dict[str, tuple[str, str]] = {}
    for i, (name, desc) in enumerate(zip(df[cols["image"]], df[cols["description"]])):
        if pd.isna(name):
            continue
        name = str(name).strip()
        key = _row_key(name)
        text = "" if pd.isna(desc) else " ".join(str(desc).split())
        if not text:
            raise DataError(f"row {i + 2} ({name}): empty Description", path)
        if key in rows and rows[key][1] != text:
            raise DataError(f"row {i + 2}: '{name}' listed twice with different descriptions", path)
        rows[key] = (name, text)
    return rows


def _row_key(name: str) -> str:
    stem = Path(name).stem if Path(name).suffix.lower() in IMAGE_SUFFIXES else name
    return stem[len(MASK_PREFIX):] if stem.lower().startswith(MASK_PREFIX) else stem


def _list_images(folder: Path) -> dict[str, Path]:
    out: dict[str, Path] = {}
    for p in sorted(folder.iterdir()):
        if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith("."):
            if p.stem in out:
                raise DataError(f"two files share the stem '{p.stem}' ({out[p.stem].name}, {p.name})", folder)
            out[p.stem] = p
    return out


def _mask_for(stem: str, masks: dict[str, Path]) -> Path | None:
    return masks.get(stem) or masks.get(MASK_PREFIX + stem)


def collect_lvit(src: str | Path, allow_missing_text: bool = False) -> tuple[list[_Item], list[dict[str, str]], dict]:
    """Pair every image with its mask and text. Returns (items, exclusions, sheets used).

    Errors (or, with allow_missing_text, warnings + exclusions) for an image without text and a
    text row without image; always an error for an image without mask.
    """
    src = Path(src)
    if not src.is_dir():
        raise DataError("source folder not found", src)
    split_dirs = {s: _find_dir(src, f"{tag}_Folder") for s, tag in SPLITS.items()}
    split_dirs = {s: d for s, d in split_dirs.items() if d is not None}
    if not split_dirs:
        raise DataError("no Train_Folder / Val_Folder / Test_Folder here (expected the LViT layout)", src)

    # Which sheet serves which split: its own, else a shared Train_Val sheet (train and val only).
    shared = _sheet_file(src, SHARED_SHEET)
    for s in ("train", "val"):
        if shared is None and s in split_dirs:
            shared = _sheet_file(split_dirs[s], SHARED_SHEET)
    sheets: dict[str, Path] = {}
    for s, d in split_dirs.items():
        own = _sheet_file(d, f"{SPLITS[s]}_text")
        if own is None and s in ("train", "val"):
            own = shared
        if own is None:
            raise DataError(f"no {SPLITS[s]}_text.xlsx (columns Image, Description)"
                            + (f" and no {SHARED_SHEET}.xlsx" if s != "test" else ""), d)
        sheets[s] = own

    # Images and masks per split.
    images: dict[str, dict[str, Path]] = {}
    masks: dict[str, dict[str, Path]] = {}
    for s, d in split_dirs.items():
        img_dir, mask_dir = _find_dir(d, "img"), _find_dir(d, "labelcol")
        if img_dir is None:
            raise DataError("missing img/ folder", d)
        if mask_dir is None:
            raise DataError("missing labelcol/ folder (binary masks)", d)
        images[s], masks[s] = _list_images(img_dir), _list_images(mask_dir)
        if not images[s]:
            raise DataError("no images (png, tif, jpg, bmp) found", img_dir)

    # Rows per sheet file (a shared sheet is read once and matched against all splits it serves).
    rows_by_sheet = {p: read_text_sheet(p) for p in set(sheets.values())}
    used: dict[Path, set[str]] = {p: set() for p in rows_by_sheet}
    items: list[_Item] = []
    excluded: list[dict[str, str]] = []
    seen_ids: dict[str, Path] = {}
    for s in split_dirs:
        sheet = sheets[s]
        rows = rows_by_sheet[sheet]
        for stem, img in images[s].items():
            if stem in seen_ids:
                raise DataError(f"image stem '{stem}' also appears as {seen_ids[stem]}; case ids must be unique", img)
            seen_ids[stem] = img
            mask = _mask_for(stem, masks[s])
            if mask is None:
                raise DataError(f"no mask in {img.parent.parent.name}/labelcol/ for this image "
                                f"(looked for '{stem}.*' and '{MASK_PREFIX}{stem}.*')", img)
            row = rows.get(stem)
            if row is None:
                msg = f"no text row for this image in {sheet.name}"
                if not allow_missing_text:
                    raise DataError(msg, img, hint="pass --allow-missing-text to exclude such images")
                _warn(f"{img}: {msg}; excluded")
                excluded.append({"file": str(img), "reason": "image without text"})
                continue
            used[sheet].add(stem)
            items.append(_Item(s, img, mask, row[1]))
    for sheet, rows in rows_by_sheet.items():
        for key, (name, _) in rows.items():
            if key in used[sheet]:
                continue
            msg = f"text row '{name}' names no image in {', '.join(sorted(SPLITS[s] + '_Folder/img' for s, p in sheets.items() if p == sheet))}"
            if not allow_missing_text:
                raise DataError(msg, sheet, hint="pass --allow-missing-text to ignore such rows")
            _warn(f"{sheet}: {msg}; ignored")
            excluded.append({"file": str(sheet), "reason": f"text row without image: {name}"})
    return items, excluded, {s: str(p) for s, p in sheets.items()}


def _read_picture(path: Path) -> np.ndarray:
    """(rows, cols) or (rows, cols, C) array as stored; DataError naming the file when unreadable."""

    try:
        with Image.open(path) as im:
            if im.mode in ("P", "PA", "LA", "RGBA", "CMYK", "YCbCr"):
                im = im.convert("RGB")
            return np.asarray(im)
    except Exception as exc:
        raise DataError(f"unreadable image ({type(exc).__name__}: {exc})", path) from exc


def _resize(arr: np.ndarray, size: int, mode: str) -> np.ndarray:

    t = torch.from_numpy(np.ascontiguousarray(arr, dtype=np.float32))
    t = t.permute(2, 0, 1)[None] if t.ndim == 3 else t[None, None]
    if mode == "nearest":
        t = F.interpolate(t, size=(size, size), mode="nearest")
    elif mode == "linear":  # cv2.INTER_LINEAR: no antialiasing
        t = F.interpolate(t, size=(size, size), mode="bilinear", align_corners=False, antialias=False)
    else:
        t = F.interpolate(t, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
    t = t[0].permute(1, 2, 0) if arr.ndim == 3 else t[0, 0]
    return t.numpy()


def lvit_loader_resize(img: np.ndarray, mask: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray]:
    """LViT's loader (Load_Dataset.py:173-180): `cv2.resize` to size² (INTER_LINEAR: two-tap bilinear, half-pixel
    centres, no antialiasing) of the uint8 image and of the uint8 mask as stored, each rounded to uint8; then
    image / 255 (ValGenerator's to_tensor) and mask > 0. cv2 is not a dependency: the interpolation is
    computed in float and rounded half up, which can differ from cv2's 11-bit fixed point by one grey level."""
    def lin(a: np.ndarray) -> np.ndarray:
        return np.clip(np.floor(_resize(a.astype(np.float32), size, "linear") + 0.5), 0, 255)

    return (lin(img) / 255.0).astype(np.float32), (lin(mask) > 0).astype(np.uint8)


def _minmax_per_channel(img: np.ndarray) -> np.ndarray:
    img = img.astype(np.float32)
    lo = img.min(axis=(0, 1), keepdims=True)
    hi = img.max(axis=(0, 1), keepdims=True)
    return ((img - lo) / np.maximum(hi - lo, 1e-8)).astype(np.float32)


# The modality of the LViT releases by data set name (dataset.json `modality`; DATE's offline prompts use it).
KNOWN_MODALITIES = {"monuseg": "histology", "qata-cov19": "chest x-ray", "mosmeddata+": "ct"}  # canonical names


def prep_lvit(src: str | Path, out: str | Path, *, allow_missing_text: bool = False, resize: int | None = None,
              force: bool = False, name: str | None = None, modality: str | None = None,
              protocol: str = "textseg"):
    """Prepare an LViT-layout folder into a 2D prepared folder (see module docstring).

    Images become float32 NIfTI (rows, cols, C) scaled to [0, 1] per image and channel; masks become
    uint8 0/1 (foreground > 0); every case keeps its description as `text`; splits follow the
    folders present. `resize=N` resizes images (bilinear, antialiased) and masks (nearest) to N×N.
    `protocol="lvit"` instead reads pixels as LViT's loader does (`lvit_loader_resize`: bilinear without
    antialiasing, intensities / 255, masks bilinear then > 0); it needs `resize` (LViT: 224).
    Returns the `PreparedDataset`.
    """
    if resize is not None and resize < 8:
        raise DataError(f"--resize {resize}: expected a size of at least 8 pixels")
    if protocol not in ("textseg", "lvit"):
        raise DataError(f"--protocol {protocol!r}: expected textseg or lvit")
    if protocol == "lvit" and resize is None:
        raise DataError("--protocol lvit resizes as LViT's loader does and needs --resize (LViT: 224)")
    src = Path(src)
    items, excluded, sheets = collect_lvit(src, allow_missing_text=allow_missing_text)
    if not items:
        raise DataError("no image with text left to prepare", src)

    # One channel count for the whole set: colour if any image is colour (grey ones are replicated).

    def _is_colour(p: Path) -> bool:
        try:
            with Image.open(p) as im:
                return im.mode not in ("1", "L", "I", "I;16", "I;16B", "I;16L", "F")
        except Exception as exc:
            raise DataError(f"unreadable image ({type(exc).__name__}: {exc})", p) from exc

    n_ch = 3 if any(_is_colour(it.image) for it in items) else 1
    channel_names = ["R", "G", "B"] if n_ch == 3 else ["gray"]
    ds_name = name or src.resolve().name
    modality = modality or KNOWN_MODALITIES.get(canonical_name(ds_name), "2D")
    w = PreparedWriter(out, name=ds_name, dim=2, modality=modality, channel_names=channel_names,
                       class_names=["background", "foreground"], force=force, src=src)
    shapes = set()
    with progress() as bar:
        task = bar.add_task("prep lvit", total=len(items), info="")
        for it in items:
            img = _read_picture(it.image)
            mask = _read_picture(it.mask)
            if mask.ndim == 3:  # colour-saved masks: any channel above zero is foreground
                mask = mask.max(axis=-1)
            if mask.shape[:2] != img.shape[:2]:
                raise DataError(f"mask size {mask.shape[1]}x{mask.shape[0]} differs from image size "
                                f"{img.shape[1]}x{img.shape[0]} ({it.image.name})", it.mask)
            if img.ndim == 2:
                img = img[..., None]
            if img.shape[-1] != n_ch:
                img = np.repeat(img[..., :1], n_ch, axis=-1)
            original_shape = list(img.shape[:2])
            if protocol == "lvit":
                img, mask = lvit_loader_resize(img, mask, resize)
            else:
                img = img.astype(np.float32)
                mask = (mask > 0).astype(np.uint8)
            if protocol == "textseg" and resize is not None:
                img = _resize(img, resize, "bilinear")
                mask = (_resize(mask, resize, "nearest") > 0.5).astype(np.uint8)
            if protocol == "textseg":
                img = _minmax_per_channel(img)
            stored = img[..., 0] if n_ch == 1 else img
            shapes.add(tuple(img.shape[:2]))
            w.add_case(it.image.stem, stored, mask, (1.0, 1.0), text=it.text,
                       qc=volume_qc(img, mask, (1.0, 1.0), split=it.split),
                       source_image=str(it.image.relative_to(src)), source_mask=str(it.mask.relative_to(src)),
                       original_shape=original_shape)
            bar.update(task, advance=1, info=it.image.name)

    splits: dict[str, Any] = {s: sorted(it.image.stem for it in items if it.split == s) for s in SPLITS}
    splits = {s: v for s, v in splits.items() if v}
    splits.setdefault("train", [])
    if resize is not None:
        patch = [resize, resize]
    elif len(shapes) == 1 and max(next(iter(shapes))) <= 512:
        patch = list(next(iter(shapes)))
    else:
        patch = [224, 224]
    preprocessing: list[dict[str, Any]] = [
        {"step": "read", "params": {"axes": "row, column (picture as released)", "channels": channel_names,
                                    "grey_to_colour": "replicated" if n_ch == 3 else None}},
        {"step": "binarise_mask", "params": {"foreground": "> 0"}},
    ]
    if protocol == "lvit":
        preprocessing.append({"step": "resize", "params": {
            "size": [resize, resize], "as": "LViT Load_Dataset.py:173-180 (cv2.resize INTER_LINEAR, uint8)",
            "image": "bilinear, no antialiasing, rounded to uint8", "mask": "bilinear of the stored mask, > 0"}})
        preprocessing.append({"step": "scale", "params": {"divide_by": 255, "as": "torchvision to_tensor"}})
    else:
        if resize is not None:
            preprocessing.append({"step": "resize", "params": {"size": [resize, resize],
                                                               "image": "bilinear, antialiased", "mask": "nearest"}})
        preprocessing.append({"step": "minmax_per_channel",
                              "params": {"range": [0.0, 1.0], "per": "image and channel"}})
    source = {"layout": "lvit", "paths": [str(src.resolve())], "text_sheets": sheets}
    extra = {"excluded": excluded, "resize": resize, "protocol": protocol,
             "text_key": "stem (a leading 'mask_' dropped)"}
    return w.finish(splits=splits, preprocessing=preprocessing, source=source, patch_size=patch,
                    extra=extra)
