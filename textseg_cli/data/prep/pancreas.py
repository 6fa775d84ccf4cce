"""NIH Pancreas-CT (82 contrast-enhanced CT volumes) -> prepared folder with the standard 62/20 split.

Accepted source layouts (found anywhere under --src; labels under --labels, default --src):
  dicom: `PANCREAS_0001/<study>/<series>/*.dcm` as downloaded from TCIA, labels `label0001.nii.gz`
  nifti: `PANCREAS_0001.nii.gz` or `image0001.nii.gz` already converted, same labels
  h5:    the community's processed `Pancreas_h5/image0001_norm.h5` (datasets `image`, `label`)

Standard processing (every value is a parameter, recorded in dataset.json): HU -> resample to 1 mm
isotropic (B-spline image, nearest label) -> crop x/y around the label bounding box enlarged to >= 96
voxels plus 25 voxels on each side, z kept -> window level 75 / width 400 (HU [-125, 275]) to [0, 1]
-> z-score on the cropped volume. The h5 files are already resampled, windowed and cropped by their
distributors, so only the z-score is applied to them (it leaves already z-scored data unchanged).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from textseg_cli.data.io import read_h5
from textseg_cli.data.prep import runner
from textseg_cli.data.prep.dicom import dicom_folders, read_dicom_series
from textseg_cli.data.prep.steps import (
    Loaded,
    Processing,
    load_files,
    load_sitk_case,
    parse_spacing,
    read_sitk_image,
    window_setting,
)
from textseg_cli.data.splits import carve_validation
from textseg_cli.errors import ConfigError, DataError

# The split used by the semi-supervised pancreas literature; train order matters (labeled = first N).
PANCREAS_TEST = ("0050 0059 0037 0060 0040 0074 0004 0046 0008 0054 0005 0073 0001 0039 0006 0067 0025 0051 "
                 "0021 0009").split()
PANCREAS_TRAIN = ("0057 0018 0062 0031 0020 0017 0032 0079 0061 0064 0070 0019 0048 0076 0041 0052 0049 0071 0072 "
                  "0034 0010 0015 0077 0080 0027 0047 0022 0014 0068 0058 0007 0011 0024 0042 0082 0035 0012 0055 "
                  "0075 0078 0016 0013 0053 0023 0056 0033 0038 0030 0081 0029 0036 0044 0002 0045 0026 0065 0066 "
                  "0043 0028 0063 0069 0003").split()
# TCIA later withdrew two of the 82 scans as duplicates; the published split still contains them.
KNOWN_DUPLICATES = ("0025", "0070")

LAYOUTS = ("auto", "dicom", "nifti", "h5")
_DICOM_DIR = re.compile(r"^PANCREAS_(\d{4})$", re.I)
_NIFTI_IMG = re.compile(r"^(?:PANCREAS_|image)(\d{4})\.nii(?:\.gz)?$", re.I)
_H5 = re.compile(r"^image(\d{4})_norm\.h5$", re.I)
_LABEL = re.compile(r"^label(\d{4})\.nii(?:\.gz)?$", re.I)


def case_id(number: str) -> str:
    return f"PANCREAS_{number}"


def standard_split() -> dict[str, list[str]]:
    return {"train": [case_id(n) for n in PANCREAS_TRAIN], "val": [], "test": [case_id(n) for n in PANCREAS_TEST]}


def discover(src: Path, labels: Path | None = None, layout: str = "auto") -> tuple[str, dict[str, dict[str, Any]]]:
    """Find cases: {number: {"image": path, "label": path|None}} and the layout used."""
    if layout not in LAYOUTS:
        raise ConfigError(f"--layout {layout!r}: expected one of {', '.join(LAYOUTS)}")
    found: dict[str, dict[str, Path]] = {"dicom": {}, "nifti": {}, "h5": {}}
    label_files: dict[str, Path] = {}
    for p in sorted(src.rglob("*")):
        name = p.name
        if p.is_dir() and (m := _DICOM_DIR.match(name)) and layout in ("auto", "dicom"):
            folders = dicom_folders(p)
            if len(folders) > 1:
                raise DataError(f"case '{case_id(m.group(1))}': DICOM files in {len(folders)} folders "
                                f"({[str(f.relative_to(p)) for f in folders[:3]]}); keep one CT series per patient", p)
            if folders:
                found["dicom"][m.group(1)] = folders[0]
        elif p.is_file() and (m := _NIFTI_IMG.match(name)):
            found["nifti"][m.group(1)] = p
        elif p.is_file() and (m := _H5.match(name)):
            found["h5"][m.group(1)] = p
        elif p.is_file() and labels is None and (m := _LABEL.match(name)):
            label_files[m.group(1)] = p
    if labels is not None:
        if not labels.is_dir():
            raise DataError("labels folder not found", labels)
        label_files = {m.group(1): p for p in sorted(labels.rglob("*")) if (m := _LABEL.match(p.name))}
    if layout == "auto":
        layout = next((k for k in ("dicom", "nifti", "h5") if found[k]), "")
        if not layout:
            raise DataError("no Pancreas-CT cases found (expected PANCREAS_NNNN/ DICOM folders, PANCREAS_NNNN.nii.gz "
                            "or imageNNNN.nii.gz images, or Pancreas_h5/imageNNNN_norm.h5)", src)
    cases = {n: {"image": p, "label": None if layout == "h5" else label_files.get(n)}
             for n, p in sorted(found[layout].items())}
    if not cases:
        raise DataError(f"no Pancreas-CT cases in the {layout} layout found", src)
    return layout, cases


def load_dicom(case_id: str, folder: str, label: str | None, label_geometry: str) -> Loaded:
    if label is None:
        raise DataError(f"case '{case_id}': no label file label{case_id[-4:]}.nii.gz found (use --labels DIR)")
    img = read_dicom_series(folder, case_id)
    lab = read_sitk_image(label, case_id)
    return load_sitk_case(case_id, [img], lab, label_path=label, label_geometry=label_geometry, image_path=folder)


def load_nifti(case_id: str, image: str, label: str | None, label_geometry: str) -> Loaded:
    if label is None:
        raise DataError(f"case '{case_id}': no label file label{case_id[-4:]}.nii.gz found (use --labels DIR)", image)
    return load_files(case_id, [image], label, label_geometry=label_geometry)


def load_h5(case_id: str, path: str, spacing: Sequence[float]) -> Loaded:


    d = read_h5(path)
    img, lab = np.asarray(d["image"], dtype=np.float32), np.asarray(d["label"])
    if img.ndim != 3 or img.shape != lab.shape:
        raise DataError(f"case '{case_id}': image {img.shape} and label {lab.shape} must be equal 3D shapes", path)
    return Loaded(img[None], lab, tuple(float(s) for s in spacing))


def prep_pancreas(src: str | Path, out: str | Path, *, labels: str | Path | None = None, layout: str = "auto",
                  spacing: Any = 1.0, window: Any = (75.0, 400.0), window_preset: str | None = None,
                  crop_min_size: int = 96, crop_margin: int = 25, normalize: str = "zscore",
                  h5_spacing: Sequence[float] = (1.0, 1.0, 1.0), label_geometry: str = "check",
                  patch_size: Sequence[int] = (96, 96, 96), n_val: int = 6, keep_labeled: int = 12, seed: int = 0,
                  workers: int = 1, force: bool = False, drop_failed: bool = False):
    """Prepare NIH Pancreas-CT from the download (DICOM + label NIfTI), converted NIfTI or the community h5.

    Defaults reproduce the literature: 1 mm isotropic, window 75/400 -> [0, 1], x/y crop around the
    label (>= 96 + 25 margin, z kept), z-score; split 62 train (fixed order) / 20 test. `normalize="none"`
    stops before the z-score (values stay in [0, 1]). `n_val` cases are carved (seeded) from the training
    list for checkpoint selection, never from its first `keep_labeled` cases (the 10%/20% labeled subsets);
    n_val=0 keeps the published 62/20 split exactly. Returns the PreparedDataset.
    """
    src, out = Path(src), Path(out)
    if not src.is_dir():
        raise DataError("source folder not found", src)
    layout, cases = discover(src, Path(labels) if labels is not None else None, layout)
    win, win_name = window_setting(None if window_preset else window, window_preset)
    if layout == "h5":
        proc = Processing(normalize=normalize)
    else:
        proc = Processing(target_spacing=parse_spacing(spacing), window=win, window_name=win_name, crop="label",
                          crop_axes=(True, True, False), crop_min_size=(crop_min_size, crop_min_size, 0),
                          crop_margin=(crop_margin, crop_margin, 0), normalize=normalize)
    settings = {"preparer": "pancreas", "layout": layout, "processing": proc.settings(), "label_geometry": label_geometry,
                "h5_spacing": list(h5_spacing) if layout == "h5" else None}
    shash = runner.settings_hash(settings)
    labels_spec = runner.LabelSpec(allowed=(0, 1), strict=True)
    tasks = []
    for num, c in cases.items():
        cid = case_id(num)
        if layout == "h5":
            load, args = load_h5, {"case_id": cid, "path": str(c["image"]), "spacing": tuple(h5_spacing)}
        else:
            load = load_dicom if layout == "dicom" else load_nifti
            key = "folder" if layout == "dicom" else "image"
            args = {"case_id": cid, key: str(c["image"]), "label": None if c["label"] is None else str(c["label"]),
                    "label_geometry": label_geometry}
        tasks.append(runner.CaseTask(cid, load, args, proc, labels_spec, out, shash,
                                     {"source": str(Path(c["image"]).relative_to(src))}))

    warnings = []
    split = standard_split()
    present = {case_id(n) for n in cases}
    missing = [c for c in split["train"] + split["test"] if c not in present]
    extra_ids = sorted(present - set(split["train"]) - set(split["test"]))
    if missing:
        warnings.append(f"{len(missing)} case(s) of the standard 62/20 split are absent from the source and left out "
                        f"of the splits: {missing[:10]}{' ...' if len(missing) > 10 else ''}"
                        + (" (TCIA withdrew 0025 and 0070 as duplicates; published results use all 82)"
                           if set(missing) & {case_id(n) for n in KNOWN_DUPLICATES} else ""))
    if extra_ids:
        warnings.append(f"case(s) {extra_ids[:10]} are not in the standard split and are left out of it")
    dups = [case_id(n) for n in KNOWN_DUPLICATES if case_id(n) in present]
    if dups:
        warnings.append(f"{dups} are in this copy: TCIA later withdrew them as duplicate scans; they stay in the "
                        "standard split for comparability with published results")
    split = {k: [c for c in v if c in present] for k, v in split.items()}
    standard = dict(split)
    if n_val < 0 or keep_labeled < 0:
        raise ConfigError("--val and --keep-labeled must not be negative")
    keep = min(keep_labeled, len(split["train"]))
    if n_val > len(split["train"]) - keep:
        raise ConfigError(f"--val {n_val} asks for more cases than the {len(split['train']) - keep} training cases "
                          f"outside the protected labeled head (--keep-labeled {keep})")
    split["train"], split["val"] = carve_validation(split["train"], n_val, seed, keep_first=keep)

    writer = runner.open_output(out, force=force, src=[src] + ([Path(labels)] if labels else []), name="pancreas",
                                dim=3, modality="CT", channel_names=["CT"], class_names=["background", "pancreas"])
    report = runner.run_cases(tasks, out, workers=workers, description="prep pancreas")
    if layout == "h5":
        preprocessing = [{"step": "from_h5", "params": {"note": "resampled, windowed and cropped by the distributor",
                                                        "assumed_spacing_mm": list(h5_spacing)}}] + proc.record()
    else:
        preprocessing = [{"step": "read", "params": {"layout": layout, "units": "HU",
                                                     "reader": "SimpleITK ImageSeriesReader (slice-position order)"
                                                     if layout == "dicom" else "SimpleITK",
                                                     "label_geometry": label_geometry}}] + proc.record()
    return runner.finish(writer, report, splits=split, preprocessing=preprocessing,
                         source={"layout": f"pancreas-{layout}", "paths": [str(src)] + ([str(labels)] if labels else [])},
                         drop_failed=drop_failed, warnings=warnings, patch_size=list(patch_size),
                         seed=seed, labeled={"rule": "first_n_of_train", "default": keep or None,
                                             "doc": "the first N cases of splits.train in its standard order are "
                                                    "labeled (10% = 6, 20% = 12 of the 62)"},
                         extra={"standard_split": {"doc": "62 train (in order) / 20 test, Pancreas-CT semi-supervised "
                                                          "benchmark; val is carved from its train list", **standard},
                                "val_seed": seed, "keep_labeled": keep})
