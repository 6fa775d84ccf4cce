"""`textseg prep custom`: your own NIfTI / NRRD / MHA images and labels, matched by case id."""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Tuple

import typer

from textseg_cli.cli import prep_app
from textseg_cli.cli.prep_msd import (
    CROP_HELP,
    PRESET_HELP,
    SPLIT_FILE_HELP,
    WINDOW_HELP,
    _report,
)
from textseg_cli.cli.prep_pancreas import LABEL_GEOMETRY_HELP
from textseg_cli.console import console, err_console


@prep_app.command("custom")
def prep_custom_cmd(
    images: Path = typer.Option(..., "--images", help="Folder of images (.nii.gz, .nii, .nrrd, .mha); channel files "
                                "case_0000, case_0001, ... become channels. Only read."),
    out: Path = typer.Option(..., "--out", help="Output folder (must not overlap the inputs)."),
    labels: Optional[Path] = typer.Option(None, "--labels", help="Folder of labels named like the images (a _seg, "
                                          "_label, _mask or _gt suffix is allowed). Images without one are "
                                          "unlabeled training cases."),
    modality: str = typer.Option("CT", "--modality", help="CT or MR."),
    classes: Optional[str] = typer.Option(None, "--classes", help="Foreground class names for label values 1..K, "
                                          "comma-separated (default: one class 'foreground')."),
    name: str = typer.Option("custom", "--name", help="Data set name."),
    spacing: str = typer.Option("none", "--spacing", help="Resample to this spacing in mm (one or three values)."),
    window: Optional[Tuple[float, float]] = typer.Option(None, "--window", metavar="LEVEL WIDTH", help=WINDOW_HELP),
    window_preset: Optional[str] = typer.Option(None, "--window-preset", help=PRESET_HELP),
    clip: Optional[str] = typer.Option(None, "--clip", help="Percentile clip: UPPER (e.g. 99.9) or LOWER,UPPER."),
    crop: str = typer.Option("none", "--crop", help=CROP_HELP),
    crop_margin: int = typer.Option(0, "--crop-margin", help="Voxels added on each side of the crop box.", min=0),
    normalize: str = typer.Option("zscore", "--normalize", help="zscore, zscore-nonzero or none."),
    split: str = typer.Option("auto", "--split", help="TRAIN,TEST or TRAIN,VAL,TEST counts or fractions of the "
                              "labeled cases; auto: 20 % test, 10 % (at least 1) validation."),
    folds: Optional[int] = typer.Option(None, "--folds", help="Record K cross-validation folds over the labeled "
                                        "non-test cases (train with --fold k); fold 0 is splits.train/val.", min=2),
    split_file: Optional[Path] = typer.Option(None, "--split-file", help=SPLIT_FILE_HELP),
    seed: int = typer.Option(1337, "--seed", help="Seed of the split."),
    require_labels: bool = typer.Option(False, "--require-labels", help="Treat an image without a label as an error."),
    label_geometry: str = typer.Option("check", "--label-geometry", help=LABEL_GEOMETRY_HELP),
    workers: int = typer.Option(1, "--workers", help="Parallel worker processes.", min=1),
    force: bool = typer.Option(False, "--force", help="Redo every case (default: resume, skipping finished cases)."),
    drop_failed: bool = typer.Option(False, "--drop-failed", help="Write the data set without cases that failed."),
    nan_policy: str = typer.Option("refuse", "--nan-policy", help="NaN/Inf voxels in an image: refuse (the case "
                                   "fails, naming the count) or zero (replace them by 0, with a warning)."),
    plan: bool = typer.Option(False, "--plan", help="Then plan a training on the prepared set (`textseg plan OUT` "
                              "with its defaults: mcnet, the default device, 60 minutes) and (re)write OUT/plan.yaml; "
                              "run `textseg plan` itself for another method, device or budget."),
) -> None:
    """Prepare your own NIfTI / NRRD / MHA image and label folders.

    Same windowing, resampling, cropping, normalisation and split options as the benchmark preparers."""
    from textseg_cli.data.prep.custom import prep_custom  # lazy: keeps `textseg --help` torch-free
    from textseg_cli.storage.outputs import locked_output  # lazy: keeps `textseg --help` torch-free

    # locked: no concurrent prep/--force in out
    with locked_output(out, "prep custom", prep_sources=[images, *([labels] if labels else [])]):
        ds = prep_custom(images, out, labels=labels, modality=modality,
                         classes=classes.split(",") if classes else None, name=name, spacing=spacing, window=window,
                         window_preset=window_preset, clip=clip, crop=crop, crop_margin=crop_margin,
                         normalize=normalize, split=split, split_file=split_file, seed=seed,
                         require_labels=require_labels, label_geometry=label_geometry, workers=workers, force=force,
                         drop_failed=drop_failed, folds=folds, nan_policy=nan_policy)
    _report(ds.name, ds, out)
    if plan:
        from textseg_cli.experiments.plan import (  # lazy: keeps `textseg --help` torch-free
            make_plan,
            plan_table,
            write_plan,
        )

        made = make_plan(out, log=lambda msg: err_console.print(f"[dim]{msg}[/]", highlight=False))
        written = write_plan(made, out / "plan.yaml", force=True)  # the plan of this prep run: replaces an older one
        console.print(plan_table(made))
        console.print(f"plan written to {written}: textseg train --method {made.method} --data {out} --config "
                      f"{written}", highlight=False, soft_wrap=True)
