"""`textseg plot`: training curves of one or more runs in one figure."""

from __future__ import annotations

from pathlib import Path
from typing import List

import typer

from textseg_cli.cli import app
from textseg_cli.console import console


@app.command("plot")
def plot(
    run_dirs: List[Path] = typer.Argument(..., help="Run folders (each with log.csv)."),
    out: Path = typer.Option(Path("curves.png"), "--out", help="PNG to write."),
    force: bool = typer.Option(False, "--force", help="Replace an existing --out file."),
) -> None:
    """Overlay loss terms, learning rate, consistency weight and validation Dice of several runs."""
    from textseg_cli.reports.curves import plot_curves  # lazy: keeps `textseg --help` torch-free
    from textseg_cli.storage.outputs import guard_output_file  # lazy: keeps `textseg --help` torch-free

    guard_output_file(out, force=force)
    plot_curves(run_dirs, out)
    console.print(f"wrote {out}")
