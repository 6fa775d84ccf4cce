"""Usage errors as one line with exit code 2, `-h` on every command, `--debug` anywhere on the line.

Typer vendors its own copy of click (typer._click); its exceptions are not click's, so both are mapped.
"""

from __future__ import annotations

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
