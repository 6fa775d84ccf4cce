"""Issue 25, point 4: every command that writes a folder holds its lock (`.textseg.lock`) from the claim of the
folder until its result is written, so a concurrent `--force` can neither delete nor mix into another run's
output; a stale (dead pid) or empty/garbage lock is taken over with a note, a live or other-host one refused.
Point 6 (last item): a re-run of a killed resumable `prep` removes the temporaries of its interrupted writes."""

from __future__ import annotations

import hashlib
import json
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from conftest import run_cli
from raw_fakes import phantom_ct, write_image

from textseg_cli.storage.outputs import LOCK, run_lock

SP = (0.7, 0.7, 2.0)
SYN = ["--cases", "3", "--size", "16", "--val", "1", "--test", "1"]


def _snapshot(folder: Path) -> dict[str, str]:
    """Every file below `folder` (the lock file aside) with a hash of its bytes."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file() and p.name != LOCK}


def _hold(folder: Path, pid: int, host: str | None = None, command: str = "prep custom") -> str:
    """A lock file as run_lock writes it."""
    text = json.dumps({"pid": pid, "host": host or socket.gethostname(), "command": command,
                       "started": "2026-01-01T00:00:00+00:00", "token": "0" * 32})
    (folder / LOCK).write_text(text, encoding="utf-8")
    return text


def _error_line(code: int, text: str, *needles: object) -> str:
    assert code == 2, text
    err = [line for line in text.splitlines() if "error" in line]
    assert len(err) == 1 and "Traceback" not in text, text
    for n in needles:
        assert str(n) in err[0], err[0]
    return err[0]


@pytest.fixture
def sleeper():
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    yield proc
    proc.kill()
    proc.wait()


@pytest.fixture
def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def _raw(root: Path, n: int = 4) -> tuple[Path, Path]:
    images, labels = root / "imgs", root / "labs"
    for i in range(n):
        hu, lab = phantom_ct((16, 16, 6), seed=i)
        write_image(images / f"case{i}.nii.gz", hu, SP)
        write_image(labels / f"case{i}.nii.gz", lab, SP)
    return images, labels


def _custom(images: Path, labels: Path, out: Path, *extra: str) -> tuple[int, str]:
    return run_cli("prep", "custom", "--images", images, "--labels", labels, "--out", out, "--split", "3,1", *extra)


# --- (a) a live holder is refused, the folder untouched ------------------------------------------------

def test_prep_synthetic_force_is_refused_while_another_command_holds_the_folder(tmp_path, sleeper):
    out = tmp_path / "P"
    code, text = run_cli("prep", "synthetic", "--out", out, *SYN)
    assert code == 0, text
    before = _snapshot(out)
    lock = _hold(out, sleeper.pid, command="prep synthetic")
    _error_line(*run_cli("prep", "synthetic", "--out", out, *SYN, "--seed", "5", "--force"),
                "in use by `textseg prep synthetic`", f"pid {sleeper.pid}")
    assert _snapshot(out) == before  # not one file removed or rewritten
    assert (out / LOCK).read_text(encoding="utf-8") == lock  # the holder's lock is left alone


def test_prep_custom_resume_and_force_are_refused_while_another_prep_holds_the_folder(tmp_path, sleeper):
    images, labels = _raw(tmp_path)
    out = tmp_path / "P"
    code, text = _custom(images, labels, out)
    assert code == 0, text
    before = _snapshot(out)
    _hold(out, sleeper.pid)
    for extra in ((), ("--force",), ("--force", "--spacing", "1")):
        _error_line(*_custom(images, labels, out, *extra), "in use by `textseg prep custom`", f"pid {sleeper.pid}")
    assert _snapshot(out) == before and (out / "dataset.json").is_file()


def test_a_lock_from_another_host_is_never_taken_over(tmp_path):
    out = tmp_path / "P"
    out.mkdir()
    _hold(out, 1, host="other-node-17", command="prep synthetic")
    line = _error_line(*run_cli("prep", "synthetic", "--out", out, *SYN), "other-node-17", "another host",
                       f"delete {out / LOCK}")
    assert "pid 1" in line and not (out / "dataset.json").exists()


# --- (b) a stale, empty or garbage lock is taken over with a note --------------------------------------

def test_a_stale_lock_is_taken_over_with_a_note(tmp_path, dead_pid):
    out = tmp_path / "P"
    out.mkdir()
    _hold(out, dead_pid, command="prep synthetic")
    code, text = run_cli("prep", "synthetic", "--out", out, *SYN)
    assert code == 0, text
    notes = [line for line in text.splitlines() if "taking over" in line]
    assert len(notes) == 1 and f"pid {dead_pid}" in notes[0] and "prep synthetic" in notes[0], text
    assert (out / "dataset.json").is_file() and not (out / LOCK).exists()  # released afterwards


@pytest.mark.parametrize("content", ["", "{not json", "[1, 2]", '{"pid": "x"}'])
def test_an_empty_or_garbage_lock_file_is_taken_over_with_a_note(tmp_path, content):
    images, labels = _raw(tmp_path, n=3)
    out = tmp_path / "P"
    out.mkdir()
    (out / LOCK).write_text(content, encoding="utf-8")
    code, text = run_cli("prep", "custom", "--images", images, "--labels", labels, "--out", out, "--split", "2,1")
    assert code == 0, text
    notes = [line for line in text.splitlines() if "taking over" in line]
    assert len(notes) == 1 and "empty or unreadable" in notes[0], text
    assert (out / "dataset.json").is_file() and not (out / LOCK).exists()


# --- (c) the other writers: export-data and predict, locked from a thread of this very process ---------

@pytest.fixture
def held_in_thread():
    """Hold run_lock(folder) in another thread until the test ends (same pid: the lock is live)."""
    stop, started, threads = threading.Event(), [], []

    def hold(folder: Path, command: str) -> None:
        ready = threading.Event()

        def body():
            with run_lock(folder, command):
                ready.set()
                stop.wait(60)

        t = threading.Thread(target=body, daemon=True)
        t.start()
        assert ready.wait(10)
        threads.append(t)
        started.append(folder)

    yield hold
    stop.set()
    for t in threads:
        t.join(10)
    assert not any((f / LOCK).exists() for f in started)


def test_export_data_is_refused_while_the_folder_is_held(tmp_path, synthetic_data, held_in_thread):
    out = tmp_path / "nn"
    code, text = run_cli("export-data", synthetic_data, "--out", out)
    assert code == 0, text
    before = _snapshot(out)
    held_in_thread(out, "export-data")
    _error_line(*run_cli("export-data", synthetic_data, "--out", out, "--force", "--labeled", "2"),
                "in use by `textseg export-data`")
    assert _snapshot(out) == before


def test_a_folder_made_only_to_hold_the_lock_is_removed_when_the_command_fails_early(tmp_path):
    code, text = run_cli("prep", "custom", "--images", tmp_path / "missing", "--out", tmp_path / "new" / "P")
    assert code == 2 and not (tmp_path / "new").exists(), text


# --- point 6: leftovers of a killed prep ---------------------------------------------------------------

def test_the_rerun_of_a_killed_prep_removes_the_temporaries_of_its_interrupted_writes(tmp_path):
    images, labels = _raw(tmp_path)
    out = tmp_path / "P"
    code, text = _custom(images, labels, out)
    assert code == 0, text
    # what a kill during the writes of case1 leaves: temporaries of atomic writes, no record, no dataset.json
    (out / ".prep" / "case1.json").unlink()
    (out / "dataset.json").unlink()
    junk = [out / "images" / ".case1.nii.gz.k3j4h5g6.nii.gz", out / "labels" / ".case1.nii.gz.ab12cd34.nii.gz",
            out / ".prep" / ".case1.json.zz99yy88.json", out / ".qc.csv.q1w2e3r4.csv"]
    for p in junk:
        p.write_bytes(b"\0" * 64)
    code, text = _custom(images, labels, out)
    assert code == 0, text
    assert not [p for p in junk if p.exists()], [p.name for p in junk if p.exists()]
    assert not [p for p in out.rglob(".*") if p.is_file() and p.parent.name in ("images", "labels")]
    assert json.loads((out / "dataset.json").read_text(encoding="utf-8"))["cases"]


# --- (c) eval and predict into an explicit --out ---------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_run(synthetic_data, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("lockrun") / "r"
    code, text = run_cli("train", "--method", "mcnet", "--data", synthetic_data, "--labeled", "2", "--iterations",
                         "1", "--val-every", "0", "--out", out, "--device", "cpu", "--set",
                         "method.backbone.n_filters=2", "--set", "train.batch_labeled=1", "--set",
                         "train.batch_unlabeled=1")
    assert code == 0, text
    return out


def test_eval_and_predict_are_refused_while_their_out_folder_is_held(tiny_run, synthetic_data, tmp_path, sleeper):
    ev, pr = tmp_path / "ev", tmp_path / "pr"
    for folder, command in ((ev, "eval"), (pr, "predict")):
        folder.mkdir()
        (folder / "mine.txt").write_text("not textseg's")  # --force would refuse it anyway; the lock comes first
        _hold(folder, sleeper.pid, command=command)
    _error_line(*run_cli("eval", tiny_run, "--checkpoint", "last", "--device", "cpu", "--out", ev, "--force"),
                "in use by `textseg eval`", f"pid {sleeper.pid}")
    _error_line(*run_cli("predict", tiny_run, "--images", synthetic_data, "--out", pr, "--device", "cpu",
                         "--force"), "in use by `textseg predict`", f"pid {sleeper.pid}")
    assert sorted(p.name for p in ev.iterdir()) == sorted(p.name for p in pr.iterdir()) == [LOCK, "mine.txt"]
    assert not (tiny_run / LOCK).exists()  # the run itself is not held
    # once the holder is gone, the same eval runs (stale lock taken over) and releases the folder
    (ev / "mine.txt").unlink()
    sleeper.kill()
    sleeper.wait()
    code, text = run_cli("eval", tiny_run, "--checkpoint", "last", "--device", "cpu", "--out", ev)
    assert code == 0 and "taking over the stale lock" in text, text
    assert (ev / "metrics.csv").exists() or any(ev.glob("*.csv")), sorted(p.name for p in ev.iterdir())
    assert not (ev / LOCK).exists()
