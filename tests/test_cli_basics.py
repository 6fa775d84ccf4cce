from conftest import run_cli

from textseg_cli import __version__


def test_version():
    code, out = run_cli("--version")
    assert code == 0
    assert __version__ in out


def test_help_lists_commands():
    code, out = run_cli("--help")
    assert code == 0
    assert "prep" in out
