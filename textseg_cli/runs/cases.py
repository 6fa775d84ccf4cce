"""RUN/cases.json: the case IDs a run trained and validated on, written once when training starts.

`eval` reads it to report the labeled/unlabeled counts of the run (and to know which cases the run has seen).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from textseg_cli.storage.files import atomic_write_json

CASES_FILE = "cases.json"


@dataclass(frozen=True)
class RunCases:
    labeled: list[str] = field(default_factory=list)
    unlabeled: list[str] = field(default_factory=list)  # used as unlabeled (labels never read)
    unused_unlabeled: list[str] = field(default_factory=list)  # left out: the method or batch has no unlabeled stream
    val_split: str | None = None
    val: list[str] = field(default_factory=list)

    def training_cases(self) -> set[str]:
        """Every case the run trained on, labeled or not."""
        return set(self.labeled) | set(self.unlabeled)


def write_cases(run_dir: str | Path, cases: RunCases) -> Path:
    path = Path(run_dir) / CASES_FILE
    atomic_write_json(path, asdict(cases))
    return path


def read_cases(run_dir: str | Path) -> RunCases | None:
    """The run's cases, or None when the file is absent or unreadable (runs written before it existed)."""
    path = Path(run_dir) / CASES_FILE
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(data, dict):
            return None
        lists = {k: [str(x) for x in (data.get(k) or [])] for k in ("labeled", "unlabeled", "unused_unlabeled", "val")}
        return RunCases(val_split=data.get("val_split"), **lists)
    except (json.JSONDecodeError, UnicodeDecodeError, TypeError):
        return None
