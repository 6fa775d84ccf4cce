"""The training loop shared by every method (`textseg train`).

One iteration: draw a two-stream batch → `method.training_step` under autocast → backward → optimiser
and scheduler step → `method.on_after_optimizer_step`. Around it: validation on the validation split,
atomic checkpoints (last + best), a CSV log, Ctrl-C handling, non-finite loss detection and DDP.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import math
import os
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn

from textseg_cli.console import console, err_console, progress
from textseg_cli.data.prefetch import with_prefetch
from textseg_cli.data.prepared import PreparedDataset, load_prepared
from textseg_cli.data.sampling import Augment, TwoStreamSampler, load_training_cases
from textseg_cli.data.splits import apply_fold, labeled_subset
from textseg_cli.engine.checkpoint import capture_rng, load_checkpoint, restore_rng, save_checkpoint
from textseg_cli.engine.config import build_config, load_config, save_config
from textseg_cli.engine.determinism import determinism_record
from textseg_cli.engine.optim import build_optimizer, build_scheduler
from textseg_cli.engine.runlog import RunLog, progress_line
from textseg_cli.engine.bundle import snapshot_run_inputs
from textseg_cli.engine.stopping import StopRules, resolve_epochs, write_summary
from textseg_cli.engine.runs import build_run_method
from textseg_cli.errors import ConfigError, DataError, TextsegError
from textseg_cli.inference.fusion import release_inference_copy
from textseg_cli.methods.base import Method, StepContext, list_methods
from textseg_cli.reports.curves import write_run_curves
from textseg_cli.engine.checks import check_run_config, device_from
from textseg_cli.engine.ddp_exit import shutdown_process_group
from textseg_cli.precision import (channels_last, inference_request, resolve_precision, to_channels_last,
                                  training_request)
from textseg_cli.safety import guarded_run_dir, refuse_existing_run
from textseg_cli.utils import atomic_write_json, environment_info, seed_everything


class NonFiniteLossError(TextsegError):
    """The loss (or the weights) became NaN/inf; the run stopped without overwriting its last checkpoint."""


@dataclass
class TrainResult:
    run_dir: Path
    iteration: int
    best_metric: float | None
    best_iteration: int | None
    val_history: list[tuple[int, float]] = field(default_factory=list)
    seconds: float = 0.0
    stop_reason: str | None = None  # early stopping / time budget (engine/stopping.py)


# --- devices and processes --------------------------------------------------------------------------

@dataclass
class Dist:
    world_size: int = 1
    rank: int = 0
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def main(self) -> bool:
        return self.rank == 0


def _dist_from_env() -> Dist:
    ws = int(os.environ.get("WORLD_SIZE", "1"))
    if ws <= 1:
        return Dist()
    return Dist(ws, int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0")))


def resolve_device(device: str | None, dist: Dist) -> torch.device:
    if device in (None, "", "auto"):
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dev = device_from(device)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"--device {device}: CUDA is not available on this machine")
        if dist.enabled:
            dev = torch.device("cuda", dist.local_rank)
        torch.cuda.set_device(dev)
    return dev


class _StepModule(nn.Module):
    """Routes `training_step` through `forward` so DistributedDataParallel can sync its gradients."""

    def __init__(self, method: Method):
        super().__init__()
        self.method = method

    def forward(self, batch, ctx):
        return self.method.training_step(batch, ctx)


# --- validation ---------------------------------------------------------------------------------------

def dice_per_class(pred: torch.Tensor, ref: torch.Tensor, num_classes: int) -> list[float]:
    """Hard Dice of foreground classes 1..K-1 (NaN when both masks are empty)."""
    out = []
    for c in range(1, num_classes):
        p, r = pred == c, ref == c
        denom = int(p.sum()) + int(r.sum())
        out.append(float("nan") if denom == 0 else 2.0 * int((p & r).sum()) / denom)
    return out


def validate(method: Method, cases: list[tuple[str, np.ndarray, np.ndarray]], cfg: dict[str, Any],
             device: torch.device, num_classes: int, class_names: list[str],
             texts: dict[str, str | None] | None = None) -> dict[str, float]:
    """Mean Dice over validation cases, predicted exactly as `textseg eval` does (`predict_case` with the
    run's inference settings); methods that read a per-case text get it through `set_case_text`."""
    from textseg_cli.inference.predict import predict_case  # lazy: inference imports the engine's pieces

    inf, val = dict(cfg["inference"]), cfg["val"]
    inf["mode"] = val.get("mode") or inf["mode"]
    inf["stride"] = val.get("stride") or inf["stride"]
    inf["precision"] = inference_request(cfg)  # auto follows training: train.amp=false validates in fp32
    set_text = getattr(method, "set_case_text", None)

    per_case = []
    for cid, image, label in cases:
        if callable(set_text):
            set_text((texts or {}).get(cid), case_id=cid)
        pred = predict_case(method, image, inf, device).argmax(0).cpu()
        per_case.append(dice_per_class(pred, torch.from_numpy(label.astype(np.int64)), num_classes))
    arr = np.array(per_case, dtype=float)  # (cases, K-1)
    with np.errstate(all="ignore"), _warnings_off():
        per_class = np.nanmean(arr, axis=0) if arr.size else np.array([])
    res = {"val_dice": float(np.nanmean(per_class)) if per_class.size and not np.all(np.isnan(per_class)) else 0.0}
    if num_classes > 2:
        for c, v in enumerate(per_class, start=1):
            res[f"val_dice_{class_names[c]}"] = float(v)
    return res


@contextlib.contextmanager
def _warnings_off():
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        yield


# --- the trainer --------------------------------------------------------------------------------------

class Trainer:
    def __init__(self, cfg: dict[str, Any], ds: PreparedDataset, run_dir: Path, device: torch.device, dist: Dist,
                 resume_from: Path | None = None, quiet: bool = False):
        self.cfg, self.ds, self.run_dir, self.device, self.dist = cfg, ds, run_dir, device, dist
        self.quiet = quiet or not dist.main
        self.stop_requested = False
        tr = cfg["train"]
        self.max_iterations = tr["iterations"]

        # cases: labeled = first N of splits.train, unlabeled = the rest, validation from the val split only
        train_ids = ds.split("train")
        if cfg["data"]["labeled"] is None:  # the prepared set's default labeled count (LA: 8), else all
            default = (ds.spec.get("labeled") or {}).get("default")
            cfg["data"]["labeled"] = None if default is None else str(default)
        self.labeled_ids, unlabeled_ids = labeled_subset(train_ids, cfg["data"]["labeled"])
        self.max_iterations = resolve_epochs(cfg, len(self.labeled_ids))  # train.epochs, if set
        self.stop = StopRules(cfg)
        method_cls = list_methods().get(cfg["method"]["name"])
        if method_cls is None:
            raise ConfigError(f"unknown method '{cfg['method']['name']}'; available: {', '.join(list_methods())}")
        self.uses_unlabeled = bool(method_cls.needs_unlabeled) and tr["batch_unlabeled"] > 0
        self.unlabeled_ids = unlabeled_ids if self.uses_unlabeled else []
        self.unused_ids = [] if self.uses_unlabeled else unlabeled_ids
        self.val_ids = self._val_ids(train_ids)
        self._check_files()

        seed_everything(cfg["seed"] + dist.rank, deterministic=cfg["deterministic"])
        if device.type == "cuda":
            torch.backends.cudnn.benchmark = bool(tr["cudnn_benchmark"]) and not cfg["deterministic"]
        self.method = build_run_method(cfg, ds).to(device)  # after seeding: initial weights depend on the seed
        self.precision = resolve_precision(training_request(cfg), device, "train.precision")
        self.channels_last = self.precision.channels_last and bool(tr["channels_last"])
        if self.channels_last:
            to_channels_last(self.method)
        self.amp = self.precision.bf16

        self.sampler = with_prefetch(self._make_sampler(), tr.get("prefetch", "auto"), device)
        self.val_cases = [(cid, *self._load_val(cid)) for cid in self.val_ids] if dist.main else []
        self.optimizer = build_optimizer(self.method.param_groups(), cfg["optim"])
        self.scheduler = build_scheduler(self.optimizer, self.max_iterations, cfg["optim"],
                                         tr.get("iterations_per_epoch"))
        self.iteration = 0
        self.best_metric: float | None = None
        self.best_iteration: int | None = None
        self.window: dict[str, float] = {}
        self.window_n = 0
        tb = self._tensorboard_dir() if dist.main else None
        self.log = RunLog(run_dir / "log.csv", tb) if dist.main else None
        if resume_from is not None:
            self._resume(resume_from)
        self.step_module: nn.Module = _StepModule(self.method)
        if dist.enabled:
            from torch.nn.parallel import DistributedDataParallel as DDP

            self.step_module = DDP(self.step_module, device_ids=[device.index] if device.type == "cuda" else None,
                                   find_unused_parameters=bool(tr["ddp_find_unused_parameters"]))

    # --- setup helpers ---------------------------------------------------------------------------
    def _val_ids(self, train_ids: list[str]) -> list[str]:
        val = self.cfg["val"]
        if not val["every"] and not val["at_start"]:
            return []
        if val["split"] not in self.ds.spec["splits"]:
            err_console.print(f"[yellow]warning:[/] no '{val['split']}' split in {self.ds.root}; validation is off "
                              "and no best.pt is written (carve one with `textseg prep ... --val N`)")
            return []
        ids = self.ds.split(val["split"])
        overlap = sorted(set(ids) & set(train_ids))
        if overlap:
            raise DataError(f"validation split '{val['split']}' shares cases with splits.train: {overlap[:5]}",
                            self.ds.root / "dataset.json")
        if val.get("max_cases"):
            ids = ids[: int(val["max_cases"])]
        return ids

    def _check_files(self) -> None:
        """Check the files this run reads exist — and only those: labels of unlabeled cases are not touched."""
        for cid in self.labeled_ids + self.unlabeled_ids + self.val_ids:
            if not self.ds.image_path(cid).exists():
                raise DataError(f"case '{cid}': image file missing", self.ds.image_path(cid))
        for cid in self.labeled_ids + self.val_ids:
            lp = self.ds.label_path(cid)
            if lp is None or not lp.exists():
                raise DataError(f"case '{cid}' is used with its label but the label file is missing",
                                lp or self.ds.root / "dataset.json")

    def _load_val(self, cid: str):
        case = self.ds.load_case(cid, with_label=True)
        return case.image.astype(np.float32, copy=False), case.label

    def _make_sampler(self) -> TwoStreamSampler:
        tr, data = self.cfg["train"], self.cfg["data"]
        n = len(self.labeled_ids) + len(self.unlabeled_ids)
        with self._progress() as bar:
            task = bar.add_task("load cases", total=n, info="")
            images_l, labels_l, images_u = load_training_cases(
                self.ds, self.labeled_ids, self.unlabeled_ids, progress_cb=lambda: bar.advance(task))
        aug = Augment(**{k: bool(v) for k, v in (data.get("augment") or {}).items()})
        texts = [self.ds.text(c) for c in self.labeled_ids], [self.ds.text(c) for c in self.unlabeled_ids]
        return TwoStreamSampler(images_l, labels_l, images_u, data["patch_size"], tr["batch_labeled"],
                                tr["batch_unlabeled"] if self.uses_unlabeled else 0,
                                seed=[int(self.cfg["seed"]), self.dist.rank], augment=aug,
                                ids_l=self.labeled_ids, ids_u=self.unlabeled_ids,
                                texts_l=texts[0] if any(t is not None for t in texts[0]) else None,
                                texts_u=texts[1] if any(t is not None for t in texts[1]) else None,
                                label_targets=self.method.label_targets)

    def _tensorboard_dir(self) -> Path | None:
        flag = self.cfg["train"].get("tensorboard", "auto")
        if flag is False or flag == "false":
            return None
        try:
            import tensorboard  # noqa: F401
        except ImportError:
            if flag is True:
                err_console.print("[yellow]warning:[/] train.tensorboard=true but tensorboard is not installed "
                                  "(pip install 'textseg-cli[tensorboard]'); logging to log.csv only")
            return None
        return self.run_dir / "tb"

    def _progress(self):
        if self.quiet:
            return _NullProgress()
        return progress()

    # --- checkpoints -----------------------------------------------------------------------------
    def _gather_rng(self) -> list[dict[str, Any]]:
        mine = {**capture_rng(), "sampler": self.sampler.state_dict()}
        if not self.dist.enabled:
            return [mine]
        import torch.distributed as tdist

        allr: list[Any] = [None] * self.dist.world_size
        tdist.all_gather_object(allr, mine)
        return allr

    def save(self, name: str = "last") -> None:
        """Collective under DDP (all ranks gather RNG states); only rank 0 writes."""
        rng = self._gather_rng()
        if not self.dist.main:
            return
        bad = [n for n, p in self.method.named_parameters() if not torch.isfinite(p).all()]
        if bad:
            raise NonFiniteLossError(f"weights became NaN/inf at iteration {self.iteration} ({bad[0]}, ...); "
                                     f"not saving. The last good checkpoint stays at {self.run_dir / 'checkpoints'}")
        state = {"method": self.method.state_dict(), "optimizer": self.optimizer.state_dict(),
                 "scheduler": self.scheduler.state_dict(), "iteration": self.iteration,
                 "rng": {"world_size": self.dist.world_size, "ranks": rng}, "config": self.cfg,
                 "best_metric": self.best_metric, "best_iteration": self.best_iteration,
                 "log_window": {"n": self.window_n, "sums": dict(self.window)},
                 "method_name": self.cfg["method"]["name"], "dataset": self.ds.name}
        save_checkpoint(self.run_dir / "checkpoints" / f"{name}.pt", state)

    def _resume(self, path: Path) -> None:
        # CPU first: RNG states must stay CPU ByteTensors; load_state_dict copies weights to the device
        ckpt = load_checkpoint(path, map_location="cpu")
        self.method.load_state_dict(ckpt["method"])
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.scheduler.load_state_dict(ckpt["scheduler"])
        self.iteration = int(ckpt["iteration"])
        if self.max_iterations < self.iteration:
            raise ConfigError(f"--iterations {self.max_iterations} is below the run's current iteration "
                              f"{self.iteration}; give at least {self.iteration} (the run is unchanged)")
        self.best_metric, self.best_iteration = ckpt.get("best_metric"), ckpt.get("best_iteration")
        ranks = ckpt["rng"]["ranks"]
        if len(ranks) == self.dist.world_size:
            mine = ranks[self.dist.rank]
            restore_rng(mine)
            self.sampler.load_state_dict(mine["sampler"])
        else:
            err_console.print(f"[yellow]warning:[/] checkpoint was written by {len(ranks)} process(es), this run has "
                              f"{self.dist.world_size}; sampling continues from fresh seeded streams")
        lw = ckpt.get("log_window") or {}
        self.window, self.window_n = dict(lw.get("sums") or {}), int(lw.get("n") or 0)
        if self.log is not None:
            self.log.resume(self.iteration)

    # --- the loop --------------------------------------------------------------------------------
    def _all_any(self, flag: bool) -> bool:
        if not self.dist.enabled:
            return flag
        import torch.distributed as tdist

        t = torch.tensor([1.0 if flag else 0.0], device=self.device if self.device.type == "cuda" else "cpu")
        tdist.all_reduce(t, op=tdist.ReduceOp.MAX)
        return bool(t.item() > 0)

    def _install_signals(self):
        if threading.current_thread() is not threading.main_thread():
            return {}
        old = {}

        def handler(signum, frame):
            if self.stop_requested:  # second Ctrl-C: stop now
                raise KeyboardInterrupt
            self.stop_requested = True
            if self.dist.main:
                err_console.print("[yellow]interrupt received: finishing this step and saving a checkpoint "
                                  "(press Ctrl-C again to abort without saving)[/]")

        for sig in (signal.SIGINT, signal.SIGTERM):
            old[sig] = signal.signal(sig, handler)
        return old

    def _validate(self) -> dict[str, float]:
        if not self.dist.main or not self.val_cases:
            return {}
        t0 = time.perf_counter()
        try:
            res = validate(self.method, self.val_cases, self.cfg, self.device, self.ds.num_classes,
                           self.ds.class_names, texts={cid: self.ds.text(cid) for cid, _, _ in self.val_cases})
        finally:
            release_inference_copy(self.method)  # built on demand; no second copy between validations
        res["val_seconds"] = round(time.perf_counter() - t0, 3)
        if self.stop.is_best(self.iteration, res["val_dice"], self.best_metric):
            self.best_metric, self.best_iteration = res["val_dice"], self.iteration
            res["val_best"] = 1
        return res

    def _log_window(self, lr: float, t_start: float, it_start: int) -> dict[str, float]:
        row = {k: v / max(1, self.window_n) for k, v in self.window.items()}
        row["lr"] = lr
        el = time.perf_counter() - t_start
        row["it_per_s"] = round((self.iteration - it_start) / el, 4) if el > 0 else 0.0
        if "data_wait_s" in row:  # share of a step spent waiting for its batch
            row["data_wait_share"] = round(row["data_wait_s"] * row["it_per_s"], 4)
        self.window, self.window_n = {}, 0
        return row

    def run(self) -> TrainResult:
        cfg, tr, val = self.cfg, self.cfg["train"], self.cfg["val"]
        old_handlers = self._install_signals()
        history: list[tuple[int, float]] = []
        t_start, it_start = time.perf_counter(), self.iteration
        self.method.train()
        try:
            with self._progress() as bar:
                task = bar.add_task(f"train {cfg['method']['name']}", total=self.max_iterations,
                                    completed=self.iteration, info="")
                if self.iteration == 0 and val["at_start"] and self.val_ids:
                    res = self._validate()
                    if res:
                        history.append((0, res["val_dice"]))
                        self.log.log(0, res)
                        self.log.flush()
                    if self._from_main(bool(res.get("val_best"))):
                        self.save("best")
                while self.iteration < self.max_iterations:
                    if self._all_any(self.stop_requested):
                        self._save_and_stop()
                    loss_terms = self._step()
                    self.iteration += 1
                    for k, v in loss_terms.items():
                        self.window[k] = self.window.get(k, 0.0) + v
                    self.window_n += 1
                    it = self.iteration
                    row: dict[str, Any] = {}
                    if it % tr["log_every"] == 0 or it == self.max_iterations:
                        row.update(self._log_window(self.scheduler.get_last_lr()[0], t_start, it_start))
                        row["time_s"] = round(time.perf_counter() - t_start, 3)
                    do_val = bool(self.val_ids) and ((val["every"] and it % val["every"] == 0)
                                                     or it == self.max_iterations)
                    if do_val:
                        res = self._validate()
                        row.update(res)
                        if res:
                            history.append((it, res["val_dice"]))
                        if self._from_main(bool(res.get("val_best"))):
                            self.save("best")
                    if row and self.log is not None:
                        self.log.log(it, row)
                        self.log.flush()
                        if not self.quiet and not console.is_terminal and "it_per_s" in row:  # piped: plain lines
                            console.print(progress_line(it, self.max_iterations, row, self._info(row, loss_terms)),
                                          highlight=False, markup=False, soft_wrap=True)
                        if do_val or it == self.max_iterations:
                            write_run_curves(self.run_dir)  # RUN/curves.png
                    if do_val or it % tr["checkpoint_every"] == 0 or it == self.max_iterations:
                        self.save("last")
                    bar.update(task, completed=it, info=self._info(row, loss_terms))
                    if self._should_stop(it, do_val, t_start):
                        break
            if it_start >= self.max_iterations:  # nothing to train (0 iterations or already done)
                self.save("last")
        finally:
            for sig, h in old_handlers.items():
                signal.signal(sig, h)
            if callable(getattr(self.sampler, "close", None)):
                self.sampler.close()
            if self.log is not None:
                self.log.close()
        return TrainResult(self.run_dir, self.iteration, self.best_metric, self.best_iteration, history,
                           time.perf_counter() - t_start, stop_reason=self.stop.reason)

    def _should_stop(self, it: int, do_val: bool, t_start: float) -> bool:
        """Early stopping after a validation, or the time budget, checked where a validation (in epoch
        mode: an epoch) ends, or at every step when the run does not validate."""
        if it >= self.max_iterations or (self.val_ids and not do_val):
            return False
        now = time.perf_counter()
        chunk, self._chunk_t0 = now - getattr(self, "_chunk_t0", t_start), now
        stop = (do_val and self.stop.early_stop(it, self.best_iteration)) or self.stop.time_up(now - t_start, chunk)
        if not self._from_main(bool(stop)):
            return False
        if not do_val:  # after a validation, last.pt was just written
            self.save("last")
        if self.dist.main:
            err_console.print(f"[yellow]stopped at iteration {it}: {self.stop.reason}[/]", highlight=False)
        return True

    def _from_main(self, flag: bool) -> bool:
        """Rank 0's value of `flag` on every rank (only rank 0 validates)."""
        if not self.dist.enabled:
            return flag
        import torch.distributed as tdist

        box = [flag]
        tdist.broadcast_object_list(box, src=0)
        return bool(box[0])

    def _step(self) -> dict[str, float]:
        ctx = StepContext(self.iteration, self.max_iterations, self.device,
                          extra={"world_size": self.dist.world_size, "rank": self.dist.rank})
        t0 = time.perf_counter()
        batch = self.sampler.next_batch().to(self.device, non_blocking=True)
        data_wait = time.perf_counter() - t0
        if self.channels_last:
            batch.image_l, batch.image_u = channels_last(batch.image_l), channels_last(batch.image_u)
        with self.precision.autocast():
            out = self.step_module(batch, ctx)
        loss = out["loss"]
        bad = not bool(torch.isfinite(loss.detach()).all())
        if self._all_any(bad):
            terms = {k: _scalar(v) for k, v in out.items() if _scalar(v) is not None}
            last = self.run_dir / "checkpoints" / "last.pt"
            if self.log is not None:
                self.log.flush()
            raise NonFiniteLossError(
                f"loss is not finite at iteration {self.iteration + 1} ({_fmt(terms)}); stopped without saving. "
                + (f"The last good checkpoint is {last}" if last.exists() else "No checkpoint was written yet")
                + "; try a lower optim.lr or --precision fp32")
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        self.scheduler.step()
        self.method.on_after_optimizer_step(ctx)
        terms = {k: v for k, v in ((k, _scalar(v)) for k, v in out.items()) if v is not None}
        terms["data_wait_s"] = data_wait
        return terms

    def _save_and_stop(self) -> None:
        self.save("last")
        if self.log is not None:
            self.log.flush()
        if self.dist.main:
            err_console.print(f"[yellow]stopped at iteration {self.iteration}; checkpoint saved to "
                              f"{self.run_dir / 'checkpoints' / 'last.pt'}; continue with "
                              f"`textseg train --resume --out {self.run_dir}`[/]")
        raise KeyboardInterrupt

    def _info(self, row: dict[str, Any], terms: dict[str, float]) -> str:
        parts = [f"loss {terms.get('loss', float('nan')):.4f}", f"lr {self.scheduler.get_last_lr()[0]:.2e}"]
        if self.best_metric is not None:
            parts.append(f"best val {self.best_metric:.4f}@{self.best_iteration}")
        if "val_dice" in row:
            parts.append(f"val {row['val_dice']:.4f}")
        return " | ".join(parts)


class _NullProgress:
    def __enter__(self):
        return self

    def __exit__(self, *a):
        return False

    def add_task(self, *a, **k):
        return 0

    def advance(self, *a, **k):
        pass

    def update(self, *a, **k):
        pass


def _scalar(v: Any) -> float | None:
    if isinstance(v, torch.Tensor) and v.numel() == 1:
        return float(v.detach().float().item())
    if isinstance(v, (int, float)) and not isinstance(v, bool):
        return float(v)
    return None


def _fmt(terms: dict[str, float]) -> str:
    return ", ".join(f"{k}={v:.4g}" for k, v in terms.items())


# --- entry point --------------------------------------------------------------------------------------

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
    dist = _dist_from_env()
    t0 = time.perf_counter()
    if resume:
        if out is None:
            raise ConfigError("--resume needs --out RUN_DIR (the run to continue)")
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
    dev = resolve_device(device, dist)
    if dist.enabled:
        import torch.distributed as tdist

        if not tdist.is_initialized():
            tdist.init_process_group("nccl" if dev.type == "cuda" else "gloo",
                                     timeout=_dt.timedelta(hours=2))
    guard, ok = contextlib.ExitStack(), True
    try:
        if dist.main:  # lock (+ claim a new folder); a failed new run leaves nothing behind
            guard.enter_context(guarded_run_dir(run_dir, "train", new=not resume, force=force,
                                                sources=[] if resume else [cfg["data"]["root"]]))
        if dist.enabled:
            import torch.distributed as tdist

            tdist.barrier()
        trainer = Trainer(cfg, ds, run_dir, dev, dist, resume_from=last, quiet=quiet)
        if dist.main:
            (run_dir / "checkpoints").mkdir(parents=True, exist_ok=True)
            save_config(cfg, run_dir / "config.yaml")
            snapshot_run_inputs(run_dir, cfg, ds)  # RUN/prepared.json + RUN/text/: the run predicts after a move
            _write_env(run_dir, cfg, dev, dist, resume, precision=_precision_record(trainer, cfg, dev))
            atomic_write_json(run_dir / "cases.json", {
                "labeled": trainer.labeled_ids, "unlabeled": trainer.unlabeled_ids,
                "unused_unlabeled": trainer.unused_ids, "val_split": cfg["val"]["split"], "val": trainer.val_ids})
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


def _precision_record(tr: Trainer, cfg: dict[str, Any], dev: torch.device) -> dict[str, Any]:
    return {"train": tr.precision.record(), "validation": resolve_precision(inference_request(cfg), dev).record()}


def _write_env(run_dir: Path, cfg: dict[str, Any], dev: torch.device, dist: Dist, resume: bool,
               precision: dict[str, Any] | None = None) -> None:
    import json

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
    from textseg_cli.models.registry import count_parameters

    d, t = cfg["data"], cfg["train"]
    console.print(
        f"[bold]{cfg['method']['name']}[/] on {tr.ds.name}: {len(tr.labeled_ids)} labeled, "
        f"{len(tr.unlabeled_ids)} unlabeled, {len(tr.val_ids)} validation cases; patch {d['patch_size']}, "
        f"batch {t['batch_labeled']}+{t['batch_unlabeled'] if tr.unlabeled_ids else 0}"
        f"{f' ×{dist.world_size} processes' if dist.enabled else ''}; {t['iterations']} iterations on {dev}"
        f"{' (bf16)' if tr.amp else ''}; {count_parameters(tr.method, trainable_only=True):,} trainable parameters; "
        f"run folder {tr.run_dir}", highlight=False)
    if tr.iteration:
        console.print(f"resuming at iteration {tr.iteration}", highlight=False)
