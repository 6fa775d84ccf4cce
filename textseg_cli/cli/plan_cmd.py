"""`textseg plan`: patch, batch, iterations and validation interval for your data, device and time budget."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from textseg_cli.cli import app
from textseg_cli.console import console, err_console


@app.command("plan")
def plan_command(
    data: Path = typer.Argument(..., help="Prepared data folder (from `textseg prep`)."),
    method: str = typer.Option("mcnet", "--method", "-m", help="The method you will train (its network, streams "
                               "and optimiser are what the trial steps measure)."),
    device: Optional[str] = typer.Option(None, "--device", help="cpu, cuda, cuda:1 ... (default: CUDA when "
                                         "available), the device you will train on."),
    budget_min: float = typer.Option(60.0, "--budget-min", help="Minutes the training may take, validation "
                                     "included."),
    out: Path = typer.Option(Path("plan.yaml"), "--out", "-o", help="The config YAML to write (pass it to "
                             "`textseg train --config`)."),
    json_out: Optional[Path] = typer.Option(None, "--json", help="Also write the full record (fingerprint, "
                                            "measurements, reasons) as JSON."),
    memory_gb: Optional[float] = typer.Option(None, "--memory-gb", help="Memory a training step may take "
                                              "(default: 85 % of the free GPU memory; on a CPU half the available "
                                              "RAM less the preloaded cases)."),
    s_per_it: Optional[float] = typer.Option(None, "--s-per-it", help="Seconds per iteration measured before "
                                             "(a previous plan, `textseg bench`): skips the timed trial steps."),
    s_per_val_case: Optional[float] = typer.Option(None, "--s-per-val-case", help="Seconds to validate one case, "
                                                   "measured before: skips the timed forward pass."),
    min_iterations: int = typer.Option(500, "--min-iterations", help="When fewer iterations of the largest patch "
                                       "that fits in memory fit the budget, shrink the patch (not below 4 network "
                                       "multiples a side, 64 for the V-Net) until this many do; 0: largest patch."),
    threads: Optional[int] = typer.Option(None, "--threads", help="CPU threads for torch, as you will pass to "
                                          "`train --threads`."),
    force: bool = typer.Option(False, "--force", help="Overwrite an existing --out / --json file."),
) -> None:
    """Plan a training on your prepared data: a fingerprint of the data (spacing, shapes, foreground intensities
    and sizes) gives the target spacing and the patch; trial steps of the method on the device give the patch and
    batch that fit its memory and the seconds per iteration; the time budget gives iterations and validation
    interval. Writes a config YAML for `train --config` and prints each value with its reason."""
    from textseg_cli.experiments.plan import (  # lazy: keeps `textseg --help` torch-free
        make_plan,
        plan_table,
        write_plan,
    )
    from textseg_cli.storage.outputs import guard_output_file  # lazy: keeps `textseg --help` torch-free

    guard_output_file(out, force)  # refused before minutes of trial steps, not after
    if json_out is not None:
        guard_output_file(json_out, force)
    plan = make_plan(data, method=method, device=device, budget_min=budget_min, s_per_it=s_per_it,
                     s_per_val_case=s_per_val_case, memory_gb=memory_gb, threads=threads,
                     min_iterations=min_iterations,
                     log=lambda msg: err_console.print(f"[dim]{msg}[/]", highlight=False))
    written = write_plan(plan, out, json_out, force=force)
    console.print(plan_table(plan))
    console.print(f"plan written to {written}: textseg train --method {method} --data {data} --config {written}",
                  highlight=False, soft_wrap=True)
