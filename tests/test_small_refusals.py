"""Issue 25.6, the smaller refusals and warnings, one CLI-level test per case (with a variant each): runs of no
length, `--gpus` the machine does not have, NIfTI headers that declare more data than the file or the memory
holds, predict on images far from the training spacing, leftovers of a killed prep, and a validation case for
every set of two or more labelled cases."""

from __future__ import annotations

import gzip
import json
import os
import signal
import struct
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import yaml

from conftest import one_line_error, run_cli
from raw_fakes import phantom_ct, write_image
from textseg_cli.data.io import write_nifti
from textseg_cli.errors import ConfigError
from textseg_cli.inference.predict import SPACING_FAR, spacing_warning

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = ["--device", "cpu", "--set", "method.backbone.n_filters=2", "--set", "train.batch_labeled=1",
        "--set", "train.batch_unlabeled=1"]
SYN_SPACING = (1.5, 1.5, 2.0)  # textseg_cli.data.synthetic.SPACING, the training spacing of `synthetic_data`


def _spec(tmp_path: Path, data: Path, **over) -> Path:
    spec = {"name": "tiny", "data": str(data), "labeled": [2], "seeds": [1], "iterations": 2, "device": "cpu",
            "threads": 1, "methods": [{"method": "sup", "set": ["method.backbone.n_filters=2"]}]}
    spec.update(over)
    path = tmp_path / "exp.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


# --- 1. runs of no length -------------------------------------------------------------------------------

@pytest.mark.parametrize("value", ["0", "-3"])
def test_train_iterations_below_one_is_refused_before_a_run_folder(synthetic_data, tmp_path, value):
    run = tmp_path / "run"
    code, text = run_cli("train", "--method", "mcnet", "--data", synthetic_data, "--iterations", value,
                         "--out", run, *TINY)
    one_line_error(code, text, f"--iterations {value}", "untrained")
    assert not run.exists()


@pytest.mark.parametrize("key", ["train.iterations=0", "train.epochs=0"])
def test_a_config_of_no_length_is_refused_naming_its_key(synthetic_data, tmp_path, key):
    run = tmp_path / "run"
    code, text = run_cli("train", "--method", "mcnet", "--data", synthetic_data, "--set", key, "--out", run, *TINY)
    one_line_error(code, text, key.replace("=", " "))
    assert not run.exists()


@pytest.mark.parametrize("over", [{"iterations": 0},
                                  {"iterations": None,
                                   "methods": [{"method": "sup", "set": ["train.iterations=0"]}]}])
def test_experiment_of_no_length_is_refused_before_it_writes(synthetic_data, tmp_path, over):
    spec = _spec(tmp_path, synthetic_data, **over)
    code, text = run_cli("experiment", "run", spec, "--quiet")
    one_line_error(code, text, "sup/2L_s1", "iterations 0" if over["iterations"] == 0 else "train.iterations 0")
    assert not (tmp_path / "exp").exists()


# --- 2. --gpus the machine does not have ----------------------------------------------------------------

@pytest.mark.parametrize("visible", [0, 1])
def test_experiment_gpus_not_visible_are_refused_before_launching(synthetic_data, tmp_path, monkeypatch, visible):
    import torch

    monkeypatch.setattr(torch.cuda, "device_count", lambda: visible)  # 0: this CPU machine; 1: one GPU
    spec = _spec(tmp_path, synthetic_data)
    code, text = run_cli("experiment", "run", spec, "--gpus", "0,1")
    line = one_line_error(code, text, "--gpus 0,1", "visible GPUs: " + ("none" if visible == 0 else "1 (0)"))
    assert ("GPU 0, 1 not visible" if visible == 0 else "GPU 1 not visible") in line
    assert "started" not in text and not (tmp_path / "exp").exists()


def test_gpus_count_this_process_visible_devices(synthetic_data, tmp_path, monkeypatch):
    """Under CUDA_VISIBLE_DEVICES=5,7, `--gpus 1` is GPU 7: the child must see 7, not physical GPU 1."""
    import torch

    from textseg_cli.experiments.launch import parse_gpus, run_on_gpus
    from textseg_cli.experiments.spec import load_experiment

    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "5,7")
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    exp = load_experiment(_spec(tmp_path, synthetic_data))
    probe = "import os, sys; open(sys.argv[1], 'w').write(os.environ['CUDA_VISIBLE_DEVICES'])"
    out = run_on_gpus(exp, exp.runs(), parse_gpus("1"), log=lambda s: None,
                      command=lambda e, r: [sys.executable, "-c", probe, str(tmp_path / "seen")])
    assert out.done and (tmp_path / "seen").read_text() == "7"
    with pytest.raises(ConfigError, match="GPU 2 not visible.*CUDA_VISIBLE_DEVICES='5,7'"):
        parse_gpus("2")


# --- 3. NIfTI headers declaring more than the file or the memory holds ----------------------------------

def _inflate_header(path: Path, dims=(20000, 20000, 200)) -> None:
    """Overwrite dim[1..3] of a NIfTI-1 header (int16 at byte 42), in a .nii or inside a .nii.gz."""
    gz = path.name.endswith(".gz")
    raw = bytearray(gzip.decompress(path.read_bytes()) if gz else path.read_bytes())
    raw[42:48] = struct.pack("<3h", *dims)
    path.write_bytes(gzip.compress(bytes(raw)) if gz else bytes(raw))
    assert nib.load(str(path)).header.get_data_shape()[:3] == tuple(dims)


@pytest.mark.parametrize("ext", [".nii.gz", ".nii"])
def test_a_header_declaring_a_huge_image_is_refused_before_reading(tmp_path, ext):
    images, labels = tmp_path / "imgs", tmp_path / "labs"
    for i in range(3):
        hu, lab = phantom_ct((20, 20, 6), seed=i)
        write_image(images / f"case{i}{ext}", hu.astype(np.int16), (1.0, 1.0, 2.0))
        write_image(labels / f"case{i}{ext}", lab, (1.0, 1.0, 2.0))
    _inflate_header(images / f"case1{ext}")
    code, text = run_cli("prep", "custom", "--images", images, "--labels", labels, "--out", tmp_path / "out",
                         "--workers", "1")
    assert code == 2, text
    assert "20000x20000x200 int16" in text and "MemoryError" not in text and "Traceback" not in text, text
    assert f"case1{ext}" in text


def test_a_gz_image_larger_than_the_available_memory_is_refused_by_its_header(tmp_path, monkeypatch):
    """A plausible .nii.gz (within deflate's ratio) that would not fit in memory: refused before reading."""
    import textseg_cli.data.io as io_mod

    monkeypatch.setattr(io_mod, "available_memory", lambda: 4000)  # bytes: a 20x20x6 float32 image needs 9600
    images, labels = tmp_path / "imgs", tmp_path / "labs"
    hu, lab = phantom_ct((20, 20, 6), seed=0)
    write_image(images / "big.nii.gz", hu.astype(np.float32), (1.0, 1.0, 2.0))
    write_image(labels / "big.nii.gz", lab, (1.0, 1.0, 2.0))
    code, text = run_cli("prep", "custom", "--images", images, "--labels", labels, "--out", tmp_path / "out",
                         "--workers", "1")
    assert code == 2 and "20x20x6 float32" in text and "more than the 4.0 kB available" in text, text


def test_predict_refuses_an_inflated_header_and_segments_the_others(trained_run, tmp_path):
    images = tmp_path / "new"
    for i in range(2):
        write_nifti(images / f"n{i}.nii.gz", np.random.default_rng(i).standard_normal((32, 32, 16)).astype(np.float32),
                    SYN_SPACING)
    _inflate_header(images / "n1.nii.gz", (30000, 30000, 300))
    code, text = run_cli("predict", trained_run, "--images", images, "--out", tmp_path / "pred", "--device", "cpu")
    assert code == 2 and "30000x30000x300 float32" in text and "MemoryError" not in text, text
    assert (tmp_path / "pred" / "n0.nii.gz").exists()


# --- 4. predict on images far from the training spacing -------------------------------------------------

@pytest.fixture(scope="module")
def trained_run(synthetic_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "r"
    code, text = run_cli("train", "--method", "mcnet", "--data", synthetic_data, "--labeled", "2", "--iterations", "1",
                         "--out", out, "--val-every", "0", *TINY)
    assert code == 0, text
    return out


def test_predict_warns_when_the_spacing_is_far_from_training(trained_run, tmp_path):
    images = tmp_path / "new"
    rng = np.random.default_rng(0)
    far = tuple(s * 3 for s in SYN_SPACING)  # 3x coarser: the model sees organs a third of their size
    near = tuple(s * 1.5 for s in SYN_SPACING)  # within x0.5..x2: no warning
    write_nifti(images / "far.nii.gz", rng.standard_normal((32, 32, 16)).astype(np.float32), far)
    write_nifti(images / "near.nii.gz", rng.standard_normal((32, 32, 16)).astype(np.float32), near)
    code, text = run_cli("predict", trained_run, "--images", images, "--out", tmp_path / "pred", "--device", "cpu")
    assert code == 0, text
    warn = [line for line in text.splitlines() if "far from the training spacing" in line]
    assert len(warn) == 1 and "far.nii.gz" in warn[0] and "4.5x4.5x6 mm" in warn[0] and "1.5x1.5x2 mm" in warn[0]
    meta = json.loads((tmp_path / "pred" / "predict.json").read_text(encoding="utf-8"))
    assert list(meta["spacing_warnings"]) == ["far.nii.gz"]
    rec = meta["spacing_warnings"]["far.nii.gz"]
    assert rec["ratio"] == [3.0, 3.0, 3.0] and rec["training_spacing"] == list(SYN_SPACING) and not rec["resampled"]
    assert sorted(meta["cases"]) == ["far.nii.gz", "near.nii.gz"]


def test_spacing_rule_also_warns_when_predict_resamples():
    assert spacing_warning("a.nii.gz", (1.0, 1.0, 1.0), (1.0, 1.0, 1.0 * SPACING_FAR), True) is None
    rec = spacing_warning("a.nii.gz", (0.3, 0.3, 1.0), (1.0, 1.0, 1.0), True)
    assert rec is not None and rec["resampled"] and "resamples it to the training spacing" in rec["warning"]
    assert spacing_warning("a.nii.gz", (1.0, 1.0, 1.0), None, False) is None


# --- 5. leftovers of a killed prep ----------------------------------------------------------------------

def _raw_folders(root: Path, n: int, shape=(20, 20, 6)) -> tuple[Path, Path]:
    images, labels = root / "imgs", root / "labs"
    for i in range(n):
        hu, lab = phantom_ct(shape, seed=i)
        write_image(images / f"case_{i}.nii.gz", hu, (1.0, 1.0, 2.0))
        write_image(labels / f"case_{i}.nii.gz", lab, (1.0, 1.0, 2.0))
    return images, labels


def _hidden(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob(".*") if p.name != ".textseg-output.json")


def test_prep_custom_rerun_removes_temporaries_of_a_killed_run(tmp_path):
    images, labels = _raw_folders(tmp_path, 3)
    out = tmp_path / "out"
    args = ["prep", "custom", "--images", images, "--labels", labels, "--out", out, "--workers", "1"]
    code, text = run_cli(*args)
    assert code == 0, text
    (out / "dataset.json").unlink()  # killed before the end ...
    for sub in ("images", "labels"):  # ... while writing case_1: atomic_path's ".<name>.<8 chars><suffixes>"
        (out / sub / ".case_1.nii.gz.ab12cd34.nii.gz").write_bytes(b"partial")
    mine = out / "images" / ".my_notes.txt"  # a hidden file of the user's is not a temporary
    mine.write_text("keep")
    code, text = run_cli(*args)
    assert code == 0, text
    assert _hidden(out) == [".prep", "images/.my_notes.txt"] and (out / "dataset.json").exists()


_KILL_IN_FIRST_WRITE = """
import os, signal, sys
from pathlib import Path
import nibabel
from textseg_cli.data.prep.synthetic import prep_synthetic
def die(img, fname):
    Path(fname).write_bytes(b"partial")  # the temporary is half written when the process is killed
    os.kill(os.getpid(), signal.SIGKILL)
nibabel.save = die
prep_synthetic(sys.argv[1], n_cases=3, size=(16, 16, 16), n_val=1, n_test=0, patch_size=(16, 16, 16))
"""


def test_prep_killed_in_its_first_write_is_replaced_with_force(tmp_path):
    out = tmp_path / "syn"
    proc = subprocess.run([sys.executable, "-c", _KILL_IN_FIRST_WRITE, str(out)], capture_output=True,
                          env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()[-2000:]
    assert len(_hidden(out / "images")) == 1  # the leftover of the killed write
    args = ["prep", "synthetic", "--out", out, "--cases", "3", "--size", "16,16,16", "--val", "1", "--test", "0",
            "--patch", "16,16,16"]
    one_line_error(*run_cli(*args), "--force")  # not resumable: the re-run needs --force ...
    code, text = run_cli(*args, "--force")  # ... which must recognise images/ as textseg's
    assert code == 0, text
    assert _hidden(out) == [] and (out / "dataset.json").exists()


# --- 6. a validation case for every set of two or more labelled cases -----------------------------------

@pytest.mark.parametrize("n, counts", [(2, (1, 1, 0)), (3, (1, 1, 1)), (4, (2, 1, 1))])
def test_prep_custom_gives_small_sets_a_validation_case(tmp_path, n, counts):
    images, labels = _raw_folders(tmp_path, n)
    out = tmp_path / "out"
    code, text = run_cli("prep", "custom", "--images", images, "--labels", labels, "--out", out, "--workers", "1")
    assert code == 0, text
    splits = json.loads((out / "dataset.json").read_text(encoding="utf-8"))["splits"]
    assert tuple(len(splits[k]) for k in ("train", "val", "test")) == counts
    assert not set(splits["val"]) & set(splits["train"] + splits["test"])


def test_one_labelled_case_prepares_and_trains_without_validation_and_says_so(tmp_path):
    images, labels = _raw_folders(tmp_path, 1)
    hu, _ = phantom_ct((20, 20, 6), seed=5)
    write_image(images / "extra.nii.gz", hu, (1.0, 1.0, 2.0))  # image-only: unlabeled
    code, text = run_cli("prep", "custom", "--images", images, "--labels", labels, "--out", tmp_path / "out",
                         "--workers", "1")
    assert code == 0 and "only one labelled case" in text, text
    splits = json.loads((tmp_path / "out" / "dataset.json").read_text(encoding="utf-8"))["splits"]
    assert splits["train"] == ["case_0", "extra"] and splits["val"] == []
    # training on such a set (here: synthetic, patch-sized) validates nothing, and says so
    data = tmp_path / "syn"
    code, text = run_cli("prep", "synthetic", "--out", data, "--cases", "2", "--size", "32,32,16", "--val", "0",
                         "--test", "0", "--patch", "32,32,16")
    assert code == 0, text
    run = tmp_path / "run"
    code, text = run_cli("train", "--method", "sup", "--data", data, "--labeled", "1", "--iterations", "1",
                         "--val-every", "1", "--out", run, *TINY)
    assert code == 0, text
    warn = [line for line in text.splitlines() if "split of" in line and "is empty" in line]
    assert len(warn) == 1 and "without validation" in warn[0], text
    assert not (run / "checkpoints" / "best.pt").exists() and (run / "checkpoints" / "last.pt").exists()


# --- a 16-voxel patch with BatchNorm and a batch of 1 (found while testing point 5) --------------------------------
@pytest.mark.parametrize("method, batches, refused", [("sup", (1, 0), True), ("uamt", (1, 1), None),
                                                      ("mcnet", (1, 1), False), ("mcnet", (2, 2), False)])
def test_one_voxel_bottleneck_with_batchnorm_and_batch_1_is_refused_before_training(
        synthetic_data, tmp_path, method, batches, refused):
    """V-Net halves each side 4 times: patch 16³ leaves one value per channel at the bottleneck, which BatchNorm
    cannot train on with one image ("Expected more than 1 value per channel"; exit 1 before)."""
    code, text = run_cli("train", "--method", method, "--data", synthetic_data, "--labeled", "2", "--iterations", "1",
                         "--out", tmp_path / "r", "--device", "cpu", "--set", "method.backbone.n_filters=2",
                         "--set", "data.patch_size=[16,16,16]", "--set", f"train.batch_labeled={batches[0]}",
                         "--set", f"train.batch_unlabeled={batches[1]}")
    if refused:  # one image in all: refused before a run folder exists
        assert code == 2 and "one voxel per channel" in text and "data.patch_size" in text, text
        assert not (tmp_path / "r").exists()
    elif refused is None:  # exit 0 if every forward sees ≥ 2 images, else the engine's one-line refusal
        assert code in (0, 2) and "internal error" not in text, text
        if code == 2:
            assert "one value per channel" in text and not (tmp_path / "r").exists(), text
    else:
        assert code == 0, text


def test_negative_val_every_and_resuming_nothing_are_refused(synthetic_data, tmp_path):
    """Found by the attack run: --val-every -5 validated every iteration; --resume of a folder holding no run
    blamed --set instead of saying there is nothing to resume."""
    code, text = run_cli("train", "--method", "sup", "--data", synthetic_data, "--iterations", "1", "--val-every", "-5",
                         "--out", tmp_path / "r", *TINY)
    assert code == 2 and "val.every (--val-every) -5" in text and not (tmp_path / "r").exists(), text
    code, text = run_cli("train", "--resume", "--out", tmp_path / "nothing", "--iterations", "3", *TINY)
    assert code == 2 and "holds no run to continue" in text and not (tmp_path / "nothing").exists(), text
