"""A run folder received from someone else is untrusted input (issue 25): its config.yaml and cases.json are
checked before anything relies on them, and a doctored one is one line, exit 2, naming the file."""

from __future__ import annotations

import json
import shutil

import pytest
import yaml
from conftest import run_cli

TINY = ["--device", "cpu", "--set", "method.backbone.n_filters=4", "--set", "train.batch_labeled=1",
        "--set", "train.batch_unlabeled=1"]


@pytest.fixture(scope="module")
def run(tmp_path_factory, synthetic_data):
    out = tmp_path_factory.mktemp("received") / "run"
    code, text = run_cli("train", "--method", "sup", "--data", synthetic_data, "--labeled", "2", "--iterations", "1",
                         "--out", out, *TINY)
    assert code == 0, text
    return out


def _copy(run, tmp_path):
    dst = tmp_path / "run"
    shutil.copytree(run, dst)
    return dst


@pytest.mark.parametrize("edit, needle", [
    (lambda c: c.__setitem__("method", "../../x"), "section 'method' must be a mapping"),
    (lambda c: c["method"].__setitem__("name", "bogus"), "'bogus' is not a textseg method"),
    (lambda c: c.__setitem__("data", [1, 2]), "section 'data' must be a mapping"),
    (lambda c: c.pop("val"), "section 'val' must be a mapping"),
])
def test_doctored_config_yaml_is_named(run, tmp_path, synthetic_data, edit, needle):
    r = _copy(run, tmp_path)
    cfg = yaml.safe_load((r / "config.yaml").read_text())
    edit(cfg)
    (r / "config.yaml").write_text(yaml.safe_dump(cfg))
    for argv in (["eval", r, "--checkpoint", "last", "--device", "cpu"],
                 ["predict", r, "--images", synthetic_data / "images", "--out", tmp_path / "p", "--device", "cpu"]):
        code, text = run_cli(*argv)
        assert code == 2, text
        assert needle in text and "config.yaml" in text and "internal error" not in text, text
    assert not (r / "eval").exists() and not (tmp_path / "p").exists()


@pytest.mark.parametrize("content, needle", [
    (json.dumps({"labeled": ["a"], "unlabeled": "abc"}), "'unlabeled' must be a list"),
    (json.dumps({"labeled": [1, 2]}), "'labeled' must be a list"),
    (json.dumps(["synth_000"]), "expected a JSON object"),
    ("{not json", "unreadable"),
    (b"\xff\xfe{}", "unreadable"),
])
def test_doctored_cases_json_is_named_not_ignored(run, tmp_path, content, needle):
    """eval relies on cases.json to refuse training cases; a damaged copy must not make that check vacuous."""
    r = _copy(run, tmp_path)
    path = r / "cases.json"
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    code, text = run_cli("eval", r, "--checkpoint", "last", "--device", "cpu", "--split", "test")
    assert code == 2, text
    assert needle in text and "cases.json" in text, text
