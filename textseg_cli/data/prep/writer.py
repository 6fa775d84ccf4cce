"""Shared writer for every preparer: output guarding, per-case NIfTI, QC rows, dataset.json."""

from __future__ import annotations

import datetime as _dt
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pandas as pd

from textseg_cli import __version__
from textseg_cli.data.io import write_nifti
from textseg_cli.data.names import check_case_id
from textseg_cli.data.prepared import FORMAT, load_prepared
from textseg_cli.errors import ConfigError
from textseg_cli.storage.files import atomic_path, atomic_write_json
from textseg_cli.storage.outputs import note_written, prepare_output_dir, seal


class PreparedWriter:
    """Collects cases and writes a prepared folder.

    Usage::

        w = PreparedWriter(out, name="la", dim=3, modality="MR", channel_names=["LGE-MRI"],
                           class_names=["background", "left atrium"], force=force, src=src)
        w.add_case("ID", image, label, spacing)
        w.finish(splits={...}, preprocessing=[...], source={...}, patch_size=[112, 112, 80])

    With resume=True an existing folder is kept and cases whose files exist are skipped by callers
    (`w.is_done(id)`), so re-runs only redo what is missing.
    """

    def __init__(self, out: str | Path, *, name: str, dim: int, modality: str, channel_names: Sequence[str],
                 class_names: Sequence[str], force: bool = False, src: str | Path | Sequence[str | Path] | None = None,
                 resume: bool = False):
        self.out = Path(out)
        srcs = [] if src is None else ([src] if isinstance(src, (str, Path)) else list(src))
        for s in srcs:
            s = Path(s).resolve()
            o = self.out.resolve()
            if o == s or s in o.parents or o in s.parents:
                raise ConfigError(f"--out {self.out} overlaps the source {s}; choose a separate folder")
        prepare_output_dir(self.out, force=force and not resume, allow_existing=resume, command="prep", sources=srcs)
        for sub in ("images", "labels"):
            (self.out / sub).mkdir(exist_ok=True)
            # registered at once: a prep killed during its first write leaves images/ holding only a temporary,
            # and --force must still recognise the folder as textseg's (and remove it with the temporary)
            note_written(self.out / sub)
        self.meta = dict(name=name, dim=dim, modality=modality, channel_names=list(channel_names),
                         class_names=list(class_names))
        self.cases: list[dict[str, Any]] = []
        self.qc_rows: list[dict[str, Any]] = []

    def image_rel(self, case_id: str) -> str:
        return f"images/{case_id}.nii.gz"

    def label_rel(self, case_id: str) -> str:
        return f"labels/{case_id}.nii.gz"

    def is_done(self, case_id: str) -> bool:
        return (self.out / self.image_rel(case_id)).exists()

    def add_case(self, case_id: str, image: np.ndarray | None, label: np.ndarray | None, spacing: Sequence[float],
                 origin=None, direction=None, text: str | None = None, qc: dict[str, Any] | None = None,
                 has_label: bool | None = None, **extra: Any) -> None:
        """Write one case (image channels last for multi-channel). image=None records an already written case."""
        check_case_id(case_id, self.out)  # the ID names images/<id>.nii.gz (and later eval/predict outputs)
        if image is not None:
            kw = {} if origin is None else {"origin": origin, "direction": direction}
            write_nifti(self.out / self.image_rel(case_id), np.asarray(image, dtype=np.float32), spacing, **kw)
            if label is not None:
                write_nifti(self.out / self.label_rel(case_id), np.asarray(label, dtype=np.uint8), spacing, **kw)
        if has_label is None:
            has_label = label is not None
        shape = list(np.asarray(image).shape) if image is not None else extra.pop("shape", None)
        entry: dict[str, Any] = {"id": case_id, "image": self.image_rel(case_id),
                                 "label": self.label_rel(case_id) if has_label else None,
                                 "shape": shape, "spacing": [float(s) for s in spacing]}
        if text is not None:
            entry["text"] = text
        entry.update(extra)
        self.cases.append(entry)
        if qc is not None:
            self.qc_rows.append({"case": case_id, **qc})

    def finish(self, *, splits: dict[str, Any], preprocessing: list[dict[str, Any]], source: dict[str, Any],
               patch_size: Sequence[int] | None = None, labeled: dict[str, Any] | None = None, seed: int | None = None,
               spacing: Sequence[float] | None = None, extra: dict[str, Any] | None = None):
        """Write dataset.json (and qc.csv) atomically, then reload to validate what was written."""

        self.cases.sort(key=lambda c: c["id"])
        if spacing is None and self.cases:
            spacing = np.median(np.array([c["spacing"] for c in self.cases]), axis=0).tolist()
        spec = {
            "format": FORMAT,
            **self.meta,
            "spacing": spacing,
            "patch_size": list(patch_size) if patch_size is not None else None,
            "cases": self.cases,
            "splits": splits,
            "labeled": labeled or {"rule": "first_n_of_train",
                                   "doc": "the first N cases of splits.train in its order are labeled"},
            "preprocessing": preprocessing,
            "source": source,
            "tool_version": __version__,
            "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "seed": seed,
            "extra": extra or {},
        }
        if self.qc_rows:
            with atomic_path(self.out / "qc.csv") as tmp:
                pd.DataFrame(self.qc_rows).to_csv(tmp, index=False)
        atomic_write_json(self.out / "dataset.json", spec)
        seal(self.out)
        return load_prepared(self.out)


def volume_qc(image: np.ndarray, label: np.ndarray | None, spacing: Sequence[float], **kw: Any) -> dict[str, Any]:
    """Per-case QC row: shape, spacing, label volume (voxels and ml), intensity percentiles."""
    img = np.asarray(image)
    row: dict[str, Any] = {"shape": "x".join(map(str, img.shape)), "spacing": "x".join(f"{s:.4g}" for s in spacing)}
    p = np.percentile(img, [0.5, 50, 99.5])
    row.update({"p0.5": float(p[0]), "p50": float(p[1]), "p99.5": float(p[2])})
    if label is not None:
        n = int(np.count_nonzero(label))
        row.update({"label_voxels": n, "label_ml": n * float(np.prod(spacing)) / 1000.0, "label_empty": n == 0})
    row.update(kw)
    return row
