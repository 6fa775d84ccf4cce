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
trains on exactly textseg's split (splits_final.json) and its predictions score in the same tables.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from textseg_cli.console import err_console
from textseg_cli.data.io import write_nifti
from textseg_cli.data.names import check_case_ids
from textseg_cli.data.prep.custom import match_cases, prep_custom
from textseg_cli.data.prepared import load_prepared
from textseg_cli.data.splits import labeled_subset
from textseg_cli.errors import ConfigError, DataError
from textseg_cli.storage.files import atomic_write_json, child_path, read_json
from textseg_cli.storage.outputs import prepare_output_dir


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


def export_data(prepared: str | Path, out: str | Path, fmt: str = "nnunet", labeled: str | int | None = None,
                force: bool = False) -> Path:
    """Write a prepared set as an nnU-Net v2 raw folder (+ splits_final.json) or an MSD task.

    Training cases are the labeled head of splits.train (`labeled`, default: all labeled training cases)
    plus splits.val; splits_final.json holds textseg's folds (`prep custom --folds`) or its one train/val
    split. Test cases go to imagesTs/ with their labels in labelsTs/ (nnU-Net ignores those; `textseg eval`
    scores its predictions against them). Image-only cases are left out: nnU-Net trains fully supervised."""

    if fmt not in EXPORT_FORMATS:
        raise ConfigError(f"--format {fmt!r}: expected one of {', '.join(EXPORT_FORMATS)}")
    ds = load_prepared(prepared)
    if ds.dim != 3:
        raise ConfigError("export-data writes 3D data sets", ds.root / "dataset.json")
    out = Path(out)
    train_lab, _ = labeled_subset([c for c in ds.split("train") if ds.has_label(c)], labeled)
    val = [c for c in ds.split("val") if ds.has_label(c)]
    test = ds.split("test")
    prepare_output_dir(out, force=force)
    ending = ".nii.gz"

    def write_case(cid: str, img_dir: str, lab_dir: str | None) -> tuple[str, str | None]:
        case = ds.load_case(cid, with_label=lab_dir is not None and ds.has_label(cid))
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
    if fmt == "nnunet":
        atomic_write_json(out / "dataset.json", {
            "channel_names": chans, "labels": {n: i for i, n in enumerate(ds.class_names)},
            "numTraining": len(training), "file_ending": ending, "name": ds.name,
            "description": f"exported by textseg from {ds.root} (preprocessed: see textseg_dataset.json)"})
        folds = (ds.spec.get("extra") or {}).get("folds")
        if folds:
            keep = set(train_lab + val)
            splits = [{"train": [c for c in f["train"] if c in keep], "val": [c for c in f["val"] if c in keep]}
                      for f in folds]
        else:
            splits = [{"train": train_lab, "val": val}]
        atomic_write_json(out / "splits_final.json", splits)
    else:
        atomic_write_json(out / "dataset.json", {
            "name": ds.name, "description": f"exported by textseg from {ds.root}", "tensorImageSize": "4D"
            if ds.in_channels > 1 else "3D", "modality": chans,
            "labels": {str(i): n for i, n in enumerate(ds.class_names)}, "numTraining": len(training),
            "numTest": len(tests), "training": [{"image": i, "label": lb} for i, lb in training],
            "test": [i for i, _ in tests], "validation": val})
    atomic_write_json(out / "textseg_dataset.json", ds.spec)  # where the cases came from, how they were preprocessed
    return out

