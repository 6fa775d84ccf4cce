"""`textseg prep check`: validate a prepared folder (dataset.json, referenced files, optionally contents)."""

from __future__ import annotations

from pathlib import Path

import typer

from textseg_cli.cli import prep_app
from textseg_cli.console import console


@prep_app.command("check")
def prep_check_cmd(
    data: Path = typer.Argument(..., help="A prepared data folder (with dataset.json)."),
    contents: bool = typer.Option(False, "--contents", help="Also read every image and label: readable files, "
                                  "matching shapes, label values within the classes."),
) -> None:
    """Validate a prepared data set; errors name the file or case at fault."""
    from textseg_cli.data.prepared import load_prepared  # lazy: keeps `textseg --help` torch-free

    ds = load_prepared(data)
    if contents:
        ds.validate_files(check_contents=True)
    counts = ", ".join(f"{k} {len(v)}" for k, v in ds.spec["splits"].items() if isinstance(v, list))
    console.print(f"[green]ok[/]: {ds.name} ({ds.dim}D, {len(ds.case_ids)} cases; {counts})"
                  + (" - all files read" if contents else ""))
