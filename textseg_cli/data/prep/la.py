"""`textseg prep la`: the Left Atrium benchmark (2018 Atrial Segmentation Challenge, LGE-MRI).

Two source layouts are accepted, per case folder `SRC/<CASE_ID>/`:

* preprocessed (every semi-supervised repo): `mri_norm2.h5` with `image` (float32, already z-scored and
  cropped) and `label` (uint8 0/1); 0.625 mm isotropic. Arrays are copied unchanged.
* raw challenge: `lgemri.nrrd` + `laendo.nrrd` (label = laendo == 255), processed the standard way:
  z-score the whole volume, then crop x and y around the label's bounding box (at least 112 voxels, the
  patch size) with a seeded random margin of 10-20 voxels per side; all z slices are kept.

The standard split (80 training ids in their standard order, whose head is the labeled subset, and 20
test ids) is embedded below. Listed cases that are absent are reported by name and left out; extra
cases are appended to training. `--val N` carves a seeded validation set from the training cases,
never from the protected head (`--keep-labeled`, default 8 = the 10% setting).
Case processing, resuming, workers and QC go through the shared runner (`data/prep/runner.py`).
"""

from __future__ import annotations

import hashlib
import zlib
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from textseg_cli.console import err_console
from textseg_cli.data.io import read_h5
from textseg_cli.data.prep import runner
from textseg_cli.data.prep.steps import (
    Loaded,
    Processing,
    check_label_values,
    load_files,
)
from textseg_cli.data.preprocessing import bbox, crop, expand_box, zscore
from textseg_cli.data.splits import carve_validation
from textseg_cli.errors import ConfigError, DataError

# The public standard split of the semi-supervised LA benchmark (UA-MT / SSL4MIS `train.list`, `test.list`).
LA_TRAIN_IDS: tuple[str, ...] = (
    "06SR5RBREL16DQ6M8LWS", "0RZDK210BSMWAA6467LU", "1D7CUD1955YZPGK8XHJX", "1GU15S0GJ6PFNARO469W",
    "1MHBF3G6DCPWHSKG7XCP", "23X6SY44VT9KFHR7S7OC", "2XL5HSFSE93RMOJDRGR4", "38CWS74285MFGZZXR09Z",
    "3C2QTUNI0852XV7ZH4Q1", "3DA0T2V6JJ2NLUAV6FWM", "4498CA6DZWELOXCBRYRF", "45C45I6IXAFGNRO067W9",
    "4CHFJGF6ZUM7CMZTNFQF", "4EPVTT1HPA8U60CDUKXE", "57SGAJMLCTCH92QUA0EE", "5BHTH9RHH3PQT913I59W",
    "5FKQL4K14KCB72Y8YMC2", "5HH0WPWIY06DLAFOBQ4M", "5QFK2PMHNX7UALK52NNA", "5UB5KFD2PK38Z4LS6W80",
    "6799D6LEBH3NSRV1KH27", "78NJ5YFQF72BGC8RO51C", "7FUCNXB39F78WTOP5K71", "8GYK8A9MBRC9TV0FVSRA",
    "8M99G0JLAXG9GLPV0O8G", "8RE90C8H5DKF4V6HO8UU", "8ZG2TRZ81MAWHZPN9KKG", "9DCM2IB45SK6YKQNYUQY",
    "9DHWWP5Y66VDMPXISZ13", "9DQYTIU00I4JC0OEOKQQ", "A11O45O3NAXWM7T2H8CH", "A4R1S23KR0KU2WSYHK2X",
    "A5RNNK0A891WUSC2V624", "AT5CRO5JUDBWD4RUPXSQ", "BNK95S2SJXEGSW7VAKYU", "BXJWOUYP2J3EN4U92517",
    "BYSRSI3H4YTWKMM3MADP", "BZUFJX66T0W6ZPVTL9DU", "CB5P5W7X310NIIVU7UZV", "CBIJFVZ5L9BS0LKWE8YL",
    "CCGAKN4EDT72KC8TTJ76", "CLXFYOBQDCVXQ9P7YC07", "CMPXO4J23G58J53Q98SZ", "CZPMV6KWZ4I7IJJP9FOK",
    "DLKXBV73A55ZTSZ0QQI2", "DQ5UYBGR5QP6L692QSG6", "DYXSCIWHLSUOZIDDSZ40", "E2ZMO66WGS74UKXTZPPQ",
    "EJ5V7SPR4961JWD6SS8V", "FGM5NIWN3URY4HF4WNUW", "GSC9KNY0VEZXFSGWNF25", "HVE7DR3CUA2IM3RC6OMA",
    "HZZ4O0BRKF8S0YX3NNF7", "I2VZ7N8H9QYNYT7ZZF1Y", "IDWWHGWJ5STOQXSDT6GU", "IIY6TYJMTJIZRIZLB9YW",
    "IJJY51YW3W4YJJ7DTVTK", "IQYKPTWXVV9H0IHB8YXC", "JEC6HJ7SQJXBKVREX03F", "JGFOLWJF7YCYD8DPHQNH",
    "K32FD6LRSUSSXGS1YUOX", "KM5RYAMP4P4ZP6XWP3Q2", "KSNYHUBHHUJTYJ14UQZR", "LH4FVU3TQDEC87YGN6FL",
    "LJSDNMND9SHKM7Q4IRHJ", "MFTDVMBWFNQ3F5KHBRDR", "MJHV7F65TB2A76CQLOC3", "MVKIPGBKTNSENNP1S4HB",
    "O5TSIKRD4AIB8K84WIR9", "OIRDLE32TXZX942FVZMM", "P1OTI3IWJUIB5NRLULLH", "PVNXUK681N9BY14K4Z86",
    "Q0MEX9ZIKAGJORSPLQ3Y", "Q7J0WYM695R9MA285ZW0", "QZC1W0FNR19KJFLOCFLH", "R8ER97O9UUN77C02VE2J",
    "RSZY41MT2FGDKHWWL5L2", "SN4LF8SGBSRQUPTDSX78", "TDDI6L3Y0L9VVFP9MNFS", "UZUZZT2W9IUSHL6ASOX3",
)
LA_TEST_IDS: tuple[str, ...] = (
    "UPT6DX9IQY9JAZ7HJKA7", "UTBUJIWZMKP64E3N73YC", "ULHWPWKKLTE921LQLH1P", "V0MZOWJ6MU3RMRCV9EXR",
    "VDOF02M8ZHEAADFMS6NP", "VG4C826RAAKVMV9BQLVD", "VIXBEFTNVHZWKAKURJBN", "VQ2L3WM8KEVF6L44E6G9",
    "WBG9WYZ1B25WDT5WAT8T", "WMDG2EFA6L2SNDZXIRU0", "WNPKE0W404QE9AELX1LR", "WSJB9P4JCXUVHBOYFVWL",
    "WW8F5CO4S4K5IM5Z7EXX", "X18LU5AOBNNDMLTA0JZL", "XYDLYJ5CS19FDBVLJIPI", "Y7ZU0B2APPF54WG6PDMF",
    "YDKD1HVHSME6NVMA8I39", "Z9GMG63CJLL0VW893BB1", "ZIJLJAVQV3FJ6JSQOH1E", "ZQPMJ4XEC5A4BISD45P1",
)

SPACING = (0.625, 0.625, 0.625)  # mm, all cases of the preprocessed layout
PATCH_SIZE = (112, 112, 80)
H5_FILE, RAW_IMAGE, RAW_LABEL = "mri_norm2.h5", "lgemri.nrrd", "laendo.nrrd"
CROP_MARGIN = (10, 20)  # inclusive range of the random margin per side, voxels
DEFAULT_LABELED = 8  # the 10% setting of the literature
CLASS_NAMES = ["background", "left atrium"]
# Direction (LPS, as SimpleITK reports it) that the runner turns into an identity RAS affine: h5 arrays carry
# no orientation, and the literature's h5 -> NIfTI conversions write them with an identity affine.
_H5_DIRECTION = (-1.0, 0.0, 0.0, 0.0, -1.0, 0.0, 0.0, 0.0, 1.0)


def _content_hash(image: np.ndarray, label: np.ndarray | None) -> str:
    h = hashlib.sha256(np.ascontiguousarray(image, dtype=np.float32).tobytes())
    if label is not None:
        h.update(np.ascontiguousarray(label, dtype=np.uint8).tobytes())
    return h.hexdigest()[:16]


def load_h5_case(case_id: str, path: str) -> Loaded:
    """Read a preprocessed case unchanged; check shapes, finite intensities and 0/1 labels."""
    arrays = read_h5(path, ("image", "label"))
    image, label = arrays["image"], arrays["label"]
    if image.ndim != 3:
        raise DataError(f"case '{case_id}': 'image' has shape {image.shape}, expected a 3D volume", path)
    if label.shape != image.shape:
        raise DataError(f"case '{case_id}': 'label' shape {label.shape} differs from 'image' shape {image.shape}", path)
    if not np.isfinite(image).all():
        raise DataError(f"case '{case_id}': 'image' holds NaN or infinite values", path)
    label, _ = check_label_values(case_id, label, (0, 1), where=path)
    image = image.astype(np.float32, copy=False)
    return Loaded(image[None], label, SPACING, (0.0, 0.0, 0.0), _H5_DIRECTION,
                  extra={"layout": "h5", "content_hash": _content_hash(image, label)})


def crop_box_xy(label: np.ndarray, rng: np.random.Generator, min_size: int = PATCH_SIZE[0],
                margin: tuple[int, int] = CROP_MARGIN) -> list[tuple[int, int]]:
    """The standard LA crop: label bounding box in x and y, grown to `min_size`, plus a random margin of
    margin[0]..margin[1] voxels on each side (clipped to the volume); z is kept whole."""

    box = bbox(label)
    grown = expand_box(box[:2], label.shape[:2], (0, 0), (min_size, min_size))
    out = []
    for (lo, hi), n in zip(grown, label.shape[:2]):
        m_lo, m_hi = (int(v) for v in rng.integers(margin[0], margin[1] + 1, size=2))
        out.append((max(0, lo - m_lo), min(n, hi + m_hi)))
    return out + [(0, label.shape[2])]


def case_rng(seed: int, case_id: str) -> np.random.Generator:
    """A per-case generator: the crop of a case depends on (seed, id) only, not on order or workers."""
    return np.random.default_rng([int(seed), zlib.crc32(case_id.encode())])


def load_raw_case(case_id: str, image_path: str, label_path: str, seed: int) -> Loaded:
    """Read lgemri/laendo, check geometry and label values, z-score the whole volume, crop x/y."""
    loaded = load_files(case_id, [image_path], label_path)  # checks size, spacing, origin, direction
    if loaded.image.shape[0] != 1:
        raise DataError(f"case '{case_id}': expected a single-channel image, got {loaded.image.shape[0]}", image_path)
    laendo, _ = check_label_values(case_id, loaded.label, (0, 255), where=label_path)
    label = (laendo == 255).astype(np.uint8)
    if not label.any():
        raise DataError(f"case '{case_id}': the label is empty; cannot crop around the atrium", label_path)
    image = zscore(loaded.image[0])
    box = crop_box_xy(label, case_rng(seed, case_id))
    image, label = np.ascontiguousarray(crop(image, box)), np.ascontiguousarray(crop(label, box))
    d = np.eye(3) if loaded.direction is None else np.asarray(loaded.direction, dtype=float).reshape(3, 3)
    shift = d @ (np.array([lo for lo, _ in box], dtype=float) * np.asarray(loaded.spacing, dtype=float))
    origin = tuple(float(v) for v in np.asarray(loaded.origin, dtype=float) + shift)
    return Loaded(image[None], label, loaded.spacing, origin, loaded.direction, loaded.warnings,
                  extra={"layout": "raw", "orig_shape": list(loaded.image.shape[1:]),
                         "crop_box": [list(b) for b in box], "content_hash": _content_hash(image, label)})


def find_cases(src: Path) -> tuple[dict[str, tuple[str, dict[str, str]]], dict[str, DataError]]:
    """(case id -> (layout, files), case id -> problem). Folders without data files are not cases unless
    their name is a listed id; half a raw pair or an empty listed folder is a problem of that case."""
    listed = set(LA_TRAIN_IDS) | set(LA_TEST_IDS)
    found: dict[str, tuple[str, dict[str, str]]] = {}
    problems: dict[str, DataError] = {}
    for d in sorted(p for p in src.iterdir() if p.is_dir()):
        h5, img, lab = d / H5_FILE, d / RAW_IMAGE, d / RAW_LABEL
        if h5.exists():  # when both layouts are present the benchmark's own h5 wins
            found[d.name] = ("h5", {"path": str(h5)})
        elif img.exists() and lab.exists():
            found[d.name] = ("raw", {"image_path": str(img), "label_path": str(lab)})
        elif img.exists() or lab.exists():
            missing = lab if img.exists() else img
            problems[d.name] = DataError(f"case '{d.name}': {missing.name} is missing (the raw layout needs "
                                         f"{RAW_IMAGE} and {RAW_LABEL})", missing)
        elif d.name in listed:
            problems[d.name] = DataError(f"case folder holds neither {H5_FILE} nor {RAW_IMAGE} + {RAW_LABEL}", d)
    return found, problems


def build_splits(present: Sequence[str], n_val: int, seed: int, keep_labeled: int, n_test: int = 0
                 ) -> tuple[dict[str, list[str]], dict[str, Any]]:
    """Standard split restricted to `present`; returns (splits, facts about absent/extra/carved cases)."""
    have = set(present)
    std_train = [c for c in LA_TRAIN_IDS if c in have]
    test = [c for c in LA_TEST_IDS if c in have]
    extra = sorted(have - set(LA_TRAIN_IDS) - set(LA_TEST_IDS))
    train = std_train + extra
    keep = min(keep_labeled, len(train))
    facts: dict[str, Any] = {"extra_cases": extra, "protected_head": keep, "n_train_before_carving": len(train)}
    if n_test > 0:
        if n_test > len(train) - keep:
            raise ConfigError(f"--test {n_test} asks for more cases than the {len(train) - keep} training cases "
                              f"outside the protected head (--keep-labeled {keep})")
        train, carved = carve_validation(train, n_test, seed + 1, keep_first=keep)
        test += carved
        facts["carved_test"] = carved
    if n_val > len(train) - keep:
        raise ConfigError(f"--val {n_val} asks for more cases than the {len(train) - keep} training cases "
                          f"outside the protected head (--keep-labeled {keep})")
    train, val = carve_validation(train, n_val, seed, keep_first=keep)
    if not train:
        raise ConfigError("no training case left after carving the validation/test sets")
    return {"train": train, "val": val, "test": test}, facts


def _preprocessing_record(layouts: set[str], seed: int) -> list[dict[str, Any]]:
    steps: list[dict[str, Any]] = []
    if "h5" in layouts:
        steps.append({"step": "copy_h5", "applies_to": "h5 cases", "params": {
            "file": H5_FILE, "image": "unchanged (the source is z-scored over the whole volume and cropped)",
            "label": "unchanged, values 0/1", "spacing_mm": list(SPACING)}})
    if "raw" in layouts:
        steps += [
            {"step": "label", "applies_to": "raw cases", "params": {"file": RAW_LABEL, "rule": "laendo == 255"}},
            {"step": "zscore", "applies_to": "raw cases", "params": {"over": "whole volume, before cropping"}},
            {"step": "crop", "applies_to": "raw cases", "params": {
                "around": "label bounding box", "axes": "xy", "min_size": list(PATCH_SIZE[:2]),
                "margin_per_side": list(CROP_MARGIN), "margin_rng": "numpy default_rng([seed, crc32(case id)])",
                "seed": seed, "z": "kept whole"}},
        ]
    return steps


def prep_la(src: str | Path, out: str | Path, n_val: int = 8, seed: int = 0, force: bool = False, workers: int = 1,
            keep_labeled: int = DEFAULT_LABELED, cases: Sequence[str] | None = None, n_test: int = 0,
            drop_failed: bool = False):
    """Prepare the Left Atrium data set from SRC (either layout) into OUT; returns the PreparedDataset.

    n_val: validation cases carved (seeded) from training, never from the first `keep_labeled` cases.
    n_test: extra test cases carved from training (for copies without the 20 standard test cases).
    cases: only these case ids (e.g. for a quick check). Re-running skips finished cases unless force.
    drop_failed: write the data set without cases that failed (listed in dataset.json extra.dropped_cases)
    instead of stopping with an error.
    """
    src, out = Path(src), Path(out)
    if not src.is_dir():
        raise DataError("LA source folder not found", src)
    s, o = src.resolve(), out.resolve()
    if o == s or s in o.parents or o in s.parents:
        raise ConfigError(f"--out {out} overlaps the source {src}; choose a separate folder (the source is never written)")
    if workers < 1:
        raise ConfigError(f"--workers {workers}: expected 1 or more")
    if keep_labeled < 0 or n_val < 0 or n_test < 0:
        raise ConfigError("--val, --test and --keep-labeled must not be negative")
    found, problems = find_cases(src)
    if cases is not None:
        wanted = list(dict.fromkeys(c.strip() for c in cases if c.strip()))
        problems = {c: p for c, p in problems.items() if c in wanted}
    if problems:
        raise next(iter(problems.values()))
    if cases is not None:
        unknown = [c for c in wanted if c not in found]
        if unknown:
            raise DataError(f"case(s) {unknown} not found (expected {H5_FILE} or {RAW_IMAGE} + {RAW_LABEL} "
                            "in a folder named after the case)", src)
        found = {c: found[c] for c in wanted}
    if not found:
        raise DataError(f"no LA cases found: expected <CASE_ID>/{H5_FILE} or <CASE_ID>/{RAW_IMAGE} + {RAW_LABEL}", src)

    absent = {}
    if cases is None:
        absent = {name: [c for c in ids if c not in found] for name, ids in (("train", LA_TRAIN_IDS), ("test", LA_TEST_IDS))}
        absent = {k: v for k, v in absent.items() if v}
        if absent:
            parts = "; ".join(f"{k} ({len(v)}): {', '.join(v)}" for k, v in absent.items())
            err_console.print(f"[yellow]warning:[/] {sum(map(len, absent.values()))} case(s) of the standard split "
                              f"are absent from {src} and left out: {parts}", highlight=False, soft_wrap=True)
    splits, facts = build_splits(list(found), n_val, seed, keep_labeled, n_test)
    if facts["extra_cases"]:
        err_console.print(f"[yellow]warning:[/] {len(facts['extra_cases'])} case(s) are not in the standard split "
                          f"and were appended to train: {', '.join(facts['extra_cases'])}", highlight=False, soft_wrap=True)

    tasks = []
    no_processing = Processing(normalize="none")  # all LA processing happens in the loaders above
    for cid, (layout, files) in found.items():
        if layout == "h5":
            load, args, settings = load_h5_case, {"case_id": cid, **files}, {"layout": "h5", "version": 1}
        else:
            load, args = load_raw_case, {"case_id": cid, **files, "seed": seed}
            settings = {"layout": "raw", "version": 1, "seed": seed, "margin": CROP_MARGIN, "min_size": PATCH_SIZE[0]}
        tasks.append(runner.CaseTask(cid, load, args, no_processing, runner.LabelSpec(allowed=(0, 1)), out,
                                     runner.settings_hash(settings)))
    writer = runner.open_output(out, force=force, src=src, name="la", dim=3, modality="MR",
                                channel_names=["LGE-MRI"], class_names=CLASS_NAMES)
    report = runner.run_cases(tasks, out, workers=workers, description="prep la")

    train = [c for c in splits["train"] if c not in report.failed]  # as written when --drop-failed
    n_std = facts["n_train_before_carving"] - len([c for c in report.failed if c not in splits["test"]])
    labeled = {"rule": "first_n_of_train", "doc": "the first N cases of splits.train in its standard order are labeled",
               "default": min(keep_labeled or DEFAULT_LABELED, len(train)),
               "protected_from_carving": facts["protected_head"],
               "percent_base": n_std,
               "percent_doc": "percentages refer to the training cases before carving (80 in the full set: "
                              "5% = 4, 10% = 8, 20% = 16)",
               "subsets": {f"{p}%": train[:max(1, int(np.floor(n_std * p / 100 + 0.5)))] for p in (5, 10, 20)}}
    layouts = sorted({layout for layout, _ in found.values()})
    hashes = "".join(f"{cid}:{report.records[cid]['entry'].get('content_hash')};"
                     for cid in sorted(report.records))
    extra = {"absent_cases": absent, "extra_cases": facts["extra_cases"],
             "carved_test": facts.get("carved_test", []), "val_seed": seed,
             "content_hash": hashlib.sha256(hashes.encode()).hexdigest()[:16],
             "standard_split": "80 train (standard order) / 20 test ids embedded in textseg_cli.data.prep.la"}
    source = {"layout": layouts[0] if len(layouts) == 1 else "mixed", "paths": [str(s)],
              "case_filter": list(found) if cases is not None else None}
    return runner.finish(writer, report, splits=splits, preprocessing=_preprocessing_record(set(layouts), seed),
                         source=source, patch_size=list(PATCH_SIZE), labeled=labeled, seed=seed, extra=extra,
                         drop_failed=drop_failed)
