"""Atomic file writes (temporary file + rename, registered in the output folder's manifest) and JSON reading."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from textseg_cli.errors import DataError
from textseg_cli.storage.outputs import note_written


@contextlib.contextmanager
def atomic_path(path: str | Path, suffix: str | None = None) -> Iterator[Path]:
    """Yield a temporary path in the same folder; rename it onto `path` only if the block succeeds.

    `suffix` keeps extensions that writers inspect (e.g. '.nii.gz', '.safetensors').
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if suffix is None:
        suffix = "".join(path.suffixes) or ".tmp"
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix, dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        try:
            yield tmp_path
        except OSError as exc:
            if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                raise DataError(f"no space left on the device while writing ({exc.strerror}); the previous "
                                "version of the file, if any, is unchanged", path) from None
            raise
        # mkstemp creates 0600 files; give outputs the usual umask-based mode.
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp_path, 0o666 & ~umask)
        os.replace(tmp_path, path)
        note_written(path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def child_path(folder: str | Path, name: str, suffix: str = "") -> Path:
    """`folder / (name + suffix)` for a per-case file, refused unless it lies directly inside `folder`.

    `name` comes from other people's files (case IDs in dataset.json, split files): a name with separators,
    `..`, an absolute path, or an existing symlink pointing out of `folder` must not let a writer reach
    outside the output folder."""
    folder = Path(folder)
    target = folder / f"{name}{suffix}"
    base = folder.resolve()
    if (not name or name in (".", "..") or Path(name).name != name or "\\" in name or "\0" in name
            or target.parent.resolve() != base or target.resolve().parent != base):
        raise DataError(f"refusing to write {name + suffix!r}: the file would not lie directly inside this folder",
                        folder)
    return target


def read_json(path: str | Path) -> Any:
    """Parse a JSON file; a syntax error becomes a DataError naming the file."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise DataError(f"invalid JSON ({exc})", path) from exc


def atomic_write_text(path: str | Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def atomic_write_json(path: str | Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, default=_json_default) + "\n")


def _json_default(o: Any) -> Any:
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return float(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")



