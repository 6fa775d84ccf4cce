"""The parity harness itself (issue 26): official imports leave no trace, and a missing or mismatched checkout
skips locally but fails under CI / TEXTSEG_PARITY_STRICT=1."""

from __future__ import annotations

import sys
import types

import pytest
from parity_helpers import isolated_imports, official_module, require_checkout


def test_official_imports_leave_sys_modules_and_sys_path_as_they_were(official_dir):
    sentinel = types.ModuleType("utils")  # a foreign `utils` present before (what made a test fail in one order)
    saved_utils = sys.modules.get("utils")
    sys.modules["utils"] = sentinel
    path_before = list(sys.path)
    try:
        with isolated_imports(official_dir):
            losses = official_module(official_dir, "UA-MT", "utils.losses")
            assert sys.modules["utils.losses"] is losses and sys.modules["utils"] is not sentinel
        assert sys.modules["utils"] is sentinel
        assert "utils.losses" not in sys.modules
        assert not any(str(official_dir) in str(getattr(m, "__file__", "") or "") for m in list(sys.modules.values()))
        assert sys.path == path_before
    finally:
        if saved_utils is None:
            sys.modules.pop("utils", None)
        else:
            sys.modules["utils"] = saved_utils


@pytest.mark.parametrize("env", [{}, {"CI": "true"}, {"TEXTSEG_PARITY_STRICT": "1"}, {"CI": "0"}])
def test_missing_or_mismatched_checkout_skips_locally_and_fails_when_strict(tmp_path, monkeypatch, env):
    monkeypatch.delenv("CI", raising=False)
    monkeypatch.delenv("TEXTSEG_PARITY_STRICT", raising=False)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    strict = env in ({"CI": "true"}, {"TEXTSEG_PARITY_STRICT": "1"})
    expected = pytest.fail.Exception if strict else pytest.skip.Exception
    with pytest.raises(expected, match="missing"):
        require_checkout(tmp_path, "UA-MT")
    (tmp_path / "UA-MT").mkdir()
    (tmp_path / "UA-MT" / ".commit").write_text("0123456789abcdef\n", encoding="utf-8")
    with pytest.raises(expected, match="written against 88ed29a"):
        require_checkout(tmp_path, "UA-MT")
    (tmp_path / "UA-MT" / ".commit").write_text("88ed29ad794f877122e542a7fa9505a76fa83515\n", encoding="utf-8")
    assert require_checkout(tmp_path, "UA-MT") == tmp_path / "UA-MT"
