"""Small shared helpers: atomic writes, output guarding, seeding, environment facts."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import platform
import random
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
        try:
            yield tmp_path
        except OSError as exc:
            if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                from textseg_cli.errors import DataError

                raise DataError(f"no space left on the device while writing ({exc.strerror}); the previous "
                                "version of the file, if any, is unchanged", path) from None
            raise
        # mkstemp creates 0600 files; give outputs the usual umask-based mode.
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp_path, 0o666 & ~umask)
        os.replace(tmp_path, path)
        from textseg_cli.safety import note_written

        note_written(path)
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


def prepare_output_dir(path: str | Path, force: bool = False, allow_existing: bool = False, *,
                       command: str = "output", inputs=(), sources=()) -> Path:
    """Create an output folder; refuse a non-empty existing one unless force.

    force replaces only what textseg wrote there (textseg_cli.safety.claim_output_dir): a folder holding
    anything else, an input of the command (`inputs`: out may not be or contain them; `sources`: nor sit
    inside them) or a symlinked --out is refused.
    """
    from textseg_cli.safety import claim_output_dir

    return claim_output_dir(path, command, force=force, allow_existing=allow_existing, inputs=inputs,
                            sources=sources)


def guard_output_file(path: str | Path, force: bool = False) -> Path:
    from textseg_cli.safety import check_out_path

    path = check_out_path(path)  # a symlinked output is refused, not written through
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
        "cudnn": torch.backends.cudnn.version() if torch.cuda.is_available() else None,
        "cpu": cpu_model(),
        "packages": package_versions(),
    }
    return info


# The stack a result depends on (the design card's packages plus the numeric and image-I/O ones).
STACK = ("torch", "torchvision", "numpy", "scipy", "SimpleITK", "nibabel", "h5py", "scikit-image", "pandas",
         "safetensors", "transformers", "open_clip_torch", "openai", "pydicom", "pillow", "typer", "rich",
         "pyyaml", "medpy", "matplotlib", "onnx", "onnxruntime", "nnunetv2", "tensorboard")


def package_versions(names=STACK) -> dict[str, str | None]:
    """Installed version of each distribution (None when absent), read from package metadata."""
    from importlib import metadata

    out: dict[str, str | None] = {}
    for name in names:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def cpu_model() -> str:
    """The CPU's model name (/proc/cpuinfo), else what platform knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text(encoding="utf-8").splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()
