"""Custom data: folders of NIfTI / NRRD / MHA images and labels matched by case id.

Case ids are file names without extension. Image files may carry an nnU-Net channel suffix
(`case_0000`, `case_0001`, ... become channels of `case`); label files may end in `_seg`, `_label`,
`_labels`, `_mask` or `_gt`. Images without a label are kept as image-only (unlabeled) cases and
placed at the end of the training list; labels without an image are reported.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Sequence

from textseg_cli.data.io import NAN_POLICIES
from textseg_cli.data.prep import runner
from textseg_cli.data.prep.steps import (
    default_patch_size,
    load_files,
    make_folds,
    make_splits,
    processing_from_options,
)
from textseg_cli.errors import ConfigError, DataError

EXTENSIONS = (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd")
_CHANNEL = re.compile(r"^(.+)_(\d{4})$")
_LABEL_SUFFIX = re.compile(r"^(.+?)_(seg|label|labels|mask|gt)$", re.I)


def _stem(path: Path) -> str | None:
    name = path.name
    if name.startswith("."):
        return None
    for ext in EXTENSIONS:
        if name.lower().endswith(ext):
            return name[: -len(ext)]
    return None


def looks_like_label(path: Path) -> bool:
    """Whether an image file's name ends in a label suffix (`case_seg.nii.gz`, `case_gt.nrrd`, ...; see
    `_LABEL_SUFFIX`): `predict --images DIR` skips such files instead of segmenting a mask as an image."""
    stem = _stem(path)
    return stem is not None and _LABEL_SUFFIX.match(stem) is not None


def match_cases(images: Path, labels: Path | None) -> tuple[dict[str, list[Path]], dict[str, Path], list[str]]:
    """-> ({case: [image files in channel order]}, {case: label file}, labels without an image)."""
    groups: dict[str, list[tuple[int, Path]]] = {}
    for p in sorted(images.iterdir()):
        stem = _stem(p) if p.is_file() else None
        if stem is None:
            continue
        m = _CHANNEL.match(stem)
        cid, ch = (m.group(1), int(m.group(2))) if m else (stem, -1)
        groups.setdefault(cid, []).append((ch, p))
    image_files = {}
    for cid, files in groups.items():
        chans = sorted(files)
        if len(chans) > 1 and any(c < 0 for c, _ in chans):
            raise DataError(f"case '{cid}': both a plain image and channel files (_0000 ...) exist", images)
        if [c for c, _ in chans] not in ([-1], list(range(len(chans)))):
            raise DataError(f"case '{cid}': channel files must be numbered _0000, _0001, ... without gaps", images)
        image_files[cid] = [p for _, p in chans]
    label_files: dict[str, Path] = {}
    if labels is not None:
        for p in sorted(labels.iterdir()):
            stem = _stem(p) if p.is_file() else None
            if stem is None:
                continue
            m = _LABEL_SUFFIX.match(stem)
            cid = stem if stem in image_files or not m else m.group(1)
            if cid in label_files:
                raise DataError(f"case '{cid}': two label files ({label_files[cid].name}, {p.name})", labels)
            label_files[cid] = p
    orphans = sorted(set(label_files) - set(image_files))
    return image_files, {k: v for k, v in label_files.items() if k in image_files}, orphans


def prep_custom(images: str | Path, out: str | Path, *, labels: str | Path | None = None, modality: str = "CT",
                classes: Sequence[str] | None = None, channel_names: Sequence[str] | None = None, name: str = "custom",
                spacing: Any = None, window: Any = None, window_preset: str | None = None, clip: Any = None,
                crop: str = "none", crop_margin: Any = 0, body_threshold: float = -500.0, normalize: str = "zscore",
                split: Any = "auto", split_file: str | Path | None = None, seed: int = 1337,
                require_labels: bool = False, patch_size: Sequence[int] | None = None, label_geometry: str = "check",
                workers: int = 1, force: bool = False, drop_failed: bool = False, folds: int | list | None = None,
                nan_policy: str = "refuse"):
    """Prepare image/label folders matched by case id. `classes` names the foreground classes (label values
    1..K); the default is one class. Labeled cases are split (seeded --split, or --split-file); image-only
    cases join the end of the training list as unlabeled cases. `split="auto"` keeps 20 % for test and
    10 % (at least one case) for validation. `folds=K` records K cross-validation folds over the labeled
    non-test cases (dataset.json `extra.folds`; `train --fold k`); fold 0 becomes splits.train/val.
    Returns the PreparedDataset."""
    images, out = Path(images), Path(out)
    labels_p = Path(labels) if labels is not None else None
    for p in (images, labels_p):
        if p is not None and not p.is_dir():
            raise DataError("folder not found", p)
    modality = modality.upper()
    if modality not in ("CT", "MR"):
        raise ConfigError(f"--modality {modality!r}: expected CT or MR")
    fg = [c.strip() for c in (classes or ["foreground"]) if c.strip()]
    class_names = ["background"] + fg
    image_files, label_files, orphans = match_cases(images, labels_p)
    if not image_files:
        raise DataError(f"no images found (extensions {', '.join(EXTENSIONS)})", images)
    unlabeled = sorted(set(image_files) - set(label_files))
    if unlabeled and require_labels:
        raise DataError(f"{len(unlabeled)} image(s) have no label: {unlabeled[:10]}", labels_p or images)
    n_chan = {len(v) for v in image_files.values()}
    if len(n_chan) > 1:
        raise DataError(f"cases have different numbers of channel files {sorted(n_chan)}", images)
    proc = processing_from_options(spacing=spacing, window=window, window_preset=window_preset, clip=clip, crop=crop,
                                   crop_margin=crop_margin, body_threshold=body_threshold, normalize=normalize)
    if proc.crop == "label" and unlabeled:
        raise ConfigError(f"--crop label needs a label for every case; {unlabeled[:5]} have none")

    if nan_policy not in NAN_POLICIES:
        raise ConfigError(f"--nan-policy {nan_policy!r}: expected refuse or zero")
    settings = {"preparer": "custom", "classes": class_names, "processing": proc.settings(),
                "label_geometry": label_geometry, **({"nan_policy": nan_policy} if nan_policy != "refuse" else {})}
    shash = runner.settings_hash(settings)
    lab_spec = runner.LabelSpec(allowed=tuple(range(len(class_names))), strict=True)
    tasks = [runner.CaseTask(cid, load_files, {"case_id": cid, "images": [str(p) for p in files],
                                               "label": str(label_files[cid]) if cid in label_files else None,
                                               "label_geometry": label_geometry, "nan_policy": nan_policy},
                             proc, lab_spec, out, shash, {"source": [p.name for p in files]})
             for cid, files in sorted(image_files.items())]
    labeled = sorted(label_files)
    warnings = []
    if orphans:
        warnings.append(f"{len(orphans)} label file(s) without an image are ignored: {orphans[:10]}")
    if unlabeled:
        warnings.append(f"{len(unlabeled)} image(s) without a label are image-only (unlabeled) training cases: "
                        f"{unlabeled[:10]}")
    if split_file is not None:
        splits = make_splits(sorted(image_files), split=split, split_file=split_file, seed=seed)
        for part in ("val", "test"):
            bad = [c for c in splits[part] if c in unlabeled]
            if bad:
                raise ConfigError(f"split '{part}' lists image-only case(s) {bad[:5]}; evaluation needs labels",
                                  split_file)
    else:
        if not labeled:
            raise DataError("no image has a label; pass --labels DIR (image-only data sets need a --split-file)",
                            images)
        splits = make_splits(labeled, split=split, split_file=None, seed=seed)
        if len(labeled) == 1 and not folds:
            warnings.append(f"only one labelled case ('{labeled[0]}'): no validation or test case; `textseg train` "
                            "runs without validation (no best.pt; eval and predict use last.pt)")
        splits["train"] += unlabeled
    fold_list = None
    if isinstance(folds, list):  # given folds (nnU-Net's splits_final.json)
        fold_list = [{"train": list(f["train"]) + [c for c in splits["train"] if c in unlabeled and c not in f["train"]],
                      "val": list(f["val"])} for f in folds]
        known = set(image_files)
        bad = sorted({c for f in fold_list for c in f["train"] + f["val"]} - known)
        if bad:
            raise ConfigError(f"folds name unknown case(s) {bad[:5]}")
    elif folds:
        fold_list = make_folds([c for c in splits["train"] + splits["val"] if c not in unlabeled], int(folds), seed)
        for f in fold_list:
            f["train"] += [c for c in splits["train"] if c in unlabeled]
        splits["train"], splits["val"] = list(fold_list[0]["train"]), list(fold_list[0]["val"])
    n = len(next(iter(image_files.values())))
    chan = list(channel_names) if channel_names else ([modality] if n == 1 else [f"{modality}{i}" for i in range(n)])
    if len(chan) != n:
        raise ConfigError(f"--channel-names gives {len(chan)} names for {n} channel(s)")
    writer = runner.open_output(out, force=force, src=[images] + ([labels_p] if labels_p else []), name=name, dim=3,
                                modality=modality, channel_names=chan, class_names=class_names)
    report = runner.run_cases(tasks, out, workers=workers, description="prep custom")
    if patch_size is None:
        patch_size = default_patch_size([r["entry"]["shape"] for r in report.records.values()])
    preprocessing = [{"step": "read", "params": {"label_geometry": label_geometry}}] + proc.record()
    return runner.finish(writer, report, splits=splits, preprocessing=preprocessing,
                         source={"layout": "custom", "paths": [str(images)] + ([str(labels_p)] if labels_p else [])},
                         drop_failed=drop_failed, warnings=warnings, patch_size=list(patch_size), seed=seed,
                         extra={"split_rule": (f"user file {split_file}" if split_file else
                                f"seeded {split} of the labeled cases (seed {seed}); image-only cases at the end of train")
                                + (f"; {len(fold_list)} folds, fold 0 as train/val" if fold_list else ""),
                                **({"folds": fold_list} if fold_list else {})})
