"""`textseg export-data`: a prepared set as an nnU-Net v2 raw folder (+ splits_final.json) or an MSD task."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

import typer
from rich.markup import escape

from textseg_cli.cli import app
from textseg_cli.console import console


@app.command("export-data")
def export_data_cmd(
    prepared: Path = typer.Argument(..., help="Prepared folder (from `textseg prep`)."),
    fmt: str = typer.Option("nnunet", "--format", help="nnunet (nnU-Net v2 raw + splits_final.json) or msd."),
    out: Path = typer.Option(..., "--out", help="Output folder, e.g. $nnUNet_raw/Dataset501_Name."),
    labeled: Optional[str] = typer.Option(None, "--labeled", help="Only the first N (or N%) cases of splits.train "
                                          "(textseg's labeled subset) as nnU-Net training cases. Default: all labeled."),
    images: str = typer.Option("prepared", "--images", help="prepared: the preprocessed cases textseg trains on; "
                               "raw: the source scans and labels they were prepared from (own geometry), so the "
                               "nnU-Net model runs on raw scans (sets from prep custom/nnunet/msd/lung)."),
    preprocessed: Optional[Path] = typer.Option(
        None, "--preprocessed", help="nnUNet_preprocessed root (default: $nnUNet_preprocessed): splits_final.json "
        "goes to DIR/<--out name>/, where nnU-Net's trainer reads it. Without it, the command to copy it is printed."),
    force: bool = typer.Option(False, "--force", help="Replace an existing --out folder (and a splits_final.json "
                               "textseg wrote into --preprocessed)."),
) -> None:
    """Write the same cases and train/val split for nnU-Net (fully supervised baseline) or MSD tools."""
    from textseg_cli.data.prep.nnunet import export_data, splits_copy_command  # lazy: keeps `textseg --help` torch-free
    from textseg_cli.storage.outputs import locked_output  # lazy: keeps `textseg --help` torch-free

    if preprocessed is None and fmt == "nnunet" and os.environ.get("nnUNet_preprocessed"):
        preprocessed = Path(os.environ["nnUNet_preprocessed"])
    with locked_output(out, "export-data", inputs=[prepared]):  # no concurrent writer in out
        export_data(prepared, out, fmt=fmt, labeled=labeled, force=force, images=images, preprocessed=preprocessed)
    console.print(f"wrote {fmt} layout ({images} images) to {out}", highlight=False, soft_wrap=True)
    if fmt != "nnunet":
        return
    if preprocessed is not None:
        console.print(f"splits_final.json: {preprocessed / out.name / 'splits_final.json'} (where nnU-Net reads it)",
                      highlight=False, soft_wrap=True)
    else:
        console.print("[yellow]note:[/] nnU-Net reads splits_final.json from $nnUNet_preprocessed/"
                      f"{escape(out.name)}/ (else it makes its own 5 folds); no --preprocessed was given, so copy it:",
                      highlight=False, soft_wrap=True)
        console.print(splits_copy_command(out), markup=False, highlight=False, soft_wrap=True)
