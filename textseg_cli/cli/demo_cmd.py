"""`textseg demo`: the bundled end-to-end job on synthetic data (offline)."""

from __future__ import annotations

from pathlib import Path

import typer

from textseg_cli.cli import app


@app.command("demo")
def demo(
    out: Path = typer.Option(Path("runs/demo"), "--out", help="Folder for data, text, runs, evaluation and table."),
    iterations: int = typer.Option(300, "--iterations", help="Training iterations (CPU-friendly default)."),
    methods: str = typer.Option("mcnet,vclipseg", "--methods",
                                help="Comma-separated methods to train and compare (text-free and text-guided)."),
    seed: int = typer.Option(0, "--seed", help="Seed for data generation and training."),
    device: str = typer.Option(None, "--device", help="cpu, cuda or cuda:N (default: CUDA when available)."),
    force: bool = typer.Option(False, "--force", help="Replace an existing --out folder."),
    precision: str = typer.Option(None, "--precision", help="auto (bf16 on CUDA and on CPUs with bf16 units, else "
                                  "fp32), fp32 or bf16; validation and evaluation follow it."),
) -> None:
    """Run prep synthetic → describe → encode → train → eval → table on the bundled synthetic data."""
    from textseg_cli.experiments.demo import run_demo  # lazy: keeps `textseg --help` torch-free

    run_demo(out=out, force=force, iterations=iterations, methods=tuple(m.strip() for m in methods.split(",") if m.strip()),
             seed=seed, device=device, precision=precision)
