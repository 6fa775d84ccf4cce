"""Property test (issue 25): hostile names in every place a name is read never change anything outside a sandbox.

A set of hostile names (`..`, `../x`, an absolute path, `a/b`, `.`, the empty name, a symbolic link to a folder
outside) is placed in every place textseg reads a name from — the `.textseg-output.json` manifest of an output
folder, case IDs of a prepared `dataset.json`, split files, nnU-Net's `dataset.json` and `splits_final.json`, and
experiment `id:`s — and fed to every command that takes `--out` (and `prep check`). For every combination:

- the command ends with exit code 0 or 2, never an internal error (1) or a traceback;
- a hostile name is refused (exit 2) except where it is harmless by construction (a symlink listed in a manifest
  is unlinked, never followed: exit 0);
- the sha256 of every file under the sandbox's parent, outside the sandbox, is the same before and after.

The parent holds planted files a hostile name would hit: `x.nii.gz`, `x_0000.nii.gz`, `abs_x*`, a folder
`outside/` with content, and the names the absolute path variant points to.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import yaml
from conftest import fingerprint_outside, run_cli
from raw_fakes import phantom_ct, write_image

HOSTILE = ["..", "../x", "ABS", "a/b", ".", "", "LINK"]
TINY = ["--device", "cpu", "--set", "method.backbone.n_filters=4", "--set", "train.batch_labeled=1",
        "--set", "train.batch_unlabeled=1"]
SP = (0.8, 0.8, 2.0)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """ROOT/{planted files, outside/} and ROOT/sandbox/{data, run, raw, nnunet}: a prepared synthetic set
    (train 2 / val 1 / test 1), a 2-iteration run on it, raw NIfTI images+labels and an nnU-Net v2 raw folder."""
    root = tmp_path_factory.mktemp("hostile")
    sandbox = root / "sandbox"
    data, run = sandbox / "data", sandbox / "run"
    code, text = run_cli("prep", "synthetic", "--out", data, "--cases", "4", "--val", "1", "--test", "1",
                         "--size", "32,32,16", "--patch", "32,32,16")
    assert code == 0, text
    code, text = run_cli("train", "--method", "sup", "--data", data, "--labeled", "2", "--iterations", "2",
                         "--val-every", "2", "--out", run, *TINY)
    assert code == 0, text
    raw = sandbox / "raw"
    for i in range(3):
        hu, lab = phantom_ct((16, 16, 6), seed=i)
        write_image(raw / "images" / f"p{i}.nii.gz", hu, SP)
        write_image(raw / "labels" / f"p{i}.nii.gz", lab, SP)
    nn = sandbox / "Dataset501_Liver"
    ids = [f"liver_{i:03d}" for i in range(3)]
    for i, cid in enumerate(ids):
        hu, lab = phantom_ct((16, 16, 6), seed=i)
        write_image(nn / "imagesTr" / f"{cid}_0000.nii.gz", hu, SP)
        write_image(nn / "labelsTr" / f"{cid}.nii.gz", lab.astype(np.uint8), SP)
    (nn / "dataset.json").write_text(json.dumps({
        "channel_names": {"0": "CT"}, "labels": {"background": 0, "liver": 1}, "numTraining": 3,
        "file_ending": ".nii.gz", "name": "Liver"}))
    (nn / "splits_final.json").write_text(json.dumps([{"train": ids[1:], "val": ids[:1]}]))
    for name in ("x.nii.gz", "x_0000.nii.gz", "abs_x.nii.gz", "abs_x_0000.nii.gz", "x", "abs_x"):
        (root / name).write_bytes(b"precious " + name.encode())
    (root / "outside").mkdir()
    (root / "outside" / "keep.txt").write_text("keep me")
    (root / "outside" / "x.nii.gz").write_bytes(b"keep me too")
    return root, sandbox, data, run, raw, nn


def _name(world, hostile: str) -> str:
    root = world[0]
    return {"ABS": str(root / "abs_x"), "LINK": "lnk"}.get(hostile, hostile)


def _check(world, code: int, text: str, expect_refused: bool = True) -> None:
    assert code in (0, 2), text
    assert "internal error" not in text.lower() and "Traceback" not in text, text
    if expect_refused:
        assert code == 2, text


class Sandboxed:
    """Fingerprint ROOT outside the sandbox before, compare after; each case gets its own scratch folder."""

    def __init__(self, world, tag: str):
        self.world, self.root, self.sandbox = world, world[0], world[1]
        self.scratch = self.sandbox / "cases" / tag
        if self.scratch.exists():
            shutil.rmtree(self.scratch)
        self.scratch.mkdir(parents=True)

    def __enter__(self):
        self.before = fingerprint_outside(self.root, self.sandbox)
        return self

    def __exit__(self, *exc):
        assert fingerprint_outside(self.root, self.sandbox) == self.before, "a file outside the sandbox changed"
        return False


# --- 1. manifest entries × every command that writes a folder with --out -------------------------------------------
def _cmd_with_out(world, command: str, out: Path) -> list:
    root, sandbox, data, run, raw, nn = world
    return {
        "prep synthetic": ["prep", "synthetic", "--out", out, "--cases", "3", "--val", "1", "--test", "1",
                           "--size", "32,32,16", "--patch", "32,32,16", "--force"],
        "prep custom": ["prep", "custom", "--images", raw / "images", "--labels", raw / "labels", "--out", out,
                        "--modality", "CT", "--workers", "1", "--force"],
        "prep nnunet": ["prep", "nnunet", "--src", nn, "--out", out, "--force"],
        "train": ["train", "--method", "sup", "--data", data, "--labeled", "2", "--iterations", "1",
                  "--val-every", "1", "--out", out, "--force", *TINY],
        "predict": ["predict", run, "--images", raw / "images", "--out", out, "--checkpoint", "last",
                    "--device", "cpu", "--force"],
        "eval": ["eval", run, "--split", "test", "--checkpoint", "last", "--out", out, "--device", "cpu", "--force"],
        "export-data": ["export-data", data, "--format", "nnunet", "--out", out, "--force"],
        "export": ["export", run, "--checkpoint", "last", "--out", out, "--force"],
    }[command]


# the `command` each one records in its manifest (a manifest from another command is refused anyway)
MANIFEST_COMMAND = {"prep synthetic": "prep", "prep custom": "prep", "prep nnunet": None, "train": "train",
                    "predict": "predict", "eval": "eval", "export-data": None, "export": None}
COMMANDS = list(MANIFEST_COMMAND)


def _doctored_out(box: Sandboxed, command: str, hostile: str) -> Path:
    """An output folder that textseg 'wrote' (manifest of that command) listing a hostile entry."""
    out = box.scratch / "out"
    out.mkdir()
    (out / "old.txt").write_text("written by textseg earlier")
    entries = ["old.txt"]
    if hostile == "LINK":
        (out / "lnk").symlink_to(box.root / "outside", target_is_directory=True)
        entries.append("lnk")
    else:
        entries.append(_name(box.world, hostile))
    man = {"tool": "textseg", "command": MANIFEST_COMMAND[command], "entries": entries}
    (out / ".textseg-output.json").write_text(json.dumps(man))
    return out


@pytest.mark.parametrize("hostile", HOSTILE)
@pytest.mark.parametrize("command", COMMANDS)
def test_manifest_entry_names(world, command, hostile):
    with Sandboxed(world, f"man_{command.replace(' ', '_')}_{HOSTILE.index(hostile)}") as box:
        out = _doctored_out(box, command, hostile)
        if MANIFEST_COMMAND[command] is None:
            # learn the manifest's command name from a real run of the command (first use only)
            probe = box.scratch / "probe"
            code, text = run_cli(*[a if a != out else probe for a in _cmd_with_out(world, command, out)])
            assert code == 0, text
            man = json.loads((out / ".textseg-output.json").read_text())
            man["command"] = json.loads((probe / ".textseg-output.json").read_text())["command"]
            (out / ".textseg-output.json").write_text(json.dumps(man))
        code, text = run_cli(*_cmd_with_out(world, command, out))
        _check(world, code, text, expect_refused=hostile != "LINK")
        if hostile == "LINK":
            assert not (out / "lnk").exists() and (box.root / "outside" / "keep.txt").exists()
        else:
            assert ".textseg-output.json" in text, text
            assert (out / "old.txt").exists(), "nothing may be removed when the manifest is refused"


def test_out_given_as_a_symlink_to_outside_is_refused(world):
    """--out itself a symbolic link to a folder outside (the 'symlink' hostile name at the top level)."""
    for command in COMMANDS:
        with Sandboxed(world, f"outlink_{command.replace(' ', '_')}") as box:
            link = box.scratch / "out"
            link.symlink_to(box.root / "outside", target_is_directory=True)
            code, text = run_cli(*_cmd_with_out(world, command, link))
            _check(world, code, text)
            assert "link" in text.lower(), text


def test_a_received_run_folder_with_a_doctored_manifest(world):
    """`eval RUN --force` writes into the run: a received run whose manifest lists a hostile entry."""
    for i, hostile in enumerate(HOSTILE):
        with Sandboxed(world, f"runman_{i}") as box:
            run = box.scratch / "run"
            shutil.copytree(world[3], run, symlinks=True)
            man = json.loads((run / ".textseg-output.json").read_text())
            if hostile == "LINK":
                (run / "lnk").symlink_to(box.root / "outside", target_is_directory=True)
                man["entries"].append("lnk")
            else:
                man["entries"].append(_name(world, hostile))
            (run / ".textseg-output.json").write_text(json.dumps(man))
            code, text = run_cli("eval", run, "--split", "test", "--checkpoint", "last", "--device", "cpu",
                                 "--force")
            _check(world, code, text, expect_refused=hostile != "LINK")


# --- 2. case IDs of a prepared dataset.json × every command that reads one --------------------------------------------
def _hostile_data(box: Sandboxed, split: str, hostile: str) -> Path:
    """A copy of the prepared set whose first `split` case has the hostile ID (LINK: a valid ID whose image and
    label are symbolic links to files outside, which may be read but never written through)."""
    data = box.scratch / "data"
    shutil.copytree(box.world[2], data)
    spec = json.loads((data / "dataset.json").read_text())
    old = spec["splits"][split][0]
    new = _name(box.world, hostile)
    if hostile == "LINK":
        case = next(c for c in spec["cases"] if c["id"] == old)
        for key in ("image", "label"):
            if case.get(key):
                src = data / case[key]
                target = box.root / "outside" / f"{key}_{src.name}"
                if not target.exists():
                    shutil.copy(src, target)
                    box.before = fingerprint_outside(box.root, box.sandbox)  # planted by the test, not by textseg
                src.unlink()
                src.symlink_to(target)
    for c in spec["cases"]:
        if c["id"] == old:
            c["id"] = new
    spec["splits"] = {k: [new if c == old else c for c in v] if isinstance(v, list) else v
                      for k, v in spec["splits"].items()}
    (data / "dataset.json").write_text(json.dumps(spec))
    return data


def _id_commands(world, data: Path, scratch: Path) -> dict[str, list]:
    run = world[3]
    return {
        "train": ["train", "--method", "sup", "--data", data, "--labeled", "2", "--iterations", "1",
                  "--val-every", "1", "--out", scratch / "r", *TINY],
        "export-data": ["export-data", data, "--format", "nnunet", "--out", scratch / "exp"],
        "export-data msd": ["export-data", data, "--format", "msd", "--out", scratch / "msd"],
        "predict": ["predict", run, "--images", data, "--out", scratch / "pred", "--checkpoint", "last",
                    "--device", "cpu"],
        "prep check": ["prep", "check", data],
    }


@pytest.mark.parametrize("hostile", HOSTILE)
@pytest.mark.parametrize("split", ["train", "test"])
def test_case_ids_of_a_prepared_set(world, split, hostile):
    with Sandboxed(world, f"ids_{split}_{HOSTILE.index(hostile)}") as box:
        data = _hostile_data(box, split, hostile)
        for name, args in _id_commands(world, data, box.scratch).items():
            code, text = run_cli(*args)
            _check(world, code, text, expect_refused=hostile != "LINK")
            if hostile != "LINK":
                assert "dataset.json" in text, (name, text)


@pytest.mark.parametrize("hostile", HOSTILE)
def test_case_ids_when_eval_reads_the_runs_data(world, hostile):
    """eval RUN reads the run's data folder: a hostile val ID there (the data set changed after training)."""
    with Sandboxed(world, f"evalids_{HOSTILE.index(hostile)}") as box:
        run = box.scratch / "run"
        shutil.copytree(world[3], run, symlinks=True)
        data = _hostile_data(box, "val", hostile)
        cfg = yaml.safe_load((run / "config.yaml").read_text())
        cfg["data"]["root"] = str(data)
        (run / "config.yaml").write_text(yaml.safe_dump(cfg))
        code, text = run_cli("eval", run, "--split", "val", "--checkpoint", "last", "--device", "cpu",
                             "--data", data, "--out", box.scratch / "ev")
        _check(world, code, text, expect_refused=hostile != "LINK")


# --- 3. split files -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("hostile", HOSTILE)
def test_split_file_names(world, hostile):
    raw = world[4]
    with Sandboxed(world, f"split_{HOSTILE.index(hostile)}") as box:
        name = "p9" if hostile == "LINK" else _name(world, hostile)  # LINK: an ID with no image (unknown)
        split = box.scratch / "split.yaml"
        split.write_text(yaml.safe_dump({"train": ["p0", "p2"], "test": ["p1", name]}))
        code, text = run_cli("prep", "custom", "--images", raw / "images", "--labels", raw / "labels", "--out",
                             box.scratch / "out", "--modality", "CT", "--split-file", split, "--workers", "1")
        _check(world, code, text)
        assert "split.yaml" in text, text
        assert not (box.scratch / "out" / "dataset.json").exists()


# --- 4. nnU-Net dataset.json and splits_final.json ----------------------------------------------------------------
@pytest.mark.parametrize("hostile", HOSTILE)
@pytest.mark.parametrize("where", ["splits_final", "file_ending", "channel_names", "labels"])
def test_nnunet_json_names(world, where, hostile):
    with Sandboxed(world, f"nn_{where}_{HOSTILE.index(hostile)}") as box:
        nn = box.scratch / "Dataset501_Liver"
        shutil.copytree(world[5], nn)
        name = _name(world, hostile)
        spec = json.loads((nn / "dataset.json").read_text())
        if where == "splits_final":
            sf = json.loads((nn / "splits_final.json").read_text())
            sf[0]["val"] = [name]
            (nn / "splits_final.json").write_text(json.dumps(sf))
        elif where == "file_ending":
            spec["file_ending"] = "/../../../x.nii.gz" if hostile == "../x" else name + ".nii.gz"
        elif where == "channel_names":
            spec["channel_names"] = {"0": name}
        else:
            spec["labels"] = {"background": 0, name: 1}
        (nn / "dataset.json").write_text(json.dumps(spec))
        code, text = run_cli("prep", "nnunet", "--src", nn, "--out", box.scratch / "out")
        # names that are never used as paths (channel and label names) may be anything; an empty name in front of
        # '.nii.gz' is the normal ending
        harmless = where in ("channel_names", "labels") or (where == "file_ending" and hostile == "")
        _check(world, code, text, expect_refused=not harmless)
        if code == 2:
            assert not (box.scratch / "out" / "dataset.json").exists()


# --- 5. experiment ids --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("hostile", HOSTILE)
def test_experiment_ids(world, hostile):
    with Sandboxed(world, f"expid_{HOSTILE.index(hostile)}") as box:
        name = _name(world, hostile)
        spec = {"name": "t", "data": str(world[2]), "labeled": [2], "seeds": [1], "iterations": 1,
                "out": str(box.scratch / "exp"), "methods": [{"method": "sup", "id": name, "set": TINY[3::2]}]}
        path = box.scratch / "exp.yaml"
        path.write_text(yaml.safe_dump(spec))
        if hostile == "LINK":  # a valid id whose runs folder is a symbolic link to a folder outside
            (box.scratch / "exp" / "runs").mkdir(parents=True)
            (box.scratch / "exp" / "runs" / name).symlink_to(box.root / "outside", target_is_directory=True)
        code, text = run_cli("experiment", "run", path, "--quiet")
        _check(world, code, text)
        assert ("empty id" if name == "" else repr(name) if hostile != "LINK" else "symbolic link") in text, text
