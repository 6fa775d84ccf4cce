"""Evaluation of predicted label maps against references (the Python API behind `textseg eval`).

- `evaluate_pairs` computes the per-case, per-class metrics of any iterable of label-map pairs.
- `write_evaluation` writes `per_case.csv`, `summary.csv`, `meta.json` (+ a results table) and
  prints the summary.
- `evaluate_folders` does both for a folder of predicted NIfTI masks against a folder of
  references or a prepared data folder, matching files by case id and checking their geometry.

2D images are scored like volumes (per image; `mDice`/`mIoU` are the means over images);
`eval_size=224` resizes both masks to 224×224 first (LViT's convention, `resize_nearest`), and
`per_volume=True` re-stacks the slices of a `textseg prep slices` folder into volumes first.

Definitions, the empty-mask policies and the file layout are in docs/evaluation.md.
"""

from __future__ import annotations

import datetime as _dt
import json
from pathlib import Path
from typing import Any, Iterable, Sequence

import nibabel as nib
import numpy as np
import pandas as pd

from textseg_cli import __version__
from textseg_cli.console import console, err_console, progress
from textseg_cli.data import load_prepared
from textseg_cli.data.io import read_nifti
from textseg_cli.data.prep.slices import restack_pairs
from textseg_cli.errors import ConfigError, DataError
from textseg_cli.metrics.case import DEFAULT_EMPTY_POLICY, EMPTY_POLICIES, evaluate_case
from textseg_cli.metrics.postprocess import lcc_per_class
from textseg_cli.metrics.table import metric_names
from textseg_cli.reports.display import summary_table
from textseg_cli.reports.overlays import overlay_tap
from textseg_cli.reports.results import EvalResult, build_rows
from textseg_cli.reports.summary import both_masks_empty, one_mask_empty, summarize
from textseg_cli.reports.table2d import render_table_2d
from textseg_cli.reports.tables import TABLE_SUFFIX, check_table_format, render_table
from textseg_cli.storage.files import atomic_path, atomic_write_json, atomic_write_text
from textseg_cli.storage.outputs import check_out_path, guard_output_file

EVAL_FORMAT = "textseg-eval/1"
OUTPUT_FILES = {"per_case": "per_case.csv", "summary": "summary.csv", "meta": "meta.json"}
NIFTI_SUFFIXES = (".nii.gz", ".nii")
_META_ALIASES = {"method": "name", "checkpoint": "checkpoint_rule", "n_labeled": "labeled",
                 "n_unlabeled": "unlabeled", "labeled_count": "labeled", "unlabeled_count": "unlabeled"}


def per_case_columns() -> list[str]:
    """Columns of per_case.csv: case, class, class_name, one per metric of `metrics.table.METRIC_TABLE`, the
    empty flags and voxel counts."""
    return ["case", "class", "class_name", *metric_names(), "pred_empty", "ref_empty", "pred_voxels", "ref_voxels"]


# --- checks -------------------------------------------------------------------------------------
def check_empty_policy(policy: str, what: str = "--empty-policy") -> str:
    if policy not in EMPTY_POLICIES:
        raise ConfigError(f"{what} {policy!r}: expected one of {', '.join(EMPTY_POLICIES)}")
    return policy


def run_empty_policy(cfg: dict[str, Any]) -> str:
    """The empty-mask policy of a run: its config's `val.empty_policy` (validation scores with it and `textseg
    eval RUN_DIR` defaults to it); configs written before the key existed get `eval`'s default."""
    policy = (cfg.get("val") or {}).get("empty_policy")
    return check_empty_policy(DEFAULT_EMPTY_POLICY if policy is None else str(policy), "val.empty_policy")


def foreground_names(class_names: Sequence[str] | None, num_classes: int) -> list[str]:
    """Names of classes 1..K-1; accepts lists with or without the background name first."""
    if class_names is None:
        return ["foreground"] if num_classes == 2 else [f"class{c}" for c in range(1, num_classes)]
    names = [str(n) for n in class_names]
    if len(names) == num_classes:
        return names[1:]
    if len(names) == num_classes - 1:
        return names
    raise ConfigError(f"{len(names)} class names {names} do not fit {num_classes} classes (background included)")


def check_label_values(arr: np.ndarray, num_classes: int, what: str, path: str | Path | None = None) -> np.ndarray:
    """Return `arr` as integer class indices; DataError if it holds values outside 0..num_classes-1."""
    arr = np.asarray(arr)
    if arr.size == 0:
        raise DataError(f"{what} is an empty array", path)
    if arr.dtype == bool:
        return arr.view(np.uint8)
    if not np.issubdtype(arr.dtype, np.integer):
        if not np.issubdtype(arr.dtype, np.floating) or not np.all(arr == np.round(arr)):
            raise DataError(f"{what} holds non-integer values; expected class indices 0..{num_classes - 1}", path)
    lo, hi = arr.min(), arr.max()
    if lo < 0 or hi >= num_classes:
        bad = np.unique(arr[(arr < 0) | (arr >= num_classes)])
        shown = [int(v) for v in bad[:8]] + (["..."] if bad.size > 8 else [])
        raise DataError(f"{what} has label value(s) {shown} outside 0..{num_classes - 1}", path,
                        hint="pass --num-classes N for multi-class masks" if hi >= num_classes else None)
    return arr.astype(np.uint8 if num_classes <= 256 else np.int32, copy=False)


def resize_nearest(mask: np.ndarray, size: int | Sequence[int]) -> np.ndarray:
    """Nearest-neighbour resize of a 2D mask to `size` (int: square): output pixel i takes input pixel
    floor(i · n_in / n_out) per axis, the rule of `torch.nn.functional.interpolate(mode="nearest")` and
    OpenCV's INTER_NEAREST used by LViT-style evaluation code."""
    arr = np.asarray(mask)
    if arr.ndim != 2:
        raise DataError(f"--eval-size resizes 2D masks; got an array of shape {arr.shape}")
    out = (int(size), int(size)) if np.isscalar(size) else tuple(int(s) for s in size)
    rows = np.minimum((np.arange(out[0]) * arr.shape[0]) // out[0], arr.shape[0] - 1)
    cols = np.minimum((np.arange(out[1]) * arr.shape[1]) // out[1], arr.shape[1] - 1)
    return arr[np.ix_(rows, cols)]


# --- metrics ------------------------------------------------------------------------------------
def evaluate_pairs(pairs: Iterable[tuple[str, np.ndarray, np.ndarray, Sequence[float] | None]], num_classes: int,
                   class_names: Sequence[str] | None = None, spacing_mm: bool = False,
                   empty_policy: str = DEFAULT_EMPTY_POLICY,
                   lcc: bool = False, *, total: int | None = None, show_progress: bool = True,
                   eval_size: int | None = None) -> pd.DataFrame:
    """Per-case, per-class metrics of `(case_id, pred_labels, ref_labels, spacing)` tuples.

    Distances are in voxels, or in the units of `spacing` (mm from NIfTI headers) when
    `spacing_mm`. `lcc` keeps each predicted class's largest connected component first.
    `eval_size` (2D only) resizes prediction and reference to eval_size² with `resize_nearest`
    before anything else; the spacing is scaled to match.
    Returns one row per (case, foreground class) with `per_case_columns()`; `df.attrs` records the
    settings (empty_policy, lcc, distance_unit, num_classes, class_names).
    """
    check_empty_policy(empty_policy)
    names = foreground_names(class_names, num_classes)
    rows: list[dict[str, Any]] = []
    with progress(transient=True) as bar:
        task = bar.add_task("evaluating", total=total, info="", visible=show_progress)
        for case_id, pred, ref, spacing in pairs:
            case_id = str(case_id)
            pred = check_label_values(pred, num_classes, f"case '{case_id}': prediction")
            ref = check_label_values(ref, num_classes, f"case '{case_id}': reference")
            if pred.shape != ref.shape:
                raise DataError(f"case '{case_id}': prediction shape {pred.shape} differs from reference shape "
                                f"{ref.shape}")
            if eval_size:
                if spacing is not None:
                    spacing = tuple(float(s) * n / eval_size for s, n in zip(spacing, ref.shape))
                pred, ref = resize_nearest(pred, eval_size), resize_nearest(ref, eval_size)
            if spacing_mm and spacing is None:
                raise DataError(f"case '{case_id}': no voxel spacing known, so distances cannot be given in mm")
            if lcc:
                pred = lcc_per_class(pred, range(1, num_classes))
            for row in evaluate_case(pred, ref, num_classes, spacing if spacing_mm else None, empty_policy):
                rows.append({"case": case_id, "class_name": names[row["class"] - 1], **row})
            bar.update(task, advance=1, info=case_id)
    if not rows:
        raise DataError("no cases to evaluate")
    df = pd.DataFrame(rows)[per_case_columns()]
    df.attrs.update(empty_policy=empty_policy, lcc=bool(lcc), distance_unit="mm" if spacing_mm else "voxel",
                    num_classes=int(num_classes), class_names=names, eval_size=eval_size)
    return df


# --- writing ------------------------------------------------------------------------------------
def build_meta(df: pd.DataFrame, meta: dict[str, Any] | None = None) -> dict[str, Any]:
    """meta.json content: the caller's facts (name, checkpoint_rule, labeled, unlabeled, n_train,
    split, ...) plus the settings the metrics were computed with (taken from `df.attrs`)."""
    out: dict[str, Any] = {"format": EVAL_FORMAT}
    out.update(meta or {})
    for alias, key in _META_ALIASES.items():  # accept other spellings without losing the original key
        if alias in out and out.get(key) is None:
            out[key] = out[alias]
    if "spacing_mm" in out and "distance_unit" not in out:
        out["distance_unit"] = "mm" if out["spacing_mm"] else "voxel"
    out.update({k: v for k, v in df.attrs.items() if k in ("empty_policy", "lcc", "distance_unit", "num_classes",
                                                             "class_names", "eval_size")})
    out.setdefault("name", "evaluation")
    out.setdefault("checkpoint_rule", None)
    policy = out.get("empty_policy")
    out["empty_policy_description"] = EMPTY_POLICIES.get(policy, "unknown")
    out["n_cases"] = int(df["case"].nunique())
    empty = df[one_mask_empty(df)]
    out["cases_with_empty_mask"] = sorted(empty["case"].astype(str).unique().tolist())
    both = df[both_masks_empty(df)]  # Dice 1 / distances 0 under every policy: reported apart, not as "empty"
    out["cases_with_both_masks_empty"] = sorted(both["case"].astype(str).unique().tolist())
    out.setdefault("tool_version", __version__)
    out.setdefault("created", _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"))
    return out


def output_paths(out_dir: str | Path, table: str | None = None) -> dict[str, Path]:
    out_dir = Path(out_dir)
    paths = {k: out_dir / v for k, v in OUTPUT_FILES.items()}
    if table:
        try:
            paths["table"] = out_dir / f"table{TABLE_SUFFIX[check_table_format(table)]}"
        except ValueError as exc:
            raise ConfigError(f"--table: {exc}") from None
    return paths


def guard_outputs(out_dir: str | Path, table: str | None = None, force: bool = False) -> dict[str, Path]:
    """Refuse (OutputExistsError) if an evaluation was already written there, unless force."""
    paths = output_paths(out_dir, table)
    for p in paths.values():
        guard_output_file(p, force)
    return paths


def _remove_stale_tables(out_dir: Path, keep: Path | None) -> None:
    """A forced re-evaluation must not leave a results table of the previous one beside the new CSVs."""
    try:
        previous = json.loads((out_dir / OUTPUT_FILES["meta"]).read_text(encoding="utf-8")).get("format")
    except (OSError, ValueError, AttributeError):
        return
    if previous != EVAL_FORMAT:
        return
    for suffix in TABLE_SUFFIX.values():
        stale = out_dir / f"table{suffix}"
        if stale != keep and stale.is_file():
            stale.unlink()


def write_evaluation(df: pd.DataFrame, out_dir: str | Path, meta: dict[str, Any], table: str | None = None, *,
                     force: bool = False, show: bool = True) -> dict[str, Path]:
    """Write per_case.csv, summary.csv, meta.json (+ table.csv|md|tex) atomically; print the summary.

    Existing files are refused unless `force` (then only these files are replaced). Returns
    {"per_case", "summary", "meta"[, "table"]} → path.
    """

    paths = guard_outputs(out_dir, table, force)
    _remove_stale_tables(Path(out_dir), keep=paths.get("table"))
    full_meta = build_meta(df, meta)
    summary = summarize(df)
    for key, frame in (("per_case", df), ("summary", summary)):
        with atomic_path(paths[key]) as tmp:
            frame.to_csv(tmp, index=False)
    atomic_write_json(paths["meta"], full_meta)
    if table:
        result = EvalResult(full_meta["name"], summary, df, full_meta, Path(out_dir))
        if full_meta.get("dim") == 2:
            text = render_table_2d([result], table, std=True)
        else:
            text = render_table(build_rows([result]), table, std=True)
        atomic_write_text(paths["table"], text)
    if show:
        console.print(summary_table(summary, full_meta))
    return paths


# --- 2D images, slices and overlays ---------------------------------------------------------------
def check_eval_size(eval_size: int | None, per_volume: bool = False) -> int | None:
    if eval_size is None:
        return None
    if int(eval_size) < 8:
        raise ConfigError(f"--eval-size {eval_size}: expected a size of at least 8 pixels (LViT uses 224)")
    if per_volume:
        raise ConfigError("--eval-size and --per-volume cannot be combined (volumes are scored on their own grid)")
    return int(eval_size)


def scoring_meta(dim: int | None, dataset: str | None, per_volume: bool = False,
                 uses_text: bool | None = None) -> dict[str, Any]:
    """meta.json facts that say what one row of per_case.csv is and how the headline means are formed."""
    out: dict[str, Any] = {"dim": dim, "dataset": dataset, "per_volume": bool(per_volume), "uses_text": uses_text}
    if per_volume:
        out["aggregation"] = "per volume: slice predictions re-stacked into volumes, then the mean over volumes"
    elif dim == 2:
        out["aggregation"] = ("per image, then the mean over images (mDice, mIoU = mean Jaccard); masks are "
                              "class indices (2D runs: foreground where its probability > 0.5)")
    return out


def read_first_mask(refs: dict[str, Path], cases: Sequence[str]) -> np.ndarray:
    return read_nifti(refs[cases[0]]).array


def overlay_pairs(pairs, n: int, out_dir: Path, ds=None, force: bool = False, written: list | None = None):
    """Pass pairs through, drawing overlays of the first `n` (image and text from a prepared `ds`)."""
    def image_of(cid: str):
        if ds is None or cid not in ds.case_ids:
            return None, None
        case = ds.load_case(cid, with_label=False)
        return case.image, case.text

    return overlay_tap(pairs, int(n), out_dir, image_of, force=force, written=written)


# --- folders ------------------------------------------------------------------------------------
def case_id_of(path: Path) -> str | None:
    name = path.name
    for suffix in NIFTI_SUFFIXES:
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return None


def scan_masks(folder: str | Path, what: str) -> dict[str, Path]:
    """case id → NIfTI file in `folder` (hidden and non-NIfTI files ignored)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"{what} folder not found", folder)
    found: dict[str, Path] = {}
    for p in sorted(folder.iterdir()):
        cid = case_id_of(p)
        if cid is None or p.name.startswith(".") or not p.is_file():
            continue
        if cid in found:
            raise DataError(f"case '{cid}' appears twice ({found[cid].name} and {p.name})", folder)
        found[cid] = p
    return found


def _references(labels_dir: Path, split: str | None, num_classes: int | None):
    """(case → label path, num_classes, class names, source description) for a folder or prepared set."""
    if (labels_dir / "dataset.json").exists():
        ds = load_prepared(labels_dir)
        if num_classes is not None and num_classes != ds.num_classes:
            raise ConfigError(f"--num-classes {num_classes} contradicts the {ds.num_classes} classes of "
                              f"{labels_dir / 'dataset.json'}")
        ids = ds.split(split) if split else ds.case_ids
        refs = {cid: ds.label_path(cid) for cid in ids if ds.has_label(cid)}
        if not refs:
            raise DataError(f"no labeled cases{f' in split {split!r}' if split else ''}", labels_dir / "dataset.json")
        return refs, ds.num_classes, ds.class_names, {"prepared": str(labels_dir.resolve()), "dataset": ds.name,
                                                      "_ds": ds}
    if split:
        raise ConfigError(f"--split needs --labels to be a prepared data folder (with dataset.json); {labels_dir} is "
                          "a plain folder")
    refs = scan_masks(labels_dir, "labels")
    if not refs:
        raise DataError("no .nii.gz/.nii reference masks here", labels_dir)
    return refs, num_classes or 2, None, {"folder": str(labels_dir.resolve())}


def _folder_pairs(cases: Sequence[str], preds: dict[str, Path], refs: dict[str, Path], num_classes: int):

    for cid in cases:
        ref, pred = read_nifti(refs[cid]), read_nifti(preds[cid])
        if pred.array.shape != ref.array.shape:
            raise DataError(f"case '{cid}': shape {pred.array.shape} differs from the reference's {ref.array.shape} "
                            f"({refs[cid]})", preds[cid])
        ndim = ref.array.ndim
        sp_ref, sp_pred = tuple(ref.spacing[:ndim]), tuple(pred.spacing[:ndim])
        if len(sp_ref) != len(sp_pred) or not np.allclose(sp_pred, sp_ref, rtol=1e-4, atol=1e-6):
            raise DataError(f"case '{cid}': spacing {sp_pred} differs from the reference's {sp_ref} ({refs[cid]})",
                            preds[cid])
        check_same_placement(cid, preds[cid], refs[cid], min(sp_ref) if sp_ref else 1.0)
        p = check_label_values(pred.array, num_classes, f"case '{cid}': prediction", preds[cid])
        r = check_label_values(ref.array, num_classes, f"case '{cid}': reference", refs[cid])
        yield cid, p, r, sp_ref


def check_same_placement(cid: str, pred_path: Path, ref_path: Path, spacing: float) -> None:
    """Origin and direction must match too: a flipped (LAS vs RAS) or shifted mask would be scored as aligned.

    Tolerances: origin within 1e-3 of the smallest voxel side, direction cosines within 1e-4.
    """

    a_pred, a_ref = np.asarray(nib.load(str(pred_path)).affine), np.asarray(nib.load(str(ref_path)).affine)
    o_pred, o_ref = a_pred[:3, 3], a_ref[:3, 3]
    if not np.allclose(o_pred, o_ref, rtol=0, atol=1e-3 * max(spacing, 1e-6)):
        raise DataError(f"case '{cid}': origin {tuple(np.round(o_pred, 3).tolist())} differs from the reference's "
                        f"{tuple(np.round(o_ref, 3).tolist())} ({ref_path}); the masks are not on the same grid",
                        pred_path)

    def cosines(a):
        m = a[:3, :3]
        return m / np.maximum(np.linalg.norm(m, axis=0, keepdims=True), 1e-12)

    if not np.allclose(cosines(a_pred), cosines(a_ref), rtol=0, atol=1e-4):
        raise DataError(f"case '{cid}': direction {np.round(cosines(a_pred), 3).ravel().tolist()} differs from the "
                        f"reference's {np.round(cosines(a_ref), 3).ravel().tolist()} ({ref_path}); the mask is "
                        "flipped or rotated relative to the reference", pred_path)


def _name_list(ids: Sequence[str], limit: int = 20) -> str:
    return ", ".join(ids[:limit]) + (f", ... ({len(ids) - limit} more, all in meta.json)" if len(ids) > limit else "")


def default_out_dir(pred_dir: str | Path, name: str | None = None) -> Path:
    pred_dir = Path(pred_dir)
    return pred_dir.resolve().parent / f"eval_{name or pred_dir.resolve().name}"


def evaluate_folders(pred_dir: str | Path, labels_dir: str | Path, out_dir: str | Path | None = None, *,
                     num_classes: int | None = None, split: str | None = None, spacing_mm: bool = False,
                     empty_policy: str = DEFAULT_EMPTY_POLICY, lcc: bool = False, table: str | None = None,
                     name: str | None = None, force: bool = False, checkpoint_rule: str | None = None,
                     labeled: int | None = None, unlabeled: int | None = None, n_train: int | None = None,
                     write: bool = True, show: bool = True, eval_size: int | None = None, per_volume: bool = False,
                     overlays: int = 0, uses_text: bool | None = None, allow_missing: bool = False) -> pd.DataFrame:
    """Evaluate `<pred_dir>/<case>.nii.gz` against `<labels_dir>/<case>.nii.gz` (or a prepared folder).

    Cases are matched by file name; predictions without reference and references without
    prediction are reported by name (and listed in meta.json); a reference without prediction is an error
    unless `allow_missing`. Shape, spacing, origin and direction must match.
    `num_classes` (background included) defaults to the prepared set's, else 2. Writes the outputs
    (see `write_evaluation`) to `out_dir` (default `<pred_dir>/../eval_<name>`) unless `write` is
    False. Returns the per-case DataFrame; `df.attrs["meta"]` and `df.attrs["paths"]` tell the rest.

    2D: `eval_size` resizes both masks first (LViT: 224); `per_volume` (labels = a slices folder of
    `textseg prep slices`) re-stacks the slices and scores volumes; `overlays=N` writes N overlay PNGs
    to `<out_dir>/overlays/` (with the image and text when labels is a prepared folder); `uses_text`
    marks the method as text-guided in 2D tables (✓/✗).
    """
    pred_dir, labels_dir = Path(pred_dir), Path(labels_dir)
    check_empty_policy(empty_policy)
    if not labels_dir.is_dir():
        raise DataError("labels folder not found", labels_dir)
    preds = scan_masks(pred_dir, "prediction")
    refs, num_classes, class_names, source = _references(labels_dir, split, num_classes)
    ds = source.pop("_ds", None)
    name = name or pred_dir.resolve().name
    paths = None
    if (overlays or 0) > 0 and not write:
        raise ConfigError("overlays need an output folder (write=True)")
    if per_volume and ds is None:
        raise ConfigError("--per-volume needs --labels to be a slices folder made by `textseg prep slices`")
    if write:
        out_dir = Path(out_dir) if out_dir is not None else default_out_dir(pred_dir, name)

        check_out_path(out_dir, inputs=[pred_dir, labels_dir])
        paths = guard_outputs(out_dir, table, force)  # fail before the work, not after

    cases = [cid for cid in refs if cid in preds]
    missing = [cid for cid in refs if cid not in preds]
    extra = [cid for cid in preds if cid not in refs]
    if not cases:
        raise DataError(f"no prediction matches a reference case by file name (references in {labels_dir})", pred_dir)
    if missing and not allow_missing:
        raise DataError(f"{len(missing)} reference case(s) have no prediction: {_name_list(missing, 10)}; pass "
                        "--allow-missing to score the others (the table then states how many were missing)", pred_dir)
    if missing:
        err_console.print(f"[bold yellow]warning:[/] {len(missing)} reference case(s) have no prediction and are NOT "
                          f"evaluated: {_name_list(missing)}", highlight=False, soft_wrap=True)
    if extra:
        err_console.print(f"[yellow]note:[/] {len(extra)} prediction(s) have no reference and are ignored: "
                          f"{_name_list(extra)}", highlight=False, soft_wrap=True)

    pairs = _folder_pairs(cases, preds, refs, num_classes)
    written: list[Path] = []
    if overlays:
        pairs = overlay_pairs(pairs, overlays, Path(out_dir) / "overlays", ds, force, written)
    dim = ds.dim if ds is not None else None
    if per_volume:
        pairs, dim = restack_pairs(pairs, ds), 3
    df = evaluate_pairs(pairs, num_classes, class_names, spacing_mm=spacing_mm, empty_policy=empty_policy, lcc=lcc,
                        total=None if per_volume else len(cases), show_progress=show,
                        eval_size=check_eval_size(eval_size, per_volume))
    if dim is None:
        dim = int(np.ndim(read_first_mask(refs, cases)))
    meta = {"name": name, "pred_dir": str(pred_dir.resolve()), "labels": source, "split": split,
            "checkpoint_rule": checkpoint_rule or "unknown (external predictions)", "labeled": labeled,
            "unlabeled": unlabeled, "n_train": n_train, "missing_predictions": missing,
            "predictions_without_reference": extra, **scoring_meta(dim, source.get("dataset"), per_volume, uses_text),
            "overlays": [p.name for p in written]}
    if write:
        paths = write_evaluation(df, out_dir, meta, table, force=force, show=show)
        df.attrs["meta"] = json.loads(paths["meta"].read_text(encoding="utf-8"))
    else:
        df.attrs["meta"] = build_meta(df, meta)
    df.attrs["paths"] = paths
    return df
