"""`textseg prep check`: validate a prepared folder (dataset.json, referenced files, optionally contents)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

import typer
from rich.markup import escape

from textseg_cli.cli import prep_app
from textseg_cli.console import console, err_console
from textseg_cli.errors import ConfigError, DataError


@prep_app.command("check")
def prep_check_cmd(
    data: Path = typer.Argument(..., help="A prepared data folder (with dataset.json)."),
    contents: bool = typer.Option(False, "--contents", help="Also read every image and label: readable files, "
                                  "matching shapes, label values within the classes."),
    nnunet_preprocessed: Optional[Path] = typer.Option(
        None, "--nnunet-preprocessed", help="For a folder written by `export-data --format nnunet`: check that this "
        "nnUNet_preprocessed root (default: $nnUNet_preprocessed) holds the same splits_final.json."),
) -> None:
    """Validate a prepared data set; errors name the file or case at fault."""
    from textseg_cli.data.prepared import case_id_report, load_prepared  # lazy: keeps `textseg --help` torch-free

    if (data / "textseg_dataset.json").is_file() and (data / "splits_final.json").is_file():  # an nnU-Net export
        from textseg_cli.data.prep.nnunet import check_nnunet_splits  # lazy: keeps `textseg --help` torch-free

        pre = nnunet_preprocessed or (Path(os.environ["nnUNet_preprocessed"])
                                      if os.environ.get("nnUNet_preprocessed") else None)
        if pre is None:
            raise ConfigError("an nnU-Net export: give --nnunet-preprocessed DIR (or set nnUNet_preprocessed) to "
                              "check that nnU-Net will train on its splits_final.json", data)
        checked = check_nnunet_splits(data, pre)
        console.print(f"[green]ok[/]: {escape(str(checked))} holds the export's folds", highlight=False,
                      soft_wrap=True)
        return
    if (data / "dataset.json").is_file():
        problems = case_id_report(data)  # every unsafe ID, one line each (loading stops at the first)
        if problems:
            for line in problems:
                err_console.print(f"[red]bad case id:[/] {escape(line)}", highlight=False, soft_wrap=True)
            raise DataError(f"{len(problems)} unsafe or repeated case id(s) (case IDs become file names)",
                            data / "dataset.json")
    ds = load_prepared(data)
    if contents:
        ds.validate_files(check_contents=True)
    counts = ", ".join(f"{k} {len(v)}" for k, v in ds.spec["splits"].items() if isinstance(v, list))
    console.print(f"[green]ok[/]: {ds.name} ({ds.dim}D, {len(ds.case_ids)} cases; {counts})"
                  + (" - all files read" if contents else ""))
