"""Devices: `--device` parsed and resolved in one place (CUDA when available, the local rank under DDP)."""

from __future__ import annotations

import re

import torch

from textseg_cli.errors import ConfigError

_DEVICE = re.compile(r"^(auto|cpu|cuda(:\d+)?|mps)$")


def device_from(device: str | torch.device, option: str = "--device") -> torch.device:
    """torch.device(device), with an unknown name as a one-line usage error."""
    if isinstance(device, torch.device):
        return device
    if not _DEVICE.match(str(device)):
        raise ConfigError(f"{option} {device!r}: expected auto, cpu, cuda or cuda:N")
    return torch.device(device)


def resolve_device(device: str | torch.device | None = None, *, option: str = "--device",
                   local_rank: int | None = None, bind: bool = False) -> torch.device:
    """`None`/"auto" → CUDA when available, else CPU; a CUDA request on a machine without CUDA is a usage error.

    local_rank: under DDP, the process's GPU (`cuda:LOCAL_RANK`) replaces the requested CUDA device.
    bind: make the device current (`torch.cuda.set_device`), as training does.
    """
    if device is None or str(device) in ("", "auto"):
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dev = device_from(device, option)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"{option} {device}: CUDA is not available on this machine")
        if local_rank is not None:
            dev = torch.device("cuda", local_rank)
        if bind:
            torch.cuda.set_device(dev)
    return dev
