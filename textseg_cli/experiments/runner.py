"""Running an experiment: each run = `engine.setup.train` (or its resume) + `evaluation.run.evaluate_run`, restartable.

State of a run (OUT/status/<id>__<run>.json plus the run folder):
- done: finished and evaluated with the current budget → skipped;
- partial: a run folder with checkpoints/last.pt (killed, interrupted, failed later) → resumed from it;
- started: a run folder without a checkpoint → started again from scratch;
- failed: the last attempt raised (reported; tried again on the next `experiment run`);
- pending: nothing yet.
`execute_run` is the whole of one run whichever launcher calls it (in-process, a subprocess per GPU,
a submitit job), so a run never depends on how it was started.
"""

from __future__ import annotations

import datetime as _dt
import os
import socket
import traceback
from dataclasses import dataclass, field
from pathlib import Path

from textseg_cli.engine.setup import train
from textseg_cli.errors import TextsegError
from textseg_cli.evaluation.run import evaluate_run
from textseg_cli.experiments.spec import Experiment, Run, load_experiment, run_lcc
from textseg_cli.runs.config import load_config
from textseg_cli.storage.files import atomic_write_json, read_json
from textseg_cli.storage.outputs import check_no_links_below


class RunFailed(TextsegError):
    """One run of an experiment raised; the message names the run and the error."""


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def status_path(exp: Experiment, run: Run) -> Path:
    return exp.out / "status" / run.status_name


def read_status(exp: Experiment, run: Run) -> dict:
    p = status_path(exp, run)
    try:
        return read_json(p) if p.exists() else {}
    except TextsegError:
        return {}  # a torn status file: the run folder decides


def run_state(exp: Experiment, run: Run) -> str:
    st = read_status(exp, run)
    if (st.get("state") == "done" and st.get("target_iterations") == run.iterations
            and (exp.eval_dir(run) / "meta.json").exists() and st.get("eval_dir") == str(exp.eval_dir(run))):
        return "done"
    if (run.dir / "checkpoints" / "last.pt").exists() and (run.dir / "config.yaml").exists():
        return "partial"
    if st.get("state") == "failed":
        return "failed"
    if run.dir.exists():
        return "started"
    return "pending"


def _write_status(exp: Experiment, run: Run, **fields) -> dict:
    st = read_status(exp, run)
    st.update(fields, run=run.key, method=run.entry.method, name=run.entry.name, labeled=run.labeled,
              seed=run.seed, run_dir=str(run.dir), target_iterations=run.iterations,
              **({} if run.fold is None else {"fold": run.fold}))
    atomic_write_json(status_path(exp, run), st)
    return st


def run_one(exp: Experiment, run: Run, *, launcher: str = "local", quiet: bool = False) -> str:
    """Train (or resume) and evaluate one run; returns "skipped" or "done". KeyboardInterrupt marks it
    interrupted and propagates; any other error marks it failed and raises RunFailed."""
    check_no_links_below(exp.out, run.dir)  # a link at OUT/runs/<id> would carry the run's writes outside OUT
    state = run_state(exp, run)
    if state == "done":
        return "skipped"
    attempts = int(read_status(exp, run).get("attempts") or 0) + 1
    _write_status(exp, run, state="running", started=_now(), pid=os.getpid(), host=socket.gethostname(),
                  launcher=launcher, attempts=attempts, resumed=state == "partial", error=None,
                  cuda_visible_devices=os.environ.get("CUDA_VISIBLE_DEVICES"))
    try:
        if state == "partial":
            train(out=run.dir, resume=True, iterations=run.iterations, device=exp.device, quiet=quiet,
                      threads=exp.threads)
        else:
            train(run.entry.method, exp.data, labeled=run.labeled, iterations=run.iterations, out=run.dir,
                      seed=run.seed, device=exp.device, force=run.dir.exists(), sets=fold_sets(run),
                      config=run.entry.config or None, quiet=quiet, threads=exp.threads)
        cfg = load_config(run.dir / "config.yaml")
        lcc = run_lcc(exp, run, cfg)
        evaluate_run(run.dir, split=exp.eval["split"], checkpoint=exp.checkpoint(),
                         inference=exp.eval["inference"], out=exp.eval_dir(run), lcc=lcc,
                         spacing_mm=bool(exp.eval["spacing_mm"]), empty_policy=exp.eval["empty_policy"], force=True,
                         device=exp.device, name=run.entry.name)
    except KeyboardInterrupt:
        _write_status(exp, run, state="interrupted", stopped=_now())
        raise
    except Exception as exc:
        msg = f"{type(exc).__name__}: {exc}"
        _write_status(exp, run, state="failed", stopped=_now(), error=msg,
                      traceback=traceback.format_exc(limit=8))
        raise RunFailed(f"run {run.key} failed: {msg}") from exc
    _write_status(exp, run, state="done", finished=_now(), eval_dir=str(exp.eval_dir(run)), lcc=lcc,
                  iterations=int(cfg["train"]["iterations"]))
    return "done"


def fold_sets(run: Run) -> list[str]:
    """The run's `--set` overrides, plus `data.fold=k` for a run of the fold axis (as `textseg train --fold k`)."""
    return list(run.entry.sets) + ([] if run.fold is None else [f"data.fold={run.fold}"])


def find_run(exp: Experiment, key: str) -> Run:
    for run in exp.runs():
        if run.key == key:
            return run
    raise RunFailed(f"no run {key!r} in {exp.path}")


def execute_run(spec: str, key: str, launcher: str = "local", quiet: bool = True) -> str:
    """One run by its key (`<id>/<labeled>L_s<seed>`) of the experiment file `spec`: the entry point of
    every launcher (subprocess per GPU, submitit job)."""
    exp = load_experiment(spec)
    return run_one(exp, find_run(exp, key), launcher=launcher, quiet=quiet)


@dataclass
class Outcome:
    done: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)
    not_started: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.failed


def run_sequential(exp: Experiment, runs: list[Run], *, fail_fast: bool = False, quiet: bool = False,
                   log=print) -> Outcome:
    out = Outcome()
    for i, run in enumerate(runs):
        state = run_state(exp, run)
        if state == "done":
            out.skipped.append(run.key)
            continue
        fold = "" if run.fold is None else f", fold {run.fold}"
        log(f"run {i + 1}/{len(runs)}: {run.key} ({run.entry.name}, {run.labeled} labeled, seed {run.seed}{fold}; "
            f"{ {'partial': 'resuming', 'failed': 'retrying', 'started': 'restarting'}.get(state, 'starting') })")
        try:
            run_one(exp, run, quiet=quiet)
            out.done.append(run.key)
        except RunFailed as exc:
            out.failed[run.key] = str(exc)
            log(f"FAILED {exc}")
            if fail_fast:
                out.not_started = [r.key for r in runs[i + 1:] if run_state(exp, r) != "done"]
                break
    return out
