"""Per-case processing shared by the benchmark preparers: skip finished cases, parallel workers, progress,
per-case QC, partial-failure reporting.

Each case is processed by `process_case` (in the main process or a worker), which writes the case's image
and label atomically and then a small record `<out>/.prep/<case>.json` (dataset.json entry, QC row,
warnings, settings hash). A case counts as finished only when its record exists, so an interrupted or
partly failed run leaves valid finished cases that the next run skips; `--force` starts from scratch.
A run whose settings differ from the finished cases' refuses to mix them.
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing as mp
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import pandas as pd
import SimpleITK as sitk
from rich.table import Table

from textseg_cli.console import console, progress
from textseg_cli.data.io import write_nifti
from textseg_cli.data.prep.steps import (
    Loaded,
    Processing,
    apply_processing,
    check_label_values,
)
from textseg_cli.data.prep.writer import PreparedWriter, volume_qc
from textseg_cli.errors import ConfigError, DataError, OutputExistsError, TextsegError
from textseg_cli.storage.files import atomic_path, atomic_write_json
from textseg_cli.storage.outputs import LOCK, MANIFEST, check_out_path, remove_leftovers

STATE_DIR = ".prep"


@dataclass
class LabelSpec:
    """How source label values map to classes.

    allowed: values that may occur; strict: other values are an error (else a warning);
    binarize: every value > 0 becomes class 1 (e.g. BraTS whole tumour).
    """
    allowed: tuple[int, ...]
    strict: bool = True
    binarize: bool = False


@dataclass
class CaseTask:
    case_id: str
    load: Callable[..., Loaded]  # module-level function, so tasks pickle into worker processes
    load_args: dict[str, Any]
    processing: Processing
    labels: LabelSpec
    out: Path
    settings_hash: str
    entry_extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class RunReport:
    records: dict[str, dict[str, Any]]  # finished cases (processed now or skipped), by id
    processed: list[str]
    skipped: list[str]
    failed: dict[str, str]  # id -> message

    @property
    def warnings(self) -> list[str]:
        return [w for r in self.records.values() for w in r.get("warnings", [])]


def settings_hash(settings: dict[str, Any]) -> str:
    blob = json.dumps(settings, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def _ras(origin, direction) -> tuple[tuple[float, ...], tuple[float, ...] | None]:
    """SimpleITK geometry is LPS; NIfTI affines are RAS (flip the first two world axes)."""
    flip = np.diag([-1.0, -1.0, 1.0])
    o = tuple(float(v) for v in flip @ np.asarray(origin, dtype=float))
    d = np.eye(3) if direction is None else np.asarray(direction, dtype=float).reshape(3, 3)
    return o, tuple(float(v) for v in (flip @ d).ravel())


def process_case(task: CaseTask) -> dict[str, Any]:
    """Load, check, process and write one case; return its record (also saved under .prep/)."""
    cid = task.case_id
    loaded = task.load(**task.load_args)
    warnings = list(loaded.warnings)
    orig_shape = list(loaded.image.shape[1:])
    orig_spacing = [float(s) for s in loaded.spacing]
    if loaded.label is not None:
        lab, w = check_label_values(cid, loaded.label, task.labels.allowed, strict=task.labels.strict)
        warnings += w
        if task.labels.binarize:
            lab = (lab > 0).astype(np.uint8)
        if not lab.any():
            warnings.append(f"case '{cid}': empty label (no foreground voxels)")
        loaded.label = lab
    res = apply_processing(cid, loaded, task.processing)
    if res.label is not None and loaded.label is not None and loaded.label.any() and not res.label.any():
        warnings.append(f"case '{cid}': label became empty after processing")
    origin, direction = _ras(res.origin, res.direction)
    image = res.image[0] if res.image.shape[0] == 1 else np.moveaxis(res.image, 0, -1)
    out = Path(task.out)
    write_nifti(out / "images" / f"{cid}.nii.gz", image, res.spacing, origin, direction)
    if res.label is not None:
        write_nifti(out / "labels" / f"{cid}.nii.gz", res.label.astype(np.uint8), res.spacing, origin, direction)
    qc = volume_qc(image, res.label, res.spacing, orig_shape="x".join(map(str, orig_shape)),
                   orig_spacing="x".join(f"{s:.4g}" for s in orig_spacing), **res.stats,
                   crop_box=None if res.crop_box is None else " ".join(f"{lo}:{hi}" for lo, hi in res.crop_box),
                   warnings=" | ".join(warnings))
    entry = {"shape": list(image.shape), "spacing": list(res.spacing), "has_label": res.label is not None,
             "orig_shape": orig_shape, "orig_spacing": orig_spacing,
             "crop_box": None if res.crop_box is None else [list(b) for b in res.crop_box],
             **task.entry_extra, **loaded.extra}
    record = {"id": cid, "entry": entry, "qc": qc, "warnings": warnings, "settings": task.settings_hash}
    atomic_write_json(out / STATE_DIR / f"{cid}.json", record)
    return record


def _run_one(task: CaseTask) -> tuple[str, dict[str, Any] | None, str | None]:
    try:
        return task.case_id, process_case(task), None
    except TextsegError as exc:
        return task.case_id, None, str(exc)
    except Exception as exc:  # a bad case must not stop the others; its message names it
        return task.case_id, None, f"case '{task.case_id}': {type(exc).__name__}: {exc}"


def _worker_init() -> None:

    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(1)  # N workers x all cores would oversubscribe


def _finished_record(out: Path, cid: str, expected_hash: str) -> dict[str, Any] | None:
    path = out / STATE_DIR / f"{cid}.json"
    if not path.exists():
        return None
    try:
        rec = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError:
        return None  # an unreadable record means "not finished"; the case is redone
    if rec.get("settings") != expected_hash:
        raise ConfigError(f"case '{cid}' in {out} was prepared with different settings; "
                          "pass --force to redo all cases with the new settings")
    if not (out / "images" / f"{cid}.nii.gz").exists() or (
            rec["entry"].get("has_label") and not (out / "labels" / f"{cid}.nii.gz").exists()):
        return None
    return rec


def open_output(out: str | Path, *, force: bool, src, **writer_kw: Any) -> PreparedWriter:
    """A PreparedWriter that resumes an earlier run of a preparer (or starts fresh with force)."""
    out = check_out_path(out)
    if (not force and out.exists() and any(p.name not in (MANIFEST, LOCK) for p in out.iterdir())
            and not (out / STATE_DIR).is_dir()):
        raise OutputExistsError(out)  # a foreign non-empty folder is never written into
    writer = PreparedWriter(out, force=force, src=src, resume=not force, **writer_kw)
    (out / STATE_DIR).mkdir(exist_ok=True)
    remove_leftovers(out)  # temporaries of a killed run's atomic writes (images/.c1.nii.gz.ab12cd34.nii.gz ...)
    return writer


def run_cases(tasks: Sequence[CaseTask], out: str | Path, *, workers: int = 1, description: str = "prep") -> RunReport:
    """Process every unfinished task (skipping finished ones), in `workers` processes, with a progress bar."""
    out = Path(out)
    records: dict[str, dict[str, Any]] = {}
    todo: list[CaseTask] = []
    for t in tasks:
        rec = _finished_record(out, t.case_id, t.settings_hash)
        if rec is not None:
            records[t.case_id] = rec
        else:
            todo.append(t)
    skipped = sorted(records)
    failed: dict[str, str] = {}
    processed: list[str] = []
    if todo:
        with progress() as bar:
            job = bar.add_task(description, total=len(todo), info=f"{len(skipped)} already done" if skipped else "")

            def collect(cid, rec, err):
                if err is None:
                    records[cid] = rec
                    processed.append(cid)
                else:
                    failed[cid] = err
                bar.update(job, advance=1, info=f"{cid}" + (f" | {len(failed)} failed" if failed else ""))

            if workers <= 1 or len(todo) == 1:
                for t in todo:
                    collect(*_run_one(t))
            else:
                with ProcessPoolExecutor(max_workers=min(workers, len(todo)), mp_context=mp.get_context("spawn"),
                                         initializer=_worker_init) as pool:
                    for fut in as_completed([pool.submit(_run_one, t) for t in todo]):
                        collect(*fut.result())
    return RunReport(records, sorted(processed), skipped, dict(sorted(failed.items())))


def write_qc_table(out: Path, report: RunReport) -> Path:

    rows = [{"case": cid, **report.records[cid]["qc"]} for cid in sorted(report.records)]
    rows += [{"case": cid, "failed": msg} for cid, msg in report.failed.items()]
    path = out / "qc.csv"
    with atomic_path(path) as tmp:
        pd.DataFrame(rows).to_csv(tmp, index=False)
    return path


def print_summary(name: str, out: Path, report: RunReport, global_warnings: Sequence[str] = (),
                  max_warnings: int = 20) -> None:
    warnings = list(global_warnings) + report.warnings
    recs = [report.records[c] for c in sorted(report.records)]
    table = Table(title=f"{name}: {out}", show_header=False)
    table.add_row("cases finished", f"{len(recs)} ({len(report.processed)} processed, {len(report.skipped)} skipped as done)")
    if report.failed:
        table.add_row("[red]cases failed[/]", str(len(report.failed)))
    if recs:
        shapes = np.array([r["entry"]["shape"][:3] for r in recs])
        spacings = np.array([r["entry"]["spacing"] for r in recs])
        table.add_row("shape (min / median / max)", " / ".join("x".join(str(int(v)) for v in f(shapes, axis=0))
                                                               for f in (np.min, np.median, np.max)))
        table.add_row("spacing median (mm)", "x".join(f"{v:.3g}" for v in np.median(spacings, axis=0)))
        ml = [r["qc"].get("label_ml") for r in recs if r["qc"].get("label_ml") is not None]
        if ml:
            table.add_row("label volume ml (min / median / max)", f"{min(ml):.1f} / {float(np.median(ml)):.1f} / {max(ml):.1f}")
    table.add_row("warnings", str(len(warnings)))
    table.add_row("QC table", str(out / "qc.csv"))
    console.print(table)
    for w in warnings[:max_warnings]:
        console.print(f"[yellow]warning:[/] {w}", highlight=False, soft_wrap=True)
    if len(warnings) > max_warnings:
        console.print(f"[yellow]... {len(warnings) - max_warnings} more warnings in qc.csv / dataset.json[/]")
    for cid, msg in report.failed.items():
        console.print(f"[red]failed:[/] {msg}", highlight=False, soft_wrap=True)


def check_channels(writer: PreparedWriter, report: RunReport) -> None:
    """A case whose channel count differs from the data set's fails, naming it (training would crash on it)."""
    want = len(writer.meta["channel_names"])
    dim = int(writer.meta["dim"])
    for cid in sorted(report.records):
        shape = report.records[cid]["entry"].get("shape") or []
        got = shape[dim] if len(shape) > dim else 1
        if got != want:
            del report.records[cid]
            report.failed[cid] = (f"case '{cid}': the image has {got} channel(s), the data set {want} "
                                  f"({', '.join(writer.meta['channel_names'])}); one 4D/multi-channel file among "
                                  "single-channel ones?")


class PrepFailed(DataError):
    """Some cases failed; the finished ones are valid and kept, dataset.json is not written."""

def finish(writer: PreparedWriter, report: RunReport, *, splits: dict[str, list[str]], preprocessing: list[dict],
           source: dict[str, Any], drop_failed: bool = False, warnings: Sequence[str] = (), **finish_kw: Any):
    """Add finished cases to the writer and write dataset.json; with failures, write qc.csv, print the
    summary and raise PrepFailed (exit code 2) unless drop_failed removes the failed cases from the splits."""
    out = writer.out
    extra = dict(finish_kw.pop("extra", None) or {})
    all_warnings = list(warnings) + report.warnings
    name = writer.meta["name"]
    check_channels(writer, report)
    if report.failed and not drop_failed:
        write_qc_table(out, report)
        (out / "dataset.json").unlink(missing_ok=True)  # never leave a dataset.json that lists a missing case
        print_summary(name, out, report, warnings)
        raise PrepFailed(f"{len(report.failed)} of {len(report.failed) + len(report.records)} cases failed "
                         f"({', '.join(list(report.failed)[:10])}{' ...' if len(report.failed) > 10 else ''}); "
                         f"the {len(report.records)} finished cases are kept and skipped on re-run. Fix the inputs and "
                         "re-run, or pass --drop-failed to write the data set without them", out)
    if report.failed:
        splits = {k: [c for c in v if c not in report.failed] for k, v in splits.items()}
        extra["dropped_cases"] = report.failed
    for cid in sorted(report.records):
        rec = report.records[cid]
        entry = dict(rec["entry"])
        has_label = entry.pop("has_label")
        spacing = entry.pop("spacing")
        writer.add_case(cid, None, None, spacing, has_label=has_label, qc=rec["qc"], **entry)
    if all_warnings:
        extra["warnings"] = all_warnings
    ds = writer.finish(splits=splits, preprocessing=preprocessing, source=source, extra=extra, **finish_kw)
    write_qc_table(out, report)  # same rows as the writer's, plus failure lines when cases were dropped
    print_summary(name, out, report, warnings)
    return ds
