"""`textseg prep brats`: BraTS-2019 training data, whole tumour, seeded 250/25/60 split."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from textseg_cli.cli import prep_app
from textseg_cli.cli.prep_pancreas import LABEL_GEOMETRY_HELP
from textseg_cli.console import console


@prep_app.command("brats")
def prep_brats_cmd(
    src: Path = typer.Option(..., "--src", help="MICCAI_BraTS_2019_Data_Training (HGG/ and LGG/ case folders). "
                             "Only read, never written."),
    out: Path = typer.Option(..., "--out", help="Output folder (must not overlap --src)."),
    modalities: str = typer.Option("flair", "--modalities", help="Comma-separated channels: flair, t1, t1ce, t2."),
    split: str = typer.Option("250,25,60", "--split", help="TRAIN,VAL,TEST counts (or TRAIN,TEST; or fractions)."),
    split_file: Optional[Path] = typer.Option(None, "--split-file", help="Your own split: a folder with train.txt, "
                                              "val.txt, test.txt (one case id per line) or a JSON/YAML mapping."),
    seed: int = typer.Option(1337, "--seed", help="Seed of the split."),
    clip: float = typer.Option(99.9, "--clip", help="Upper percentile (of brain voxels) to clip at; 100 = no clip."),
    crop_margin: int = typer.Option(0, "--crop-margin", help="Voxels added around the brain bounding box.", min=0),
    spacing: str = typer.Option("none", "--spacing", help="Resample to this spacing (mm); BraTS is already 1 mm."),
    normalize: str = typer.Option("zscore-nonzero", "--normalize", help="zscore-nonzero (brain voxels; background "
                                  "stays 0), zscore or none."),
    label_geometry: str = typer.Option("check", "--label-geometry", help=LABEL_GEOMETRY_HELP),
    workers: int = typer.Option(1, "--workers", help="Parallel worker processes.", min=1),
    force: bool = typer.Option(False, "--force", help="Redo every case (default: resume, skipping finished cases)."),
    drop_failed: bool = typer.Option(False, "--drop-failed", help="Write the data set without cases that failed."),
) -> None:
    """Prepare BraTS-2019 (whole tumour) with a seeded 250/25/60 split.

    FLAIR → crop to the brain → clip at the 99.9th percentile → z-score over brain voxels; label = seg > 0."""
    from textseg_cli.data.prep.brats import prep_brats  # lazy: keeps `textseg --help` torch-free
    from textseg_cli.storage.outputs import locked_output  # lazy: keeps `textseg --help` torch-free

    with locked_output(out, "prep brats", prep_sources=[src]):  # no concurrent prep/--force in out
        ds = prep_brats(src, out, modalities=modalities.split(","), split=split, split_file=split_file, seed=seed,
                        clip_upper=None if clip >= 100 else clip, crop_margin=crop_margin, spacing=spacing,
                        normalize=normalize, label_geometry=label_geometry, workers=workers, force=force,
                        drop_failed=drop_failed)
    counts = ", ".join(f"{k} {len(v)}" for k, v in ds.spec["splits"].items())
    console.print(f"prepared [bold]brats2019[/]: {len(ds.case_ids)} cases ({counts}) → {out}")
