"""`textseg predict`: segment new volumes with a trained run."""

from __future__ import annotations

from pathlib import Path

import typer

from textseg_cli.cli import app


@app.command("predict")
def predict(
    run_dir: Path = typer.Argument(..., help="Run folder written by `textseg train` (config.yaml + checkpoints/)."),
    images: Path = typer.Option(..., "--images",
                                help="Folder of NIfTI volumes (*.nii.gz, *.nii), or a prepared folder."),
    out: Path = typer.Option(..., "--out",
                             help="Folder for the masks (<name>.nii.gz, input geometry) and predict.json."),
    checkpoint: str = typer.Option("best", "--checkpoint", help="best (best on validation), last, or a .pt path."),
    decoder: str = typer.Option(None, "--decoder",
                                help="Decoder of a multi-decoder method: an index or 'mean' (default: the run's)."),
    inference: str = typer.Option(None, "--inference",
                                  help="sliding (literature windows) or whole (one pass over the padded volume); "
                                       "default: the run's setting."),
    sw_batch_size: int = typer.Option(None, "--sw-batch-size", help="Windows per forward pass (sliding mode)."),
    buffer_on_cpu: bool = typer.Option(False, "--buffer-on-cpu",
                                       help="Accumulate probabilities on the CPU to save GPU memory on large volumes."),
    precision: str = typer.Option(None, "--precision", help="auto (the run's rule: bf16 on CUDA and on CPUs "
                                                            "with bf16 units unless it trained in fp32), fp32 "
                                                            "or bf16."),
    normalize: str = typer.Option("none", "--normalize", help="none (images already preprocessed like the "
                                                              "training data) or zscore (per image)."),
    device: str = typer.Option(None, "--device", help="cpu, cuda or cuda:N (default: CUDA when available)."),
    force: bool = typer.Option(False, "--force", help="Replace an existing --out folder."),
) -> None:
    """Segment every volume in --images with a trained run; masks keep each input's spacing and origin."""
    from textseg_cli.inference.predict import predict_folder

    predict_folder(run_dir, images, out, checkpoint=checkpoint, decoder=decoder, inference=inference, force=force,
                   device=device, normalize=normalize, sw_batch_size=sw_batch_size,
                   out_device="cpu" if buffer_on_cpu else None, precision=precision)
