"""`textseg prep msd` (any Medical Segmentation Decathlon task) and `textseg prep lung` (MSD Task06_Lung)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Tuple

import typer

from textseg_cli.cli import prep_app
from textseg_cli.cli.prep_pancreas import LABEL_GEOMETRY_HELP
from textseg_cli.console import console

WINDOW_HELP = "Explicit window LEVEL WIDTH (e.g. -600 1500), scaled to [0, 1]."
PRESET_HELP = "Named window: abdomen, lung, brain, bone, mediastinum, or none."
CROP_HELP = "Crop around: none, nonzero (non-zero voxels), body (CT body mask) or label."
SPLIT_FILE_HELP = ("Your own split: a folder with train.txt, val.txt, test.txt (one case id per line) or a "
                   "JSON/YAML mapping.")


def _report(name: str, ds, out: Path) -> None:
    counts = ", ".join(f"{k} {len(v)}" for k, v in ds.spec["splits"].items())
    console.print(f"prepared [bold]{name}[/]: {len(ds.case_ids)} cases ({counts}); classes "
                  f"{ds.class_names[1:]}; channels {ds.spec['channel_names']} → {out}")


@prep_app.command("msd")
def prep_msd_cmd(
    src: Path = typer.Option(..., "--src", help="An MSD task folder (TaskXX_Name with dataset.json, imagesTr/, "
                             "labelsTr/). Only read, never written."),
    out: Path = typer.Option(..., "--out", help="Output folder (must not overlap --src)."),
    channels: Optional[str] = typer.Option(None, "--channels", help="Channels of 4D images to keep, by index or name "
                                           "from the task's 'modality' (e.g. FLAIR,T1w or 0,2); default all."),
    name: Optional[str] = typer.Option(None, "--name", help="Data set name (default: the task's name)."),
    spacing: str = typer.Option("none", "--spacing", help="Resample to this spacing in mm (one or three values)."),
    window: Optional[Tuple[float, float]] = typer.Option(None, "--window", metavar="LEVEL WIDTH", help=WINDOW_HELP),
    window_preset: Optional[str] = typer.Option(None, "--window-preset", help=PRESET_HELP),
    clip: Optional[str] = typer.Option(None, "--clip", help="Percentile clip: UPPER (e.g. 99.9) or LOWER,UPPER."),
    crop: str = typer.Option("none", "--crop", help=CROP_HELP),
    crop_margin: int = typer.Option(0, "--crop-margin", help="Voxels added on each side of the crop box.", min=0),
    normalize: str = typer.Option("zscore", "--normalize", help="zscore, zscore-nonzero or none."),
    split: str = typer.Option("0.8,0.2", "--split", help="TRAIN,TEST or TRAIN,VAL,TEST counts or fractions."),
    split_file: Optional[Path] = typer.Option(None, "--split-file", help=SPLIT_FILE_HELP),
    seed: int = typer.Option(1337, "--seed", help="Seed of the split."),
    label_geometry: str = typer.Option("check", "--label-geometry", help=LABEL_GEOMETRY_HELP),
    workers: int = typer.Option(1, "--workers", help="Parallel worker processes.", min=1),
    force: bool = typer.Option(False, "--force", help="Redo every case (default: resume, skipping finished cases)."),
    drop_failed: bool = typer.Option(False, "--drop-failed", help="Write the data set without cases that failed."),
) -> None:
    """Prepare any Medical Segmentation Decathlon task; class names come from its dataset.json."""
    from textseg_cli.data.prep.msd import prep_msd  # lazy: keeps `textseg --help` torch-free
    from textseg_cli.storage.outputs import locked_output  # lazy: keeps `textseg --help` torch-free

    with locked_output(out, "prep msd", prep_sources=[src]):  # no concurrent prep/--force in out
        ds = prep_msd(src, out, channels=channels.split(",") if channels else None, name=name, spacing=spacing,
                      window=window, window_preset=window_preset, clip=clip, crop=crop, crop_margin=crop_margin,
                      normalize=normalize, split=split, split_file=split_file, seed=seed, label_geometry=label_geometry,
                      workers=workers, force=force, drop_failed=drop_failed)
    _report(ds.name, ds, out)


@prep_app.command("lung")
def prep_lung_cmd(
    src: Path = typer.Option(..., "--src", help="MSD Task06_Lung (dataset.json, imagesTr/, labelsTr/). Only read."),
    out: Path = typer.Option(..., "--out", help="Output folder (must not overlap --src)."),
    spacing: str = typer.Option("none", "--spacing", help="Resample, e.g. 1 for 1 mm isotropic; none keeps the "
                                "native spacing."),
    window: Optional[Tuple[float, float]] = typer.Option(None, "--window", metavar="LEVEL WIDTH",
                                                         help=WINDOW_HELP + " Overrides the lung preset."),
    window_preset: str = typer.Option("lung", "--window-preset", help=PRESET_HELP + " Lung = level -600, width 1500."),
    crop: str = typer.Option("body", "--crop", help=CROP_HELP),
    crop_margin: int = typer.Option(0, "--crop-margin", help="Voxels added on each side of the crop box.", min=0),
    normalize: str = typer.Option("zscore", "--normalize", help="zscore, zscore-nonzero or none (keep [0, 1])."),
    split: str = typer.Option("48,15", "--split", help="TRAIN,TEST or TRAIN,VAL,TEST counts."),
    split_file: Optional[Path] = typer.Option(None, "--split-file", help=SPLIT_FILE_HELP),
    seed: int = typer.Option(1337, "--seed", help="Seed of the split."),
    label_geometry: str = typer.Option("check", "--label-geometry", help=LABEL_GEOMETRY_HELP),
    workers: int = typer.Option(1, "--workers", help="Parallel worker processes.", min=1),
    force: bool = typer.Option(False, "--force", help="Redo every case (default: resume, skipping finished cases)."),
    drop_failed: bool = typer.Option(False, "--drop-failed", help="Write the data set without cases that failed."),
) -> None:
    """Prepare MSD Task06_Lung (63 CT, tumour) with a seeded 48/15 split.

    Optional resampling → crop to the body → lung window (-600/1500) to [0, 1] → z-score."""
    from textseg_cli.data.prep.msd import prep_lung  # lazy: keeps `textseg --help` torch-free
    from textseg_cli.storage.outputs import locked_output  # lazy: keeps `textseg --help` torch-free

    with locked_output(out, "prep lung", prep_sources=[src]):  # no concurrent prep/--force in out
        ds = prep_lung(src, out, spacing=spacing, window=window, window_preset=window_preset, crop=crop,
                       crop_margin=crop_margin, normalize=normalize, split=split, split_file=split_file, seed=seed,
                       label_geometry=label_geometry, workers=workers, force=force, drop_failed=drop_failed)
    _report("lung", ds, out)
