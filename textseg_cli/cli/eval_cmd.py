"""`textseg eval`: metrics of predicted masks, of a training run, or a comparison table of results."""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import List, Optional

import typer

from textseg_cli.cli import app
from textseg_cli.console import console, err_console
from textseg_cli.errors import ConfigError

_RUN_SPLITS = ("val", "test")
_INFERENCE = ("paper", "best", "sliding", "whole")  # settings.INFERENCE_CHOICES, without importing torch
_BLENDS = ("constant", "gaussian")


def warn_test_split() -> None:
    err_console.print("[bold white on red] WARNING [/] [bold red]evaluating on the TEST split: test results must NOT "
                      "be used for model selection[/] (checkpoints, iterations, hyper-parameters, methods). Select on "
                      "the validation split and report test numbers once.", highlight=False, soft_wrap=True)


def _forbid(mode: str, **given) -> None:
    bad = [f"--{k.replace('_', '-')}" for k, v in given.items() if v not in (None, False)]
    if bad:
        raise ConfigError(f"{', '.join(bad)} cannot be used {mode}")


def _run_mode(run_dir: Path, *, split, checkpoint, decoder, inference, out, lcc, spacing_mm, empty_policy, table,
              force, device, name=None, tta=None, **extra) -> None:
    from textseg_cli.evaluation.run import evaluate_run  # lazy: keeps `textseg --help` torch-free
    from textseg_cli.storage.outputs import locked_output  # lazy: keeps `textseg --help` torch-free
    split = split or "val"
    if split not in _RUN_SPLITS:
        raise ConfigError(f"--split {split!r}: expected one of {', '.join(_RUN_SPLITS)}")
    if inference not in (None, *_INFERENCE):
        raise ConfigError(f"--inference {inference!r}: expected {', '.join(_INFERENCE)}")
    if extra.get("blend") not in (None, *_BLENDS):
        raise ConfigError(f"--blend {extra['blend']!r}: expected {' or '.join(_BLENDS)}")
    if split == "test":
        warn_test_split()
    # an explicit --out is locked for the whole evaluation (the default one, inside RUN, holds the run's lock)
    with locked_output(out, "eval", inputs=[run_dir]) if out is not None else contextlib.nullcontext():
        evaluate_run(run_dir, split=split, checkpoint=checkpoint or "best", decoder=decoder,
                     inference=inference, out=out, lcc=lcc, spacing_mm=spacing_mm,
                     empty_policy=empty_policy, table=table, force=force, device=device,
                     **{k: v for k, v in dict(extra, name=name).items() if v not in (None, False, 0)},
                     **({} if tta is None else {"tta": tta}))  # --no-tta is False, and still a choice


@app.command("eval")
def eval_command(
    targets: Optional[List[Path]] = typer.Argument(
        None, metavar="RUN_DIR|RESULTS", show_default=False,
        help="A training run folder to evaluate (see --split), or with --compare the evaluation folders or "
             "CSV files to put in one table."),
    pred: Optional[Path] = typer.Option(None, "--pred", help="Folder of predicted masks, one <case id>.nii.gz each."),
    labels: Optional[Path] = typer.Option(
        None, "--labels", help="Folder of reference masks (<case id>.nii.gz), or a prepared data folder."),
    compare: bool = typer.Option(False, "--compare", help="Combine the RESULTS arguments into one results table."),
    cv: bool = typer.Option(False, "--cv", help="RUN_DIR... = one run per cross-validation fold (`train --fold k`): "
                                               "each predicts its own validation cases, all cases pooled into one "
                                               "table (n = every fold's validation cases), plus per_fold.csv. "
                                               "Needs --out."),
    out: Optional[Path] = typer.Option(
        None, "--out", help="Output folder (default <pred>/../eval_<name>); with --compare, the table file "
                            "(default: print only)."),
    table: Optional[str] = typer.Option(
        None, "--table", help="Results table format: csv, md or latex (with --compare default md, or from --out's "
                              "suffix)."),
    lcc: Optional[bool] = typer.Option(
        None, "--lcc/--no-lcc", show_default=False,
        help="Keep only the largest connected component of each predicted class before measuring (recorded in the "
             "table). RUN_DIR default: the method's protocol (on for dtc, bcp, text-semiseg; docs/fidelity.md)."),
    spacing_mm: bool = typer.Option(False, "--spacing-mm", help="Give HD95/ASD in mm using the NIfTI header spacing "
                                                                "(default: voxels)."),
    empty_policy: Optional[str] = typer.Option(
        None, "--empty-policy", show_default=False,
        help="When exactly one of prediction/reference is empty: nan (Dice 0, HD95/ASD NaN and counted as empty), "
             "penalty (HD95/ASD = image diagonal) or zero (HD95/ASD 0; legacy). Default: nan; RUN_DIR: the run's "
             "val.empty_policy (what its validation Dice used)."),
    name: Optional[str] = typer.Option(None, "--name", help="Display name for tables, e.g. \"MC-Net\" (default: the "
                                                            "--pred folder name / the run's method)."),
    group_by: Optional[str] = typer.Option(None, "--group-by", help="--compare: method = the runs (seeds) of one "
                                                                    "method in one row, mean ± SD over them."),
    force: bool = typer.Option(False, "--force", help="Overwrite existing evaluation files / table file."),
    split: Optional[str] = typer.Option(
        None, "--split", help="Split to evaluate: val (default for RUN_DIR) or test; with a prepared --labels "
                              "folder, restricts the references to that split."),
    checkpoint: Optional[str] = typer.Option(
        None, "--checkpoint", help="RUN_DIR: best (on validation; default) or last. With --pred: records how the "
                                   "predictions were chosen."),
    decoder: Optional[int] = typer.Option(None, "--decoder", help="RUN_DIR: which decoder of a multi-decoder model "
                                                                  "predicts (default: the method's choice)."),
    inference: Optional[str] = typer.Option(
        None, "--inference", help="RUN_DIR: paper (default: the methods' official windows and LCC, for tables), best "
                                  "(mirroring TTA + Gaussian windows + the post-processing chosen on validation), or "
                                  "the mode sliding|whole (default: the run's inference.mode; sliding for 3D "
                                  "methods)."),
    tta: Optional[bool] = typer.Option(
        None, "--tta/--no-tta", show_default=False,
        help="RUN_DIR: mirroring test-time augmentation (every flip of the spatial axes, probabilities averaged); "
             "default: on with --inference best, off otherwise."),
    blend: Optional[str] = typer.Option(
        None, "--blend", help="RUN_DIR: window weights, constant or gaussian (sigma = patch/8); default: gaussian "
                              "with --inference best, constant otherwise."),
    choose_postprocessing: bool = typer.Option(
        False, "--choose-postprocessing",
        help="RUN_DIR, --split val: keep each class's largest connected component only if it raises the mean "
             "validation Dice (nnU-Net's rule), record it in RUN/postprocessing.json for --inference best, and "
             "score with it (default --inference best)."),
    device: Optional[str] = typer.Option(None, "--device", help="RUN_DIR: cpu, cuda or cuda:N."),
    num_classes: Optional[int] = typer.Option(
        None, "--num-classes", help="Classes including background for plain --labels folders (default 2)."),
    labeled: Optional[int] = typer.Option(None, "--labeled", help="Labeled training cases (for the table)."),
    unlabeled: Optional[int] = typer.Option(None, "--unlabeled", help="Unlabeled training cases (for the table)."),
    std: bool = typer.Option(False, "--std", help="--compare: print mean ± SD over cases instead of the mean."),
    class_name: Optional[str] = typer.Option(
        None, "--class", help="--compare: report this class instead of the mean over foreground classes."),
    eval_size: Optional[int] = typer.Option(
        None, "--eval-size", help="2D: resize prediction and reference to SIZE×SIZE (nearest neighbour) before "
                                  "scoring; 224 reproduces LViT's convention."),
    per_volume: bool = typer.Option(
        False, "--per-volume", help="Slices folders (textseg prep slices): re-stack the slice predictions into "
                                    "volumes and score each volume."),
    overlays: int = typer.Option(
        0, "--overlays", metavar="N", min=0, help="Write N overlay PNGs (image, reference and prediction contours, "
                                                  "text) to <out>/overlays/."),
    layout: str = typer.Option(
        "auto", "--layout", help="--compare: 3d (Labeled/Unlabeled/Dice/Jaccard/95HD/ASD), 2d (method, text ✓/✗, "
                                 "Dice and mIoU per data set) or auto (2d when all results are 2D)."),
    uses_text: Optional[bool] = typer.Option(
        None, "--text/--no-text", help="With --pred: whether the method reads text (the ✓/✗ column of 2D tables)."),
    allow_missing: bool = typer.Option(
        False, "--allow-missing", help="With --pred: score the references that have a prediction (default: a "
                                       "reference without prediction is an error); the table states how many."),
    precision: Optional[str] = typer.Option(
        None, "--precision", help="RUN_DIR: auto, fp32 or bf16 (default: the run's rule; auto = bf16 on CUDA and "
                                  "on CPUs with bf16 units, unless the run trained in fp32)."),
    allow_train_cases: bool = typer.Option(
        False, "--allow-train-cases", help="RUN_DIR: score cases the run trained on (RUN/cases.json) when the split "
                                           "holds some (default: an error); meta.json and the tables mark the "
                                           "result."),
) -> None:
    """Evaluate predictions (Dice, Jaccard, 95HD, ASD; equal to medpy) and build results tables.

    \b
    textseg eval --pred PRED_DIR --labels LABELS_DIR [--lcc] [--spacing-mm] [--table latex]
    textseg eval RUN_DIR --split val [--checkpoint best|last]
    textseg eval --compare EVAL_A EVAL_B ... --table latex --out table.tex
    textseg eval --compare "MC-Net=RUN_S1/eval/val-best" "MC-Net=RUN_S2/eval/val-best" ... --group-by method
    textseg eval RUN_DIR --eval-size 224 --overlays 6        (2D: mDice / mIoU)
    textseg eval RUN_F0 RUN_F1 ... RUN_F4 --cv --out CV_DIR  (pooled cross-validation, as nnU-Net)
    """
    from textseg_cli.evaluation.folders import check_empty_policy  # lazy: keeps `textseg --help` torch-free

    targets = list(targets or [])
    if empty_policy is not None:
        check_empty_policy(empty_policy)
    if cv:
        _forbid("with --cv", compare=compare, pred=pred, labels=labels, num_classes=num_classes, labeled=labeled,
                unlabeled=unlabeled, uses_text=uses_text, allow_missing=allow_missing, std=std,
                class_name=class_name, group_by=group_by, eval_size=eval_size, per_volume=per_volume,
                overlays=overlays, allow_train_cases=allow_train_cases, choose_postprocessing=choose_postprocessing)
        if split not in (None, "val"):
            raise ConfigError("--cv scores each fold's run on its own validation cases; --split test does not apply")
        _cv_mode(targets, checkpoint=checkpoint, decoder=decoder, inference=inference, out=out, lcc=lcc,
                 spacing_mm=spacing_mm, empty_policy=empty_policy, table=table, force=force, device=device,
                 precision=precision, name=name, tta=tta, blend=blend)
        return
    if compare:
        _forbid("with --compare", pred=pred, labels=labels, lcc=lcc, spacing_mm=spacing_mm, name=name, split=split,
                checkpoint=checkpoint, decoder=decoder, inference=inference, device=device, num_classes=num_classes,
                labeled=labeled, unlabeled=unlabeled, eval_size=eval_size, per_volume=per_volume, overlays=overlays,
                uses_text=uses_text, precision=precision, allow_train_cases=allow_train_cases, tta=tta, blend=blend,
                choose_postprocessing=choose_postprocessing)
        if empty_policy is not None:
            raise ConfigError("--empty-policy cannot be used with --compare (each result keeps its own policy)")
        _compare_mode(targets, table, out, force, std, class_name, layout, group_by)
        return
    _forbid("without --compare", std=std, class_name=class_name, group_by=group_by)
    if allow_missing and pred is None:
        raise ConfigError("--allow-missing only applies to --pred/--labels")
    if layout != "auto":
        raise ConfigError("--layout can only be used with --compare")
    if pred is not None or labels is not None:
        if targets:
            raise ConfigError("give either RUN_DIR or --pred/--labels, not both")
        if pred is None or labels is None:
            raise ConfigError("--pred and --labels must be given together")
        _forbid("with --pred/--labels", decoder=decoder, inference=inference, device=device, precision=precision,
                allow_train_cases=allow_train_cases, tta=tta, blend=blend, choose_postprocessing=choose_postprocessing)
        policy = {} if empty_policy is None else {"empty_policy": empty_policy}  # None: evaluate_folders' default
        _folder_mode(pred, labels, out=out, table=table, lcc=bool(lcc), spacing_mm=spacing_mm, **policy,
                     name=name, force=force, split=split, checkpoint=checkpoint, num_classes=num_classes,
                     labeled=labeled, unlabeled=unlabeled, eval_size=eval_size, per_volume=per_volume,
                     overlays=overlays, uses_text=uses_text, allow_missing=allow_missing)
        return
    if len(targets) > 1:
        raise ConfigError(f"{len(targets)} paths given; add --compare to combine evaluation results into a table")
    if not targets:
        raise ConfigError("nothing to evaluate: give RUN_DIR, or --pred and --labels, or --compare RESULTS... "
                          "(see textseg eval --help)")
    _forbid("with RUN_DIR", num_classes=num_classes, labeled=labeled, unlabeled=unlabeled,
            uses_text=uses_text)
    _run_mode(targets[0], split=split, checkpoint=checkpoint, decoder=decoder, inference=inference, out=out, lcc=lcc,
              spacing_mm=spacing_mm, empty_policy=empty_policy, table=table, force=force, device=device,
              eval_size=eval_size, per_volume=per_volume, overlays=overlays, precision=precision, name=name,
              allow_train_cases=allow_train_cases, tta=tta, blend=blend, choose_postprocessing=choose_postprocessing)


def _cv_mode(targets: list[Path], *, out: Optional[Path], inference, blend, checkpoint, **kw) -> None:
    from textseg_cli.evaluation.run import evaluate_cv  # lazy: keeps `textseg --help` torch-free
    from textseg_cli.storage.outputs import locked_output  # lazy: keeps `textseg --help` torch-free
    if len(targets) < 2:
        raise ConfigError("--cv needs one run folder per fold (two or more)")
    if out is None:
        raise ConfigError("--cv needs --out (a folder for the pooled table and each fold's evaluation)")
    if inference not in (None, *_INFERENCE):
        raise ConfigError(f"--inference {inference!r}: expected {', '.join(_INFERENCE)}")
    if blend not in (None, *_BLENDS):
        raise ConfigError(f"--blend {blend!r}: expected {' or '.join(_BLENDS)}")
    with locked_output(out, "eval", inputs=targets):
        evaluate_cv(targets, out, checkpoint=checkpoint or "best", inference=inference, blend=blend, **kw)
    console.print(f"[green]wrote[/] pooled cross-validation: {out} (per_fold.csv: each fold's means)",
                  highlight=False, soft_wrap=True)


def _folder_mode(pred: Path, labels: Path, **kw) -> None:
    from textseg_cli.evaluation.folders import evaluate_folders  # lazy: keeps `textseg --help` torch-free
    if kw["split"] == "test":
        warn_test_split()
    kw["checkpoint_rule"] = kw.pop("checkpoint")
    df = evaluate_folders(pred, labels, kw.pop("out"), **kw)
    for key, path in (df.attrs.get("paths") or {}).items():
        console.print(f"[green]wrote[/] {key}: {path}", highlight=False, soft_wrap=True)


def _compare_mode(targets: list[Path], table: Optional[str], out: Optional[Path], force: bool, std: bool,
                  class_name: Optional[str], layout: str = "auto", group_by: Optional[str] = None) -> None:
    from textseg_cli.reports.compare import compare_results  # lazy: keeps `textseg --help` torch-free
    text = compare_results(targets, table=table, out=out, force=force, std=std, class_name=class_name, layout=layout,
                           group_by=group_by)
    console.print(text, markup=False, highlight=False, soft_wrap=True)
    if out is not None:
        console.print(f"[green]wrote[/] table: {out}", highlight=False, soft_wrap=True)
