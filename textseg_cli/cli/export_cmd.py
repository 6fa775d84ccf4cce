"""`textseg export`: a trained run as a TorchScript, torch.export or ONNX file, a self-contained predict.py and weights."""

from __future__ import annotations

from pathlib import Path

import typer

from textseg_cli.cli import app
from textseg_cli.console import console


@app.command("export")
def export(
    run_dir: Path = typer.Argument(..., help="Run folder written by `textseg train`."),
    fmt: str = typer.Option("torchscript", "--format", help="torchscript (torch.jit.load; for C++), torch-export "
                                                            "(torch.export.load(...).module()) or onnx (onnxruntime; "
                                                            "the onnx extra); dynamic batch and spatial shapes where "
                                                            "the network allows; no textseg needed."),
    out: Path = typer.Option(None, "--out", help="Output folder (default RUN/export)."),
    checkpoint: str = typer.Option("best", "--checkpoint", help="best, last, or a .pt path."),
    decoder: str = typer.Option(None, "--decoder", help="Decoder of a multi-decoder method (default: the run's)."),
    inference: str = typer.Option(None, "--inference", help="What predict.py replays: paper (default), best, "
                                                            "sliding or whole (as `textseg predict --inference`)."),
    force: bool = typer.Option(False, "--force", help="Replace an existing output folder."),
) -> None:
    """Export the network (softmax probabilities out) and a predict.py that segments a NIfTI with it; both are
    checked: the file is loaded back and compared with the run at the patch and at a second shape."""
    from textseg_cli.inference.export import export_run  # lazy: keeps `textseg --help` torch-free
    from textseg_cli.inference.settings import parse_decoder  # lazy: keeps `textseg --help` torch-free

    rec = export_run(run_dir, out, fmt=fmt, checkpoint=checkpoint,
                     decoder=parse_decoder(decoder) if decoder is not None else None, force=force,
                     inference=inference)
    console.print(f"exported {rec['method']} ({rec['format']}, input {rec['input']}) to "
                  f"{out or Path(run_dir) / 'export'} with predict.py; load-back max |diff| "
                  f"{rec['load_back_check']['max_abs_diff']:.2e}; shapes "
                  f"{'dynamic' if rec['dynamic']['spatial'] else 'fixed (' + str(rec['dynamic']['fixed_because']) + ')'}",
                  highlight=False)
