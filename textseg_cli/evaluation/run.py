"""`textseg eval RUN_DIR`: predict a split with a trained run, write the masks, score them."""

from __future__ import annotations

import dataclasses
import functools
from pathlib import Path
from typing import Iterator

import numpy as np
import pandas as pd

from textseg_cli.console import err_console
from textseg_cli.data.io import read_input_image, write_mask
from textseg_cli.data.prep.slices import restack_pairs, slice_info
from textseg_cli.errors import ConfigError, DataError, TextsegError
from textseg_cli.evaluation.folders import (
    check_eval_size,
    evaluate_pairs,
    foreground_names,
    overlay_pairs,
    run_empty_policy,
    scoring_meta,
    write_evaluation,
)
from textseg_cli.inference.postprocessing import (
    POSTPROCESSING_FILE,
    choose_lcc,
    describe,
    lcc_classes,
    read_postprocessing,
    write_postprocessing,
)
from textseg_cli.inference.predict import (
    checkpoint_rule,
    predict_case,
    probs_to_mask,
)
from textseg_cli.inference.settings import NO_RECORD, InferenceSettings, resolve_preset
from textseg_cli.methods.clip_weights import RANDOM_LABEL, run_uses_random_clip
from textseg_cli.reports.summary import summarize
from textseg_cli.runs.cases import read_cases
from textseg_cli.runs.config import load_config, selection_rule
from textseg_cli.runs.load import load_run
from textseg_cli.runtime.device import resolve_device
from textseg_cli.storage.files import atomic_path, child_path, read_json
from textseg_cli.storage.outputs import prepare_output_dir, run_lock


def _train_precision(run_dir: Path) -> str | None:
    """The precision the run trained in (RUN/env.json, as the engine recorded it), for every table's note."""
    try:
        rec = read_json(Path(run_dir) / "env.json").get("precision", {}).get("train", {})
    except (TextsegError, OSError, AttributeError):
        return None
    return rec.get("precision") if isinstance(rec, dict) and isinstance(rec.get("precision"), str) else None


def _labeled_counts(run) -> tuple[int | None, int | None]:
    """(labeled, unlabeled) training-case counts: RUN/cases.json as the engine wrote it, else the config."""
    cases = read_cases(run.run_dir)
    if cases is not None:
        return len(cases.labeled), len(cases.unlabeled)
    data_cfg = run.config.get("data") or {}
    lab = data_cfg.get("labeled")
    return (int(lab) if isinstance(lab, int) or (isinstance(lab, str) and lab.isdigit()) else None), None


def _trained_cases(run_dir: Path, split: str, ids: list[str], allow: bool) -> list[str] | None:
    """The cases of `ids` the run trained on (labeled or unlabeled, RUN/cases.json); refused unless `allow`.

    dataset.json can change after training (a case moved from train to val/test); scoring such a case
    silently inflates the result. None: the run records no cases.json (older runs), so nothing is checked."""
    cases = read_cases(run_dir)
    if cases is None:
        err_console.print(f"[yellow]warning:[/] {run_dir} has no readable cases.json; cannot check that split "
                          f"'{split}' holds no case the run trained on", highlight=False, soft_wrap=True)
        return None
    seen = cases.training_cases()
    trained = [cid for cid in ids if cid in seen]
    if trained and not allow:
        more = f" and {len(trained) - 10} more" if len(trained) > 10 else ""
        raise DataError(f"{len(trained)} case(s) of split '{split}' were training cases of this run: "
                        f"{', '.join(trained[:10])}{more} (dataset.json changed after training?); scoring them "
                        "inflates the result. Evaluate a split without them, or pass --allow-train-cases to score "
                        "them anyway (the result is marked)", run_dir)
    if trained:
        err_console.print(f"[bold yellow]warning:[/] scoring {len(trained)} case(s) this run trained on "
                          f"(--allow-train-cases); meta.json and the tables mark the result", highlight=False,
                          soft_wrap=True)
    return trained


def default_eval_dir(run_dir: Path, split: str, checkpoint: str, inference: str, decoder, tag: str = "") -> Path:
    """RUN/eval/<split>-<checkpoint>-<mode>[-decN][tag]; `tag` ('-best', ...: `InferenceSettings.tag`) is empty
    for the papers' protocol, so those folders keep their names."""
    ckpt = checkpoint if checkpoint in ("best", "last") else Path(checkpoint).stem
    name = f"{split}-{ckpt}-{inference}" + (f"-dec{decoder}" if decoder is not None else "") + tag
    return run_dir / "eval" / name


def method_uses_text(method) -> bool:
    """Whether a method reads text (for the ✓/✗ column of 2D tables): its own `uses_text` flag, else
    a per-case text hook or a text source/embedding attribute."""
    flag = getattr(method, "uses_text", None)
    if flag is not None:
        return bool(flag)
    if callable(getattr(method, "set_case_text", None)):
        return True
    return any(getattr(method, attr, None) is not None for attr in ("text", "text_embeddings"))


def mask_from_probs(probs, dim: int, threshold: float = 0.5) -> np.ndarray:
    """Class-index mask from probabilities (K, *spatial). 2D binary tasks: foreground where its
    probability exceeds `threshold` (0.5 equals argmax; ties go to background); otherwise argmax."""
    if dim == 2 and probs.shape[0] == 2:
        return (probs[1] > threshold).to(device="cpu").numpy().astype(np.uint8)
    return probs_to_mask(probs)


def _evaluate_run(run_dir: str | Path, split: str = "val", checkpoint: str = "best", decoder: int | str | None = None,
                  inference: str | None = None, out: str | Path | None = None, lcc: bool | None = None,
                  spacing_mm: bool = False, empty_policy: str | None = None, table: str | None = None,
                  force: bool = False, device: str | None = None, eval_size: int | None = None,
                  per_volume: bool = False, overlays: int = 0, threshold: float = 0.5, precision: str | None = None,
                  name: str | None = None, allow_train_cases: bool = False, tta: bool | None = None,
                  blend: str | None = None, choose_postprocessing: bool = False):
    """Predict every case of `split` with the run's `checkpoint` and score the masks.

    Writes `out/predictions/<case>.nii.gz` (argmax of the network, before any post-processing, with
    the image's geometry) and, through `textseg_cli.evaluation.folders.write_evaluation`, `per_case.csv`,
    `summary.csv`, `meta.json` (+ `table`). `out` defaults to `RUN_DIR/eval/<split>-<checkpoint>-<mode>[-decN]`.
    `inference` ("sliding" or "whole") defaults to the run's `inference.mode` (sliding for the 3D methods,
    whole images for the 2D ones); "paper" (the default preset: the official protocol) or "best" (mirroring,
    Gaussian windows, and the post-processing recorded in RUN/postprocessing.json) keep the run's mode;
    `tta`/`blend` override the preset (`InferenceSettings.from_config`).
    `choose_postprocessing` (split val only; preset default best): predict the validation cases, decide per class
    whether LCC raises the mean Dice (`inference.postprocessing.choose_lcc`, nnU-Net's rule), write the decision
    to RUN/postprocessing.json and score the cases with it.
    Returns the per-case DataFrame. Evaluating `split="test"` is allowed but flagged loudly: test
    numbers must never choose checkpoints or settings.

    2D runs: binary masks are the foreground probability > `threshold`; each case's text is handed to
    methods that read it (`set_case_text`); `eval_size=224` scores at 224×224 (LViT); `per_volume`
    re-stacks the slices of a `textseg prep slices` folder and scores volumes; `overlays=N` writes N
    overlay PNGs to `out/overlays/`. `precision` (auto | fp32 | bf16) defaults to the run's rule
    (`textseg_cli.runtime.precision.inference_request`), resolved once on the device; meta.json records what ran.
    The inference settings (`InferenceSettings.from_config`) are built once and handed to every case.
    `lcc` None follows the method's evaluation protocol (`inference.protocol.resolve_lcc`: on for DTC, BCP and
    Text-SemiSeg runs, as their official test scripts); True/False force it.
    `name`: the display name tables show for this run (default: the method).
    `empty_policy` None: the run's `val.empty_policy`, the policy its validation Dice (best.pt) used.
    A case the run trained on (RUN/cases.json; dataset.json may have changed since) is refused, unless
    `allow_train_cases`: then meta.json lists them (`train_cases_evaluated`) and every table built from it says so.
    """

    run_dir = Path(run_dir)
    if split == "test":
        err_console.print("[bold red]WARNING: evaluating on the TEST split.[/] Report these numbers once; they must "
                          "not drive model selection (checkpoint, decoder, post-processing or hyper-parameters) — "
                          "use the validation split for that.", highlight=False)
    dev = resolve_device(device)
    eval_size = check_eval_size(eval_size, per_volume)
    run = load_run(run_dir, checkpoint, device=str(dev))
    empty_policy = run_empty_policy(run.config) if empty_policy is None else empty_policy
    ds = run.dataset
    method_name = run.config.get("method")
    if isinstance(method_name, dict):
        method_name = method_name.get("name")
    method_name = method_name or getattr(run.method, "name", None)
    if choose_postprocessing:
        if split != "val":
            raise ConfigError("--choose-postprocessing decides on the validation split only (--split val); "
                              "test cases must never choose post-processing")
        if lcc is not None:
            raise ConfigError("--choose-postprocessing decides the LCC itself; drop --lcc/--no-lcc")
        inference = inference or "best"
    preset = resolve_preset(run.config, inference)
    record = read_postprocessing(run_dir) if preset == "best" and not choose_postprocessing else None
    settings = InferenceSettings.from_config(
        run.config, device=dev, mode=inference, decoder=decoder, precision=precision, lcc=lcc, method=method_name,
        ndim=ds.dim, tta=tta, blend=blend, postprocessing=record,
        **({"lcc_source": "choosing (--choose-postprocessing)"} if choose_postprocessing else {}))
    if settings.lcc_source == NO_RECORD:
        err_console.print(f"note: {NO_RECORD}", highlight=False, markup=False, soft_wrap=True)
    if per_volume:
        if slice_info(ds) is None:
            raise DataError("--per-volume needs a run trained on a slices folder (`textseg prep slices`)",
                            ds.root / "dataset.json")
    ids = ds.split(split)
    if not ids:
        raise DataError(f"split '{split}' of this run has no cases", run_dir)
    unlabeled = [cid for cid in ids if not ds.has_label(cid)]
    if unlabeled:
        raise DataError(f"split '{split}' holds case(s) without a label, cannot score them: {unlabeled[:5]}",
                        ds.root / "dataset.json")
    trained = _trained_cases(run_dir, split, ids, allow_train_cases)
    rule = getattr(run, "checkpoint_rule", checkpoint)  # "best" falls back to "last" when validation was off
    out = Path(out) if out is not None else default_eval_dir(run_dir, split, rule if rule != "file" else checkpoint,
                                                              settings.mode, settings.decoder, settings.tag)
    prepare_output_dir(out, force=force, command="eval", inputs=[run_dir, ds.root])
    pred_dir = out / "predictions"

    def pairs() -> Iterator[tuple[str, np.ndarray, np.ndarray, tuple[float, ...]]]:
        # inference runs lazily as evaluate_pairs (and its progress bar) walks the cases
        set_text = getattr(run.method, "set_case_text", None)
        for cid in ids:
            case = ds.load_case(cid, with_label=True)
            if callable(set_text):
                set_text(case.text, case_id=cid)
            mask = mask_from_probs(predict_case(run.method, case.image, settings, dev), ds.dim, threshold)
            write_mask(child_path(pred_dir, cid, ".nii.gz"), mask,
                       read_input_image(ds.image_path(cid), ds.dim, name=cid))
            yield cid, mask, case.label, tuple(case.spacing)

    stream: Iterator[tuple[str, np.ndarray, np.ndarray, tuple[float, ...]]] = pairs()
    chosen = None
    if choose_postprocessing:  # every raw mask first: the decision needs all validation cases
        cases = list(stream)
        chosen = choose_lcc(((cid, m, lab) for cid, m, lab, _ in cases), ds.num_classes,
                            foreground_names(ds.class_names, ds.num_classes), empty_policy)
        chosen.update(checkpoint=str(run.checkpoint_path), split=split,
                      inference={k: v for k, v in settings.record().items()
                                 if k not in ("out_device", "postprocessing")})
        path = write_postprocessing(run_dir, chosen)
        classes = lcc_classes(chosen)
        settings = dataclasses.replace(settings, lcc=bool(classes), lcc_classes=classes,
                                       lcc_source=f"{POSTPROCESSING_FILE}, chosen on validation: {describe(chosen)}")
        err_console.print(f"wrote {path}: {describe(chosen)}", highlight=False, markup=False, soft_wrap=True)
        stream = iter(cases)
    written: list[Path] = []
    if overlays:
        stream = overlay_pairs(stream, overlays, out / "overlays", ds, force, written)
    if per_volume:
        stream = restack_pairs(stream, ds)
    if settings.lcc_classes is not None:  # the post-processing chosen on validation (--inference best)
        stream = ((cid, settings.postprocess(m), lab, sp) for cid, m, lab, sp in stream)
    df = evaluate_pairs(stream, ds.num_classes, ds.class_names, spacing_mm=spacing_mm, empty_policy=empty_policy,
                        lcc=settings.lcc if settings.lcc_classes is None else False,
                        total=None if per_volume else len(ids), eval_size=eval_size)
    df.attrs["lcc"] = bool(settings.lcc)

    n_lab, n_unlab = _labeled_counts(run)
    meta = {
        "name": name,  # None: the method's name (build_meta's alias)
        "method": method_name,
        "lcc_source": settings.lcc_source,
        "run_dir": str(run_dir.resolve()),
        "split": split,
        "test_split_warning": split == "test",
        "checkpoint": str(run.checkpoint_path),
        "checkpoint_rule": (selection_rule(run.config) if str(rule) == "best"
                            else checkpoint_rule(rule, run.checkpoint_path)),
        "iteration": getattr(run, "iteration", None),
        "decoder": settings.decoder,
        "inference": settings.mode,
        "inference_preset": settings.preset,
        "inference_settings": {k: v for k, v in settings.record().items() if k != "out_device"},
        "labeled": n_lab,
        "unlabeled": n_unlab,
        "cases": len(ids),
        "predictions": (f"foreground probability > {threshold} before post-processing"
                        if ds.dim == 2 and ds.num_classes == 2 else "argmax before post-processing"),
        "threshold": threshold if ds.dim == 2 and ds.num_classes == 2 else None,
        "device": str(dev),
        "precision": settings.precision.name,
        "train_precision": _train_precision(run_dir),
        **scoring_meta(3 if per_volume else ds.dim, ds.name, per_volume, method_uses_text(run.method)),
        "overlays": [p.name for p in written],
        "train_cases_evaluated": trained,  # None: the run records no cases.json, nothing could be checked
        **({"postprocessing_chosen": chosen} if chosen is not None else {}),
    }
    if run_uses_random_clip(run.config):  # an explicit choice at train time; every row of this result says so
        meta["clip"] = RANDOM_LABEL
        meta["name"] = f"{meta['method']} ({RANDOM_LABEL})"
    write_evaluation(df, out, meta, table=table)
    return df



@functools.wraps(_evaluate_run)
def evaluate_run(run_dir: str | Path, *args, **kwargs):
    # eval writing into the run folder (its default --out) holds the run's lock, as train does

    out = kwargs.get("out")
    run = Path(run_dir)
    # --choose-postprocessing writes RUN/postprocessing.json: it holds the run's lock wherever --out is
    inside = out is None or run.resolve() in Path(out).resolve().parents or bool(kwargs.get("choose_postprocessing"))
    if not (inside and (run / "config.yaml").is_file()):
        return _evaluate_run(run_dir, *args, **kwargs)
    with run_lock(run, "eval"):
        return _evaluate_run(run_dir, *args, **kwargs)


# --- cross-validation --------------------------------------------------------------------------------
def _fold_of(run_dir: Path, index: int) -> int:
    """The fold a run trained on (config data.fold, `train --fold k`), else its position in the list."""
    fold = (load_config(run_dir / "config.yaml").get("data") or {}).get("fold")
    return int(fold) if isinstance(fold, int) else index


def check_disjoint_validation(run_dirs: list[Path], vals: list[list[str]]) -> None:
    """Refuse folds whose validation cases overlap: a pooled table must count each case once."""
    seen: dict[str, Path] = {}
    for run_dir, ids in zip(run_dirs, vals):
        for cid in ids:
            if cid in seen:
                raise DataError(f"validation case '{cid}' of run {run_dir} is also a validation case of run "
                                f"{seen[cid]}; --cv pools folds with disjoint validation cases (one run per fold)")
        for cid in ids:
            seen[cid] = run_dir


def evaluate_cv(run_dirs: list[str | Path], out: str | Path, *, checkpoint: str = "best",
                decoder: int | str | None = None, inference: str | None = None, lcc: bool | None = None,
                spacing_mm: bool = False, empty_policy: str | None = None, table: str | None = None,
                force: bool = False, device: str | None = None, precision: str | None = None,
                tta: bool | None = None, blend: str | None = None, name: str | None = None) -> pd.DataFrame:
    """The pooled cross-validation table, as nnU-Net reports it: each fold's run predicts ITS OWN validation
    cases (`evaluate_run`, split val, written to `out/fold_<k>/`), then all cases go into one table
    (`out/per_case.csv`, `summary.csv`, `meta.json`: per class mean Dice etc. over n = every fold's validation
    cases together) and `out/per_fold.csv` holds each fold's own summary (its mean over its cases).

    Folds whose validation cases overlap are refused (RUN/cases.json before predicting, the scored cases after),
    as are runs that score different classes or units. `empty_policy` None: the first run's `val.empty_policy`,
    used for every fold. The other options are `evaluate_run`'s, the same for every fold.
    """
    dirs = [Path(r) for r in run_dirs]
    if len(dirs) < 2:
        raise ConfigError("--cv pools the validation cases of two or more fold runs; give one run per fold")
    if len({d.resolve() for d in dirs}) != len(dirs):
        raise ConfigError("--cv: the same run is given twice; give one run per fold")
    out = Path(out)
    folds = [_fold_of(d, i) for i, d in enumerate(dirs)]
    if len(set(folds)) != len(folds):
        raise ConfigError(f"--cv: runs {[str(d) for d in dirs]} record folds {folds}; give one run per fold")
    recorded = [read_cases(d) for d in dirs]
    if all(c is not None for c in recorded):
        check_disjoint_validation(dirs, [c.val for c in recorded])  # before any prediction
    if empty_policy is None:
        empty_policy = run_empty_policy(load_config(dirs[0] / "config.yaml"))
    prepare_output_dir(out, force=force, command="eval", inputs=dirs)
    frames: list[pd.DataFrame] = []
    metas: list[dict] = []
    for d, fold in zip(dirs, folds):
        sub = out / f"fold_{fold}"
        df = evaluate_run(d, split="val", checkpoint=checkpoint, decoder=decoder, inference=inference, out=sub,
                          lcc=lcc, spacing_mm=spacing_mm, empty_policy=empty_policy, force=force, device=device,
                          precision=precision, tta=tta, blend=blend, name=name)
        frames.append(df)
        metas.append(read_json(sub / "meta.json"))
    check_disjoint_validation(dirs, [sorted(f["case"].astype(str).unique()) for f in frames])
    first = frames[0].attrs
    for d, f in zip(dirs[1:], frames[1:]):
        for key in ("num_classes", "class_names", "distance_unit", "eval_size"):
            if f.attrs.get(key) != first.get(key):
                raise ConfigError(f"--cv: run {d} scores {key} {f.attrs.get(key)!r} but run {dirs[0]} scores "
                                  f"{first.get(key)!r}; the folds of one cross-validation share them")
    pooled = pd.concat(frames, ignore_index=True)
    pooled.attrs.update({k: v for k, v in first.items()})
    pooled.attrs["lcc"] = all(bool(f.attrs.get("lcc")) for f in frames)
    per_fold = []
    for d, fold, f in zip(dirs, folds, frames):
        summary = summarize(f)
        summary.insert(0, "run_dir", str(d.resolve()))
        summary.insert(0, "fold", fold)
        per_fold.append(summary)
    per_fold_df = pd.concat(per_fold, ignore_index=True)
    base = metas[0]
    n_cases = int(pooled["case"].nunique())
    meta = {k: base.get(k) for k in ("method", "checkpoint_rule", "decoder", "inference", "inference_preset",
                                      "inference_settings", "labeled", "unlabeled", "device", "precision",
                                      "train_precision", "dim", "dataset", "per_volume", "uses_text", "clip")
            if k in base}
    meta.update({
        "name": name or (f"{base.get('name') or base.get('method')} (CV)"),
        "split": "val",
        "test_split_warning": False,
        "cases": n_cases,
        "lcc_source": "; ".join(dict.fromkeys(str(m.get("lcc_source")) for m in metas)),
        "cross_validation": {
            "pooled": "every fold's run on its own validation cases, all cases in one table (nnU-Net's "
                      "cross-validation summary); per_fold.csv: each fold's own means",
            "folds": [{"fold": fold, "run_dir": str(d.resolve()), "cases": int(f["case"].nunique()),
                       "eval_dir": str((out / f"fold_{fold}").resolve()), "checkpoint": m.get("checkpoint"),
                       "lcc": bool(f.attrs.get("lcc"))} for d, fold, f, m in zip(dirs, folds, frames, metas)],
        },
        "train_cases_evaluated": sorted({c for m in metas for c in (m.get("train_cases_evaluated") or [])}) or None,
    })
    write_evaluation(pooled, out, meta, table=table, force=force)
    with atomic_path(out / "per_fold.csv") as tmp:
        per_fold_df.to_csv(tmp, index=False)
    err_console.print("per fold (mean over each fold's validation cases; the table above pools all "
                      f"{n_cases} cases):", highlight=False, markup=False)
    for fold, f in zip(folds, per_fold):
        head = f[f["class"].astype(str) == str(f["class"].iloc[-1])]
        err_console.print(f"  fold {fold}: n={int(head['n_cases'].iloc[0])} " + ", ".join(
            f"{r['metric']} {r['mean']:.4g}" for r in head.to_dict("records")), highlight=False, markup=False)
    return pooled
