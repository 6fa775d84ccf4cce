"""Issue 14 (and the data-integrity parts of issue 20), one CLI-level test per numbered case: run locks,
leftovers, truncated and NaN inputs, split leakage, eval geometry, channels, resume targets, DDP shutdown,
usage errors, the describe cache and predict's per-file errors. --force ownership: tests/test_no_data_loss.py."""

from __future__ import annotations

import errno
import gzip
import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from conftest import one_line_error, run_cli
from raw_fakes import phantom_ct, write_image
from textseg_cli.data.io import read_nifti, write_nifti
from textseg_cli.storage.outputs import LOCK

TINY = ["--device", "cpu", "--set", "method.backbone.n_filters=2", "--set", "train.batch_labeled=1",
        "--set", "train.batch_unlabeled=1"]


@pytest.fixture(scope="module")
def data(tmp_path_factory, synthetic_data):
    root = tmp_path_factory.mktemp("safety")
    shutil.copytree(synthetic_data, root / "data")
    return root / "data"


@pytest.fixture(scope="module")
def run(data, tmp_path_factory):
    """A 2-iteration mcnet run (validation at 2, so best.pt and last.pt exist)."""
    out = tmp_path_factory.mktemp("runs") / "r"
    code, text = run_cli("train", "--method", "mcnet", "--data", data, "--labeled", "2", "--iterations", "2",
                         "--out", out, "--val-every", "2", *TINY)
    assert code == 0, text
    return out


def _copy_run(run: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "run"
    shutil.copytree(run, dst)
    return dst


# --- 2. run lock ------------------------------------------------------------------------------------

def _hold_lock(folder: Path, pid: int, host: str | None = None, command: str = "train") -> None:
    (folder / LOCK).write_text(json.dumps({"pid": pid, "host": host or socket.gethostname(), "command": command,
                                           "started": "2026-01-01T00:00:00+00:00"}))


def test_a_run_in_use_is_refused_to_train_resume_and_eval_and_a_stale_lock_is_taken_over(run, data, tmp_path):
    r = _copy_run(run, tmp_path)
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        _hold_lock(r, holder.pid)
        before = (r / "checkpoints" / "last.pt").read_bytes()
        for args in (["train", "--resume", "--out", r, "--iterations", "3", "--device", "cpu"],
                     ["eval", r, "--checkpoint", "last", "--device", "cpu"],
                     ["train", "--method", "mcnet", "--data", data, "--labeled", "2", "--iterations", "1", "--out", r,
                      "--force", *TINY]):
            one_line_error(*run_cli(*args), "in use by `textseg train`", f"pid {holder.pid}")
        assert (r / "checkpoints" / "last.pt").read_bytes() == before and not (r / "eval").exists()
    finally:
        holder.kill()
        holder.wait()
    # the holder is gone: its lock is stale and taken over; the lock is released afterwards
    code, text = run_cli("train", "--resume", "--out", r, "--iterations", "3", "--device", "cpu")
    assert code == 0, text
    assert not (r / LOCK).exists()


def test_a_lock_from_another_host_is_never_guessed_about(run, tmp_path):
    r = _copy_run(run, tmp_path)
    _hold_lock(r, 1, host="other-node-17")
    one_line_error(*run_cli("train", "--resume", "--out", r, "--iterations", "3", "--device", "cpu"),
                    "other-node-17", f"delete {r / LOCK}")


def test_two_concurrent_trainings_into_one_folder_one_is_refused(data, tmp_path):
    """Two real processes started together: exactly one trains, the other is refused with exit 2."""
    out = tmp_path / "r"
    cmd = [sys.executable, "-m", "textseg_cli", "train", "--method", "mcnet", "--data", str(data), "--labeled", "2",
           "--iterations", "3", "--val-every", "0", "--out", str(out), "--force", *TINY]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    procs = [subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              encoding="utf-8", errors="replace")
             for _ in range(2)]
    outs = [p.communicate(timeout=1500)[0] for p in procs]
    codes = sorted(p.returncode for p in procs)
    assert codes == [0, 2], outs
    refused = outs[[p.returncode for p in procs].index(2)]
    assert "in use by" in refused or "already exists" in refused, refused
    assert json.loads((out / "cases.json").read_text(encoding="utf-8"))["labeled"]


# --- 3. leftovers -----------------------------------------------------------------------------------

def test_temporary_checkpoint_of_a_killed_write_is_removed_on_the_next_run(run, tmp_path):
    r = _copy_run(run, tmp_path)
    junk = r / "checkpoints" / ".last.pt.k3j4h5g6.pt"
    junk.write_bytes(b"\0" * 4096)
    mine = r / "checkpoints" / ".my-notes.txt"  # a user's hidden file is not a leftover
    mine.write_text("keep")
    code, text = run_cli("train", "--resume", "--out", r, "--iterations", "3", "--device", "cpu")
    assert code == 0, text
    assert not junk.exists() and mine.read_text(encoding="utf-8") == "keep"


def test_a_failed_training_leaves_no_folder_that_demands_force(data, tmp_path, monkeypatch):
    from textseg_cli.engine import loop as trainer

    def crash(self):
        raise RuntimeError("simulated crash before the first checkpoint")

    monkeypatch.setattr(trainer.Trainer, "run", crash)
    out = tmp_path / "r"
    args = ["train", "--method", "mcnet", "--data", data, "--labeled", "2", "--iterations", "1", "--out", out, *TINY]
    code, text = run_cli(*args)
    assert code == 1 and "simulated crash" in text
    assert not out.exists()
    monkeypatch.undo()
    code, text = run_cli(*args)  # no --force needed
    assert code == 0, text


def test_a_failed_prep_lvit_leaves_no_half_folder(tmp_path):
    from test_prep_lvit import _make_split
    from PIL import Image

    src, out = tmp_path / "src", tmp_path / "out"
    _make_split(src, "Train", ["a1", "a2"])
    mask = src / "Train_Folder" / "labelcol" / "a2.png"
    good = mask.read_bytes()
    Image.fromarray(np.zeros((10, 10), np.uint8)).save(mask)
    code, text = run_cli("prep", "lvit", "--src", src, "--out", out)
    assert code == 2 and "a2.png" in text, text
    assert not out.exists()
    mask.write_bytes(good)
    code, text = run_cli("prep", "lvit", "--src", src, "--out", out)
    assert code == 0, text


# --- 4. truncated volumes and NaN voxels in prep ---------------------------------------------------------

def _raw(tmp_path, n=3, shape=(16, 16, 8)):
    raw = tmp_path / "raw"
    for i in range(n):
        img, lab = phantom_ct(shape=shape, seed=i)
        write_image(raw / "images" / f"c{i}.nii.gz", img)
        write_image(raw / "labels" / f"c{i}.nii.gz", lab)
    return raw


def _prep_custom(raw, out, *extra):
    return run_cli("prep", "custom", "--images", raw / "images", "--labels", raw / "labels", "--out", out,
                   "--split", "2,1", *extra)


@pytest.mark.parametrize("how", ["gzip", "data block"])
def test_truncated_volume_fails_prep_custom_naming_the_file(tmp_path, how):
    raw = _raw(tmp_path)
    f = raw / "images" / "c1.nii.gz"
    if how == "gzip":
        blob = f.read_bytes()
        f.write_bytes(blob[: len(blob) // 2])
    else:  # a well-formed gzip stream around a short data block
        body = gzip.decompress(f.read_bytes())
        f.write_bytes(gzip.compress(body[: len(body) // 2]))
    code, text = _prep_custom(raw, tmp_path / "out")
    assert code == 2 and "c1" in text and ("truncated" in text or "incomplete" in text), text


def test_nan_voxels_are_refused_by_default_and_zeroed_on_request(tmp_path):
    raw = _raw(tmp_path)
    img = np.asarray(nib.load(raw / "images" / "c2.nii.gz").dataobj).astype(np.float32)
    img[0, 0, :3] = np.nan
    img[1, 1, 1] = np.inf
    write_image(raw / "images" / "c2.nii.gz", img)
    code, text = _prep_custom(raw, tmp_path / "out")
    assert code == 2 and "case 'c2'" in text and "4 NaN/Inf" in text and "--nan-policy zero" in text, text
    code, text = _prep_custom(raw, tmp_path / "out2", "--nan-policy", "zero")
    assert code == 0 and "case 'c2': 4 NaN/Inf voxel(s) replaced by 0" in text, text
    assert np.isfinite(read_nifti(tmp_path / "out2" / "images" / "c2.nii.gz").array).all()
    one_line_error(*_prep_custom(raw, tmp_path / "out3", "--nan-policy", "mean"), "--nan-policy", "refuse or zero")


# --- 5 and 13. predict: NaN inputs and one bad file among good ones ----------------------------------------

def test_predict_finishes_good_files_and_reports_bad_ones(run, data, tmp_path):
    images = tmp_path / "imgs"
    images.mkdir()
    src = sorted((data / "images").glob("*.nii.gz"))[:3]
    for p in src:
        shutil.copy(p, images / p.name)
    names = [p.name[:-7] for p in src]
    vol = read_nifti(images / src[1].name)
    arr = vol.array.copy()
    arr[3, 3, 3] = np.nan
    write_nifti(images / src[1].name, arr, vol.spacing)  # NaN voxel
    blob = (images / src[2].name).read_bytes()
    (images / src[2].name).write_bytes(blob[: len(blob) // 3])  # truncated
    out = tmp_path / "pred"
    code, text = run_cli("predict", run, "--images", images, "--out", out, "--checkpoint", "last", "--device", "cpu")
    assert code == 2, text
    assert f"case '{names[1]}': 1 NaN/Inf" in text and src[2].name in text and "2 of 3 file(s)" in text, text
    rec = json.loads((out / "predict.json").read_text(encoding="utf-8"))
    assert rec["cases"] == [src[0].name] and set(rec["failed"]) == set(names[1:])
    assert sorted(p.name for p in out.glob("*.nii.gz")) == [src[0].name]  # no mask computed from NaNs
    code, text = run_cli("predict", run, "--images", images, "--out", out, "--checkpoint", "last", "--device", "cpu",
                         "--force", "--nan-policy", "zero")
    assert code == 2 and "replaced by 0" in text and "1 of 3" in text, text
    assert (out / src[1].name).exists()


# --- 6. split leakage -------------------------------------------------------------------------------

def _edit_splits(data: Path, tmp_path: Path, fn) -> Path:
    d = tmp_path / "data"
    shutil.copytree(data, d)
    spec = json.loads((d / "dataset.json").read_text(encoding="utf-8"))
    fn(spec["splits"])
    (d / "dataset.json").write_text(json.dumps(spec))
    return d


def test_train_test_overlap_is_refused_by_prep_check_train_and_eval(data, tmp_path):
    d = _edit_splits(data, tmp_path, lambda s: s["test"].append(s["train"][0]))
    case = json.loads((d / "dataset.json").read_text(encoding="utf-8"))["splits"]["train"][0]
    needles = (case, "'train' and 'test'")
    one_line_error(*run_cli("prep", "check", d), *needles)
    one_line_error(*run_cli("train", "--method", "mcnet", "--data", d, "--iterations", "1", "--out",
                             tmp_path / "r", *TINY), *needles)
    assert not (tmp_path / "r").exists()
    one_line_error(*run_cli("eval", "--pred", d / "labels", "--labels", d, "--split", "test", "--out",
                             tmp_path / "e"), *needles)


def test_duplicates_and_a_string_split_are_refused(data, tmp_path):
    d = _edit_splits(data, tmp_path, lambda s: s["val"].append(s["val"][0]))
    one_line_error(*run_cli("prep", "check", d), "split 'val'", "more than once")
    d2 = _edit_splits(data, tmp_path / "b", lambda s: s.__setitem__("train", ",".join(s["train"])))
    one_line_error(*run_cli("prep", "check", d2), "splits.train", "must be a list", "str")


# --- 7. eval --pred geometry and missing predictions -------------------------------------------------

@pytest.fixture
def masks(tmp_path):
    rng = np.random.default_rng(0)
    ref, pred = tmp_path / "ref", tmp_path / "pred"
    for i in range(3):
        m = (rng.random((12, 10, 8)) > 0.6).astype(np.uint8)
        write_nifti(ref / f"c{i}.nii.gz", m, (1.0, 1.0, 2.0))
        write_nifti(pred / f"c{i}.nii.gz", m, (1.0, 1.0, 2.0))
    return ref, pred


def test_eval_pred_checks_origin_and_direction(masks, tmp_path):
    ref, pred = masks
    m = read_nifti(pred / "c1.nii.gz").array
    write_nifti(pred / "c1.nii.gz", m, (1.0, 1.0, 2.0), origin=(50.0, 0.0, 0.0))
    one_line_error(*run_cli("eval", "--pred", pred, "--labels", ref, "--out", tmp_path / "e1"),
                    "case 'c1'", "origin", "(50.0, 0.0, 0.0)")
    write_nifti(pred / "c1.nii.gz", m, (1.0, 1.0, 2.0), direction=(-1, 0, 0, 0, 1, 0, 0, 0, 1))  # LAS vs RAS
    one_line_error(*run_cli("eval", "--pred", pred, "--labels", ref, "--out", tmp_path / "e2"),
                    "case 'c1'", "direction", "flipped")


def test_missing_prediction_is_an_error_unless_allowed_and_then_counted(masks, tmp_path):
    ref, pred = masks
    (pred / "c2.nii.gz").unlink()
    one_line_error(*run_cli("eval", "--pred", pred, "--labels", ref, "--out", tmp_path / "e"),
                    "1 reference case(s) have no prediction: c2", "--allow-missing")
    code, text = run_cli("eval", "--pred", pred, "--labels", ref, "--out", tmp_path / "e", "--allow-missing",
                         "--table", "md")
    assert code == 0, text
    table = (tmp_path / "e" / "table.md").read_text(encoding="utf-8")
    assert "References without a prediction (not scored, not in n): pred: 1." in table, table
    assert "(n = 2)" in table


def test_negative_label_values_are_an_error_naming_the_case(masks, tmp_path):
    ref, pred = masks
    m = read_nifti(ref / "c1.nii.gz").array.astype(np.int16)
    m[0, 0, 0] = -1
    write_nifti(ref / "c1.nii.gz", m, (1.0, 1.0, 2.0))
    one_line_error(*run_cli("eval", "--pred", pred, "--labels", ref, "--out", tmp_path / "e"),
                    "case 'c1'", "[-1]", "outside 0..1")


# --- 8. channels --------------------------------------------------------------------------------------

def test_one_multichannel_file_among_single_channel_ones_fails_prep_naming_the_case(tmp_path):
    import SimpleITK as sitk

    raw = _raw(tmp_path)
    img = np.asarray(nib.load(raw / "images" / "c1.nii.gz").dataobj).astype(np.float32)
    four = sitk.JoinSeries([sitk.GetImageFromArray(np.transpose(img, (2, 1, 0)))] * 3)  # (x, y, z, 3)
    sitk.WriteImage(four, str(raw / "images" / "c1.nii.gz"))
    code, text = _prep_custom(raw, tmp_path / "out")
    assert code == 2 and "case 'c1': the image has 3 channel(s), the data set 1" in text, text
    code, text = run_cli("prep", "check", tmp_path / "out")
    assert code == 2  # no dataset.json was written for a failed set


# --- 9. resume below the current iteration -------------------------------------------------------------

def test_resume_with_fewer_iterations_than_done_is_refused(run, tmp_path):
    r = _copy_run(run, tmp_path)
    cfg = (r / "config.yaml").read_text(encoding="utf-8")
    one_line_error(*run_cli("train", "--resume", "--out", r, "--iterations", "1", "--device", "cpu"),
                    "--iterations 1", "current iteration 2")
    assert (r / "config.yaml").read_text(encoding="utf-8") == cfg


# --- 10. DDP shutdown ---------------------------------------------------------------------------------

def test_process_group_is_closed_after_a_barrier_on_success_and_error(monkeypatch, tmp_path):
    import torch.distributed as tdist

    from textseg_cli.engine.distributed import shutdown_process_group

    tdist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    calls = []
    real_barrier, real_destroy = tdist.monitored_barrier, tdist.destroy_process_group
    monkeypatch.setattr(tdist, "monitored_barrier", lambda **kw: (calls.append(("barrier", kw["timeout"].seconds)),
                                                                  real_barrier(**kw)))
    monkeypatch.setattr(tdist, "destroy_process_group", lambda: (calls.append(("destroy", 0)), real_destroy()))
    shutdown_process_group(ok=False)
    assert [c[0] for c in calls] == ["barrier", "destroy"] and calls[0][1] <= 60
    assert not tdist.is_initialized()
    shutdown_process_group()  # nothing to close: no error


@pytest.mark.benchmark
def test_torchrun_two_gloo_processes_exit_cleanly_20_times(tmp_path):
    """The 20 % failure of tests/test_ddp.py ("terminate called without an active exception" at shutdown)."""
    from test_ddp import test_torchrun_two_gloo_processes

    for i in range(20):
        test_torchrun_two_gloo_processes(tmp_path / f"t{i}")


# --- 11. usage errors -----------------------------------------------------------------------------------

@pytest.mark.parametrize("args,needles", [
    (["--bogus"], ["No such option", "--bogus"]),
    (["bogus"], ["No such command", "bogus"]),
    (["eval", "--bogus"], ["textseg eval", "--bogus"]),
    (["prep", "synthetic"], ["textseg prep synthetic", "--out"]),
    (["train", "--method", "mcnet", "--data", "x", "--iterations", "2.5"], ["--iterations", "2.5", "not a valid"]),
])
def test_usage_errors_are_one_line_with_exit_2(args, needles):
    code, text = run_cli(*args)
    assert code == 2, text
    assert len([ln for ln in text.splitlines() if ln.strip()]) == 1 and "internal error" not in text, text
    for n in needles:
        assert n in text, text


@pytest.mark.parametrize("extra,needles", [
    (["--device", "tpu"], ["--device 'tpu'", "cpu, cuda or cuda:N"]),
    (["--set", "optim.lr=-0.1"], ["optim.lr -0.1", "positive"]),
    (["--set", "method.backbone.n_filters=abc"], ["method.backbone.n_filters 'abc'", "integer"]),
    (["--set", "data.patch_size=[7,7,7]"], ["data.patch_size [7, 7, 7]", "at least 16"]),
])
def test_bad_training_values_are_usage_errors_and_leave_no_run_folder(data, tmp_path, extra, needles):
    out = tmp_path / "r"
    one_line_error(*run_cli("train", "--method", "mcnet", "--data", data, "--iterations", "1", "--out", out,
                             "--set", "method.backbone.n_filters=2", *extra), *needles)
    assert not out.exists()


def test_help_works_on_every_command():
    from textseg_cli.cli import app, prep_app

    commands = [[c.name] for c in app.registered_commands if c.name] + [
        ["prep", c.name] for c in prep_app.registered_commands if c.name]
    assert len(commands) > 15
    for cmd in [[]] + commands:
        code, text = run_cli(*cmd, "-h")
        assert code == 0 and "Usage:" in text, (cmd, text)


def test_debug_works_before_or_after_the_subcommand(tmp_path):
    from textseg_cli.errors import DataError

    for args in (["--debug", "prep", "check", tmp_path], ["prep", "check", tmp_path, "--debug"]):
        with pytest.raises(DataError):  # --debug re-raises for the traceback
            run_cli(*args)
    code, text = run_cli("prep", "check", tmp_path)
    assert code == 2 and "Traceback" not in text


def test_disk_full_is_a_one_line_error_naming_the_file(tmp_path, monkeypatch):
    real = Path.write_text

    def full(self, *a, **k):
        if self.name.startswith(".d.json."):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(self, *a, **k)

    out = tmp_path / "d.json"
    monkeypatch.setattr(Path, "write_text", full)
    one_line_error(*run_cli("describe", "--dataset", "synthetic", "--llm", "offline", "--out", out),
                    str(out), "no space left")
    assert not out.exists() and not list(tmp_path.glob(".d.json.*"))


# --- 12. describe cache ---------------------------------------------------------------------------------

@pytest.fixture
def llm_env(tmp_path, monkeypatch):
    monkeypatch.setenv("TEXTSEG_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test")
    monkeypatch.delenv("OPENAI_BASE_URL", raising=False)


def _reply(n=15):
    filler = " ".join(["word"] * 70)
    return "\n".join(f"{i}. Feature {i}: {filler} {i}." for i in range(1, n + 1))


def test_describe_cache_is_per_server(llm_env, tmp_path):
    from fake_openai_server import FakeOpenAIServer

    with FakeOpenAIServer(default_content=_reply(3)) as bad, FakeOpenAIServer(default_content=_reply()) as good:
        code, text = run_cli("describe", "--dataset", "pancreas", "--llm", "gpt-4", "--base-url", bad.url,
                             "--out", tmp_path / "a.json", "--backoff", "0.01")
        assert code == 2 and "3 distinct" in text, text
        code, text = run_cli("describe", "--dataset", "pancreas", "--llm", "gpt-4", "--base-url", good.url,
                             "--out", tmp_path / "b.json", "--backoff", "0.01")
        assert code == 0, text
        assert len(good.requests) == 1  # the other server's bad reply was not replayed
    entries = [json.loads(p.read_text(encoding="utf-8")) for p in (tmp_path / "cache" / "llm").glob("*.json")]
    rejected = [e for e in entries if e.get("rejected")]
    assert len(entries) == 2 and len(rejected) == 1 and rejected[0]["base_url"] == bad.url


def test_describe_non_utf8_reply_is_a_clear_error(llm_env, tmp_path):
    from fake_openai_server import FakeOpenAIServer

    with FakeOpenAIServer() as s:
        s.push(body=b'{"choices": [{"message": {"content": "caf\xe9"}}]}')
        one_line_error(*run_cli("describe", "--dataset", "pancreas", "--llm", "gpt-4", "--base-url", s.url,
                                 "--out", tmp_path / "a.json", "--retries", "0"), "not valid UTF-8", s.url)
    assert not list((tmp_path / "cache").rglob("*.json"))


# --- issue 20: labels of unlabeled cases are never opened; --labeled percentages --------------------------

def test_no_label_file_of_an_unlabeled_case_is_opened_while_the_files_exist(data, tmp_path, monkeypatch):
    import nibabel

    import textseg_cli.data.io as io_mod

    opened: list[str] = []
    real_read, real_load = io_mod.read_nifti, nibabel.load

    def read(path, *a, **k):
        opened.append(str(Path(path).resolve()))
        return real_read(path, *a, **k)

    def load(path, *a, **k):
        opened.append(str(Path(path).resolve()))
        return real_load(path, *a, **k)

    monkeypatch.setattr(io_mod, "read_nifti", read)
    monkeypatch.setattr(nibabel, "load", load)
    out = tmp_path / "r"
    code, text = run_cli("train", "--method", "mcnet", "--data", data, "--labeled", "2", "--iterations", "2",
                         "--val-every", "2", "--out", out, *TINY)
    assert code == 0, text
    cases = json.loads((out / "cases.json").read_text(encoding="utf-8"))
    assert len(cases["unlabeled"]) >= 2
    labels = {str((data / "labels" / f"{cid}.nii.gz").resolve()) for cid in cases["unlabeled"]}
    assert all(Path(p).exists() for p in labels)  # the files are there, and still never opened
    assert labels.isdisjoint(opened), sorted(labels & set(opened))
    # the reader was really in the path: labeled and validation labels were read through it
    assert str((data / "labels" / f"{cases['labeled'][0]}.nii.gz").resolve()) in opened


@pytest.mark.parametrize("text,n_train,expected", [
    ("10%", 62, 6), ("20%", 62, 12),  # the LA convention in docs/data.md
    ("10%", 25, 3), ("30%", 15, 5),   # halves round up, not down and not to even
    ("10%", 24, 2), ("5%", 10, 1), ("100%", 7, 7), ("12.5%", 8, 1),
])
def test_labeled_percentage_rounds_half_up(text, n_train, expected):
    from textseg_cli.data.splits import parse_labeled

    assert parse_labeled(text, n_train) == expected


def test_labeled_percentage_on_the_command_line(data, tmp_path):
    n_train = len(json.loads((data / "dataset.json").read_text(encoding="utf-8"))["splits"]["train"])
    out = tmp_path / "r"
    pct = f"{100 * 2.5 / n_train:g}%"  # 2.5 cases (to printing precision): rounds up to 3
    code, text = run_cli("train", "--method", "mcnet", "--data", data, "--labeled", pct, "--iterations", "1",
                         "--val-every", "0", "--out", out, *TINY)
    assert code == 0, text
    assert len(json.loads((out / "cases.json").read_text(encoding="utf-8"))["labeled"]) == 3
    one_line_error(*run_cli("train", "--method", "mcnet", "--data", data, "--labeled", "1%", "--iterations", "1",
                             "--out", tmp_path / "r2", *TINY), "--labeled '1%'", "gives 0 cases")
