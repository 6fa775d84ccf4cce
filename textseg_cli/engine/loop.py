"""The training loop shared by every method (`textseg train`).

One iteration: draw a two-stream batch → `method.training_step` under autocast → backward → optimiser
and scheduler step → `method.on_after_optimizer_step`. Around it: validation on the validation split,
atomic checkpoints (last + best), a CSV log, Ctrl-C handling, non-finite loss detection and DDP.
"""

from __future__ import annotations

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
from textseg_cli.data.prepared import PreparedDataset
from textseg_cli.data.sampling import Augment, TwoStreamSampler, load_training_cases
from textseg_cli.data.splits import labeled_subset
from textseg_cli.engine.distributed import (
    Dist,
    any_rank,
    from_main,
    gather_objects,
    main_value,
    wrap_for_training,
)
from textseg_cli.engine.optim import build_optimizer, build_scheduler, lr_factor
from textseg_cli.engine.runlog import RunLog, progress_line
from textseg_cli.engine.stopping import StopRules, fitted_iterations, resolve_epochs
from textseg_cli.errors import ConfigError, DataError, TextsegError
from textseg_cli.evaluation.validation import validate, validation_settings
from textseg_cli.inference.fusion import release_inference_copy
from textseg_cli.methods.base import StepContext
from textseg_cli.methods.registry import list_methods
from textseg_cli.reports.curves import write_run_curves
from textseg_cli.runs.checkpoint import (
    capture_rng,
    load_checkpoint,
    restore_rng,
    save_checkpoint,
)
from textseg_cli.runs.config import save_config, selection_split
from textseg_cli.runs.load import build_run_method
from textseg_cli.runtime.determinism import seed_everything
from textseg_cli.runtime.precision import (
    Precision,
    channels_last,
    to_channels_last,
)


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


# --- the trainer --------------------------------------------------------------------------------------

class Trainer:
    def __init__(self, cfg: dict[str, Any], ds: PreparedDataset, run_dir: Path, device: torch.device, dist: Dist,
                 resume_from: Path | None = None, quiet: bool = False, *, precision: Precision,
                 val_precision: Precision):
        """precision/val_precision: the run's training and validation precisions on `device`, resolved once by
        `train()` (engine/setup.py)."""
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
        self.labeled_note = ""  # how the labeled cases were chosen, when no rule was given (the startup line)
        if cfg["data"]["labeled"] is None and not all(ds.has_label(c) for c in train_ids):
            # no --labeled on a set with image-only training cases (prep custom): the cases with a label file are
            # the labeled ones, the rest unlabeled -- "all labeled" would fail on the first missing label
            self.labeled_ids = [c for c in train_ids if ds.has_label(c)]
            unlabeled_ids = [c for c in train_ids if not ds.has_label(c)]
            if not self.labeled_ids:
                raise DataError("no case of splits.train has a label file; training needs labeled cases",
                                ds.root / "dataset.json")
            if train_ids[: len(self.labeled_ids)] == self.labeled_ids:  # the usual order: recorded as a count
                cfg["data"]["labeled"] = str(len(self.labeled_ids))
            self.labeled_note = " (no --labeled: the training cases with a label file; the image-only ones unlabeled)"
        else:
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
        self.precision = precision
        self.val_settings = validation_settings(cfg, val_precision)  # built once, used by every validation
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
        self._val_seconds = 0.0  # spent validating in this process (the budget fit keeps it apart from steps)
        self._planned_iterations = int(self.max_iterations)  # before any fit to the time budget
        self.best_metric: float | None = None
        self.best_iteration: int | None = None
        self.window: dict[str, float] = {}
        self.window_n = 0
        tb = self._tensorboard_dir() if dist.main else None
        self.log = RunLog(run_dir / "log.csv", tb) if dist.main else None
        if resume_from is not None:
            self._resume(resume_from)
        self.step_module: nn.Module = wrap_for_training(self.method, dist, device,
                                                        bool(tr["ddp_find_unused_parameters"]))

    # --- setup helpers ---------------------------------------------------------------------------
    def _val_ids(self, train_ids: list[str]) -> list[str]:
        val = self.cfg["val"]
        if not val["every"] and not val["at_start"]:
            return []
        split = selection_split(self.cfg)
        if split not in self.ds.spec["splits"]:
            err_console.print(f"[yellow]warning:[/] no '{split}' split in {self.ds.root}; validation is off "
                              "and no best.pt is written (carve one with `textseg prep ... --val N`)")
            return []
        if split != val["split"] and self.dist.main:
            err_console.print(f"[bold red]LEGACY SELECTION:[/] best.pt is chosen on the TEST split every {val['every']}"
                              " iterations, as the official scripts do; numbers from best.pt are optimistic and every "
                              "table marks them 'best-on-test'. Use the default (--select val) for new results.")
        ids = self.ds.split(split)
        overlap = sorted(set(ids) & set(train_ids))
        if overlap:
            raise DataError(f"validation split '{split}' shares cases with splits.train: {overlap[:5]}",
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
            import tensorboard  # noqa: F401  # lazy: optional extra
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
        return gather_objects(self.dist, {**capture_rng(), "sampler": self.sampler.state_dict()})

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
        return any_rank(self.dist, flag, self.device)

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
                           self.ds.class_names, texts={cid: self.ds.text(cid) for cid, _, _ in self.val_cases},
                           settings=self.val_settings)
        finally:
            release_inference_copy(self.method)  # built on demand; no second copy between validations
        res["val_seconds"] = round(time.perf_counter() - t0, 3)
        self._val_seconds += res["val_seconds"]
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
        fit_t0, fit_it0, fit_val0 = t_start, self.iteration, 0.0  # set after the first (untimed) step
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
                    if it == it_start + 1:  # the first step (warm-up) is not timed for the fit
                        fit_t0, fit_it0, fit_val0 = time.perf_counter(), it, self._val_seconds
                    if (self.stop.fit_after and it - it_start >= 2 and it % self.stop.fit_after == 0
                            and it < self.max_iterations):  # refit every fit_after steps, on the recent speed
                        now = time.perf_counter()
                        steps_s = now - fit_t0 - (self._val_seconds - fit_val0)
                        self._fit_to_budget(it, now - t_start, steps_s / (it - fit_it0), it - fit_it0)
                        fit_t0, fit_it0, fit_val0 = now, it, self._val_seconds
                        bar.update(task, total=self.max_iterations)
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
            failing = sys.exc_info()[1]  # the error that stopped training, if any
            for sig, h in old_handlers.items():
                signal.signal(sig, h)
            if callable(getattr(self.sampler, "close", None)):
                self.sampler.close()
            if self.log is not None:
                try:
                    self.log.close()
                except TextsegError:  # a full disk fails log.csv too: report what failed first (the checkpoint)
                    if failing is None:
                        raise
        return TrainResult(self.run_dir, self.iteration, self.best_metric, self.best_iteration, history,
                           time.perf_counter() - t_start, stop_reason=self.stop.reason)

    def _fit_to_budget(self, it: int, elapsed_s: float, step_s: float, timed: int) -> None:
        """`train.fit_budget_after`: set the run's length from the seconds per step of the last `timed` steps
        (validation time taken out) so it ends at `train.time_budget_min`, keeping what is left of
        `train.fit_budget_reserve_s` once validations have spent part of it; called every fit_after steps, so a
        machine that gets slower or faster mid-run is followed (rank 0's measurement on every rank). The lr
        schedule is rebuilt over the new length at the current step, ramps read it from the step context, a
        validation planned only at the end moves with the end, and config.yaml records the fitted length (a
        resumed run continues it)."""
        tr, val = self.cfg["train"], self.cfg["val"]
        old = self.max_iterations
        reserve = max(0.0, self.stop.fit_reserve_s - self._val_seconds)
        new = int(main_value(self.dist, fitted_iterations(it, elapsed_s, step_s, self.stop.budget_s, reserve,
                                                          self._planned_iterations)))
        fitted = self.stop.fitted or {"after": it, "planned": self._planned_iterations, "refits": 0}
        fitted.update({"s_per_it": round(step_s, 4), "elapsed_s": round(elapsed_s, 3),
                       "reserve_s": round(reserve, 3), "fitted": new, "refits": fitted["refits"] + 1})
        self.stop.fitted = fitted
        if new == old:
            return
        self.max_iterations = tr["iterations"] = new
        if val.get("every") == old:  # one validation, at the end
            val["every"] = self.stop.every = new
        last_lr = self.scheduler.last_epoch
        self.scheduler = build_scheduler(self.optimizer, new, self.cfg["optim"], tr.get("iterations_per_epoch"))
        self.scheduler.last_epoch = last_lr
        for g, base in zip(self.optimizer.param_groups, self.scheduler.base_lrs):
            g["lr"] = base * lr_factor(last_lr, new, self.cfg["optim"], tr.get("iterations_per_epoch"))
        self.scheduler._last_lr = [g["lr"] for g in self.optimizer.param_groups]
        if self.dist.main:
            save_config(self.cfg, self.run_dir / "config.yaml")
            if not self.quiet:
                err_console.print(f"fitted to the time budget at step {it}: {old} → {new} iterations ({step_s:.3g} s "
                                  f"per step over the last {timed}, {elapsed_s:.0f} s used, {reserve:.0f} s kept for "
                                  "validation)", highlight=False)

    def _should_stop(self, it: int, do_val: bool, t_start: float) -> bool:
        """Early stopping after a validation; the time budget where a validation (in epoch mode: an epoch)
        ends, and, in iteration mode, also after every step (a planned run may validate only at its end: without
        the per-step check its budget was never looked at). Every rank takes the same branch (config facts)."""
        if it >= self.max_iterations:
            return False
        now = time.perf_counter()
        step_s, self._step_t0 = now - getattr(self, "_step_t0", t_start), now
        if self.val_ids and not do_val:
            if self.stop.per_epoch or self.stop.budget_s is None:
                return False
            stop = self.stop.time_up(now - t_start, step_s)  # the next step would pass the budget
        else:
            chunk, self._chunk_t0 = now - getattr(self, "_chunk_t0", t_start), now
            stop = ((do_val and self.stop.early_stop(it, self.best_iteration))
                    or self.stop.time_up(now - t_start, chunk))
        if not self._from_main(bool(stop)):
            return False
        if not do_val:  # after a validation, last.pt was just written
            self.save("last")
        if self.dist.main:
            err_console.print(f"[yellow]stopped at iteration {it}: {self.stop.reason}[/]", highlight=False)
        return True

    def _from_main(self, flag: bool) -> bool:
        return from_main(self.dist, flag)

    def _step(self) -> dict[str, float]:
        ctx = StepContext(self.iteration, self.max_iterations, self.device,
                          extra={"world_size": self.dist.world_size, "rank": self.dist.rank})
        t0 = time.perf_counter()
        batch = self.sampler.next_batch().to(self.device, non_blocking=True)
        data_wait = time.perf_counter() - t0
        if self.channels_last:
            batch.image_l, batch.image_u = channels_last(batch.image_l), channels_last(batch.image_u)
        with self.precision.autocast():
            try:
                out = self.step_module(batch, ctx)
            except ValueError as exc:  # BatchNorm on one value per channel: the patch/batch choice, not a bug
                if "Expected more than 1 value per channel" not in str(exc):
                    raise
                raise ConfigError(f"data.patch_size {self.cfg['data']['patch_size']} with batches of "
                                  f"{self.cfg['train']['batch_labeled']}+{self.cfg['train']['batch_unlabeled']}: a "
                                  "forward pass of this method sees one value per channel at a BatchNorm layer "
                                  "(the bottleneck of a 16-voxel patch); use a larger patch or batches of at least 2"
                                  ) from None
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



