"""`textseg export`: a trained run as a TorchScript file plus plain weights."""

from __future__ import annotations

from pathlib import Path

import typer

from textseg_cli.cli import app
from textseg_cli.console import console


@app.command("export")
def export(
    run_dir: Path = typer.Argument(..., help="Run folder written by `textseg train`."),
    fmt: str = typer.Option("torchscript", "--format", help="torchscript (torch.jit.load) or torch-export "
                                                                    "(torch.export.load(...).module()); no textseg needed."),
    out: Path = typer.Option(None, "--out", help="Output folder (default RUN/export)."),
    checkpoint: str = typer.Option("best", "--checkpoint", help="best, last, or a .pt path."),
    decoder: str = typer.Option(None, "--decoder", help="Decoder of a multi-decoder method (default: the run's)."),
    force: bool = typer.Option(False, "--force", help="Replace an existing output folder."),
) -> None:
    """Export the network (one patch in, softmax probabilities out), load it back and compare outputs."""
    from textseg_cli.inference.export import export_run  # lazy: keeps `textseg --help` torch-free
    from textseg_cli.inference.settings import parse_decoder  # lazy: keeps `textseg --help` torch-free

    rec = export_run(run_dir, out, fmt=fmt, checkpoint=checkpoint,
                     decoder=parse_decoder(decoder) if decoder is not None else None, force=force)
    console.print(f"exported {rec['method']} ({rec['format']}, input {rec['input']}) to "
                  f"{out or Path(run_dir) / 'export'}; load-back max |diff| {rec['load_back_check']['max_abs_diff']:.2e}",
                  highlight=False)
