"""Medical Segmentation Decathlon tasks (`TaskXX_Name/` with dataset.json, imagesTr/, labelsTr/) and
MSD Task06_Lung with the CT lung window (`prep lung`).

Cases come from the `training` list of the task's dataset.json (so macOS `._*` files are ignored);
4D multi-modal images become channels (select some with `channels`); class names come from `labels`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

from textseg_cli.data.prep import runner
from textseg_cli.data.prep.steps import (
    default_patch_size,
    load_files,
    make_splits,
    processing_from_options,
)
from textseg_cli.errors import ConfigError, DataError
from textseg_cli.storage.files import read_json


def read_task(src: Path) -> dict[str, Any]:
    path = src / "dataset.json"
    if not path.exists():
        raise DataError("no dataset.json: expected an MSD task folder (TaskXX_Name with dataset.json, imagesTr/, "
                        "labelsTr/)", src)
    spec = read_json(path)
    if "training" not in spec and "channel_names" in spec and "file_ending" in spec:
        raise DataError("this is an nnU-Net v2 raw folder (channel_names, file_ending): use `textseg prep nnunet`",
                        path)
    for key in ("labels", "training"):
        if key not in spec:
            raise DataError(f"MSD dataset.json lacks '{key}'", path)
    return spec


def _channel_names(spec: dict[str, Any]) -> list[str]:
    mod = spec.get("modality") or spec.get("channel_names") or {"0": "image"}
    return [str(mod[k]) for k in sorted(mod, key=lambda k: int(k))]


def select_channels(names: list[str], channels: Sequence[str | int] | None, where: Path) -> list[int] | None:
    """Channel indices from indices or names (case-insensitive); None keeps all."""
    if not channels:
        return None
    out = []
    lower = [n.lower() for n in names]
    for c in channels:
        text = str(c).strip()
        if text.isdigit() and int(text) < len(names):
            out.append(int(text))
        elif text.lower() in lower:
            out.append(lower.index(text.lower()))
        else:
            raise ConfigError(f"--channels {text!r}: the task has {dict(enumerate(names))}", where)
    return out


def _rel(src: Path, p: str) -> Path:
    return src / p[2:] if p.startswith("./") else src / p


def case_id_of(path: str) -> str:
    name = Path(path).name
    for ext in (".nii.gz", ".nii", ".nrrd", ".mha"):
        if name.endswith(ext):
            return name[: -len(ext)]
    return name


def prep_msd(src: str | Path, out: str | Path, *, channels: Sequence[str | int] | None = None, name: str | None = None,
             spacing: Any = None, window: Any = None, window_preset: str | None = None, clip: Any = None,
             crop: str = "none", crop_margin: Any = 0, body_threshold: float = -500.0, normalize: str = "zscore",
             split: Any = "0.8,0.2", split_file: str | Path | None = None, seed: int = 1337,
             patch_size: Sequence[int] | None = None, label_geometry: str = "check", workers: int = 1,
             force: bool = False, drop_failed: bool = False, _layout: str = "msd"):
    """Prepare any MSD task. Defaults: no resampling, no window, no crop, per-channel z-score, seeded
    80/20 train/test split. Returns the PreparedDataset."""
    src, out = Path(src), Path(out)
    if not src.is_dir():
        raise DataError("source folder not found", src)
    spec = read_task(src)
    names = _channel_names(spec)
    sel = select_channels(names, channels, src / "dataset.json")
    chan_names = names if sel is None else [names[i] for i in sel]
    try:
        label_map = {int(k): str(v) for k, v in spec["labels"].items()}
    except (ValueError, AttributeError):
        raise DataError("'labels' must map integer values to class names", src / "dataset.json") from None
    if sorted(label_map) != list(range(len(label_map))):
        raise DataError(f"'labels' values {sorted(label_map)} must be 0..K-1", src / "dataset.json")
    class_names = [label_map[i] for i in range(len(label_map))]
    proc = processing_from_options(spacing=spacing, window=window, window_preset=window_preset, clip=clip, crop=crop,
                                   crop_margin=crop_margin, body_threshold=body_threshold, normalize=normalize)
    settings = {"preparer": _layout, "channels": sel, "processing": proc.settings(), "label_geometry": label_geometry}
    shash = runner.settings_hash(settings)
    labels = runner.LabelSpec(allowed=tuple(range(len(class_names))), strict=True)
    tasks, seen = [], set()
    for i, item in enumerate(spec["training"]):
        if not isinstance(item, dict) or "image" not in item:
            raise DataError(f"training[{i}] needs 'image' (and 'label')", src / "dataset.json")
        cid = case_id_of(item["image"])
        if cid in seen:
            raise DataError(f"case '{cid}' listed twice in 'training'", src / "dataset.json")
        seen.add(cid)
        label = item.get("label")
        if label is None:
            raise DataError(f"case '{cid}': training entry without a label", src / "dataset.json")
        tasks.append(runner.CaseTask(cid, load_files, {"case_id": cid, "images": [str(_rel(src, item["image"]))],
                                                       "label": str(_rel(src, label)), "channels": sel,
                                                       "label_geometry": label_geometry},
                                     proc, labels, out, shash, {"source": item["image"]}))
    if not tasks:
        raise DataError("'training' lists no cases", src / "dataset.json")
    splits = make_splits([t.case_id for t in tasks], split=split, split_file=split_file, seed=seed)
    modality = "CT" if all(n.upper() == "CT" for n in chan_names) else "MR"
    task_name = name or str(spec.get("name") or src.name).lower()
    writer = runner.open_output(out, force=force, src=src, name=task_name, dim=3, modality=modality,
                                channel_names=chan_names, class_names=class_names)
    report = runner.run_cases(tasks, out, workers=workers, description=f"prep {_layout}")
    if patch_size is None:
        patch_size = default_patch_size([r["entry"]["shape"] for r in report.records.values()])
    preprocessing = [{"step": "read", "params": {"channels": chan_names, "label_geometry": label_geometry}}] + proc.record()
    return runner.finish(writer, report, splits=splits, preprocessing=preprocessing,
                         source={"layout": _layout, "paths": [str(src)], "task": spec.get("name"),
                                 "reference": spec.get("reference"), "licence": spec.get("licence")},
                         drop_failed=drop_failed, patch_size=list(patch_size), seed=seed,
                         extra={"split_rule": f"user file {split_file}" if split_file else f"seeded {split} (seed {seed})"})


def prep_lung(src: str | Path, out: str | Path, *, spacing: Any = None, window: Any = None,
              window_preset: str | None = "lung", crop: str = "body", crop_margin: Any = 0,
              body_threshold: float = -500.0, normalize: str = "zscore", split: Any = "48,15",
              split_file: str | Path | None = None, seed: int = 1337, patch_size: Sequence[int] = (96, 96, 96),
              label_geometry: str = "check", workers: int = 1, force: bool = False, drop_failed: bool = False):
    """MSD Task06_Lung (63 CT volumes, tumour labels): lung window (-600/1500) to [0, 1], optional
    resampling (spacing=1 for 1 mm), crop around the body, z-score, seeded 48/15 train/test split."""
    if window is not None:
        window_preset = None
    return prep_msd(src, out, name="lung", spacing=spacing, window=window, window_preset=window_preset, crop=crop,
                    crop_margin=crop_margin, body_threshold=body_threshold, normalize=normalize, split=split,
                    split_file=split_file, seed=seed, patch_size=patch_size, label_geometry=label_geometry,
                    workers=workers, force=force, drop_failed=drop_failed, _layout="msd-lung")
