"""`train()`: resolve the config and run folder, lock it, record the environment, run the loop."""

from __future__ import annotations

import contextlib
import datetime as _dt
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch

from textseg_cli.console import console, err_console
from textseg_cli.data.prepared import load_prepared
from textseg_cli.data.splits import apply_fold
from textseg_cli.engine.distributed import (
    Dist,
    barrier,
    dist_from_env,
    init_process_group,
    shutdown_process_group,
)
from textseg_cli.engine.loop import Trainer, TrainResult
from textseg_cli.engine.stopping import write_summary
from textseg_cli.errors import ConfigError, DataError
from textseg_cli.models.registry import count_parameters
from textseg_cli.runs.bundle import snapshot_run_inputs
from textseg_cli.runs.cases import RunCases, write_cases
from textseg_cli.runs.checks import check_run_config, check_run_length
from textseg_cli.runs.config import build_config, load_config, save_config, selection_split
from textseg_cli.runtime.determinism import determinism_record
from textseg_cli.runtime.device import resolve_device
from textseg_cli.runtime.environment import environment_info
from textseg_cli.runtime.precision import inference_precision, training_precision
from textseg_cli.storage.files import atomic_write_json
from textseg_cli.storage.outputs import guarded_run_dir, refuse_existing_run


def train(method: str | None = None, data: str | Path | None = None, *, labeled: str | int | None = None,
          iterations: int | None = None, out: str | Path | None = None, seed: int | None = None,
          device: str | None = None, val_every: int | None = None, resume: bool = False,
          deterministic: bool = False, force: bool = False, sets: list[str] | tuple[str, ...] = (),
          config: str | Path | dict | None = None, quiet: bool = False, threads: int | None = None) -> TrainResult:
    """Train `method` on a prepared data folder; the Python API of `textseg train`.

    labeled: count ("8") or percentage ("10%") of splits.train taken from its head; the rest is
    unlabeled (labels never read). out: the run folder (default runs/<data>/<method>_<labeled>L_s<seed>).
    sets: overrides such as ["optim.lr=0.005", "train.batch_labeled=1"]. resume: continue RUN=out from
    checkpoints/last.pt (only `iterations` and `device` may change). Under `torchrun` each process trains
    with DistributedDataParallel and only rank 0 writes. threads: CPU threads for torch (default: torch's
    choice, all cores); set it when several runs share a CPU, or they slow each other down many times over.
    """
    if threads is not None:
        if threads < 1:
            raise ConfigError(f"--threads {threads}: expected at least 1")
        torch.set_num_threads(int(threads))
    if iterations is not None:  # --iterations 0 or -5: refused before any folder, also with --resume
        check_run_length({}, iterations)
    dist = dist_from_env()
    t0 = time.perf_counter()
    if resume:
        if out is None:
            raise ConfigError("--resume needs --out RUN_DIR (the run to continue)")
        if not (Path(out) / "config.yaml").is_file():
            raise ConfigError(f"--resume: {out} holds no run to continue (no config.yaml); start it without --resume")
        ignored = [f for f, v in (("--labeled", labeled), ("--seed", seed), ("--val-every", val_every),
                                  ("--set", list(sets)), ("--config", config), ("--data", data)) if v]
        if ignored:
            raise ConfigError(f"{', '.join(ignored)} cannot change a resumed run (only --iterations and --device "
                              "can); start a new run instead")
        run_dir = Path(out)
        cfg = load_config(run_dir / "config.yaml")
        if method is not None and method != cfg["method"]["name"]:
            raise ConfigError(f"--method {method} differs from the run's method {cfg['method']['name']}")
        if iterations is not None:
            cfg["train"]["iterations"] = int(iterations)
        ds = load_prepared(cfg["data"]["root"], check_files=False)
        last = run_dir / "checkpoints" / "last.pt"
        if not last.exists():
            raise DataError("no checkpoint to resume from", last)
    else:
        if method is None or data is None:
            raise ConfigError("--method and --data are required (or --resume --out RUN_DIR)")
        ds = load_prepared(data, check_files=False)  # the trainer checks the files it will read
        flags = {"data.labeled": None if labeled is None else str(labeled), "train.iterations": iterations,
                 "seed": seed, "val.every": val_every, "deterministic": True if deterministic else None}
        cfg = build_config(method, ds.name, ds.dim, ds.patch_size, user_config=config, flags=flags, sets=sets)
        check_run_config(cfg, build_config(method, ds.name, ds.dim, ds.patch_size))
        check_run_length(cfg, iterations)  # --set train.iterations=0, train.epochs=0, a --config file
        cfg["data"]["root"] = str(Path(data).resolve())
        if out is None:
            lab = str(cfg["data"]["labeled"] or "all").replace("%", "pct")
            fold = "" if cfg["data"].get("fold") is None else f"_f{cfg['data']['fold']}"
            out = Path("runs") / ds.name / f"{method.replace('+', '_plus')}_{lab}L_s{cfg['seed']}{fold}"
        run_dir = Path(out)
        # every rank checks, so a refused folder fails everywhere instead of hanging the others
        refuse_existing_run(run_dir, force)
        last = None
    apply_fold(ds, cfg["data"].get("fold"))  # `train --fold k`: fold k's train/val replace the splits

    if iterations is not None:  # an explicit --iterations sets the length, also of an epoch-based config
        cfg["train"]["epochs"] = None
    dev = resolve_device(device, local_rank=dist.local_rank if dist.enabled else None, bind=True)
    precision, val_precision = training_precision(cfg, dev), inference_precision(cfg, dev)  # once per run
    init_process_group(dist, dev)
    guard, ok = contextlib.ExitStack(), True
    try:
        if dist.main:  # lock (+ claim a new folder); a failed new run leaves nothing behind
            guard.enter_context(guarded_run_dir(run_dir, "train", new=not resume, force=force,
                                                sources=[] if resume else [cfg["data"]["root"]]))
        barrier(dist)
        trainer = Trainer(cfg, ds, run_dir, dev, dist, resume_from=last, quiet=quiet, precision=precision,
                          val_precision=val_precision)
        val = cfg["val"]
        if dist.main and not trainer.val_ids and (val["every"] or val["at_start"]) \
                and val["split"] in ds.spec["splits"]:  # (a missing split: the Trainer says so)
            err_console.print(f"warning: the '{val['split']}' split of {ds.root} is empty: training runs without "
                              "validation and writes no best.pt (eval and predict use last.pt); `textseg prep` gives "
                              "a set of 2 or more labelled cases at least one validation case", highlight=False,
                              markup=False, soft_wrap=True)
        if dist.main:
            (run_dir / "checkpoints").mkdir(parents=True, exist_ok=True)
            save_config(cfg, run_dir / "config.yaml")
            snapshot_run_inputs(run_dir, cfg, ds)  # RUN/prepared.json + RUN/text/: the run predicts after a move
            _write_env(run_dir, cfg, dev, dist, resume,
                       precision={"train": precision.record(), "validation": val_precision.record()})
            write_cases(run_dir, RunCases(trainer.labeled_ids, trainer.unlabeled_ids, trainer.unused_ids,
                                          selection_split(cfg), trainer.val_ids))
            if not quiet:
                _print_header(trainer, cfg, dev, dist)
        result = trainer.run()
        if dist.main:
            write_summary(run_dir, result, trainer.stop, trainer.max_iterations)
        result.seconds = time.perf_counter() - t0
        if dist.main and not quiet:
            best = "n/a" if result.best_metric is None else f"{result.best_metric:.4f} at iteration {result.best_iteration}"
            console.print(f"done: {result.iteration} iterations in {result.seconds:.1f} s; best validation Dice {best}; "
                          f"run folder {run_dir}" + (f"; {result.stop_reason}" if result.stop_reason else ""),
                          highlight=False)
        return result
    except BaseException as exc:
        ok = False
        guard.__exit__(type(exc), exc, exc.__traceback__)
        raise
    finally:
        guard.close()
        if dist.enabled:
            shutdown_process_group(ok)


def _write_env(run_dir: Path, cfg: dict[str, Any], dev: torch.device, dist: Dist, resume: bool,
               precision: dict[str, Any] | None = None) -> None:
    path = run_dir / "env.json"
    env = json.loads(path.read_text(encoding="utf-8")) if (resume and path.exists()) else {"sessions": []}
    info = environment_info()
    info.update({"device": str(dev), "world_size": dist.world_size, "seed": cfg["seed"],
                 "deterministic": cfg["deterministic"], "resumed": resume, "argv": sys.argv,
                 "started": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
                 "torch_threads": torch.get_num_threads()})
    if precision is not None:
        info["precision"] = precision
    info.update(determinism_record(bool(cfg["deterministic"])))
    if dev.type == "cuda":
        info["gpus"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    env["sessions"].append(info)
    env.update({k: v for k, v in info.items() if k != "argv"})
    atomic_write_json(path, env)


def _print_header(tr: Trainer, cfg: dict[str, Any], dev: torch.device, dist: Dist) -> None:
    d, t = cfg["data"], cfg["train"]
    console.print(
        f"[bold]{cfg['method']['name']}[/] on {tr.ds.name}: {len(tr.labeled_ids)} labeled{tr.labeled_note}, "
        f"{len(tr.unlabeled_ids)} unlabeled, {len(tr.val_ids)} validation cases; patch {d['patch_size']}, "
        f"batch {t['batch_labeled']}+{t['batch_unlabeled'] if tr.unlabeled_ids else 0}"
        f"{f' ×{dist.world_size} processes' if dist.enabled else ''}; {t['iterations']} iterations on {dev}"
        f"{' (bf16)' if tr.amp else ''}; {count_parameters(tr.method, trainable_only=True):,} trainable parameters; "
        f"run folder {tr.run_dir}", highlight=False)
    if tr.iteration:
        console.print(f"resuming at iteration {tr.iteration}", highlight=False)
