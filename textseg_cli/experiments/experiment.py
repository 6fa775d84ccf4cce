"""`textseg experiment run`: expand the grid, show the plan (--dry-run, with a time estimate), run it."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
import yaml

from textseg_cli import __version__
from textseg_cli.bench.benchmark import run_benchmark
from textseg_cli.console import console
from textseg_cli.data.prepared import load_prepared
from textseg_cli.errors import ConfigError, DataError, TextsegError
from textseg_cli.experiments.launch import parse_gpus, run_on_gpus, run_with_submitit
from textseg_cli.experiments.runner import Outcome, run_sequential, run_state
from textseg_cli.experiments.spec import (
    SPEC_COPY,
    Experiment,
    Run,
    commands,
    frozen_copy,
    load_experiment,
    resolved_config,
    run_lcc,
)
from textseg_cli.experiments.table import published_numbers
from textseg_cli.runs.checks import check_run_length
from textseg_cli.runtime.device import resolve_device
from textseg_cli.runtime.environment import default_cache_root, hardware_name
from textseg_cli.storage.files import atomic_write_json, atomic_write_text

LAUNCHERS = ("local", "slurm", "submitit-local")


def _dataset(exp: Experiment, required: bool):
    if exp.data is None or not (exp.data / "dataset.json").exists():
        if required:
            raise DataError("prepared data not found (the experiment's `data:`)", exp.data or exp.path)
        return None
    return load_prepared(exp.data, check_files=False)


def official_settings(cfg: dict) -> dict[str, Any]:
    """What a reader checks against a paper: patch, stride, schedule, batch and evaluation of a resolved config."""
    m, o, t, inf = cfg.get("method") or {}, cfg["optim"], cfg["train"], cfg["inference"]
    sched = o["schedule"] + (f" x{o['step_gamma']}/{o['step_size']}" if o["schedule"] == "step" else "")
    return {"patch": "x".join(map(str, cfg["data"]["patch_size"] or [])) or "data's",
            "stride": "x".join(map(str, inf.get("stride") or [])) or "half patch",
            "iterations": t["iterations"], "batch": f"{t['batch_labeled']}+{t['batch_unlabeled']}",
            "optim": f"{o['name']} {o['lr']:g} {sched}", "inference": inf.get("mode") or "sliding",
            "decoder": m.get("eval_decoder", inf.get("decoder")), "augment": "+".join(
                k for k, v in (cfg["data"].get("augment") or {}).items() if v) or "crop only"}


def plan(exp: Experiment, runs: Sequence[Run], ds=None) -> list[dict[str, Any]]:
    rows = []
    for run in runs:
        cfg = resolved_config(exp, run, ds)
        lcc = run_lcc(exp, run, cfg)
        train_cmd, eval_cmd = commands(exp, run, lcc)
        rows.append({"run": run, "cfg": cfg, "state": run_state(exp, run), "lcc": lcc, "train": train_cmd,
                     "eval": eval_cmd, **official_settings(cfg)})
    return rows


def estimate(exp: Experiment, rows: list[dict], ds=None, device: str | None = None, bench_iterations: int = 2,
             log: Callable[[str], None] = lambda s: None) -> dict[str, Any]:
    """Seconds per run from a short `bench` of each method (training s/it × iterations + sliding-window
    inference × the validations and the final evaluation). An estimate: data loading, logging and
    checkpointing are not timed."""


    dev = "cuda" if resolve_device(device).type == "cuda" else "cpu"
    n_val = n_eval = None
    if ds is not None:
        n_val = len(ds.split(rows[0]["cfg"]["val"]["split"])) if rows else None
        n_eval = len(ds.split(exp.eval["split"]))
    per_method: dict[str, dict] = {}
    n_methods = len({r["run"].entry.id for r in rows})
    for row in rows:
        run, cfg = row["run"], row["cfg"]
        key = run.entry.id
        if key not in per_method:
            patch = cfg["data"]["patch_size"]
            vol = tuple(int(round(p * 1.25)) for p in patch)  # a volume a little larger than the patch
            sets = list(run.entry.sets) + ([f"data.profile={cfg['data']['profile'] or exp.dataset or ''}"]
                                           if (cfg["data"].get("profile") or exp.dataset) else [])
            kwargs = dict(patch=patch, batch=(cfg["train"]["batch_labeled"], max(0, cfg["train"]["batch_unlabeled"])),
                          iterations=bench_iterations, repeats=1, device=dev, volume=vol,
                          stride=cfg["inference"]["stride"], sw_batch_size=cfg["inference"]["sw_batch_size"],
                          in_channels=ds.in_channels if ds is not None else 1,
                          num_classes=ds.num_classes if ds is not None else 2,
                          inference_modes=(cfg["inference"].get("mode") or "sliding",), sets=sets,
                          feature_cache="on")
            cache = _bench_cache_path(run.entry.method, kwargs, cfg)
            cached = _read_cached(cache)
            if cached is not None:
                log(f"bench {run.entry.method}: cached ({cache.name}; delete {cache.parent} to re-measure)")
                per_method[key] = cached
            else:
                log(f"bench {run.entry.method} on {dev} ({len(per_method) + 1}/{n_methods}): patch {patch}, "
                    f"batch {row['batch']} ...")
                res = run_benchmark(run.entry.method, **kwargs)["results"][0]
                per_method[key] = {"s_per_it": res.get("train_s_per_it"),
                                   "s_per_volume": res.get(f"{cfg['inference'].get('mode') or 'sliding'}_s"),
                                   "device_name": res.get("device_name")}
                with contextlib.suppress(OSError):
                    atomic_write_json(cache, per_method[key])
        b = per_method[key]
        its = int(cfg["train"]["iterations"])
        every = int(cfg["val"]["every"] or 0)
        n_validations = (its // every if every else 0) + 1
        infer = b["s_per_volume"] or 0.0
        seconds = its * (b["s_per_it"] or 0.0)
        if n_val is not None:
            seconds += n_validations * min(n_val, cfg["val"].get("max_cases") or n_val) * infer
        if n_eval is not None:
            seconds += n_eval * infer
        row["estimate_s"] = seconds
    total = sum(r.get("estimate_s", 0.0) for r in rows if r["state"] != "done")
    return {"device": dev, "per_method": per_method, "total_s": total,
            "device_name": next(iter(per_method.values()))["device_name"] if per_method else None,
            "includes_eval": n_val is not None}


def _bench_cache_path(method: str, kwargs: dict, cfg: dict) -> Path:
    """$TEXTSEG_CACHE/bench/<key>.json: one bench result per (method, patch, batch, device, precision, settings,
    textseg and torch version, CPU/GPU model), so a second --dry-run --estimate prints at once."""
    key = {"method": method, **{k: (list(v) if isinstance(v, tuple) else v) for k, v in kwargs.items()},
           "precision": (cfg.get("train") or {}).get("precision"), "textseg": __version__, "torch": torch.__version__,
           "hardware": hardware_name(kwargs["device"]), "cpu_bf16": os.environ.get("TEXTSEG_CPU_BF16")}
    digest = hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:24]
    return default_cache_root() / "bench" / f"{method}-{digest}.json"


def _read_cached(path: Path) -> dict | None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    ok = isinstance(data, dict) and all(isinstance(data.get(k), (int, float, type(None))) for k in
                                        ("s_per_it", "s_per_volume"))
    return data if ok else None


def _hours(s: float) -> str:
    return f"{s / 3600:.1f} h" if s >= 3600 else f"{s / 60:.1f} min"


def print_plan(exp: Experiment, rows: list[dict], est: dict | None, gpus: int = 1) -> None:

    def say(text: str) -> None:
        console.print(text, markup=False, highlight=False, soft_wrap=True)

    say(f"experiment {exp.name}: {len(exp.methods)} method(s) x {len(exp.labeled)} labeled "
        f"({', '.join(exp.labeled)}) x {len(exp.seeds)} seed(s) ({', '.join(map(str, exp.seeds))})"
        + (f" x {len(exp.folds)} fold(s) ({', '.join(map(str, exp.folds))})" if exp.folds else "")
        + f" = {len(rows)} runs -> {exp.out}")
    say(f"evaluation: split {exp.eval['split']}, checkpoint {exp.eval['checkpoint']}, LCC {exp.eval['lcc']}, "
        f"empty-mask policy {exp.eval['empty_policy']}, distances in {'mm' if exp.eval['spacing_mm'] else 'voxels'}")
    say("settings per method (its packaged config under this data set's profile, plus the file's overrides):")
    seen = set()
    for r in rows:
        e = r["run"].entry
        if e.id in seen:
            continue
        seen.add(e.id)
        say(f"  {e.name} [{e.method}]: patch {r['patch']}, stride {r['stride']}, {r['iterations']} iterations, "
            f"batch {r['batch']}, {r['optim']}, augment {r['augment']}, inference {r['inference']}, decoder "
            f"{r['decoder']}, LCC {'on' if r['lcc'] else 'off'}" + (f", set {' '.join(e.sets)}" if e.sets else ""))
        pubs = [(lab, published_numbers(e, exp.dataset, lab)) for lab in exp.labeled]
        known = [(lab, p) for lab, p in pubs if p]
        if known:
            say("    published: " + "; ".join(
                f"{lab} labeled " + " / ".join(f"{p[k]:g}" for k in ("dice", "jaccard", "hd95", "asd") if k in p)
                for lab, p in known) + " (Dice / Jaccard / 95HD / ASD"
                + (f"; none for {', '.join(lab for lab, p in pubs if not p)}" if len(known) < len(pubs) else "")
                + f"; {'; '.join(sorted({p['source'] for _, p in known}))})")
    say("runs (state; each run = the train and eval commands below it):")
    for r in rows:
        run = r["run"]
        fold = "" if run.fold is None else f", fold {run.fold}"
        say(f"  {run.key}  {run.entry.name}, {run.labeled} labeled, seed {run.seed}{fold}: {r['state']}")
        say(f"    {r['train']}")
        say(f"    {r['eval']}")
    if est:
        print_estimate(rows, est, gpus)


def print_estimate(rows: list[dict], est: dict, gpus: int = 1) -> None:
    """Per-run estimates and the total, after the plan (the bench behind them can take minutes on a CPU)."""

    def say(text: str) -> None:
        console.print(text, markup=False, highlight=False, soft_wrap=True)

    for r in rows:
        say(f"  {r['run'].key}: estimate {_hours(r['estimate_s'])} ({r['state']})")
    todo = sum(1 for r in rows if r["state"] != "done")
    scope = ("training + validation + evaluation" if est["includes_eval"] else
             "training and inference speed only (no prepared data found, so validation/evaluation counts are "
             "left out)")
    say(f"ESTIMATE, not a measurement (from a short bench of each method on {est['device']}: "
        f"{est['device_name']}; inference timed on a volume 1.25x the patch): {_hours(est['total_s'])} of "
        f"{est['device'].upper()} time for the {todo} unfinished run(s), {scope}"
        + (f"; about {_hours(est['total_s'] / gpus)} wall-clock on {gpus} GPUs" if gpus > 1 else "") + ".")


def write_frozen_copy(exp: Experiment) -> Path:

    path = exp.out / SPEC_COPY
    text = yaml.safe_dump(frozen_copy(exp), sort_keys=False, allow_unicode=True)
    if not path.exists() or path.read_text(encoding="utf-8") != text:
        exp.out.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, text)
    return path


def run_experiment(spec: str | Path, *, dry_run: bool = False, fail_fast: bool = False, gpus: str | None = None,
                   launcher: str = "local", only: Sequence[str] = (), estimate_time: bool = False,
                   bench_iterations: int = 2, slurm_partition: str | None = None, slurm_time_min: int = 24 * 60,
                   slurm_gpus: int = 1, slurm_cpus: int | None = None, wait: bool = True, quiet: bool = False,
                   log: Callable[[str], None] | None = None) -> Outcome | list[dict]:
    """Run (or with `dry_run` show) an experiment file: every method × labeled × seed, skipping finished
    runs, resuming interrupted ones, reporting failed ones (stopping at the first with `fail_fast`).

    `gpus` ("0,1,2,3"): one run per GPU at a time, each in its own process seeing only that GPU.
    `launcher` "slurm" submits each run as a Slurm job through submitit; "submitit-local" runs the same
    jobs on this machine (submitit's local executor). Returns the Outcome (the plan rows when dry_run)."""
    log = log or (lambda s: console.print(s, markup=False, highlight=False, soft_wrap=True))
    if launcher not in LAUNCHERS:
        raise ConfigError(f"--launcher {launcher!r}: expected one of {', '.join(LAUNCHERS)}")
    if gpus and launcher != "local":
        raise ConfigError("--gpus applies to the local launcher; with --launcher slurm use --slurm-gpus")
    gpu_ids = parse_gpus(gpus, check=not dry_run) if gpus else None  # GPUs not visible: refused before any write
    exp = load_experiment(spec)
    runs = exp.runs()
    if only:
        keys = {r.key for r in runs}
        bad = [k for k in only if k not in keys]
        if bad:
            raise ConfigError(f"--only {bad[0]!r}: not a run of this experiment (e.g. {runs[0].key})")
        runs = [r for r in runs if r.key in set(only)]
    ds = _dataset(exp, required=not dry_run)
    exp.check_folds(ds)  # `folds:` on a set without (enough) folds: refused before any write
    for r in runs:  # a run of 0 iterations (`iterations: 0`, a method's set/config) is refused before any write
        try:
            cfg = resolved_config(exp, r, ds)
        except TextsegError:
            continue  # any other bad setting fails that run when it starts, and the others go on
        try:
            check_run_length(cfg, r.iterations, option="iterations")
        except ConfigError as exc:
            raise ConfigError(f"run {r.key}: {exc.args[0]}", exp.path) from None
    if dry_run:  # the plan at once; the estimate (a bench per method, cached) only when asked
        rows = plan(exp, runs, ds)
        n_gpus = len(gpu_ids) if gpu_ids else 1
        print_plan(exp, rows, None, n_gpus)
        if estimate_time:
            est = estimate(exp, rows, ds, exp.device, bench_iterations, log)
            print_estimate(rows, est, n_gpus)
        return rows
    write_frozen_copy(exp)
    if launcher != "local":
        outcome = run_with_submitit(exp, runs, launcher, partition=slurm_partition, time_min=slurm_time_min,
                                    gpus_per_run=slurm_gpus, cpus_per_run=slurm_cpus, wait=wait,
                                    fail_fast=fail_fast, log=log)
    elif gpus:
        outcome = run_on_gpus(exp, runs, gpu_ids, fail_fast=fail_fast, log=log)
    else:
        outcome = run_sequential(exp, runs, fail_fast=fail_fast, quiet=quiet, log=log)
    log(f"experiment {exp.name}: {len(outcome.done)} run(s) done, {len(outcome.skipped)} already finished (skipped), "
        f"{len(outcome.failed)} failed" + (f", {len(outcome.not_started)} not started/waiting"
                                           if outcome.not_started else ""))
    for key, msg in outcome.failed.items():
        log(f"  failed: {msg}")
    return outcome
