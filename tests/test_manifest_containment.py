"""A manifest (.textseg-output.json) may come from someone else's folder: `--force` and the clean-up after a
failure remove only direct children of the output folder, whatever names the manifest lists (issue 25.1)."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest

from conftest import run_cli
from textseg_cli.storage.outputs import MANIFEST, discard_if_unfinished

SMALL = ["--cases", "4", "--val", "1", "--test", "1", "--size", "32,32,16"]


def _tree_hash(folder: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(folder.rglob("*")):
        h.update(str(p.relative_to(folder)).encode())
        if p.is_file() and not p.is_symlink():
            h.update(p.read_bytes())
    return h.hexdigest()


def _doctor(folder: Path, name: str) -> None:
    man = json.loads((folder / MANIFEST).read_text(encoding="utf-8"))
    man["entries"].append(name)
    (folder / MANIFEST).write_text(json.dumps(man), encoding="utf-8")


@pytest.mark.parametrize("hostile", ["../sibling", "..", "ABS", "sub/dir", ".", "", "..\\sibling"])
def test_force_refuses_a_manifest_naming_anything_but_a_child(tmp_path, hostile):
    sandbox = tmp_path / "sandbox"
    out = sandbox / "prepared"
    sibling = sandbox / "sibling"
    sibling.mkdir(parents=True)
    (sibling / "keep.txt").write_text("not textseg's", encoding="utf-8")
    outside = tmp_path / "abs_target"
    outside.mkdir()
    (outside / "keep.txt").write_text("not textseg's either", encoding="utf-8")
    code, text = run_cli("prep", "synthetic", "--out", out, *SMALL)
    assert code == 0, text
    _doctor(out, str(outside) if hostile == "ABS" else hostile)
    before = _tree_hash(tmp_path)

    code, text = run_cli("prep", "synthetic", "--out", out, "--force", *SMALL)

    assert code == 2, text
    flat = " ".join(text.split())
    assert MANIFEST in flat and "not a plain name" in flat
    assert _tree_hash(tmp_path) == before  # nothing inside or outside the sandbox changed


def test_symlinked_entry_is_unlinked_not_followed(tmp_path):
    out, outside = tmp_path / "prepared", tmp_path / "outside"
    outside.mkdir()
    (outside / "keep.txt").write_text("x", encoding="utf-8")
    code, text = run_cli("prep", "synthetic", "--out", out, *SMALL)
    assert code == 0, text
    os.symlink(outside, out / "link")
    _doctor(out, "link")  # a listed name that is a symlink pointing out of the folder
    code, text = run_cli("prep", "synthetic", "--out", out, "--force", *SMALL)
    assert code == 0, text
    assert (outside / "keep.txt").read_text(encoding="utf-8") == "x" and not (out / "link").exists()


def test_cleanup_after_a_failure_removes_nothing_on_a_doctored_manifest(tmp_path):
    folder, victim = tmp_path / "run", tmp_path / "victim"
    folder.mkdir()
    victim.mkdir()
    (victim / "data.txt").write_text("precious", encoding="utf-8")
    (folder / MANIFEST).write_text(json.dumps({"tool": "textseg", "command": "train", "entries": ["../victim"]}),
                                   encoding="utf-8")
    assert discard_if_unfinished(folder) is False
    assert (victim / "data.txt").read_text(encoding="utf-8") == "precious"
