"""The run's CSV log (losses, learning rate, validation metrics) and optional TensorBoard mirror."""

from __future__ import annotations

import csv
import math
from pathlib import Path
from typing import Any

from textseg_cli.storage.files import atomic_path


class RunLog:
    """Rows keyed by iteration; columns grow as new scalars appear. The file is rewritten atomically at
    each flush (a few thousand rows at most), so it is always a complete, readable CSV."""

    def __init__(self, path: str | Path, tensorboard_dir: str | Path | None = None):
        self.path = Path(path)
        self.rows: list[dict[str, Any]] = []
        self.columns: list[str] = ["iteration"]
        self.tb = None
        if tensorboard_dir is not None:
            try:
                from torch.utils.tensorboard import SummaryWriter  # lazy: optional extra [tensorboard]

                self.tb = SummaryWriter(str(tensorboard_dir))
            except Exception:  # tensorboard not installed: the CSV is the record
                self.tb = None

    def resume(self, up_to_iteration: int) -> None:
        """Keep rows up to the checkpoint's iteration; later rows will be recomputed by the resumed run."""
        if not self.path.exists():
            return
        with self.path.open(newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            self.columns = list(reader.fieldnames or ["iteration"])
            for row in reader:
                if int(float(row["iteration"])) <= up_to_iteration:
                    self.rows.append({k: _num(v) for k, v in row.items() if v not in ("", None)})

    def log(self, iteration: int, values: dict[str, Any]) -> None:
        row = next((r for r in self.rows if r["iteration"] == iteration), None)
        if row is None:
            row = {"iteration": iteration}
            self.rows.append(row)
        for k, v in values.items():
            if k not in self.columns:
                self.columns.append(k)
            row[k] = v
            if self.tb is not None and isinstance(v, (int, float)) and math.isfinite(v):
                self.tb.add_scalar(k, v, iteration)

    def flush(self) -> None:
        with atomic_path(self.path) as tmp:
            with tmp.open("w", newline="", encoding="utf-8") as f:
                w = csv.DictWriter(f, fieldnames=self.columns)
                w.writeheader()
                for r in self.rows:
                    w.writerow(r)
        if self.tb is not None:
            self.tb.flush()

    def close(self) -> None:
        self.flush()
        if self.tb is not None:
            self.tb.close()


def _num(v: str) -> Any:
    try:
        f = float(v)
    except ValueError:
        return v
    return int(f) if f.is_integer() and "." not in v and "e" not in v.lower() else f


def progress_line(iteration: int, total: int, row: dict[str, Any], info: str) -> str:
    """One plain line for logs that are not a terminal (batch jobs, `| tee`): where, how fast, ETA."""
    rate = float(row.get("it_per_s") or 0.0)
    eta = _hms((total - iteration) / rate) if rate > 0 else "?"
    elapsed = _hms(float(row.get("time_s") or 0.0))
    return (f"it {iteration}/{total} ({100.0 * iteration / max(1, total):.1f}%) | {info} | {rate:.2f} it/s | "
            f"elapsed {elapsed} | ETA {eta}")


def _hms(seconds: float) -> str:
    s = int(round(seconds))
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"
