"""Facts about the machine and the package stack, recorded in every run's env.json."""

from __future__ import annotations

import os
import platform
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
import torch

from textseg_cli import __version__


def environment_info() -> dict[str, Any]:
    """Versions and hardware recorded beside every run and prepared data set."""


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


CACHE_ENV = "TEXTSEG_CACHE"


def default_cache_root() -> Path:
    """`$TEXTSEG_CACHE`, else `$XDG_CACHE_HOME/textseg`, else `~/.cache/textseg` (LLM replies, bench results)."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base).expanduser() / "textseg"


def hardware_name(device: str) -> str:
    """The model name of the device a measurement ran on (GPU name, else the CPU model)."""
    if str(device).startswith("cuda") and torch.cuda.is_available():
        return torch.cuda.get_device_name(torch.device(device))
    return cpu_model()
