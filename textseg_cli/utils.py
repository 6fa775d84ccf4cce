"""Small shared helpers: atomic writes, output guarding, seeding, environment facts."""

from __future__ import annotations

import contextlib
import json
import os
import platform
import random
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from textseg_cli.errors import OutputExistsError


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
        yield tmp_path
        # mkstemp creates 0600 files; give outputs the usual umask-based mode.
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp_path, 0o666 & ~umask)
        os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def read_json(path: str | Path) -> Any:
    """Parse a JSON file; a syntax error becomes a DataError naming the file."""
    from textseg_cli.errors import DataError

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


def prepare_output_dir(path: str | Path, force: bool = False, allow_existing: bool = False) -> Path:
    """Create an output folder; refuse a non-empty existing one unless force (then it is emptied).

    Never called on a source folder: callers check that out != src first.
    """
    path = Path(path)
    if path.exists() and any(path.iterdir()):
        if allow_existing:
            return path
        if not force:
            raise OutputExistsError(path)
        shutil.rmtree(path)
    path.mkdir(parents=True, exist_ok=True)
    return path


def guard_output_file(path: str | Path, force: bool = False) -> Path:
    path = Path(path)
    if path.exists() and not force:
        raise OutputExistsError(path)
    return path


def seed_everything(seed: int, deterministic: bool = False) -> None:
    """Seed python, numpy and torch; optionally switch torch to deterministic kernels."""
    import torch

    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(seed)
    if deterministic:
        from textseg_cli.engine.determinism import set_deterministic

        set_deterministic()


def environment_info() -> dict[str, Any]:
    """Versions and hardware recorded beside every run and prepared data set."""
    import torch

    from textseg_cli import __version__

    info: dict[str, Any] = {
        "textseg": __version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "numpy": np.__version__,
        "torch": torch.__version__,
        "cuda": torch.version.cuda if torch.cuda.is_available() else None,
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }
    return info
