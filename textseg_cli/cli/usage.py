"""Usage errors as one line with exit code 2, `-h` on every command, `--debug` anywhere on the line.

Typer vendors its own copy of click (typer._click); its exceptions are not click's, so both are mapped.
`os_error_line` turns an OSError that is the user's folder, disk or permissions into one line (exit 2).
"""

from __future__ import annotations

import errno

import click

HELP_OPTIONS = {"help_option_names": ["-h", "--help"]}

try:  # typer >= 0.16 ships its own click
    from typer._click import exceptions as _tclick
except ImportError:  # pragma: no cover - older typer uses click itself
    _tclick = click.exceptions

USAGE_ERRORS: tuple[type[BaseException], ...] = tuple({click.UsageError, _tclick.UsageError})
CLICK_ERRORS: tuple[type[BaseException], ...] = tuple({click.ClickException, _tclick.ClickException})


def hoist_debug(argv: list[str]) -> list[str]:
    """`--debug` is a root option; accept it after the subcommand too (not after `--`)."""
    end = argv.index("--") if "--" in argv else len(argv)
    if "--debug" not in argv[:end]:
        return argv
    rest = [a for a in argv[:end] if a != "--debug"] + argv[end:]
    return ["--debug", *rest]


def usage_line(exc: BaseException) -> str:
    """'textseg train: No such option: --bogus (see `textseg train -h`)'."""
    ctx = getattr(exc, "ctx", None)
    where = ctx.command_path if ctx is not None and getattr(ctx, "command_path", None) else "textseg"
    msg = exc.format_message() if hasattr(exc, "format_message") else str(exc)
    msg = " ".join(str(msg).split())
    return f"{where}: {msg} (see `{where} -h`)"


# An OSError with one of these errno values and a file name is the user's folder, disk or permissions, not a bug
_OS_USER_ERRORS = {
    errno.EROFS: "cannot write: read-only file system",
    errno.EACCES: "permission denied",
    errno.EPERM: "operation not permitted",
    errno.ENOSPC: "cannot write: no space left on the device",
    errno.EDQUOT: "cannot write: disk quota exceeded",
    errno.EFBIG: "cannot write: file too large (a file-size limit such as `ulimit -f` applies)",
}


def os_error_line(exc: OSError) -> str | None:
    """'PATH: cannot write: read-only file system (choose another output folder ...)', or None when the
    OSError is not one the user can fix (then it stays an internal error)."""
    what = _OS_USER_ERRORS.get(exc.errno) if isinstance(exc.errno, int) else None
    if what is None or not exc.filename:
        return None
    hint = ("free some space or choose another output folder" if exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)
            else "choose another output folder or fix its permissions")
    return f"{exc.filename}: {what} ({hint})"
