"""`textseg prep slices` (a prepared 3D folder → 2D slices with organ prompts) and `textseg prep overlays`
(overlay PNGs of a prepared folder for a visual check of preprocessing)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from textseg_cli.cli import prep_app
from textseg_cli.console import console


@prep_app.command("slices")
def prep_slices_cmd(
    src: Path = typer.Option(..., "--src", help="A prepared 3D folder (textseg prep msd/synthetic/custom ...)."),
    out: Path = typer.Option(..., "--out", help="Output folder for the prepared 2D slices."),
    axis: str = typer.Option("axial", "--axis", help="Slicing axis: axial (z), coronal (y) or sagittal (x)."),
    classes: Optional[str] = typer.Option(
        None, "--classes", help="Comma-separated class names to keep (default: all); the others become background."),
    skip_empty_ratio: float = typer.Option(
        0.0, "--skip-empty-ratio", help="Fraction of the slices without any kept class to drop, in training volumes "
                                        "only (validation/test keep every slice for per-volume scores)."),
    template: Optional[str] = typer.Option(
        None, "--template", help="Slice text template with {modality} and {classes} (default "
                                 "'A {modality} slice showing the {classes}.')."),
    seed: int = typer.Option(0, "--seed", help="Seed of the choice of skipped empty slices."),
    force: bool = typer.Option(False, "--force", help="Replace an existing --out folder."),
) -> None:
    """Turn a prepared 3D folder into a prepared 2D folder of slices, each with an organ prompt.

    Slices inherit their volume's split; each records source_volume and slice_index so that
    `textseg eval ... --per-volume` can re-stack predictions and score whole volumes.
    """
    from textseg_cli.data.prep.slices import prep_slices  # lazy: keeps `textseg --help` torch-free
    from textseg_cli.storage.outputs import discard_on_failure  # lazy: keeps `textseg --help` torch-free

    # locked: no concurrent prep/--force in out; a failed run leaves nothing that would demand --force
    with discard_on_failure(out, command="prep slices", prep_sources=[src]):
        ds = prep_slices(src, out, axis=axis, classes=classes, skip_empty_ratio=skip_empty_ratio, template=template,
                         seed=seed, force=force)
    counts = ", ".join(f"{k} {len(v)}" for k, v in ds.spec["splits"].items())
    n_vol = len(ds.spec["extra"]["slices"]["volumes"])
    console.print(f"[green]prepared[/] {ds.name}: {len(ds.case_ids)} {axis} slices of {n_vol} volumes ({counts}); "
                  f"text: \"{ds.text(ds.case_ids[0]) if ds.case_ids else ''}\" → {out}", highlight=False,
                  soft_wrap=True)


@prep_app.command("overlays")
def prep_overlays_cmd(
    data: Path = typer.Argument(..., help="A prepared data folder (with dataset.json)."),
    n: int = typer.Option(6, "--n", help="Number of cases, spread evenly over the list.", min=1),
    split: Optional[str] = typer.Option(None, "--split", help="Take the cases from this split only."),
    out: Optional[Path] = typer.Option(None, "--out", help="Folder for the PNGs (default DATA/overlays)."),
    force: bool = typer.Option(False, "--force", help="Overwrite existing PNGs."),
) -> None:
    """Write overlay PNGs (image, label contour in green, the case text) for a visual check of preprocessing.

    2D cases show the image; 3D cases the middle axial slice and the slice of largest label area.
    """
    from textseg_cli.reports.overlays import prepared_overlays  # lazy: keeps `textseg --help` torch-free

    paths = prepared_overlays(data, out=out, n=n, split=split, force=force)
    console.print(f"[green]wrote[/] {len(paths)} overlay PNG(s) to {paths[0].parent if paths else out}",
                  highlight=False, soft_wrap=True)
