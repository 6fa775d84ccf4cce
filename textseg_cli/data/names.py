"""Canonical names of data sets that circulate under several spellings.

Config profiles (`datasets.<name>` blocks) and per-data-set facts (modality) are keyed on the canonical name;
the prepared data set's recorded name (dataset.json `name`, from `--name` or the source folder) is mapped here
first, so LViT's own folder names (`QaTa-Covid19`, `MosMedDataPlus`) find the same settings as
`QaTa-COV19` and `MosMedData+`.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Iterable

from textseg_cli.errors import DataError

ALIASES = {
    "qata-cov19": ("qata-cov19", "qata-covid19", "qata_cov19", "qata_covid19", "qata", "qatacov19"),
    "mosmeddata+": ("mosmeddata+", "mosmeddataplus", "mosmeddata_plus", "mosmeddata", "mosmed", "mosmed+"),
}
_LOOKUP = {alias: canon for canon, names in ALIASES.items() for alias in names}


def canonical_name(name: str | None) -> str | None:
    """Lower-case name, mapped to its canonical spelling when it is a known alias."""
    if name is None:
        return None
    key = str(name).strip().lower()
    return _LOOKUP.get(key, key)


# --- case and run IDs that become file or folder names ------------------------------------------------------------

ID_CHARS = "letters, digits, '.', '_', '-' and '+'"
_ID_RE = re.compile(r"[A-Za-z0-9._+-]+")
MAX_ID_LENGTH = 200  # room for `_0000.nii.gz` and the atomic writer's temporary prefix under the 255-byte name limit


def case_id_problem(cid: Any, what: str = "case id") -> str | None:
    """Why `cid` cannot be a file name stem (None when it can): IDs from dataset.json, split files, nnU-Net
    files and experiment files are other people's input, and `<folder>/<id>.nii.gz` must stay in `<folder>`."""
    if not isinstance(cid, str):
        return f"{what} {cid!r} is not a string"
    if not cid:
        return f"empty {what}"
    if cid in (".", ".."):
        return f"{what} {cid!r} is a folder reference, not a name"
    if len(cid) > MAX_ID_LENGTH:
        return f"{what} {cid[:40]!r}... is longer than {MAX_ID_LENGTH} characters"
    if not _ID_RE.fullmatch(cid):
        bad = sorted({ch for ch in cid if not _ID_RE.fullmatch(ch)})
        return f"{what} {cid!r} holds {''.join(bad)!r}; IDs may hold only {ID_CHARS}"
    return None


def case_id_problems(ids: Iterable[Any]) -> list[str]:
    """One line per unsafe or repeated ID (empty when all are fine)."""
    problems, seen, twice = [], set(), []
    for cid in ids:
        why = case_id_problem(cid)
        if why is not None:
            problems.append(why)
        elif cid in seen and cid not in twice:
            twice.append(cid)
        if isinstance(cid, str):
            seen.add(cid)
    problems += [f"case id {cid!r} is listed twice" for cid in twice]
    return problems


def check_case_id(cid: Any, where: str | Path | None = None, what: str = "case id") -> str:
    """`cid` when it is a safe file name stem, else a DataError naming `where` (the file it came from)."""
    why = case_id_problem(cid, what)
    if why is not None:
        raise DataError(why, where)
    return cid


def check_case_ids(ids: Iterable[Any], where: str | Path | None = None, *, unique: bool = True) -> list[str]:
    """Check a list of IDs (safe names, and with `unique` no repeats); a DataError lists up to 10 problems."""
    ids = list(ids)
    problems = case_id_problems(ids) if unique else [p for p in map(case_id_problem, ids) if p is not None]
    if problems:
        more = f" (and {len(problems) - 10} more)" if len(problems) > 10 else ""
        raise DataError("; ".join(problems[:10]) + more, where)
    return ids
