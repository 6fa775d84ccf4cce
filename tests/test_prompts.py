"""Prompt files: bundled content, lookup order, inheritance from generic.yaml and error messages."""

from __future__ import annotations

import itertools
import re
import sys
from pathlib import Path

import pytest

from textseg_cli.errors import ConfigError
from textseg_cli.text.describe import count_words
from textseg_cli.text.prompts import (PROMPTS_ENV, find_prompt_file, list_datasets, load_aux_template, load_prompts,
                                      search_dirs)

REPO = Path(__file__).resolve().parents[1]
BUNDLED = ["pancreas", "la", "brats", "lung", "spleen", "synthetic"]


@pytest.fixture(autouse=True)
def _no_user_prompts(monkeypatch):
    monkeypatch.delenv(PROMPTS_ENV, raising=False)


def _words(text: str) -> set[str]:
    return set(re.findall(r"[a-z]{4,}", text.lower()))


@pytest.mark.parametrize("name", BUNDLED)
def test_bundled_prompt_files_are_complete(name):
    ps = load_prompts(name)
    assert ps.path == (REPO / "prompts" / f"{name}.yaml").resolve()
    assert ps.class_names[0] == "background" and len(ps.class_names) >= 2
    assert len(ps.descriptions) == 15
    assert min(count_words(d) for d in ps.descriptions) >= 60
    # distinct: no two descriptions share most of their vocabulary
    for a, b in itertools.combinations(ps.descriptions, 2):
        wa, wb = _words(a), _words(b)
        assert len(wa & wb) / len(wa | wb) < 0.5
    messages = ps.llm_messages(15, 60)
    user = messages[-1]["content"]
    assert messages[0]["role"] == "system" and messages[-1]["role"] == "user"
    assert "Generate 15 descriptive crucial features" in user and "minimum of 60 words" in user
    assert ps.target in user and ps.modality in user and "{" not in user
    assert ps.class_prompts() == [f"A pixel of a {c}." for c in ps.class_names]


def test_descriptions_differ_between_datasets():
    sets = {name: set(load_prompts(name).descriptions) for name in BUNDLED}
    for a, b in itertools.combinations(BUNDLED, 2):
        assert not sets[a] & sets[b]


def test_lookup_env_then_repo_and_explicit_dir_first(tmp_path, monkeypatch):
    # the checkout's prompts/ first, then the copy a wheel installs under <prefix>/share/textseg/prompts
    assert search_dirs()[-2:] == [REPO / "prompts", Path(sys.prefix) / "share" / "textseg" / "prompts"]
    user = tmp_path / "user"
    user.mkdir()
    # a minimal custom data set: everything else is inherited from generic.yaml
    (user / "kidney.yaml").write_text("name: kidney\ntarget: kidney\nmodality: CT\n"
                                      "class_names: [background, kidney]\n"
                                      "descriptions: ['The kidney is a bean-shaped organ.']\n")
    with pytest.raises(ConfigError, match="kidney.yaml"):
        load_prompts("kidney")
    monkeypatch.setenv(PROMPTS_ENV, str(user))
    ps = load_prompts("kidney")
    assert ps.path == (user / "kidney.yaml").resolve()
    assert ps.clip_templates[0] == "A pixel of a {class}."  # inherited
    assert "segmenting the kidney from 3D CT images" in ps.llm_messages(5, 40)[-1]["content"]
    assert "kidney" in list_datasets() and "pancreas" in list_datasets()
    # an explicit --prompts-dir beats the environment and the bundled files
    override = tmp_path / "override"
    override.mkdir()
    (override / "pancreas.yaml").write_text("target: pancreatic gland\nmodality: MRI\nstructures: ducts\n"
                                            "class_names: [background, pancreas]\n")
    assert load_prompts("pancreas", prompts_dir=override).target == "pancreatic gland"
    assert load_prompts("pancreas").target == "pancreas"
    # a data set can also be named by the path of its file
    assert load_prompts(str(user / "kidney.yaml")).name == "kidney"


def test_unknown_dataset_error_names_search_path(tmp_path):
    with pytest.raises(ConfigError) as err:
        find_prompt_file("liverish", prompts_dir=tmp_path)
    msg = str(err.value)
    assert "liverish.yaml" in msg and str(tmp_path) in msg and str(REPO / "prompts") in msg
    assert "pancreas" in msg  # lists the known data sets


@pytest.mark.parametrize("body, fragment", [
    ("target: x\nmodality: CT\nclass_names: [background]\n", "class_names"),
    ("target: x\nmodality: CT\nclass_names: [background, x]\nllm: {user: 'Generate {count} things'}\n",
     "unknown placeholder"),
    ("target: x\nmodality: CT\nclass_names: [background, x]\nclip_templates: ['no placeholder']\n", "{class}"),
    ("target: [unclosed\n", "invalid YAML"),
])
def test_bad_prompt_files_name_file_and_field(tmp_path, body, fragment):
    (tmp_path / "bad.yaml").write_text(body)
    with pytest.raises(ConfigError) as err:
        load_prompts("bad", prompts_dir=tmp_path)
    assert fragment in str(err.value) and "bad.yaml" in str(err.value)


def test_aux_template_loads():
    tpl = load_aux_template()
    assert "{text}" in tpl["llm"]["user"]
    assert tpl["offline"]["rewrites"] and Path(tpl["path"]).name == "aux_prompt.yaml"
    assert "aux_prompt" not in list_datasets()
