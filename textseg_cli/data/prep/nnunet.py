"""nnU-Net v2 raw data sets in (`textseg prep nnunet`) and prepared sets out (`textseg export-data`).

nnU-Net v2 raw layout (nnunetv2/dataset_conversion docs)::

    DatasetXXX_Name/dataset.json    channel_names {"0": "CT"}, labels {"background": 0, "organ": 1},
                                    numTraining, file_ending (".nii.gz")
    DatasetXXX_Name/imagesTr/<case>_0000<file_ending>    one file per channel
    DatasetXXX_Name/labelsTr/<case><file_ending>
    DatasetXXX_Name/imagesTs/                              optional, unlabeled
    splits_final.json (nnUNet_preprocessed/DatasetXXX_Name/) [{"train": [...], "val": [...]}, ...]

Import keeps the class and channel names; with a splits_final.json its folds become the prepared set's
folds (`train --fold k`) and fold 0 its train/val. Export writes a prepared set's cases and split so nnU-Net
trains on exactly textseg's split and its predictions score in the same tables. nnU-Net's trainer reads
splits_final.json from nnUNet_preprocessed/DatasetXXX_Name/ (without it, it silently builds its own 5 folds), so
export writes it there (`--preprocessed`), keeps a copy in the raw folder, and `check_nnunet_splits` compares the
two. `--images raw` exports the source scans themselves (their own grid), for an nnU-Net that runs on raw scans.
"""

from __future__ import annotations

import hashlib
import json
import re
import shlex
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import SimpleITK as sitk

from textseg_cli.console import err_console
from textseg_cli.data.io import read_sitk_image, write_nifti
from textseg_cli.data.names import check_case_ids
from textseg_cli.data.prep.custom import match_cases, prep_custom
from textseg_cli.data.prep.msd import _channel_names, _rel, case_id_of, read_task
from textseg_cli.data.prep.steps import check_geometry, geometry_of, split_channels
from textseg_cli.data.prepared import load_prepared
from textseg_cli.data.splits import labeled_subset
from textseg_cli.errors import ConfigError, DataError, OutputExistsError
from textseg_cli.storage.files import (
    atomic_path,
    atomic_write_json,
    atomic_write_text,
    child_path,
    read_json,
)
from textseg_cli.storage.outputs import (
    OutputOwnershipError,
    check_out_path,
    locked_output,
    prepare_output_dir,
)


def read_nnunet_spec(src: Path) -> dict[str, Any]:
    """SRC/dataset.json, checked whole before anything is written (issue 25.7): a malformed field is a
    DataError naming the file and the field, not a ValueError half-way through the preparation."""
    path = src / "dataset.json"
    if not path.is_file():
        raise DataError("no dataset.json: expected an nnU-Net v2 raw folder (DatasetXXX_Name)", src)
    spec = read_json(path)
    if not isinstance(spec, dict):
        raise DataError(f"expected a JSON object at the top level, got {type(spec).__name__}", path)
    missing = [k for k in ("channel_names", "labels", "file_ending") if k not in spec]
    if missing:
        raise DataError(f"nnU-Net v2 dataset.json lacks {missing}" + (" (an MSD task? use `textseg prep msd`)"
                                                                      if "training" in spec else ""), path)
    chans = spec["channel_names"]
    if not isinstance(chans, dict) or not chans or not all(
            isinstance(k, str) and k.isdigit() and isinstance(v, str) for k, v in chans.items()):
        raise DataError(f"channel_names {chans!r}: expected an object like {{\"0\": \"CT\"}} (channel index → name)",
                        path)
    if sorted(int(k) for k in chans) != list(range(len(chans))):
        raise DataError(f"channel_names {sorted(chans, key=int)}: expected channels numbered 0..{len(chans) - 1}", path)
    labels = spec["labels"]
    if not isinstance(labels, dict) or not labels:
        raise DataError(f"labels {_short(labels)}: expected an object mapping class names to values, e.g. "
                        '{"background": 0, "liver": 1}', path)
    for name, value in labels.items():
        if not (isinstance(value, (list, tuple)) or (isinstance(value, int) and not isinstance(value, bool))):
            raise DataError(f"labels.{name} {value!r}: expected an integer label value", path)
    ending = spec["file_ending"]
    if (not isinstance(ending, str) or not ending.startswith(".") or len(ending) < 2 or ".." in ending
            or "/" in ending or "\\" in ending or "\0" in ending):
        raise DataError(f"file_ending {ending!r}: expected a file extension such as \".nii.gz\"", path)
    n = spec.get("numTraining")
    if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n < 0):
        raise DataError(f"numTraining {n!r}: expected a whole number of training cases", path)
    if spec.get("name") is not None and not isinstance(spec["name"], str):
        raise DataError(f"name {spec['name']!r}: expected a string", path)
    return spec


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def read_splits_final(sf: Path, case_ids: set[str]) -> list[dict[str, list[str]]]:
    """nnU-Net's splits_final.json: a list of {train, val} folds over known cases, each case at most once per
    fold. Every error names `sf` (the user's file), checked before anything is written (issue 25.9)."""
    folds = read_json(sf)
    if not isinstance(folds, list) or not folds or not all(
            isinstance(f, dict) and all(isinstance(f.get(k), list) for k in ("train", "val")) for f in folds):
        raise ConfigError("splits_final.json must be a list of {train: [...], val: [...]}", sf)
    for i, f in enumerate(folds):
        check_case_ids(f["train"] + f["val"], sf)  # other people's file: its IDs become file names (and no repeats)
        unknown = sorted(set(f["train"] + f["val"]) - case_ids)
        if unknown:
            raise ConfigError(f"fold {i} names case(s) that are not in imagesTr/labelsTr: {unknown[:5]}", sf)
    return [{"train": list(f["train"]), "val": sorted(f["val"])} for f in folds]


def class_names_from_labels(labels: dict[str, Any], where: Any = None) -> list[str]:
    """{"background": 0, "a": 1, "b": 2} -> ["background", "a", "b"]; region labels (lists) and `ignore` are refused."""
    by_value: dict[int, str] = {}
    for name, value in labels.items():
        if isinstance(value, (list, tuple)):
            raise ConfigError(f"label '{name}' is region-based ({value}); textseg needs one value per class", where)
        if name == "ignore":
            raise ConfigError("an 'ignore' label is not supported by textseg", where)
        by_value[int(value)] = str(name)
    if sorted(by_value) != list(range(len(by_value))) or 0 not in by_value:
        raise ConfigError(f"labels must be 0..K-1 with 0 the background, got {sorted(by_value)}", where)
    return [by_value[v] for v in range(len(by_value))]


def prep_nnunet(src: str | Path, out: str | Path, *, splits_final: str | Path | None = None, name: str | None = None,
                **options: Any):
    """Prepare an nnU-Net v2 raw folder (names intact). `splits_final` (default: `src/splits_final.json` when
    present) supplies the folds; other `options` are those of `prep_custom` (spacing, window, crop, ...).
    dataset.json and splits_final.json are checked whole before anything is written."""
    src = Path(src)
    spec = read_nnunet_spec(src)
    classes = class_names_from_labels(spec["labels"], src / "dataset.json")
    chans = [str(spec["channel_names"][k]) for k in sorted(spec["channel_names"], key=int)]
    modality = "CT" if any(c.upper() == "CT" for c in chans) else "MR"
    if not (src / "imagesTr").is_dir() or not (src / "labelsTr").is_dir():
        raise DataError("an nnU-Net v2 raw folder needs imagesTr/ and labelsTr/", src)
    sf = Path(splits_final) if splits_final else (src / "splits_final.json")
    folds = None
    with tempfile.TemporaryDirectory() as tmp:
        if sf.is_file():
            image_files, _, _ = match_cases(src / "imagesTr", src / "labelsTr")
            folds = read_splits_final(sf, set(image_files))
            # prep_custom reads fold 0 as a split file; read_splits_final checked everything its reader checks,
            # so no error can name this temporary copy
            options["split_file"] = Path(tmp) / "split.json"
            atomic_write_json(options["split_file"], {**folds[0], "test": []})
        elif splits_final:
            raise ConfigError("splits_final.json not found", sf)
        ds = prep_custom(src / "imagesTr", out, labels=src / "labelsTr", modality=modality, classes=classes[1:],
                         channel_names=chans, name=name or spec.get("name") or src.name, require_labels=True,
                         folds=folds, **options)
    n = spec.get("numTraining")
    if n is not None and n != len(ds.case_ids):
        err_console.print(f"[yellow]warning:[/] dataset.json says numTraining {n}; {len(ds.case_ids)} cases found")
    return ds


# --- export -------------------------------------------------------------------------------------------

EXPORT_FORMATS = ("nnunet", "msd")
EXPORT_IMAGES = ("prepared", "raw")
SPLITS_FILE = "splits_final.json"
# Beside the splits_final.json textseg writes into nnUNet_preprocessed/DatasetXXX_Name/: the SHA-256 of the bytes it
# wrote, so a later `--force` replaces that file only while it is still textseg's (the folder itself is nnU-Net's).
SPLITS_RECORD = ".textseg-splits_final.json"
# nnU-Net finds a data set by its folder name (nnunetv2/utilities/dataset_name_id_conversion.py): DatasetXXX_Name
DATASET_DIR_RE = re.compile(r"^Dataset\d{3}_[A-Za-z0-9][A-Za-z0-9_.+-]*$")
# preparers whose dataset.json records the source scan of every case (case entry "source" + source.paths)
RAW_LAYOUTS = ("custom", "msd", "msd-lung")
_NIFTI_GZ = ".nii.gz"


@dataclass
class RawSource:
    """Where one prepared case came from: its channel file(s), the channels kept, its label file."""
    images: list[Path]
    channels: list[int] | None  # None: every channel of `images`
    label: Path | None
    label_geometry: str = "check"  # how prep matched the label to the image (label_geometry of the read step)


def export_data(prepared: str | Path, out: str | Path, fmt: str = "nnunet", labeled: str | int | None = None,
                force: bool = False, *, images: str = "prepared", preprocessed: str | Path | None = None) -> Path:
    """Write a prepared set as an nnU-Net v2 raw folder (+ splits_final.json) or an MSD task.

    Training cases are the labeled head of splits.train (`labeled`, default: all labeled training cases)
    plus splits.val; splits_final.json holds textseg's folds (`prep custom --folds`) or its one train/val
    split. Test cases go to imagesTs/ with their labels in labelsTs/ (nnU-Net ignores those; `textseg eval`
    scores its predictions against them). Image-only cases are left out: nnU-Net trains fully supervised.

    images: "prepared" writes the preprocessed cases textseg trains on; "raw" the original scans (and labels) the
    set was prepared from, with their own geometry, so an nnU-Net model trained on them runs on raw scans (needs
    a set from prep custom/nnunet/msd whose source files are still in place; else a ConfigError naming what is
    missing). preprocessed: the nnUNet_preprocessed root; splits_final.json is written to
    `preprocessed/<out name>/`, where nnU-Net's trainer reads it (a copy always stays in `out`). Everything is
    checked before anything is written."""

    if fmt not in EXPORT_FORMATS:
        raise ConfigError(f"--format {fmt!r}: expected one of {', '.join(EXPORT_FORMATS)}")
    if images not in EXPORT_IMAGES:
        raise ConfigError(f"--images {images!r}: expected one of {', '.join(EXPORT_IMAGES)}")
    if preprocessed is not None and fmt != "nnunet":
        raise ConfigError("--preprocessed (nnUNet_preprocessed) applies to --format nnunet only")
    ds = load_prepared(prepared)
    if ds.dim != 3:
        raise ConfigError("export-data writes 3D data sets", ds.root / "dataset.json")
    out = Path(out)
    train_lab, _ = labeled_subset([c for c in ds.split("train") if ds.has_label(c)], labeled)
    val = [c for c in ds.split("val") if ds.has_label(c)]
    test = ds.split("test")
    splits = export_splits(ds, train_lab, val)
    sources = raw_sources(ds, train_lab + val + test) if images == "raw" else {}
    if preprocessed is not None:  # refused now, not after the cases are written
        splits_target(preprocessed, out, splits, force=force, inputs=[ds.root])
    prepare_output_dir(out, force=force)
    ending = _NIFTI_GZ

    def write_case(cid: str, img_dir: str, lab_dir: str | None) -> tuple[str, str | None]:
        with_label = lab_dir is not None and ds.has_label(cid)
        if images == "raw":
            return _write_raw_case(cid, sources[cid], out, img_dir, lab_dir if with_label else None, fmt)
        case = ds.load_case(cid, with_label=with_label)
        sp = tuple(case.spacing)
        if fmt == "nnunet":
            for i, ch in enumerate(case.image):
                write_nifti(child_path(out / img_dir, cid, f"_{i:04d}{ending}"), ch, sp)
            img = f"./{img_dir}/{cid}_0000{ending}"
        else:
            arr = case.image[0] if case.image.shape[0] == 1 else np.moveaxis(case.image, 0, -1)
            write_nifti(child_path(out / img_dir, cid, ending), arr, sp)
            img = f"./{img_dir}/{cid}{ending}"
        lab = None
        if case.label is not None:
            write_nifti(child_path(out / lab_dir, cid, ending), case.label.astype(np.uint8), sp)
            lab = f"./{lab_dir}/{cid}{ending}"
        return img, lab

    training = [write_case(c, "imagesTr", "labelsTr") for c in train_lab + val]
    tests = [write_case(c, "imagesTs", "labelsTs") for c in test]
    chans = {str(i): n for i, n in enumerate(ds.spec["channel_names"])}
    what = ("the source scans it was prepared from (raw geometry)" if images == "raw"
            else "its preprocessed cases (see textseg_dataset.json)")
    if fmt == "nnunet":
        atomic_write_json(out / "dataset.json", {
            "channel_names": chans, "labels": {n: i for i, n in enumerate(ds.class_names)},
            "numTraining": len(training), "file_ending": ending, "name": ds.name,
            "description": f"exported by textseg from {ds.root}: {what}"})
        # a copy beside the raw data too: recent nnU-Net versions copy it into nnUNet_preprocessed when planning (or
        # check that the one there has the same folds); older ones only read nnUNet_preprocessed/DatasetXXX_Name/
        atomic_write_text(out / SPLITS_FILE, splits_text(splits))
    else:
        atomic_write_json(out / "dataset.json", {
            "name": ds.name, "description": f"exported by textseg from {ds.root}: {what}", "tensorImageSize": "4D"
            if ds.in_channels > 1 else "3D", "modality": chans,
            "labels": {str(i): n for i, n in enumerate(ds.class_names)}, "numTraining": len(training),
            "numTest": len(tests), "training": [{"image": i, "label": lb} for i, lb in training],
            "test": [i for i, _ in tests], "validation": val})
    atomic_write_json(out / "textseg_dataset.json", ds.spec)  # where the cases came from, how they were preprocessed
    if preprocessed is not None:
        write_preprocessed_splits(preprocessed, out, splits, force=force, inputs=[ds.root])
    return out


def export_splits(ds: Any, train_lab: list[str], val: list[str]) -> list[dict[str, list[str]]]:
    """nnU-Net's splits_final.json for the exported cases: textseg's folds restricted to them, or its one split."""
    folds = (ds.spec.get("extra") or {}).get("folds")
    if folds:
        keep = set(train_lab + val)
        return [{"train": [c for c in f["train"] if c in keep], "val": [c for c in f["val"] if c in keep]}
                for f in folds]
    return [{"train": list(train_lab), "val": list(val)}]


def splits_text(splits: list[dict[str, list[str]]]) -> str:
    """The exact bytes textseg writes for splits_final.json (hashed in SPLITS_RECORD)."""
    return json.dumps(splits, indent=2) + "\n"


def splits_copy_command(out: str | Path) -> str:
    """One shell line that puts OUT/splits_final.json where nnU-Net's trainer reads it (when no
    nnUNet_preprocessed folder was known at export time); it stops if $nnUNet_preprocessed is unset."""
    out = Path(out)
    dest = f'"${{nnUNet_preprocessed:?set nnUNet_preprocessed first}}"/{shlex.quote(out.name)}'
    return f"mkdir -p {dest} && cp {shlex.quote(str(out.absolute() / SPLITS_FILE))} {dest}/{SPLITS_FILE}"


# --- splits_final.json in nnUNet_preprocessed -------------------------------------------------------

def preprocessed_dataset_dir(preprocessed: str | Path, out: str | Path, inputs: Any = ()) -> Path:
    """nnUNet_preprocessed/<name of out>, refused unless `out` is named DatasetXXX_Name, the folder lies directly
    in `preprocessed` (no symbolic link anywhere on the way) and neither folder holds the other or an input."""
    root, out = Path(preprocessed), Path(out)
    name = out.name
    if not DATASET_DIR_RE.match(name):
        raise ConfigError(f"--out {out}: nnU-Net finds a data set by its folder name, DatasetXXX_Name (three digits, "
                          "e.g. Dataset501_Liver); name --out like that to write splits_final.json into "
                          "--preprocessed / $nnUNet_preprocessed")
    root = check_out_path(root, option="--preprocessed")  # a symlinked root is refused like a symlinked --out
    if root.exists() and not root.is_dir():
        raise ConfigError(f"--preprocessed {root} is a file, not the nnUNet_preprocessed folder")
    ds_dir = check_out_path(root / name, inputs, option="--preprocessed")  # a symlinked DatasetXXX_Name is refused
    o, d = out.resolve(), ds_dir.resolve()
    if o == d or o in d.parents or d in o.parents:
        raise ConfigError(f"--preprocessed {root}: its {name}/ overlaps --out {out}; nnUNet_raw and "
                          "nnUNet_preprocessed must be separate folders")
    if root.exists():
        child_path(root, name)  # lies directly inside the root
    return ds_dir


def splits_target(preprocessed: str | Path, out: str | Path, splits: list[dict[str, list[str]]], *,
                  force: bool = False, inputs: Any = ()) -> tuple[Path, bool]:
    """(path of nnUNet_preprocessed/DatasetXXX_Name/splits_final.json, whether it must be written).

    An existing file with the same folds stays as it is; one with other folds is refused without --force, and
    with --force replaced only while it is byte for byte the file textseg wrote (SPLITS_RECORD): a split
    nnU-Net made itself, or one the user edited, is never overwritten."""
    ds_dir = preprocessed_dataset_dir(preprocessed, out, inputs)
    target = ds_dir / SPLITS_FILE
    if target.is_symlink() or (target.exists() and not target.is_file()):
        raise ConfigError("is not a plain file; textseg writes splits_final.json only as a file of its own", target)
    if not target.exists():
        return target, True
    if _same_folds(read_json(target), splits):
        return target, False
    if not force:
        raise OutputExistsError(target)
    record = ds_dir / SPLITS_RECORD
    held = read_json(record) if record.is_file() and not record.is_symlink() else {}
    if not isinstance(held, dict) or held.get("sha256") != hashlib.sha256(target.read_bytes()).hexdigest():
        raise OutputOwnershipError("holds other folds and was not written by textseg (or changed since); --force "
                                   "only replaces a splits_final.json textseg wrote: move it away yourself", target)
    return target, True


def write_preprocessed_splits(preprocessed: str | Path, out: str | Path, splits: list[dict[str, list[str]]], *,
                              force: bool = False, inputs: Any = ()) -> Path:
    """Write splits_final.json into nnUNet_preprocessed/DatasetXXX_Name/ (atomic, under that folder's lock, checked
    again there) with SPLITS_RECORD beside it. Nothing else in that folder (nnU-Net's) is touched."""
    ds_dir = preprocessed_dataset_dir(preprocessed, out, inputs)
    with locked_output(ds_dir, "export-data", inputs=inputs):
        target, needed = splits_target(preprocessed, out, splits, force=force, inputs=inputs)
        if needed:
            text = splits_text(splits)
            atomic_write_text(target, text)
            atomic_write_json(ds_dir / SPLITS_RECORD, {
                "tool": "textseg", "command": "export-data", "file": SPLITS_FILE,
                "sha256": hashlib.sha256(text.encode("utf-8")).hexdigest(), "export": str(Path(out).absolute())})
    return target


def _fold_sets(splits: Any) -> list[tuple[frozenset, frozenset]] | None:
    ok = isinstance(splits, list) and all(
        isinstance(f, dict) and isinstance(f.get("train"), list) and isinstance(f.get("val"), list) for f in splits)
    if not ok:
        return None
    return [(frozenset(map(str, f["train"])), frozenset(map(str, f["val"]))) for f in splits]


def _same_folds(a: Any, b: Any) -> bool:
    """Equal as nnU-Net reads them: the same number of folds, each with the same train and val cases."""
    fa, fb = _fold_sets(a), _fold_sets(b)
    return fa is not None and fa == fb


def check_nnunet_splits(export: str | Path, preprocessed: str | Path) -> Path:
    """Check that nnU-Net will train on the export's split: `preprocessed` (the nnUNet_preprocessed root, or its
    DatasetXXX_Name folder) holds a splits_final.json with the same folds as EXPORT/splits_final.json. Returns
    the file checked; a DataError names the first difference (`textseg prep check EXPORT --nnunet-preprocessed`)."""
    export, pre = Path(export), Path(preprocessed)
    ours_path = export / SPLITS_FILE
    if not ours_path.is_file():
        raise DataError(f"no {SPLITS_FILE}: expected a folder written by `textseg export-data --format nnunet`",
                        export)
    ds_dir = pre if pre.name == export.name else pre / export.name
    theirs_path = ds_dir / SPLITS_FILE
    if not theirs_path.is_file():
        raise DataError(f"no {SPLITS_FILE} here, so nnU-Net builds its own 5-fold split; copy it with: "
                        f"{splits_copy_command(export)}", ds_dir)
    ours, theirs = _fold_sets(read_json(ours_path)), _fold_sets(read_json(theirs_path))
    if theirs is None:
        raise DataError("is not a list of {train: [...], val: [...]} folds", theirs_path)
    if ours is None:
        raise DataError("is not a list of {train: [...], val: [...]} folds", ours_path)
    if len(ours) != len(theirs):
        raise DataError(f"holds {len(theirs)} fold(s), the export {len(ours)} ({ours_path})", theirs_path)
    for i, ((tr_a, va_a), (tr_b, va_b)) in enumerate(zip(ours, theirs)):
        for part, a, b in (("train", tr_a, tr_b), ("val", va_a, va_b)):
            if a != b:
                raise DataError(f"fold {i} {part} differs from the export's ({ours_path}): only here "
                                f"{sorted(b - a)[:5]}, only in the export {sorted(a - b)[:5]}", theirs_path)
    return theirs_path


# --- the source scans (--images raw) ------------------------------------------------------------------

def raw_sources(ds: Any, case_ids: list[str]) -> dict[str, RawSource]:
    """The source file(s) of every case in `case_ids`, from what the preparer recorded (dataset.json `source` and
    each case's `source`), all checked present; otherwise one ConfigError naming what is missing."""
    where = ds.root / "dataset.json"
    source = ds.spec.get("source") or {}
    layout = source.get("layout") if isinstance(source, dict) else None
    paths = source.get("paths") if isinstance(source, dict) else None
    if layout not in RAW_LAYOUTS:
        raise ConfigError(f"--images raw: this set was made by `prep {layout}`, which records no source scan per case "
                          "(raw export needs a set from prep custom, nnunet, msd or lung); use --images prepared",
                          where)
    if not isinstance(paths, list) or not paths or not all(isinstance(p, str) for p in paths):
        raise ConfigError("--images raw: dataset.json source.paths does not name the source folder(s)", where)
    read = next((s for s in ds.spec.get("preprocessing") or [] if isinstance(s, dict) and s.get("step") == "read"), {})
    params = read.get("params") or {}
    label_geometry = str(params.get("label_geometry", "check"))
    folders = [Path(p) for p in paths]
    gone = [str(p) for p in folders if not p.is_dir()]
    if gone:
        raise ConfigError(f"--images raw: the source folder {gone[0]} (dataset.json source.paths) is missing; "
                          "restore it, or use --images prepared", where)
    needs_label = [c for c in case_ids if ds.has_label(c)]
    if layout == "custom":
        found = _custom_sources(ds, case_ids, folders, needs_label, where)
    else:
        found = _msd_sources(ds, case_ids, folders[0], params.get("channels"), where)
    missing = [f"{f}" for c in case_ids for f in found[c].images if not f.is_file()]
    missing += [f"label of case '{c}'" + (f" ({found[c].label})" if found[c].label else "")
                for c in needs_label if found[c].label is None or not found[c].label.is_file()]
    if missing:
        raise ConfigError(f"--images raw: {len(missing)} source file(s) missing, e.g. {', '.join(missing[:3])} "
                          f"(prepared from {', '.join(paths)}); restore them, or use --images prepared", where)
    for src in found.values():
        src.label_geometry = label_geometry
    return found


def _plain_name(name: Any, ds: Any, cid: str) -> str:
    if not isinstance(name, str) or not name or Path(name).name != name or name in (".", "..") or "\\" in name:
        raise ConfigError(f"--images raw: case '{cid}' records the source {name!r}, not a file name",
                          ds.root / "dataset.json")
    return name


def _custom_sources(ds: Any, case_ids: list[str], folders: list[Path], needs_label: list[str],
                    where: Path) -> dict[str, RawSource]:
    """prep custom / prep nnunet: case `source` = channel file names in source.paths[0]; labels in paths[1]."""
    images_dir = folders[0]
    label_files: dict[str, Path] = {}
    if needs_label:
        if len(folders) < 2:
            raise ConfigError("--images raw: dataset.json source.paths names no label folder", where)
        _, label_files, _ = match_cases(images_dir, folders[1])
    entries = {c["id"]: c for c in ds.spec["cases"]}
    out = {}
    for cid in case_ids:
        names = entries[cid].get("source")
        if not isinstance(names, list) or not names:
            raise ConfigError(f"--images raw: case '{cid}' records no source file (prepared by an older textseg?)",
                              where)
        out[cid] = RawSource([images_dir / _plain_name(n, ds, cid) for n in names], None, label_files.get(cid))
    return out


def _msd_sources(ds: Any, case_ids: list[str], task: Path, kept: Any, where: Path) -> dict[str, RawSource]:
    """prep msd / prep lung: case `source` = the task's training image; label and channels from its dataset.json."""
    spec = read_task(task)
    names = _channel_names(spec)
    channels = None
    if isinstance(kept, list) and kept != names:
        bad = [k for k in kept if k not in names]
        if bad:
            raise ConfigError(f"--images raw: the task's channels {names} lack {bad}", task / "dataset.json")
        channels = [names.index(k) for k in kept]
    labels = {case_id_of(str(t["image"])): t.get("label") for t in spec.get("training", [])
              if isinstance(t, dict) and "image" in t}
    entries = {c["id"]: c for c in ds.spec["cases"]}
    out = {}
    for cid in case_ids:
        rel = entries[cid].get("source")
        if not isinstance(rel, str) or not rel:
            raise ConfigError(f"--images raw: case '{cid}' records no source file (prepared by an older textseg?)",
                              where)
        image = _inside(task, rel, ds, cid)
        lab = labels.get(cid)
        out[cid] = RawSource([image], channels, _inside(task, lab, ds, cid) if isinstance(lab, str) else None)
    return out


def _inside(task: Path, rel: str, ds: Any, cid: str) -> Path:
    p = _rel(task, rel)
    if ".." in Path(rel).parts or Path(rel).is_absolute():
        raise ConfigError(f"--images raw: case '{cid}' source {rel!r} does not lie inside the task folder {task}",
                          ds.root / "dataset.json")
    return p


def _is_plain_nifti_gz(path: Path) -> bool:
    """A 3D single-channel .nii.gz: exported as a byte copy (the very voxels, header and affine)."""
    if not path.name.lower().endswith(_NIFTI_GZ):
        return False
    return len(nib.load(str(path)).shape) == 3


def _copy(src: Path, dst: Path) -> None:
    with atomic_path(dst, suffix=_NIFTI_GZ) as tmp:
        shutil.copyfile(src, tmp)


def _write_sitk(img: Any, dst: Path) -> None:
    with atomic_path(dst, suffix=_NIFTI_GZ) as tmp:
        sitk.WriteImage(img, str(tmp), True)


def _write_raw_case(cid: str, src: RawSource, out: Path, img_dir: str, lab_dir: str | None,
                    fmt: str) -> tuple[str, str | None]:
    """The source scan (nnU-Net: one file per channel; MSD: one file, 4D for several channels) and its label, on the
    scan's own grid. Single-channel .nii.gz files are copied byte for byte; other formats, 4D files and selected
    channels go through SimpleITK with the source geometry."""
    copy_ok = src.channels is None and all(_is_plain_nifti_gz(p) for p in src.images)
    chans: list[Any] = []
    if not copy_ok:
        for p in src.images:
            chans += split_channels(read_sitk_image(p, cid))
        if src.channels is not None:
            chans = [chans[i] for i in src.channels]
    n = len(src.images) if copy_ok else len(chans)
    if fmt == "nnunet":
        for i in range(n):
            dst = child_path(out / img_dir, cid, f"_{i:04d}{_NIFTI_GZ}")
            _copy(src.images[i], dst) if copy_ok else _write_sitk(chans[i], dst)
        img_rel = f"./{img_dir}/{cid}_0000{_NIFTI_GZ}"
    else:
        dst = child_path(out / img_dir, cid, _NIFTI_GZ)
        if copy_ok and n == 1:
            _copy(src.images[0], dst)
        else:
            if copy_ok:
                chans = [read_sitk_image(p, cid) for p in src.images]
            _write_sitk(chans[0] if len(chans) == 1 else sitk.JoinSeries(chans), dst)
        img_rel = f"./{img_dir}/{cid}{_NIFTI_GZ}"
    if lab_dir is None or src.label is None:
        return img_rel, None
    dst = child_path(out / lab_dir, cid, _NIFTI_GZ)
    ref = chans[0] if chans else None
    lab = read_sitk_image(src.label, cid)
    try:
        check_geometry(cid, "label", geometry_of(ref) if ref is not None else _geometry(src.images[0]),
                       geometry_of(lab), src.label)
        fix = None
    except DataError:
        fix = src.label_geometry  # prep made the label fit (--label-geometry image|resample): do the same here
        if fix == "check":
            raise
        if ref is None:
            ref = split_channels(read_sitk_image(src.images[0], cid))[0]
    if fix is None and _is_plain_nifti_gz(src.label):
        _copy(src.label, dst)
    elif fix == "image":
        lab.CopyInformation(ref)
        _write_sitk(lab, dst)
    elif fix == "resample":
        _write_sitk(sitk.Resample(lab, ref, sitk.Transform(), sitk.sitkNearestNeighbor, 0.0, lab.GetPixelID()), dst)
    else:
        _write_sitk(lab, dst)
    return img_rel, f"./{lab_dir}/{cid}{_NIFTI_GZ}"


def _geometry(path: Path) -> dict[str, Any]:
    """geometry_of() of a 3D image file from its header alone (the pixels are not read)."""
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    reader.ReadImageInformation()
    d = np.asarray(reader.GetDirection(), dtype=float).reshape(reader.GetDimension(), -1)[:3, :3]
    return {"shape": tuple(reader.GetSize()[:3]), "spacing": tuple(reader.GetSpacing()[:3]),
            "origin": tuple(reader.GetOrigin()[:3]), "direction": tuple(d.ravel())}
