"""BraTS-2019 training data (HGG/ and LGG/ case folders) -> prepared folder, whole-tumour label.

Processing (all parameters recorded in dataset.json): FLAIR by default (`modalities` picks others, as
channels) -> crop to the bounding box of non-zero brain voxels -> clip at the 99.9th percentile of the
brain voxels -> z-score over the non-zero voxels (background stays 0). Label: whole tumour = seg > 0.
Split: seeded 250 train / 25 val / 60 test of the 335 cases, or the users' own lists (--split-file).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Sequence

from textseg_cli.data.prep import runner
from textseg_cli.data.prep.steps import (
    Processing,
    load_files,
    make_splits,
    parse_spacing,
)
from textseg_cli.errors import ConfigError, DataError

MODALITIES = ("flair", "t1", "t1ce", "t2")
_FILE = re.compile(r"^(.+)_(flair|t1|t1ce|t2|seg)\.nii(?:\.gz)?$", re.I)


def _find(folder: Path, cid: str, suffix: str) -> Path | None:
    for ext in (".nii.gz", ".nii"):
        p = folder / f"{cid}_{suffix}{ext}"
        if p.exists():
            return p
    return None


def discover(src: Path) -> dict[str, dict[str, Any]]:
    """Case folders anywhere under `src` holding `<case>_<modality>.nii[.gz]` files."""
    cases: dict[str, dict[str, Any]] = {}
    for p in sorted(src.rglob("*.nii*")):
        m = _FILE.match(p.name)
        if not m or p.name.startswith("."):
            continue
        folder = p.parent
        cid = folder.name
        if cid in cases and cases[cid]["folder"] != folder:
            raise DataError(f"case '{cid}' appears twice ({cases[cid]['folder']} and {folder})", src)
        grade = folder.parent.name.upper() if folder.parent.name.upper() in ("HGG", "LGG") else None
        cases[cid] = {"folder": folder, "grade": grade}
    if not cases:
        raise DataError("no BraTS case folders found (expected HGG/<case>/<case>_flair.nii.gz ...)", src)
    return dict(sorted(cases.items()))


def load_case(case_id: str, folder: str, modalities: Sequence[str], label_geometry: str):
    folder_p = Path(folder)
    images = []
    for mod in modalities:
        p = _find(folder_p, folder_p.name, mod)
        if p is None:
            raise DataError(f"case '{case_id}': no {mod} image ({folder_p.name}_{mod}.nii.gz)", folder_p)
        images.append(p)
    seg = _find(folder_p, folder_p.name, "seg")
    if seg is None:
        raise DataError(f"case '{case_id}': no segmentation ({folder_p.name}_seg.nii.gz)", folder_p)
    return load_files(case_id, images, seg, label_geometry=label_geometry)


def prep_brats(src: str | Path, out: str | Path, *, modalities: Sequence[str] = ("flair",), split: Any = "250,25,60",
               split_file: str | Path | None = None, seed: int = 1337, clip_upper: float | None = 99.9,
               crop_margin: int = 0, spacing: Any = None, normalize: str = "zscore-nonzero",
               label_geometry: str = "check", patch_size: Sequence[int] = (96, 96, 96), workers: int = 1,
               force: bool = False, drop_failed: bool = False):
    """Prepare the BraTS-2019 training set (whole tumour). Returns the PreparedDataset."""
    src, out = Path(src), Path(out)
    if not src.is_dir():
        raise DataError("source folder not found", src)
    mods = [m.strip().lower() for m in modalities if m.strip()]
    bad = [m for m in mods if m not in MODALITIES]
    if bad or not mods or len(set(mods)) != len(mods):
        raise ConfigError(f"--modalities {','.join(modalities)}: choose distinct ones of {', '.join(MODALITIES)}")
    cases = discover(src)
    proc = Processing(target_spacing=parse_spacing(spacing), crop="nonzero", crop_margin=(crop_margin,) * 3,
                      clip=None if clip_upper is None else (None, float(clip_upper)), clip_over="nonzero",
                      normalize=normalize)
    settings = {"preparer": "brats", "modalities": mods, "processing": proc.settings(), "label_geometry": label_geometry}
    shash = runner.settings_hash(settings)
    labels = runner.LabelSpec(allowed=(0, 1, 2, 4), strict=False, binarize=True)
    tasks = [runner.CaseTask(cid, load_case, {"case_id": cid, "folder": str(c["folder"]), "modalities": mods,
                                               "label_geometry": label_geometry}, proc, labels, out, shash,
                             {"grade": c["grade"], "source": str(c["folder"].relative_to(src))})
             for cid, c in cases.items()]
    splits = make_splits(list(cases), split=split, split_file=split_file, seed=seed)
    writer = runner.open_output(out, force=force, src=src, name="brats2019", dim=3, modality="MR",
                                channel_names=[m.upper() if m != "t1ce" else "T1CE" for m in mods],
                                class_names=["background", "whole tumour"])
    report = runner.run_cases(tasks, out, workers=workers, description="prep brats")
    preprocessing = [{"step": "read", "params": {"modalities": mods, "label": "whole tumour (seg > 0)",
                                                 "label_geometry": label_geometry}}] + proc.record()
    return runner.finish(writer, report, splits=splits, preprocessing=preprocessing,
                         source={"layout": "brats2019", "paths": [str(src)]}, drop_failed=drop_failed,
                         patch_size=list(patch_size), seed=seed,
                         extra={"split_rule": f"user file {split_file}" if split_file else f"seeded {split} (seed {seed})"})
