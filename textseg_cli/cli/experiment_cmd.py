"""`textseg experiment run|table|preset`: a paper's results table from one experiment file."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import List, Optional

import typer

from textseg_cli.cli import app
from textseg_cli.console import console
from textseg_cli.errors import ConfigError

experiment_app = typer.Typer(help="Method x labeled x seed grids: run them (restartable, multi-GPU, Slurm), "
                                  "tabulate mean ± SD over seeds, write the papers' presets.",
                             no_args_is_help=True)
app.add_typer(experiment_app, name="experiment")


@experiment_app.command("run")
def run_command(
    spec: Path = typer.Argument(..., metavar="EXP.yaml", help="The experiment file (see docs/experiments.md)."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Print the runs, their settings and commands, and an "
                                                          "estimate of the time from a short bench; run nothing."),
    estimate: bool = typer.Option(False, "--estimate/--no-estimate", help="--dry-run: also bench each method for a "
                                                                           "time estimate (minutes on a CPU; cached "
                                                                           "per method, patch, device, precision)."),
    fail_fast: bool = typer.Option(False, "--fail-fast", help="Stop at the first failed run (default: report it "
                                                              "and go on)."),
    gpus: Optional[str] = typer.Option(None, "--gpus", help="Run one run per GPU concurrently, e.g. 0,1,2,3 (each "
                                                            "process sees only its GPU)."),
    launcher: str = typer.Option("local", "--launcher", help="local (this machine), slurm (one submitit job per "
                                                             "run) or submitit-local (the same jobs, run here)."),
    slurm_partition: Optional[str] = typer.Option(None, "--slurm-partition", help="Slurm partition."),
    slurm_time: int = typer.Option(24 * 60, "--slurm-time", help="Time limit per job in minutes."),
    slurm_gpus: int = typer.Option(1, "--slurm-gpus", help="GPUs per job."),
    slurm_cpus: Optional[int] = typer.Option(None, "--slurm-cpus", help="CPUs per job."),
    wait: bool = typer.Option(True, "--wait/--no-wait", help="slurm: wait for the jobs and report them (default) or "
                                                             "submit and return."),
    only: Optional[List[str]] = typer.Option(None, "--only", help="Only this run (ID/NL_sSEED, as --dry-run lists "
                                                                  "them); repeatable."),
    quiet: bool = typer.Option(False, "--quiet", help="No per-run training progress."),
) -> int:
    """Train and evaluate every method x labeled x seed of EXP.yaml; finished runs are skipped, interrupted
    ones resumed, failed ones reported (exit code 1) without stopping the rest.

    \b
    textseg experiment run exp.yaml --dry-run
    textseg experiment run exp.yaml --gpus 0,1,2,3
    textseg experiment run exp.yaml --launcher slurm --slurm-partition gpu --slurm-time 720
    """
    from textseg_cli.experiments.experiment import run_experiment  # lazy: keeps `textseg --help` torch-free

    result = run_experiment(spec, dry_run=dry_run, fail_fast=fail_fast, gpus=gpus, launcher=launcher,
                            only=only or (), estimate_time=estimate, slurm_partition=slurm_partition,
                            slurm_time_min=slurm_time, slurm_gpus=slurm_gpus, slurm_cpus=slurm_cpus, wait=wait,
                            quiet=quiet)
    if dry_run:
        return 0
    if not result.ok:
        raise typer.Exit(1)
    return 0


@experiment_app.command("table")
def table_command(
    spec: Path = typer.Argument(..., metavar="EXP", help="The experiment file or its output folder."),
    table: str = typer.Option("md", "--table", help="md, csv (per-seed rows + mean rows) or latex (paste-ready)."),
    published: bool = typer.Option(False, "--published", help="Add the published Dice of each method (its config's "
                                                              "`published:` block) and the difference."),
    reference: Optional[str] = typer.Option(None, "--reference", help="Wilcoxon reference method (its name or "
                                                                      "id; default: the file's, else the first)."),
    out: Optional[Path] = typer.Option(None, "--out", help="Write the table to this file too."),
    force: bool = typer.Option(False, "--force", help="Overwrite --out."),
) -> None:
    """Rows = method x labeled count; cells = mean ± SD over seeds of the per-run means over cases."""
    from textseg_cli.experiments.table import experiment_table  # lazy: keeps `textseg --help` torch-free

    text = experiment_table(spec, table=table, published=published, out=out, force=force, reference=reference)
    console.print(text, markup=False, highlight=False, soft_wrap=True)


@experiment_app.command("preset")
def preset_command(
    name: str = typer.Argument(..., help="la, pancreas, brats or monuseg."),
    out: Optional[Path] = typer.Option(None, "--out", help="The experiment file to write (e.g. la.yaml)."),
    data: Optional[str] = typer.Option(None, "--data", help="The prepared data folder (default prepared/NAME)."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Show the grid (runs, official settings, commands) "
                                                          "instead of writing it."),
    estimate: bool = typer.Option(False, "--estimate/--no-estimate", help="--dry-run: bench each method for a time "
                                                                           "estimate (slow on a CPU)."),
    force: bool = typer.Option(False, "--force", help="Overwrite --out."),
) -> None:
    """Write the grid of a paper's table: its methods, 10 % and 20 % labeled (LA: 8 and 16), 3 seeds, each
    method's official patch, stride, schedule and evaluation."""
    from textseg_cli.experiments.experiment import run_experiment  # lazy: keeps `textseg --help` torch-free
    from textseg_cli.experiments.presets import write_preset  # lazy: keeps `textseg --help` torch-free


    if dry_run:
        with tempfile.TemporaryDirectory() as tmp:
            # paths as `preset --out NAME.yaml` here would write them
            path = write_preset(name, Path(tmp) / f"{name}.yaml", data=str(Path(data or f"prepared/{name}").resolve()),
                                out_dir=str(Path.cwd() / name))
            run_experiment(path, dry_run=True, estimate_time=estimate)
        return
    if out is None:
        raise ConfigError("--out EXP.yaml is required (or --dry-run to preview)")
    path = write_preset(name, out, data=data, force=force)
    console.print(f"[green]wrote[/] {path}; preview with `textseg experiment run {path} --dry-run`", highlight=False,
                  soft_wrap=True)
