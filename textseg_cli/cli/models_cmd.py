"""`textseg models`: registered backbones and methods with their parameter counts."""

from __future__ import annotations

from typing import Optional

import typer
from rich.table import Table

from textseg_cli.cli import app
from textseg_cli.console import console


@app.command("models")
def models_command(
    in_channels: int = typer.Option(1, "--in-channels", help="Input channels (modalities)."),
    classes: int = typer.Option(2, "--classes", help="Output classes, background included."),
    patch: Optional[str] = typer.Option(None, "--patch", help="Patch size, e.g. 112,112,80 (3D) or 224,224 (2D); "
                                        "its length picks 2D or 3D networks."),
    fidelity: bool = typer.Option(False, "--fidelity", help="Show, per method, its official code, the commit the "
                                                            "parity tests use and its fidelity-ledger section."),
) -> None:
    """List backbones and training methods with total, trainable and frozen parameter counts.

    A method built for one dimensionality only (tgcnet: 2D) is counted at its own default size.
    """
    from textseg_cli.methods.fidelity import ADDON_NAME, fidelity_rows  # lazy: keeps `textseg --help` torch-free
    from textseg_cli.methods.registry import list_methods  # lazy: keeps `textseg --help` torch-free
    from textseg_cli.runs.listing import list_models  # lazy: keeps `textseg --help` torch-free


    if fidelity:
        table = Table(title="Fidelity ledger (docs/fidelity.md): default = official code, paper variants as switches")
        for col in ("method", "official code", "commit", "ledger"):
            table.add_column(col, overflow="fold")
        for row in fidelity_rows([*list_methods(), ADDON_NAME]):
            table.add_row(*row)
        console.print(table)
        return

    rows = list_models(in_channels=in_channels, num_classes=classes, patch_size=patch)
    for kind, title in (("model", "Backbones / networks"), ("method", "Training methods")):
        table = Table(title=f"{title} ({in_channels} input channel(s), {classes} classes, {rows['dim']}D)")
        table.add_column("name", no_wrap=True)
        table.add_column("parameters", justify="right", no_wrap=True)
        table.add_column("trainable", justify="right", no_wrap=True)
        table.add_column("frozen", justify="right", no_wrap=True)
        table.add_column("parts", overflow="fold")
        table.add_column("description", overflow="fold")
        for r in rows[kind + "s"]:
            if r.get("error"):
                table.add_row(r["name"], "n/a", "n/a", "n/a", "", f"[red]cannot build:[/] {r['error']}")
                continue
            parts = "; ".join(f"{n} {c:,}" for n, c in r["parts"].items())
            name = r["name"] + (f" ({r['dim']}D)" if r.get("dim", rows["dim"]) != rows["dim"] else "")
            table.add_row(name, f"{r['total']:,}", f"{r['trainable']:,}", f"{r['total'] - r['trainable']:,}", parts,
                          r["description"])
        console.print(table)
