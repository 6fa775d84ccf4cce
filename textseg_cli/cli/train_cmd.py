"""`textseg train`: train a registered method on a prepared data set (single process or under torchrun)."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from textseg_cli.cli import app
from textseg_cli.console import console


@app.command("train", context_settings={"help_option_names": ["-h", "--help"]})
def train_command(
    method: Optional[str] = typer.Option(None, "--method", "-m", help="Method name (see `textseg models`), "
                                         "e.g. sup, mcnet, mcnet+."),
    data: Optional[Path] = typer.Option(None, "--data", "-d", help="Prepared data folder (from `textseg prep`)."),
    labeled: Optional[str] = typer.Option(None, "--labeled", "-l",
                                          help="Labeled cases: a count (8) or a percentage (10%) of splits.train, "
                                               "taken from its head; the rest is used unlabeled. Default: all."),
    iterations: Optional[int] = typer.Option(None, "--iterations", "-n", help="Training iterations (overrides "
                                             "the method config; with --resume, extends the run)."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Run folder. Default: "
                                       "runs/<data>/<method>_<labeled>L_s<seed>."),
    seed: Optional[int] = typer.Option(None, "--seed", help="Seed for python, numpy, torch and sampling."),
    device: Optional[str] = typer.Option(None, "--device", help="cpu, cuda, cuda:1 ... Default: CUDA when "
                                         "available."),
    val_every: Optional[int] = typer.Option(None, "--val-every", help="Validate every N iterations on the "
                                            "validation split (0 = off)."),
    resume: bool = typer.Option(False, "--resume", help="Continue the run in --out from checkpoints/last.pt "
                                "(model, optimiser, schedule, RNG and sampler state)."),
    deterministic: bool = typer.Option(False, "--deterministic", help="Deterministic kernels (slower)."),
    force: bool = typer.Option(False, "--force", help="Overwrite a non-empty --out folder."),
    sets: Optional[List[str]] = typer.Option(None, "--set", help="Override any config key, e.g. "
                                             "--set optim.lr=0.005 --set train.batch_labeled=1 (repeatable)."),
    config: Optional[Path] = typer.Option(None, "--config", help="Extra YAML merged over the packaged method "
                                          "config (before --set)."),
    print_config: bool = typer.Option(False, "--print-config", help="Print the resolved config and exit."),
) -> None:
    """Train a method; writes RUN/config.yaml, env.json, log.csv and checkpoints/{last,best}.pt.

    Checkpoints are selected on the validation split only. Ctrl-C saves a checkpoint; continue with
    --resume. Multi-GPU: torchrun --nproc_per_node=N $(which textseg) train ... (batch sizes are per process).
    """
    if print_config:
        import yaml

        from textseg_cli.data.prepared import load_prepared
        from textseg_cli.engine.config import build_config
        from textseg_cli.errors import ConfigError

        if method is None or data is None:
            raise ConfigError("--print-config needs --method and --data")
        ds = load_prepared(data)
        flags = {"data.labeled": labeled, "train.iterations": iterations, "seed": seed, "val.every": val_every,
                 "deterministic": True if deterministic else None}
        cfg = build_config(method, ds.name, ds.dim, ds.patch_size, user_config=config, flags=flags, sets=sets or [])
        cfg["data"]["root"] = str(data.resolve())
        console.print(yaml.safe_dump(cfg, sort_keys=False, default_flow_style=None), highlight=False, markup=False)
        return
    from textseg_cli.engine import train

    train(method, data, labeled=labeled, iterations=iterations, out=out, seed=seed, device=device,
          val_every=val_every, resume=resume, deterministic=deterministic, force=force, sets=sets or [],
          config=config)
