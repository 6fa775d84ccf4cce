"""The `textseg` command: thin Typer commands over the Python API (see textseg_cli.api)."""

from __future__ import annotations

import importlib
import os
import sys

import click
import typer
from rich.markup import escape

from textseg_cli.cli.usage import (
    CLICK_ERRORS,
    HELP_OPTIONS,
    USAGE_ERRORS,
    hoist_debug,
    os_error_line,
    usage_line,
)
from textseg_cli.console import console, err_console
from textseg_cli.errors import TextsegError

app = typer.Typer(
    name="textseg",
    help="Text-guided semi-supervised medical image segmentation: prep → describe → encode → train → eval.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode="rich",
    context_settings=HELP_OPTIONS,
)
prep_app = typer.Typer(help="Prepare a data set into textseg's prepared format (NIfTI + dataset.json).",
                       no_args_is_help=True, context_settings=HELP_OPTIONS)
app.add_typer(prep_app, name="prep")


def _version(value: bool) -> None:
    from textseg_cli import __version__  # lazy: keeps `textseg --help` torch-free
    if value:
        console.print(f"textseg {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                           help="Print the version and exit."),
    debug: bool = typer.Option(False, "--debug", help="Show full tracebacks on errors."),
) -> None:
    if debug:
        os.environ["TEXTSEG_DEBUG"] = "1"


# Each module registers its commands on `app` / `prep_app` when imported; add new ones here.
_COMMAND_MODULES: list[str] = [
    "train_cmd",
    "models_cmd",
    "prep_pancreas",
    "prep_brats",
    "prep_msd",
    "prep_custom",
    "demo_cmd",
    "prep_lvit",
    "prep_synthetic",
    "prep_la",
    "prep_check",
    "prep_slices",
    "predict_cmd",
    "bench_cmd",
    "eval_cmd",
    "describe_cmd",
    "encode_cmd",
    "export_cmd",
    "plot_cmd",
    "prep_nnunet",
    "export_data_cmd",
    "experiment_cmd",
    "plan_cmd",
]
for _mod in _COMMAND_MODULES:
    importlib.import_module(f"textseg_cli.cli.{_mod}")


def run(argv: list[str] | None = None) -> int:
    """Run the CLI in-process and return the exit code (errors print one line, no traceback)."""
    argv = hoist_debug(list(sys.argv[1:] if argv is None else argv))
    debug = "--debug" in argv or os.environ.get("TEXTSEG_DEBUG") == "1"
    try:
        rv = app(args=argv, prog_name="textseg", standalone_mode=False)
        return int(rv) if isinstance(rv, int) else 0
    except TextsegError as exc:
        if debug:
            raise
        err_console.print(f"[bold red]error:[/] {escape(str(exc))}", highlight=False, soft_wrap=True)
        return 2
    except click.exceptions.Exit as exc:
        return exc.exit_code
    except click.exceptions.Abort:
        err_console.print("[yellow]aborted[/]")
        return 130
    except USAGE_ERRORS as exc:
        err_console.print(f"[bold red]usage error:[/] {usage_line(exc)}", highlight=False, soft_wrap=True, markup=True)
        return 2
    except CLICK_ERRORS as exc:
        exc.show()
        return exc.exit_code
    except KeyboardInterrupt:
        err_console.print("[yellow]interrupted[/]")
        return 130
    except Exception as exc:  # unexpected: still one line unless --debug
        if debug:
            raise
        line = os_error_line(exc) if isinstance(exc, OSError) else None
        if line is not None:  # a read-only folder, missing permissions, a full disk: the user's, not a bug
            err_console.print(f"[bold red]error:[/] {escape(line)}", highlight=False, soft_wrap=True)
            return 2
        err_console.print(f"[bold red]internal error:[/] {type(exc).__name__}: {exc} (rerun with --debug for the traceback)",
                          highlight=False, soft_wrap=True)
        return 1
    finally:
        os.environ.pop("TEXTSEG_DEBUG", None) if "--debug" in argv else None


def main() -> None:
    sys.exit(run())
