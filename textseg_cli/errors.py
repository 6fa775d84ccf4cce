"""User-facing errors: one line naming the file/field and what was expected."""

from __future__ import annotations

from pathlib import Path


class TextsegError(Exception):
    """An error caused by the user's input or environment, printed without a traceback."""

    def __init__(self, message: str, path: str | Path | None = None, hint: str | None = None):
        self.path = str(path) if path is not None else None
        self.hint = hint
        super().__init__(message)

    def __str__(self) -> str:
        msg = super().__str__()
        if self.path:
            msg = f"{self.path}: {msg}"
        if self.hint:
            msg = f"{msg} ({self.hint})"
        return msg


class DataError(TextsegError):
    """Bad, missing or inconsistent data (images, labels, dataset.json)."""


class ConfigError(TextsegError):
    """Bad configuration value or command-line option."""


class OutputExistsError(TextsegError):
    """The output exists and --force was not given."""

    def __init__(self, path: str | Path):
        super().__init__("output already exists; pass --force to overwrite", path)
