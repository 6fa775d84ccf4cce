"""`textseg plot`: training curves of one or more runs in one figure, optionally beside official logs."""

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
    reference_log: List[Path] = typer.Option(None, "--reference-log", help="An official per-iteration training log "
                                             "(AD-MT's training-logs/*.log) to draw beside the runs: its loss, "
                                             "learning rate, weight and validation Dice, labelled with its file "
                                             "name. Repeatable."),
) -> None:
    """Overlay loss terms, learning rate, consistency weight and validation Dice of several runs (and of official
    logs, --reference-log)."""
    from textseg_cli.reports.curves import plot_curves  # lazy: keeps `textseg --help` torch-free
    from textseg_cli.storage.outputs import guard_output_file  # lazy: keeps `textseg --help` torch-free

    guard_output_file(out, force=force)
    plot_curves(run_dirs, out, reference_logs=reference_log or ())
    console.print(f"wrote {out}")
