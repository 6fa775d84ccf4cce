"""RUN/cases.json: the case IDs a run trained and validated on, written once when training starts.

`eval` reads it to report the labeled/unlabeled counts of the run (and to know which cases the run has seen).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from textseg_cli.errors import DataError
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
    """The run's cases, or None when the file is absent (runs written before it existed).

    A present file that is not what textseg writes (not UTF-8 JSON, not an object, a list that is not a list of
    strings) is a DataError naming it: `eval` relies on it to refuse training cases, so a damaged or doctored
    copy must not silently make that check vacuous."""
    path = Path(run_dir) / CASES_FILE
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DataError(f"unreadable ({type(exc).__name__}: {exc}); restore it from the run's origin or delete it "
                        "to evaluate without the training-case check", path) from None
    if not isinstance(data, dict):
        raise DataError(f"expected a JSON object, got {type(data).__name__}", path)
    lists = {}
    for key in ("labeled", "unlabeled", "unused_unlabeled", "val"):
        value = data.get(key) or []
        if not isinstance(value, list) or not all(isinstance(x, str) for x in value):
            raise DataError(f"'{key}' must be a list of case IDs (strings), got {value!r:.80}", path)
        lists[key] = value
    split = data.get("val_split")
    if split is not None and not isinstance(split, str):
        raise DataError(f"'val_split' must be a split name, got {split!r:.80}", path)
    return RunCases(val_split=split, **lists)
