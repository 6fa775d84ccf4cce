"""Issue 25.5: a user's mistake is one line naming the file or option, exit code 2, and nothing half-written;
never an "internal error", a traceback, or torch's advice to load with weights_only=False. One CLI-level test
per case: read-only output folders, a checkpoint that cannot be written (full disk, file-size limit), files
that are not UTF-8, patch sides the network cannot take, negative seeds, another run's checkpoint, a malformed
nnU-Net dataset.json, a pickle given as --pretrained, and errors in splits_final.json."""

from __future__ import annotations

import csv
import errno
import json
import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from conftest import REPO, run_cli
from raw_fakes import phantom_ct, write_image
from textseg_cli.runs.checks import patch_multiple

TINY = ["--device", "cpu", "--set", "method.backbone.n_filters=2", "--set", "train.batch_labeled=1",
        "--set", "train.batch_unlabeled=1"]
FORBIDDEN = ("internal error", "Traceback", "weights_only=False")
LATIN1 = "résumé café".encode("latin-1")  # bytes that are not UTF-8


def _one_line_error(code: int, text: str, *needles) -> str:
    """Exit 2, exactly one error line, which contains every needle; nothing an internal error would print."""
    assert code == 2, text
    err = [line for line in text.splitlines() if "error" in line]
    assert len(err) == 1, text
    for bad in FORBIDDEN:
        assert bad not in text, text
    for n in needles:
        assert str(n) in err[0], err[0]
    return err[0]


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def data(tmp_path_factory, synthetic_data) -> Path:
    root = tmp_path_factory.mktemp("mistakes")
    shutil.copytree(synthetic_data, root / "data")
    return root / "data"


@pytest.fixture(scope="module")
def runs(data, tmp_path_factory, one_thread) -> dict[str, Path]:
    """Two 1-iteration runs of different networks (sup: one V-Net decoder; mcnet: two)."""
    root = tmp_path_factory.mktemp("mistake_runs")
    out = {}
    for method in ("sup", "mcnet"):
        out[method] = root / method
        code, text = run_cli("train", "--method", method, "--data", data, "--labeled", "2", "--iterations", "1",
                             "--out", out[method], *TINY)
        assert code == 0, text
    return out


# --- 1. read-only output folders ---------------------------------------------------------------------

@pytest.mark.skipif(os.geteuid() == 0, reason="chmod does not stop root from writing")
def test_read_only_output_folder_by_chmod(data, tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        _one_line_error(*run_cli("train", "--method", "sup", "--data", data, "--iterations", "1", "--out", ro / "run",
                                 *TINY), ro / "run", "permission denied")
        _one_line_error(*run_cli("eval", "--pred", data / "labels", "--labels", data / "labels", "--out", ro / "ev"),
                        ro / "ev")
        assert list(ro.iterdir()) == []
    finally:
        ro.chmod(0o755)


@pytest.fixture
def read_only(tmp_path, monkeypatch):
    """A folder whose file system refuses every write below it (EROFS), as a read-only mount does, also for root:
    os.mkdir and os.open for writing raise OSError(EROFS) (EACCES for the folder `ro/denied`)."""
    ro = tmp_path / "ro"
    ro.mkdir()
    real_mkdir, real_open = os.mkdir, os.open

    def refuse(p):
        p = os.path.abspath(p)
        if p.startswith(str(ro) + os.sep):
            code = errno.EACCES if p.startswith(str(ro / "denied")) else errno.EROFS
            raise OSError(code, os.strerror(code), p)

    def mkdir(p, *a, **k):
        refuse(p)
        return real_mkdir(p, *a, **k)

    def open_(p, flags, *a, **k):
        if flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT):
            refuse(p)
        return real_open(p, flags, *a, **k)

    monkeypatch.setattr(os, "mkdir", mkdir)
    monkeypatch.setattr(os, "open", open_)
    return ro


def test_read_only_output_folder_is_a_user_error_naming_the_path(data, read_only):
    _one_line_error(*run_cli("train", "--method", "sup", "--data", data, "--iterations", "1",
                             "--out", read_only / "run", *TINY), read_only / "run", "read-only")
    # EACCES, and a writer that goes through the atomic writes (eval's per-case table)
    _one_line_error(*run_cli("eval", "--pred", data / "labels", "--labels", data / "labels",
                             "--out", read_only / "denied" / "ev"), read_only / "denied", "permission denied")
    assert list(read_only.iterdir()) == []


# --- 2. a checkpoint that cannot be written ----------------------------------------------------------

TORCH_DISK_FULL = ("[enforce fail at inline_container.cc:603] . PytorchStreamWriter failed writing file data/3: "
                   "file write failed")


@pytest.fixture
def full_disk(monkeypatch):
    """The disk fills while training: torch.save fails as torch does (a RuntimeError, or OSError(ENOSPC)), and
    log.csv's rewrite then fails too (OSError(ENOSPC) while writing the rows), as on a real full disk."""
    import textseg_cli.runs.checkpoint as ckpt_mod

    class FullWriter(csv.DictWriter):
        def writeheader(self):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr("textseg_cli.engine.runlog.csv.DictWriter", FullWriter)

    def use(error: BaseException):
        def save(*a, **k):
            raise error
        monkeypatch.setattr(ckpt_mod.torch, "save", save)

    return use


@pytest.mark.parametrize("error", [RuntimeError(TORCH_DISK_FULL), OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))],
                         ids=["torch-runtime-error", "enospc"])
def test_full_disk_names_the_checkpoint_not_log_csv(data, tmp_path, full_disk, error):
    full_disk(error)
    out = tmp_path / "run"
    line = _one_line_error(*run_cli("train", "--method", "sup", "--data", data, "--labeled", "2", "--iterations", "1",
                                    "--out", out, *TINY), out / "checkpoints" / "best.pt", "cannot write")
    assert "log.csv" not in line and "PytorchStreamWriter" not in line
    assert not out.exists()  # a failed new run leaves nothing behind


def test_file_size_limit_while_resuming_names_the_checkpoint_and_keeps_the_old_one(runs, tmp_path):
    """A real write failure (RLIMIT_FSIZE in a child process: torch says "unexpected pos ..."), on a resumed run:
    the error names the checkpoint and the previous checkpoints stay as they were."""
    run = tmp_path / "run"
    shutil.copytree(runs["sup"], run)
    before = _snapshot(run / "checkpoints")
    limit = min(len(b) for b in before.values()) // 2  # below any checkpoint, far above config/log files
    script = ("import resource, sys; resource.setrlimit(resource.RLIMIT_FSIZE, (%d, %d)); "
              "from textseg_cli.cli import run; sys.exit(run(sys.argv[1:]))" % (limit, limit))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", script, "train", "--resume", "--out", str(run), "--iterations", "2",
                           "--device", "cpu"], capture_output=True, text=True, encoding="utf-8", errors="replace", timeout=1500, cwd=REPO, env=env)
    text = proc.stdout + proc.stderr
    line = _one_line_error(proc.returncode, text, run / "checkpoints", ".pt", "file-size limit")
    assert "log.csv" not in line
    assert _snapshot(run / "checkpoints") == before


# --- 3. files that are not UTF-8 ---------------------------------------------------------------------

def test_non_utf8_config_experiment_and_split_files_name_the_file(data, tmp_path):
    cfg = tmp_path / "my.yaml"
    cfg.write_bytes(b"train:\n  iterations: 1  # " + LATIN1 + b"\n")
    _one_line_error(*run_cli("train", "--method", "sup", "--data", data, "--config", cfg, "--out", tmp_path / "r",
                             *TINY), cfg, "UTF-8")
    exp = tmp_path / "exp.yaml"
    exp.write_bytes(b"name: " + LATIN1 + b"\n")
    _one_line_error(*run_cli("experiment", "run", exp), exp, "UTF-8")
    split = tmp_path / "split.yaml"
    split.write_bytes(b"train: [" + LATIN1 + b"]\n")
    _one_line_error(*run_cli("prep", "custom", "--images", data / "images", "--labels", data / "labels",
                             "--split-file", split, "--out", tmp_path / "p"), split, "UTF-8")
    folder = tmp_path / "split_dir"  # variant: a folder of train.txt/val.txt lists
    folder.mkdir()
    (folder / "train.txt").write_bytes(b"synth_000\n" + LATIN1 + b"\n")
    _one_line_error(*run_cli("prep", "custom", "--images", data / "images", "--labels", data / "labels",
                             "--split-file", folder, "--out", tmp_path / "p"), folder / "train.txt", "UTF-8")
    assert not (tmp_path / "r").exists() and not (tmp_path / "p").exists() and not (tmp_path / "exp").exists()


def test_non_utf8_prompt_file_dataset_json_and_run_config_name_the_file(data, runs, tmp_path):
    prompts = tmp_path / "prompts"
    prompts.mkdir()
    (prompts / "synthetic.yaml").write_bytes(b"class_names: [" + LATIN1 + b"]\n")
    _one_line_error(*run_cli("encode", "--encoder", "clip", "--pretrained", "none", "--dataset", "synthetic",
                             "--prompts-dir", prompts, "--out", tmp_path / "e.safetensors"),
                    prompts / "synthetic.yaml", "UTF-8")
    assert not (tmp_path / "e.safetensors").exists()
    bad = tmp_path / "data"
    shutil.copytree(data, bad)
    spec = (bad / "dataset.json").read_bytes()
    (bad / "dataset.json").write_bytes(spec.replace(b'"synthetic"', b'"' + LATIN1 + b'"', 1))
    _one_line_error(*run_cli("train", "--method", "sup", "--data", bad, "--out", tmp_path / "r", *TINY),
                    bad / "dataset.json", "UTF-8")
    assert not (tmp_path / "r").exists()
    run = tmp_path / "run"
    shutil.copytree(runs["sup"], run)
    (run / "config.yaml").write_bytes((run / "config.yaml").read_bytes() + b"# " + LATIN1 + b"\n")
    before = _snapshot(run)
    _one_line_error(*run_cli("eval", run, "--checkpoint", "last", "--device", "cpu"), run / "config.yaml", "UTF-8")
    _one_line_error(*run_cli("predict", run, "--images", data / "images", "--out", tmp_path / "pred",
                             "--device", "cpu"), run / "config.yaml", "UTF-8")
    assert _snapshot(run) == before and not (tmp_path / "pred").exists()


# --- 4. patch sides the network cannot take ----------------------------------------------------------

@pytest.mark.parametrize("patch", ["40,32,16", "17,32,16"])
def test_patch_side_not_a_multiple_of_16_is_refused_before_a_run_folder(data, tmp_path, patch):
    out = tmp_path / "run"
    line = _one_line_error(*run_cli("train", "--method", "sup", "--data", data, "--iterations", "1", "--out", out,
                                    "--set", f"data.patch_size=[{patch}]", *TINY),
                           "data.patch_size", f"[{patch.replace(',', ', ')}]", "multiple of 16")
    assert patch.split(",")[0] in line and not out.exists()


def test_the_data_sets_own_patch_size_is_named_and_the_factor_follows_the_network(data, tmp_path):
    bad = tmp_path / "data"
    shutil.copytree(data, bad)
    spec = json.loads((bad / "dataset.json").read_text(encoding="utf-8"))
    spec["patch_size"] = [40, 32, 16]
    (bad / "dataset.json").write_text(json.dumps(spec), encoding="utf-8")
    _one_line_error(*run_cli("train", "--method", "mcnet", "--data", bad, "--iterations", "1",
                             "--out", tmp_path / "run", *TINY), "dataset.json", "multiple of 16")
    assert not (tmp_path / "run").exists()
    # the U-Nets pad odd sizes on the way up (no multiple needed); the V-Net family and LViT's U-Net need 16
    assert patch_multiple({"method": {"name": "urpc"}}) == 1
    assert patch_multiple({"method": {"name": "unet2d", "model": "unet2d"}}) == 1
    assert patch_multiple({"method": {"name": "llm-segnet", "backbone_model": "unet3d"}}) == 1
    assert patch_multiple({"method": {"name": "lvit-unet", "model": "lvit-unet"}}) == 16
    assert patch_multiple({"method": {"name": "mcf"}}) == 16


# --- 5. negative seeds -------------------------------------------------------------------------------

@pytest.mark.parametrize("seed", ["-1", "-5"])
def test_negative_seed_is_refused_naming_the_option(data, tmp_path, seed):
    out = tmp_path / "run"
    _one_line_error(*run_cli("train", "--method", "sup", "--data", data, "--iterations", "1", "--seed", seed,
                             "--out", out, *TINY), "--seed", seed)
    assert not out.exists()


def test_negative_seed_in_an_experiment_file_is_refused(data, tmp_path):
    spec = tmp_path / "exp.yaml"
    spec.write_text(yaml.safe_dump({"name": "t", "data": str(data), "labeled": [2], "seeds": [1, -1], "iterations": 1,
                                    "device": "cpu", "methods": [{"method": "sup"}]}), encoding="utf-8")
    _one_line_error(*run_cli("experiment", "run", spec), spec, "seeds", "-1")
    assert not (tmp_path / "exp").exists()


# --- 6. another run's checkpoint ---------------------------------------------------------------------

def test_checkpoint_of_another_run_is_one_line_not_a_key_dump(data, runs, tmp_path):
    other = runs["mcnet"] / "checkpoints" / "last.pt"
    line = _one_line_error(*run_cli("predict", runs["sup"], "--images", data / "images", "--out", tmp_path / "pred",
                                    "--checkpoint", other, "--device", "cpu"),
                           other, "does not fit this run's network", "missing keys", "unexpected keys")
    assert line.count("net.") <= 6 and len(line) < 600, line  # at most 3 keys of each kind
    assert not (tmp_path / "pred").exists()
    # the other way round, through eval
    mine = runs["sup"] / "checkpoints" / "last.pt"
    _one_line_error(*run_cli("eval", runs["mcnet"], "--checkpoint", mine, "--device", "cpu", "--out", tmp_path / "ev"),
                    mine, "does not fit this run's network")
    assert not (tmp_path / "ev").exists()


# --- 7. a malformed nnU-Net dataset.json -------------------------------------------------------------

def _nnunet_raw(root: Path, n: int = 4) -> tuple[Path, list[str]]:
    src = root / "Dataset501_Liver"
    for i in range(n):
        hu, lab = phantom_ct((20, 18, 6), seed=i, blob_radius=3)
        write_image(src / "imagesTr" / f"liver_{i:03d}_0000.nii.gz", hu, (0.8, 0.8, 2.0))
        write_image(src / "labelsTr" / f"liver_{i:03d}.nii.gz", lab.astype(np.uint8), (0.8, 0.8, 2.0))
    (src / "dataset.json").write_text(json.dumps({
        "channel_names": {"0": "CT"}, "labels": {"background": 0, "liver": 1}, "numTraining": n,
        "file_ending": ".nii.gz", "name": "Liver"}), encoding="utf-8")
    return src, [f"liver_{i:03d}" for i in range(n)]


@pytest.mark.parametrize("field,value,needle", [
    ("numTraining", "abc", "numTraining 'abc'"),
    ("labels", ["background", "liver"], "labels ['background', 'liver']"),
    ("numTraining", 2.5, "numTraining 2.5"),
    ("channel_names", {"zero": "CT"}, "channel_names"),
    ("labels", {"background": 0, "liver": "one"}, "labels.liver 'one'"),
], ids=["numTraining-word", "labels-list", "numTraining-float", "channel-key", "label-value"])
def test_malformed_nnunet_dataset_json_is_refused_before_anything_is_written(tmp_path, field, value, needle):
    src, _ = _nnunet_raw(tmp_path)
    spec = json.loads((src / "dataset.json").read_text(encoding="utf-8"))
    spec[field] = value
    (src / "dataset.json").write_text(json.dumps(spec), encoding="utf-8")
    _one_line_error(*run_cli("prep", "nnunet", "--src", src, "--out", tmp_path / "p"), src / "dataset.json", needle)
    assert not (tmp_path / "p").exists()


# --- 8. a pickle given as --pretrained ---------------------------------------------------------------

class _RunsCode:
    def __reduce__(self):
        return (print, ("the pickle ran code",))


class _Custom:  # a plain object: still not weights, and not loadable with weights_only
    def __init__(self):
        self.weights = [1.0, 2.0]


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory) -> str:
    import open_clip

    root = tmp_path_factory.mktemp("tinyclip_mistakes")
    cfg = {"embed_dim": 32, "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "patch_size": 16,
                                           "head_width": 16},
           "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}}
    (root / "mistakes-tiny-clip.json").write_text(json.dumps(cfg), encoding="utf-8")
    open_clip.add_model_config(root / "mistakes-tiny-clip.json")
    return "mistakes-tiny-clip"


@pytest.mark.parametrize("payload", [_RunsCode, _Custom], ids=["runs-code", "custom-class"])
def test_hostile_pretrained_file_is_refused_without_weights_only_advice(tiny_clip, tmp_path, payload):
    ckpt = tmp_path / "weights.pt"
    torch.save({"state_dict": {"x": torch.zeros(1)}, "extra": payload()}, ckpt)
    code, text = run_cli("encode", "--encoder", "clip", "--model", tiny_clip, "--pretrained", ckpt,
                         "--dataset", "synthetic", "--out", tmp_path / "e.safetensors", "--device", "cpu")
    _one_line_error(code, text, ckpt, "not a plain weights file", "cannot be loaded safely")
    assert "weights_only" not in text and "the pickle ran code" not in text
    assert not (tmp_path / "e.safetensors").exists()
    with pytest.raises(pickle.UnpicklingError):  # what the CLI turned into that line
        torch.load(ckpt, weights_only=True)


# --- 9. splits_final.json errors name the user's file ------------------------------------------------

def test_splits_final_errors_name_the_users_file_not_a_temporary_copy(tmp_path):
    src, ids = _nnunet_raw(tmp_path)
    sf = src / "splits_final.json"
    sf.write_text(json.dumps([{"train": ids[2:] + ["ghost"], "val": ids[:2]}]), encoding="utf-8")
    line = _one_line_error(*run_cli("prep", "nnunet", "--src", src, "--out", tmp_path / "p"), sf, "ghost")
    assert "/tmp" not in line.replace(str(tmp_path), "") and "split.json" not in line.replace("splits_final.json", "")
    # variant: --splits-final elsewhere, an unknown case in the second fold (not the one read as the split)
    mine = tmp_path / "my_splits" / "splits_final.json"
    mine.parent.mkdir()
    mine.write_text(json.dumps([{"train": ids[2:], "val": ids[:2]}, {"train": ids[:2], "val": ["liver_999"]}]),
                    encoding="utf-8")
    _one_line_error(*run_cli("prep", "nnunet", "--src", src, "--splits-final", mine, "--out", tmp_path / "p"),
                    mine, "liver_999")
    assert not (tmp_path / "p").exists()
