"""`textseg prep nnunet`: an nnU-Net v2 raw folder (DatasetXXX_Name) with its class names and folds."""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Tuple

import typer

from textseg_cli.cli import prep_app
from textseg_cli.cli.prep_msd import CROP_HELP, PRESET_HELP, WINDOW_HELP, _report


@prep_app.command("nnunet")
def prep_nnunet_cmd(
    src: Path = typer.Option(..., "--src", help="nnU-Net v2 raw folder: dataset.json (channel_names, labels, "
                             "file_ending), imagesTr/<case>_0000.*, labelsTr/. Only read."),
    out: Path = typer.Option(..., "--out", help="Output folder (must not overlap --src)."),
    splits_final: Optional[Path] = typer.Option(None, "--splits-final", help="nnU-Net's splits_final.json (default: "
                                                "SRC/splits_final.json when present): its folds, fold 0 as train/val."),
    name: Optional[str] = typer.Option(None, "--name", help="Data set name (default: dataset.json's name)."),
    spacing: str = typer.Option("none", "--spacing", help="Resample to this spacing in mm (one or three values)."),
    window: Optional[Tuple[float, float]] = typer.Option(None, "--window", metavar="LEVEL WIDTH", help=WINDOW_HELP),
    window_preset: Optional[str] = typer.Option(None, "--window-preset", help=PRESET_HELP),
    crop: str = typer.Option("none", "--crop", help=CROP_HELP),
    normalize: str = typer.Option("zscore", "--normalize", help="zscore, zscore-nonzero or none."),
    split: str = typer.Option("auto", "--split", help="Without splits_final.json: TRAIN,TEST or TRAIN,VAL,TEST "
                              "counts or fractions; auto: 20 % test, 10 % (at least 1) validation."),
    seed: int = typer.Option(1337, "--seed", help="Seed of the split."),
    workers: int = typer.Option(1, "--workers", help="Parallel worker processes.", min=1),
    force: bool = typer.Option(False, "--force", help="Redo every case (default: resume, skipping finished cases)."),
) -> None:
    """Prepare an nnU-Net v2 raw data set, keeping its class and channel names and splits_final.json folds."""
    from textseg_cli.data.prep.nnunet import prep_nnunet  # lazy: keeps `textseg --help` torch-free
    from textseg_cli.storage.outputs import locked_output  # lazy: keeps `textseg --help` torch-free

    with locked_output(out, "prep nnunet", prep_sources=[src]):  # no concurrent prep/--force in out
        ds = prep_nnunet(src, out, splits_final=splits_final, name=name, spacing=spacing, window=window,
                         window_preset=window_preset, crop=crop, normalize=normalize, split=split, seed=seed,
                         workers=workers, force=force)
    _report(ds.name, ds, out)
