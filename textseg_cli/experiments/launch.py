"""Launchers: one run per GPU in subprocesses (`--gpus 0,1,..`), or one job per run through submitit
(`--launcher slurm`; `submitit-local` runs the same jobs on this machine). Each launches
`runner.execute_run`, so a run is the same whichever launcher started it."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Sequence

import torch

from textseg_cli.errors import ConfigError
from textseg_cli.experiments.runner import Outcome, execute_run, run_state
from textseg_cli.experiments.spec import SPEC_COPY, Experiment, Run


def parse_gpus(text: str, check: bool = True) -> list[str]:
    """`--gpus 0,1` -> ["0", "1"]; with `check`, refused unless this process sees each of those GPUs."""
    ids = [g.strip() for g in str(text).split(",") if g.strip()]
    if not ids or not all(g.isdigit() for g in ids) or len(set(ids)) != len(ids):
        raise ConfigError(f"--gpus {text!r}: expected distinct GPU indices such as 0,1,2,3")
    if check:
        check_gpus(ids)
    return ids


def check_gpus(ids: Sequence[str]) -> None:
    """Refuse GPU indices this process does not see, before anything is launched: a child given
    CUDA_VISIBLE_DEVICES=<missing GPU> sees no CUDA device and would quietly train on the CPU.

    Indices count the visible devices, as torch numbers them (`torch.cuda.device_count()`, which honours
    CUDA_VISIBLE_DEVICES)."""
    n = int(torch.cuda.device_count())
    missing = [g for g in ids if int(g) >= n]
    if not missing:
        return
    visible = ("none (no CUDA device: the runs would train on the CPU)" if n == 0
               else f"{n} ({', '.join(str(i) for i in range(n))})")
    cvd = os.environ.get("CUDA_VISIBLE_DEVICES")
    raise ConfigError(f"--gpus {','.join(ids)}: GPU {', '.join(missing)} not visible; visible GPUs: {visible}"
                      + (f" with CUDA_VISIBLE_DEVICES={cvd!r}" if cvd is not None else ""))


def _physical(gpu: str) -> str:
    """The CUDA_VISIBLE_DEVICES entry of visible GPU `gpu` (this process's own mapping, when it has one)."""
    entries = [e.strip() for e in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if e.strip()]
    return entries[int(gpu)] if int(gpu) < len(entries) else gpu


def child_command(exp: Experiment, run: Run) -> list[str]:
    """The command one GPU slot runs: this experiment's frozen copy, this run only, in a fresh process."""
    return [sys.executable, "-m", "textseg_cli", "experiment", "run", str(exp.out / SPEC_COPY), "--only", run.key,
            "--quiet"]


def run_on_gpus(exp: Experiment, runs: Sequence[Run], gpus: Sequence[str], *, fail_fast: bool = False,
                log: Callable[[str], None] = print, command: Callable[[Experiment, Run], list[str]] = child_command,
                poll_s: float = 0.2) -> Outcome:
    """At most one run per GPU at a time; each child sees only its GPU (CUDA_VISIBLE_DEVICES) and writes
    its output to OUT/logs/<id>__<run>.log."""
    out = Outcome()
    todo: list[Run] = []
    for r in runs:
        (out.skipped if run_state(exp, r) == "done" else todo).append(r)
    free = list(gpus)
    active: dict[str, tuple[Run, subprocess.Popen, Path]] = {}
    (exp.out / "logs").mkdir(parents=True, exist_ok=True)
    stop = False
    try:
        while todo or active:
            while todo and free and not stop:
                run, gpu = todo.pop(0), free.pop(0)
                log_path = exp.out / "logs" / run.status_name.replace(".json", ".log")
                env = dict(os.environ, CUDA_VISIBLE_DEVICES=_physical(gpu))  # index 1 of "2,3" is GPU 3
                with open(log_path, "ab") as fh:
                    proc = subprocess.Popen(command(exp, run), env=env, stdout=fh, stderr=subprocess.STDOUT)
                active[gpu] = (run, proc, log_path)
                log(f"GPU {gpu}: started {run.key} (pid {proc.pid}, log {log_path})")
            if stop and not active:
                break
            for gpu, (run, proc, log_path) in list(active.items()):
                rc = proc.poll()
                if rc is None:
                    continue
                del active[gpu]
                free.append(gpu)
                if rc == 0:
                    out.done.append(run.key)
                    log(f"GPU {gpu}: finished {run.key}")
                else:
                    out.failed[run.key] = f"run {run.key} exited with code {rc}; see {log_path}"
                    log(f"GPU {gpu}: FAILED {run.key} (exit code {rc}; log {log_path})")
                    if fail_fast:
                        stop = True
            if stop and todo:
                out.not_started += [r.key for r in todo]
                todo = []
            time.sleep(poll_s)
    except KeyboardInterrupt:
        for run, proc, _ in active.values():  # each child saves a checkpoint on SIGINT
            proc.send_signal(signal.SIGINT)
        for run, proc, _ in active.values():
            proc.wait()
        raise
    return out


def submitit_executor(exp: Experiment, launcher: str, *, partition: str | None, time_min: int, gpus_per_run: int,
                      cpus_per_run: int | None, extra: dict | None = None):
    try:
        import submitit  # lazy: optional extra [slurm]
    except ImportError:
        raise ConfigError("--launcher slurm needs the submitit package: pip install 'textseg[slurm]'") from None
    folder = exp.out / "submitit"
    try:
        executor = submitit.AutoExecutor(folder=str(folder), cluster="local" if launcher == "submitit-local" else "slurm")
    except RuntimeError as exc:  # submitit's "Could not detect srun": not on a Slurm login node
        raise ConfigError(f"--launcher {launcher}: {exc} (use --gpus or the default launcher here)") from None
    params: dict = {"timeout_min": int(time_min), "name": f"textseg-{exp.name}"}
    if gpus_per_run:
        params["gpus_per_node"] = int(gpus_per_run)
    if cpus_per_run:
        params["cpus_per_task"] = int(cpus_per_run)
    if partition:
        params["slurm_partition"] = partition
    params.update(extra or {})
    executor.update_parameters(**params)
    return executor


def run_with_submitit(exp: Experiment, runs: Sequence[Run], launcher: str, *, partition: str | None = None,
                      time_min: int = 24 * 60, gpus_per_run: int = 1, cpus_per_run: int | None = None,
                      wait: bool = True, fail_fast: bool = False, log: Callable[[str], None] = print) -> Outcome:
    """Submit each unfinished run as a job calling `execute_run`; with `wait`, collect their outcomes."""
    out = Outcome()
    todo = []
    for r in runs:
        (out.skipped if run_state(exp, r) == "done" else todo).append(r)
    if not todo:
        return out
    executor = submitit_executor(exp, launcher, partition=partition, time_min=time_min, gpus_per_run=gpus_per_run,
                                 cpus_per_run=cpus_per_run)
    spec = str(exp.out / SPEC_COPY)
    jobs = []
    for run in todo:
        job = executor.submit(execute_run, spec, run.key, launcher)
        jobs.append((run, job))
        log(f"submitted {run.key} as job {job.job_id} ({launcher})")
    if not wait:
        out.not_started = [r.key for r, _ in jobs]
        return out
    for i, (run, job) in enumerate(jobs):
        try:
            job.result()
            out.done.append(run.key)
            log(f"job {job.job_id}: finished {run.key}")
        except Exception as exc:  # submitit re-raises the job's error (or a FailedJobError)
            first = str(exc).strip().splitlines()
            out.failed[run.key] = f"run {run.key} (job {job.job_id}) failed: {first[-1] if first else type(exc).__name__}"
            log(f"job {job.job_id}: FAILED {run.key}; logs in {exp.out / 'submitit'}")
            if fail_fast:
                for other_run, other in jobs[i + 1:]:
                    other.cancel(check=False)
                    out.not_started.append(other_run.key)
                break
    return out
