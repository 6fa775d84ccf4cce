"""`textseg prep pancreas`: NIH Pancreas-CT (DICOM download, NIfTI or community h5) with the standard split."""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Tuple

import typer

from textseg_cli.cli import prep_app
from textseg_cli.console import console

LABEL_GEOMETRY_HELP = ("How to treat a label whose header differs from the image's: check (error naming the case), "
                       "resample (map it onto the image grid through physical space), image (same size required; "
                       "take the image's header).")


@prep_app.command("pancreas")
def prep_pancreas_cmd(
    src: Path = typer.Option(..., "--src", help="The download: PANCREAS_NNNN/ DICOM folders, PANCREAS_NNNN.nii.gz / "
                             "imageNNNN.nii.gz images, or Pancreas_h5/imageNNNN_norm.h5. Only read, never written."),
    out: Path = typer.Option(..., "--out", help="Output folder (must not overlap the sources)."),
    labels: Optional[Path] = typer.Option(None, "--labels", help="Folder with labelNNNN.nii.gz (default: search --src)."),
    layout: str = typer.Option("auto", "--layout", help="dicom, nifti, h5 or auto (first found in that order)."),
    spacing: str = typer.Option("1", "--spacing", help="Target spacing in mm: one value, three (x,y,z) or 'none'."),
    window: Optional[Tuple[float, float]] = typer.Option((75.0, 400.0), "--window", metavar="LEVEL WIDTH",
                                                         help="HU window scaled to [0, 1]."),
    window_preset: Optional[str] = typer.Option(None, "--window-preset", help="Named window instead of --window: "
                                                "abdomen, lung, brain, bone, mediastinum, or none."),
    crop_min_size: int = typer.Option(96, "--crop-min-size", help="x/y crop around the label is at least this many voxels.", min=0),
    crop_margin: int = typer.Option(25, "--crop-margin", help="Voxels added on each x/y side of the label box.", min=0),
    normalize: str = typer.Option("zscore", "--normalize", help="zscore (on the cropped volume) or none (keep [0, 1])."),
    h5_spacing: str = typer.Option("1,1,1", "--h5-spacing", help="Spacing (mm) to record for h5 files, which carry none."),
    label_geometry: str = typer.Option("check", "--label-geometry", help=LABEL_GEOMETRY_HELP),
    val: int = typer.Option(6, "--val", help="Validation cases carved (seeded) from training; 0 keeps the published "
                            "62/20 split exactly.", min=0),
    keep_labeled: int = typer.Option(12, "--keep-labeled", help="The first N training cases (labeled subsets: "
                                     "6 = 10%, 12 = 20%) are never carved into validation.", min=0),
    seed: int = typer.Option(0, "--seed", help="Seed of the validation draw."),
    workers: int = typer.Option(1, "--workers", help="Parallel worker processes.", min=1),
    force: bool = typer.Option(False, "--force", help="Redo every case (default: resume, skipping finished cases)."),
    drop_failed: bool = typer.Option(False, "--drop-failed", help="Write the data set without cases that failed "
                                     "(they are listed in dataset.json) instead of stopping with an error."),
) -> None:
    """Prepare NIH Pancreas-CT (82 CT) with the standard 62/20 split.

    HU → 1 mm → x/y crop around the label (≥ 96 + 25 voxels) → window 75/400 to [0, 1] → z-score.

    Every value is an option below and is recorded in dataset.json."""
    from textseg_cli.data.prep.pancreas import prep_pancreas  # lazy: keeps `textseg --help` torch-free
    from textseg_cli.data.prep.steps import parse_spacing  # lazy: keeps `textseg --help` torch-free
    from textseg_cli.storage.outputs import locked_output  # lazy: keeps `textseg --help` torch-free

    with locked_output(out, "prep pancreas", prep_sources=[src, *([labels] if labels else [])]):
        ds = prep_pancreas(src, out, labels=labels, layout=layout, spacing=spacing, window=window,
                           window_preset=window_preset, crop_min_size=crop_min_size, crop_margin=crop_margin,
                           normalize=normalize, h5_spacing=parse_spacing(h5_spacing) or (1.0, 1.0, 1.0),
                           label_geometry=label_geometry, n_val=val, keep_labeled=keep_labeled, seed=seed,
                           workers=workers, force=force, drop_failed=drop_failed)
    counts = ", ".join(f"{k} {len(v)}" for k, v in ds.spec["splits"].items())
    console.print(f"prepared [bold]pancreas[/]: {len(ds.case_ids)} cases ({counts}) → {out}")
