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

from textseg_cli.errors import DataError, TextsegError
from textseg_cli.storage.outputs import note_written


# errno values that are the user's environment, not a bug: the folder, its permissions, its disk
WRITE_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS, errno.EACCES, errno.EPERM)


def write_error(exc: OSError, path: str | Path) -> DataError:
    """A DataError naming `path` (the file the user asked for, not a temporary copy) for an OSError of
    WRITE_ERRNOS; the previous version of the file, if any, is unchanged (writes are atomic)."""
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        what = f"no space left on the device ({exc.strerror})"
    elif exc.errno == errno.EFBIG:
        what = f"the file exceeds a file-size limit ({exc.strerror}; see `ulimit -f`)"
    elif exc.errno == errno.EROFS:
        what = "the folder is on a read-only file system"
    else:
        what = f"permission denied ({exc.strerror}); choose a writable folder or fix its permissions"
    return DataError(f"cannot write: {what}; the previous version of the file, if any, is unchanged", path)


@contextlib.contextmanager
def atomic_path(path: str | Path, suffix: str | None = None) -> Iterator[Path]:
    """Yield a temporary path in the same folder; rename it onto `path` only if the block succeeds.

    `suffix` keeps extensions that writers inspect (e.g. '.nii.gz', '.safetensors'). A full disk, a
    file-size limit, a read-only folder or missing permissions become a DataError naming `path`.
    """
    path = Path(path)
    if suffix is None:
        suffix = "".join(path.suffixes) or ".tmp"
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix, dir=path.parent)
    except OSError as exc:
        if exc.errno in WRITE_ERRNOS:
            raise write_error(exc, path) from None
        raise
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        try:
            yield tmp_path
            # mkstemp creates 0600 files; give outputs the usual umask-based mode.
            umask = os.umask(0)
            os.umask(umask)
            os.chmod(tmp_path, 0o666 & ~umask)
            os.replace(tmp_path, path)
        except OSError as exc:
            if exc.errno in WRITE_ERRNOS:
                raise write_error(exc, path) from None
            raise
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


def read_text(path: str | Path, error: type[TextsegError] = DataError) -> str:
    """A UTF-8 text file the user gave (config, experiment, prompt, split file, dataset.json): bytes that are
    not UTF-8, or a file that cannot be opened, become `error` naming the file instead of a bare
    UnicodeDecodeError/OSError."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except IsADirectoryError:
        raise error("expected a file, found a folder", path) from None
    except FileNotFoundError:
        raise error("file not found", path) from None
    except OSError as exc:
        raise error(f"cannot read the file ({exc.strerror})", path) from None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data[:exc.start].count(b"\n") + 1
        raise error(f"not UTF-8 text: byte 0x{data[exc.start]:02x} at line {line} (offset {exc.start}); "
                    "save the file as UTF-8", path) from None


def read_json(path: str | Path) -> Any:
    """Parse a JSON file; a syntax error or bytes that are not UTF-8 become a DataError naming the file."""
    try:
        return json.loads(read_text(path))
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



