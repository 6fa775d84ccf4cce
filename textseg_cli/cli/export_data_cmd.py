"""`textseg export-data`: a prepared set as an nnU-Net v2 raw folder (+ splits_final.json) or an MSD task."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from textseg_cli.cli import app
from textseg_cli.console import console


@app.command("export-data")
def export_data_cmd(
    prepared: Path = typer.Argument(..., help="Prepared folder (from `textseg prep`)."),
    fmt: str = typer.Option("nnunet", "--format", help="nnunet (nnU-Net v2 raw + splits_final.json) or msd."),
    out: Path = typer.Option(..., "--out", help="Output folder, e.g. $nnUNet_raw/Dataset501_Name."),
    labeled: Optional[str] = typer.Option(None, "--labeled", help="Only the first N (or N%) cases of splits.train "
                                          "(textseg's labeled subset) as nnU-Net training cases. Default: all labeled."),
    force: bool = typer.Option(False, "--force", help="Replace an existing --out folder."),
) -> None:
    """Write the same cases and train/val split for nnU-Net (fully supervised baseline) or MSD tools."""
    from textseg_cli.data.prep.nnunet import export_data  # lazy: keeps `textseg --help` torch-free
    from textseg_cli.storage.outputs import locked_output  # lazy: keeps `textseg --help` torch-free

    with locked_output(out, "export-data", inputs=[prepared]):  # no concurrent writer in out
        export_data(prepared, out, fmt=fmt, labeled=labeled, force=force)
    console.print(f"wrote {fmt} layout to {out}")
