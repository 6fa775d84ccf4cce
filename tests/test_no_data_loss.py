"""Nothing outside textseg's own outputs changes: every command with --out/--force, run against a folder
holding an unrelated file, a folder holding one of the command's inputs, and a symlinked --out (issue 14.1)."""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import pytest

from conftest import run_cli


def snapshot(root: Path) -> dict[str, str]:
    """Every file and link under root (not followed) → content hash or link target."""
    out = {}
    for p in sorted(root.rglob("*")):
        rel = str(p.relative_to(root))
        if p.is_symlink():
            out[rel] = "link:" + str(p.readlink())
        elif p.is_file():
            out[rel] = hashlib.sha1(p.read_bytes()).hexdigest()
    return out


@pytest.fixture(scope="module")
def world(tmp_path_factory, synthetic_data):
    """A copy of the tiny synthetic set, a 2-iteration run on it, a folder of images and raw custom inputs."""
    from raw_fakes import make_brats, make_msd_task, phantom_ct, write_image
    from test_prep_lvit import _make_split

    root = tmp_path_factory.mktemp("world")
    data = root / "proj" / "data"
    shutil.copytree(synthetic_data, data)
    run = root / "runs" / "r"
    code, text = run_cli("train", "--method", "mcnet", "--data", data, "--labeled", "2", "--iterations", "2",
                         "--out", run, "--device", "cpu", "--val-every", "2", "--set", "method.backbone.n_filters=2",
                         "--set", "train.batch_labeled=1", "--set", "train.batch_unlabeled=1")
    assert code == 0, text
    images = root / "imgs"
    images.mkdir()
    for p in sorted((data / "images").glob("*.nii.gz"))[:2]:
        shutil.copy(p, images / p.name)
    raw = root / "raw"
    for i in range(3):
        img, lab = phantom_ct(shape=(16, 16, 8), seed=i)
        write_image(raw / "images" / f"c{i}.nii.gz", img)
        write_image(raw / "labels" / f"c{i}.nii.gz", lab)
    msd = make_msd_task(root / "msd", n=3, shape=(16, 16, 8))
    brats = root / "brats"
    make_brats(brats, n_hgg=2, n_lgg=1, shape=(16, 16, 8))
    lvit = root / "lvit"
    _make_split(lvit, "Train", ["a1", "a2"])
    _make_split(lvit, "Test", ["b1"])
    return {"root": root, "data": data, "run": run, "images": images, "raw": raw, "msd": msd, "brats": brats,
            "lvit": lvit}


# command name → (argv builder given the output folder, the input a careless --out may hold)
def _cmds(w):
    return {
        "prep synthetic": (lambda o: ["prep", "synthetic", "--out", o, "--cases", "4", "--size", "16,16,16",
                                      "--val", "1", "--test", "1"], None),
        "prep custom": (lambda o: ["prep", "custom", "--images", w["raw"] / "images", "--labels",
                                   w["raw"] / "labels", "--out", o, "--split", "2,1"], w["raw"]),
        "prep slices": (lambda o: ["prep", "slices", "--src", w["data"], "--out", o], w["data"]),
        "prep msd": (lambda o: ["prep", "msd", "--src", w["msd"], "--out", o, "--split", "2,1"], w["msd"]),
        "prep brats": (lambda o: ["prep", "brats", "--src", w["brats"], "--out", o, "--split", "1,1,1"], w["brats"]),
        "prep lvit": (lambda o: ["prep", "lvit", "--src", w["lvit"], "--out", o], w["lvit"]),
        "train": (lambda o: ["train", "--method", "mcnet", "--data", w["data"], "--labeled", "2", "--iterations", "1",
                             "--out", o, "--device", "cpu", "--val-every", "0",
                             "--set", "method.backbone.n_filters=2", "--set", "train.batch_labeled=1",
                             "--set", "train.batch_unlabeled=1"], w["data"]),
        "predict": (lambda o: ["predict", w["run"], "--images", w["images"], "--out", o, "--checkpoint", "last",
                               "--device", "cpu"], w["images"]),
        "eval": (lambda o: ["eval", w["run"], "--out", o, "--checkpoint", "last", "--device", "cpu"], w["run"]),
        "demo": (lambda o: ["demo", "--out", o, "--iterations", "1"], None),
    }


FOLDER_CMDS = ["prep synthetic", "prep custom", "prep slices", "prep msd", "prep brats", "prep lvit", "train",
               "predict", "eval", "demo"]


def _unrelated(folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "notes.txt").write_text("my notes")
    (folder / "sub").mkdir(exist_ok=True)
    (folder / "sub" / "thesis.tex").write_text("\\chapter{Results}")


@pytest.mark.parametrize("name", FOLDER_CMDS)
def test_force_keeps_a_folder_holding_unrelated_files(world, tmp_path, name):
    argv, _ = _cmds(world)[name]
    out = tmp_path / "out"
    _unrelated(out)
    before = snapshot(tmp_path)
    code, text = run_cli(*argv(out), "--force")
    assert code == 2, text
    assert "notes.txt" in text or "did not write" in text, text
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize("name", ["prep synthetic", "prep slices", "predict", "eval"])
def test_force_replaces_its_own_output_but_refuses_a_file_added_later(world, tmp_path, name):
    argv, _ = _cmds(world)[name]
    out = tmp_path / "out"
    code, text = run_cli(*argv(out))
    assert code == 0, text
    code, text = run_cli(*argv(out), "--force")  # its own output only: replaced
    assert code == 0, text
    (out / "notes.txt").write_text("added by the user")
    before = snapshot(tmp_path)
    code, text = run_cli(*argv(out), "--force")
    assert code == 2 and "notes.txt" in text, text
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize("name", [n for n in FOLDER_CMDS if n not in ("prep synthetic", "demo")])
def test_force_refuses_an_out_that_holds_an_input(world, name):
    argv, inp = _cmds(world)[name]
    out = inp.parent  # a folder containing the command's own input
    before = snapshot(world["root"])
    code, text = run_cli(*argv(out), "--force")
    assert code == 2, text
    assert "error" in text and "internal" not in text, text
    assert snapshot(world["root"]) == before


@pytest.mark.parametrize("name", ["eval", "predict"])
def test_force_refuses_the_run_folder_of_another_command(world, name):
    argv, _ = _cmds(world)[name]
    before = snapshot(world["root"])
    code, text = run_cli(*argv(world["run"]), "--force")
    assert code == 2, text
    assert snapshot(world["root"]) == before


@pytest.mark.parametrize("name", FOLDER_CMDS)
def test_symlinked_out_is_a_clear_error(world, tmp_path, name):
    argv, _ = _cmds(world)[name]
    real = tmp_path / "real"
    _unrelated(real)
    link = tmp_path / "link"
    link.symlink_to(real, target_is_directory=True)
    before = snapshot(tmp_path)
    for extra in ((), ("--force",)):
        code, text = run_cli(*argv(link), *extra)
        assert code == 2 and "symbolic link" in text, text
    assert snapshot(tmp_path) == before


def test_eval_folders_and_file_outputs_touch_only_their_files(world, tmp_path):
    """eval --pred/--labels, describe/encode --out and prep overlays --out write named files: unrelated files
    stay. (bench --json goes through the same guard_output_file; only its symlink refusal runs here, a
    benchmark is too slow for the default suite.)"""
    out = tmp_path / "out"
    _unrelated(out)
    keep = snapshot(out)
    labels = world["data"] / "labels"
    code, text = run_cli("eval", "--pred", labels, "--labels", labels, "--out", out, "--force")
    assert code == 0, text
    code, text = run_cli("describe", "--dataset", "synthetic", "--llm", "offline", "--out", out / "d.json", "--force")
    assert code == 0, text
    code, text = run_cli("prep", "overlays", world["data"], "--n", "1", "--out", out, "--force")
    assert code == 0, text
    code, text = run_cli("encode", "--encoder", "clip", "--pretrained", "none", "--dataset", "synthetic",
                         "--out", out / "e.safetensors", "--device", "cpu", "--force")
    assert code == 0, text
    after = snapshot(out)
    assert {k: after[k] for k in keep} == keep
    # an --out that is one of the inputs is refused
    before = snapshot(world["root"])
    code, text = run_cli("eval", "--pred", labels, "--labels", labels, "--out", labels, "--force")
    assert code == 2, text
    assert snapshot(world["root"]) == before
    link = tmp_path / "l.json"
    link.symlink_to(out / "notes.txt")
    code, text = run_cli("describe", "--dataset", "synthetic", "--llm", "offline", "--out", link, "--force")
    assert code == 2 and "symbolic link" in text, text
    code, text = run_cli("encode", "--encoder", "clip", "--pretrained", "none", "--dataset", "synthetic",
                         "--out", link, "--device", "cpu", "--force")
    assert code == 2 and "symbolic link" in text, text
    code, text = run_cli("bench", "--method", "mcnet", "--patch", "16,16,16", "--out", link, "--device", "cpu",
                         "--force")
    assert code == 2 and "symbolic link" in text, text
    assert (out / "notes.txt").read_text(encoding="utf-8") == "my notes"
