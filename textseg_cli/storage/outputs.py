"""Output ownership, run locks and leftovers: what `--force` may replace and who may write a run folder.

Every output folder textseg creates holds a small manifest (`.textseg-output.json`) naming the command
that made it and the top-level entries textseg wrote there (each atomic write registers its entry, so a
killed run is still accounted for). `--force` removes only those entries; it refuses a folder holding
anything else, a folder without a manifest, one made by another command, a folder that is or contains an
input of the same command, and a symlinked `--out`. Every command that writes a folder locks it
(`.textseg.lock`: pid, host, command) while it writes: train, resume, eval, predict, export-data and every
`prep`; a lock whose process is gone (same host) or an empty/unreadable lock file is taken over with a note,
one from another host never. See docs/safety.md.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import fcntl
import json
import os
import re
import shutil
import socket
import time
import uuid
from pathlib import Path
from typing import Iterable, Iterator

from textseg_cli.console import err_console
from textseg_cli.errors import ConfigError, OutputExistsError, TextsegError

MANIFEST = ".textseg-output.json"
LOCK = ".textseg.lock"
_OWN = (MANIFEST, LOCK)
# atomic_path's temporaries: "." + name + "." + 8 mkstemp characters + the name's suffixes (or .tmp)
_TEMP_RE = re.compile(r"^\.(?P<name>.+)\.[a-z0-9_]{8}(?P<suffix>(\.[A-Za-z0-9]+)*)$")


class _Temp:
    @staticmethod
    def match(name: str) -> bool:
        m = _TEMP_RE.match(name)
        if m is None:
            return False
        target, suffix = m.group("name"), m.group("suffix")
        return bool(suffix) and (target.endswith(suffix) or (suffix == ".tmp" and "." not in target))


_TEMP = _Temp()


class OutputOwnershipError(TextsegError):
    """--force was asked to replace something textseg did not write."""


class RunLockedError(TextsegError):
    """Another textseg process holds the run folder."""


# --- ownership ----------------------------------------------------------------------------------------

def check_out_path(out: str | Path, inputs: Iterable[str | Path] = (), sources: Iterable[str | Path] = (),
                   option: str = "--out") -> Path:
    """Refuse a symlinked `out`, an `out` that is or contains an input, or one inside a source folder.

    inputs: paths the command reads (out may sit inside them, e.g. RUN/eval/...); sources: data folders
    out must not even sit inside (prep sources, --images, --data).
    """
    out = Path(out)
    if out.is_symlink():
        raise ConfigError(f"{option} {out} is a symbolic link (to {os.readlink(out)}); give the real folder instead")
    o = out.resolve()
    for s in [*inputs, *sources]:
        s = Path(s).resolve()
        if o == s or o in s.parents:
            raise ConfigError(f"{option} {out} is or contains the input {s}; choose a separate folder "
                              "(inputs are never overwritten)")
    for s in sources:
        s = Path(s).resolve()
        if s in o.parents:
            raise ConfigError(f"{option} {out} is inside the input folder {s}; choose a separate folder")
    return out


def check_no_links_below(base: str | Path, path: str | Path) -> Path:
    """`path`, which textseg builds below `base` from names (an experiment's OUT/runs/<id>/<run>), when no part of
    it below `base` is a symbolic link: a link placed there (in a shared folder) would carry every write out of
    `base`. Refused with exit 2 naming the link."""
    base, path = Path(base), Path(path)
    p = base
    for part in path.relative_to(base).parts:
        p = p / part
        if p.is_symlink():
            raise ConfigError(f"{p} is a symbolic link (to {os.readlink(p)}); textseg writes only into real "
                              f"folders below {base} — remove the link")
    return path


def read_manifest(folder: str | Path) -> dict | None:
    """The folder's manifest, its entry names checked (a manifest may come from someone else's folder)."""
    path = Path(folder) / MANIFEST
    try:
        with open(path, encoding="utf-8") as f:
            fcntl.flock(f, fcntl.LOCK_SH)
            man = json.load(f)
    except FileNotFoundError:
        return None
    except (json.JSONDecodeError, UnicodeDecodeError, OSError):
        return {"command": None, "entries": []}
    if not isinstance(man, dict):
        return {"command": None, "entries": []}
    check_entry_names(man.get("entries", []), path)
    return man


def check_entry_names(entries: object, manifest: Path) -> None:
    """Every entry must name a direct child of the folder: a plain name, no separator, not `.`/`..`, not absolute.

    --force and the clean-up after a failure remove the listed entries, so a doctored name such as `../sibling`
    or `/abs/dir` would delete outside the folder; it is refused, naming the manifest and the entry, and nothing is
    removed."""
    if not isinstance(entries, list):
        raise OutputOwnershipError(f"'entries' must be a list of names, got {type(entries).__name__}; textseg will "
                                   "not remove anything on its word", manifest)
    for name in entries:
        if (not isinstance(name, str) or name in ("", ".", "..") or "/" in name or "\\" in name or "\0" in name
                or os.path.isabs(name)):
            raise OutputOwnershipError(f"lists the entry {name!r}, which is not a plain name inside this folder; "
                                       "textseg will not remove or overwrite anything on its word (delete the "
                                       "manifest if the folder is yours)", manifest)


def _write_manifest(folder: Path, data: dict) -> None:
    fd = os.open(folder / MANIFEST, os.O_RDWR | os.O_CREAT, 0o644)
    with os.fdopen(fd, "r+", encoding="utf-8") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        f.seek(0)
        f.truncate()
        json.dump(data, f, indent=1)
        f.write("\n")


def _foreign(folder: Path, man: dict | None) -> list[str]:
    owned = set((man or {}).get("entries", [])) | set(_OWN)
    out = []
    for p in sorted(folder.iterdir()):
        if p.name in owned or _TEMP.match(p.name):
            continue
        if p.is_dir() and not p.is_symlink() and not any(p.iterdir()):
            continue  # an empty folder holds nothing to lose
        out.append(p.name)
    return out


def claim_output_dir(path: str | Path, command: str, force: bool = False, allow_existing: bool = False,
                     inputs: Iterable[str | Path] = (), sources: Iterable[str | Path] = ()) -> Path:
    """Create (or, with force, clear what textseg wrote in) an output folder and mark it as textseg's.

    allow_existing keeps an existing folder as it is (resuming preparers); force removes only the entries
    the manifest lists and refuses anything else.
    """
    path = check_out_path(path, inputs, sources)
    if path.exists() and not path.is_dir():
        raise ConfigError(f"--out {path} is a file, not a folder")
    present = [p for p in path.iterdir() if p.name not in _OWN] if path.exists() else []
    man = read_manifest(path) if path.exists() else None
    if man is not None and man.get("command") not in (None, command):
        if present or force:
            raise OutputOwnershipError(
                f"holds the output of `textseg {man.get('command')}`; `textseg {command}` will not write into or "
                "replace it — choose another --out", path)
    if present:
        if allow_existing:
            if man is None:
                _write_manifest(path, {"tool": "textseg", "command": command, "entries": _names(path)})
            return path
        if not force:
            raise OutputExistsError(path)
        if man is None:
            raise OutputOwnershipError(
                f"--force only replaces folders textseg wrote ({MANIFEST} is missing) and this one holds "
                f"{_listing([p.name for p in present])}; remove them yourself or choose another --out", path)
        foreign = _foreign(path, man)
        if foreign:
            raise OutputOwnershipError(
                f"--force refused: the folder holds {_listing(foreign)}, which textseg did not write; "
                "move it away or choose another --out", path)
        for name in man.get("entries", []):
            _remove(path / name)
        remove_leftovers(path, recursive=False)
    path.mkdir(parents=True, exist_ok=True)
    _write_manifest(path, {"tool": "textseg", "command": command, "entries": [], "claim": uuid.uuid4().hex,
                           "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")})
    return path


def _names(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name not in _OWN and not _TEMP.match(p.name))


def _listing(names: list[str]) -> str:
    shown = ", ".join(names[:5])
    return shown + (f" and {len(names) - 5} more" if len(names) > 5 else "")


def _remove(p: Path) -> None:
    """Remove one entry of an owned folder: a symlink is unlinked, never followed."""
    if p.is_symlink() or p.is_file():
        p.unlink(missing_ok=True)
    elif p.is_dir():
        shutil.rmtree(p)


def note_written(path: str | Path) -> None:
    """Register a file textseg just wrote with the manifest of the nearest owned folder above it."""
    path = Path(path)
    child, folder = path, path.parent
    for _ in range(4):
        if (folder / MANIFEST).exists():
            try:
                _add_entry(folder, child.name)
            except OSError:
                pass  # a read-only or vanished manifest must not fail the write itself
            return
        if folder.parent == folder:
            return
        child, folder = folder, folder.parent


def _add_entry(folder: Path, name: str) -> None:
    fd = os.open(folder / MANIFEST, os.O_RDWR)
    with os.fdopen(fd, "r+", encoding="utf-8") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            data = json.loads(f.read() or "{}")
        except json.JSONDecodeError:
            data = {}
        entries = data.setdefault("entries", [])
        if name in entries:
            return
        entries.append(name)
        f.seek(0)
        f.truncate()
        json.dump(data, f, indent=1)
        f.write("\n")


def seal(folder: str | Path) -> None:
    """Record every top-level entry as textseg's (end of a command whose folder it created)."""
    folder = Path(folder)
    man = read_manifest(folder)
    if man is None or not folder.is_dir():
        return
    man["entries"] = sorted(set(man.get("entries", [])) | set(_names(folder)))
    _write_manifest(folder, man)


def remove_leftovers(folder: str | Path, recursive: bool = True) -> list[Path]:
    """Delete temporaries of interrupted atomic writes (e.g. `.last.pt.ab12cd34.pt`) under `folder`."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    found = folder.rglob(".*") if recursive else folder.glob(".*")
    gone = []
    for p in found:
        if p.name not in _OWN and p.is_file() and not p.is_symlink() and _TEMP.match(p.name):
            p.unlink(missing_ok=True)
            gone.append(p)
    return gone


def discard_if_unfinished(folder: str | Path, finished: Iterable[str] = (), keep_dir: bool = False) -> bool:
    """After a failed command: remove the folder textseg created if it holds no finished work.

    finished: relative paths whose presence means there is work worth keeping (e.g. checkpoints/last.pt).
    """
    folder = Path(folder)
    if not folder.is_dir() or folder.is_symlink():
        return False
    if any((folder / f).exists() for f in finished):
        return False
    try:
        man = read_manifest(folder)
    except OutputOwnershipError:  # a doctored manifest: remove nothing
        return False
    if man is None or _foreign(folder, man):
        return False
    for name in man.get("entries", []):
        _remove(folder / name)
    remove_leftovers(folder, recursive=False)
    for p in folder.iterdir():  # folders it made but never wrote into
        if p.is_dir() and not p.is_symlink() and not any(p.iterdir()):
            p.rmdir()
    (folder / MANIFEST).unlink(missing_ok=True)
    if not keep_dir and not any(p.name != LOCK for p in folder.iterdir()):
        (folder / LOCK).unlink(missing_ok=True)
        with contextlib.suppress(OSError):
            folder.rmdir()
        return True
    return False


@contextlib.contextmanager
def discard_on_failure(folder: str | Path, finished: Iterable[str] = ("dataset.json",), *, command: str | None = None,
                       prep_sources: Iterable[str | Path] = ()) -> Iterator[Path]:
    """Run a one-shot writer (prep lvit/slices/synthetic); if it fails, remove the half-written output it
    made, so a re-run needs no --force. Finished work (e.g. an existing dataset.json) is never removed.

    With `command`, the folder's lock is held around all of it (locked_output; `prep_sources` as there), so a
    concurrent `--force` can neither clear this run's files nor have its own removed by this clean-up."""
    folder = Path(folder)
    existed = folder.exists()
    with locked_output(folder, command, prep_sources=prep_sources) if command else contextlib.nullcontext(folder):
        before = (read_manifest(folder) or {}).get("claim") if existed and not folder.is_symlink() else None
        try:
            yield folder
        except BaseException:
            now = (read_manifest(folder) or {}).get("claim") if folder.is_dir() and not folder.is_symlink() else None
            if now is not None and now != before:  # only what this run claimed, never an older output
                discard_if_unfinished(folder, finished, keep_dir=existed)
            raise


# --- run lock -----------------------------------------------------------------------------------------

def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _read_lock(lock: Path) -> dict | None:
    """The lock's record; {} for an empty or unparsable file (a killed write), None when there is none."""
    try:
        text = lock.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError):
        return {}
    try:
        held = json.loads(text)
    except json.JSONDecodeError:
        return {}
    return held if isinstance(held, dict) else {}


@contextlib.contextmanager
def _serialized(folder: Path) -> Iterator[bool]:
    """flock the folder itself while a lock is inspected and taken, so two processes never both take over the
    same stale lock; yields False where the file system offers no flock (then a taken lock is re-read)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        yield False
        return
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
        except OSError:
            yield False
            return
        yield True
    finally:
        os.close(fd)


def _take_lock(folder: Path, lock: Path, me: dict) -> None:
    """Create `lock` holding `me`; take over a stale (dead pid on this host) or empty/garbage lock file with a
    one-line note on stderr; refuse a live holder and any lock from another host (RunLockedError, exit 2)."""
    for attempt in range(5):
        with _serialized(folder) as exclusive:
            held = _read_lock(lock)
            if held is not None:
                pid, host = held.get("pid"), held.get("host")
                if not held or not isinstance(pid, int) or not isinstance(host, str):
                    if not exclusive and attempt < 2 and time.time() - _mtime(lock) < 2:
                        time.sleep(0.5)  # maybe being written by a process we cannot flock against
                        continue
                    err_console.print(f"[yellow]note:[/] taking over {lock}: the lock file is empty or unreadable "
                                      "(left by a killed textseg command)", highlight=False, soft_wrap=True)
                elif host != me["host"]:
                    raise RunLockedError(
                        f"is in use by `textseg {held.get('command')}` (pid {pid} on {host}, since "
                        f"{held.get('started')}); a lock from another host is never taken over: wait for that job, "
                        f"or delete {lock} once it is gone", folder)
                elif _alive(pid):
                    raise RunLockedError(
                        f"is in use by `textseg {held.get('command')}` (pid {pid} on {host}, since "
                        f"{held.get('started')}); wait for it to finish, or choose another folder", folder)
                else:
                    err_console.print(f"[yellow]note:[/] taking over the stale lock {lock} of `textseg "
                                      f"{held.get('command')}` (pid {pid} no longer runs)", highlight=False,
                                      soft_wrap=True)
                lock.unlink(missing_ok=True)
            try:
                fd = os.open(lock, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                continue  # taken meanwhile (no flock): look again
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                json.dump(me, f)
            if exclusive or (_read_lock(lock) or {}).get("token") == me["token"]:
                return
    raise RunLockedError(f"could not take {LOCK}: other textseg commands keep taking it", folder)


def _mtime(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except OSError:
        return 0.0


@contextlib.contextmanager
def run_lock(folder: str | Path, command: str) -> Iterator[Path]:
    """Hold `folder/.textseg.lock` (pid, host, command, start time) for the block; a second holder is refused.

    A lock left by a process that no longer runs on this host, or an empty/unreadable lock file (a kill while it
    was written), is taken over with a note on stderr; one from another host is never guessed about (the
    message says how to clear it).
    """
    folder = Path(folder)
    if folder.is_symlink():
        raise ConfigError(f"--out {folder} is a symbolic link (to {os.readlink(folder)}); give the real folder instead")
    folder.mkdir(parents=True, exist_ok=True)
    read_manifest(folder)  # a doctored manifest (entries outside the folder) is refused before anything is written
    lock = folder / LOCK
    me = {"pid": os.getpid(), "host": socket.gethostname(), "command": command,
          "started": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"), "token": uuid.uuid4().hex}
    _take_lock(folder, lock, me)
    try:
        yield lock
    finally:
        held = _read_lock(lock)
        if held is not None and held.get("token") == me["token"]:
            lock.unlink(missing_ok=True)


@contextlib.contextmanager
def locked_output(folder: str | Path, command: str, *, inputs: Iterable[str | Path] = (),
                  sources: Iterable[str | Path] = (), prep_sources: Iterable[str | Path] = ()) -> Iterator[Path]:
    """Hold the output folder's lock for a whole command that writes it (prep, export-data, eval, predict), from
    before it is claimed (so a concurrent `--force` cannot clear it) until the result is written.

    `out` is checked first, so no lock is written into an input: against `inputs`/`sources` as check_out_path
    does, and against `prep_sources` as the preparers do (out may not be, contain or sit inside one). Folders
    made only to hold the lock are removed again when the command leaves them empty."""
    folder = check_out_path(folder, inputs, sources)
    o = folder.resolve()
    for s in prep_sources:
        s = Path(s).resolve()
        if o == s or s in o.parents or o in s.parents:
            raise ConfigError(f"--out {folder} overlaps the source {s}; choose a separate folder")
    made = []
    p = folder.absolute()
    while not p.exists() and p.parent != p:
        made.append(p)
        p = p.parent
    try:
        with run_lock(folder, command):
            yield folder
    finally:
        for d in made:  # innermost first
            with contextlib.suppress(OSError):
                d.rmdir()  # only succeeds while empty


@contextlib.contextmanager
def guarded_run_dir(run_dir: str | Path, command: str, *, new: bool, force: bool = False,
                    inputs: Iterable[str | Path] = (), sources: Iterable[str | Path] = (),
                    finished: Iterable[str] = ("checkpoints/last.pt",)) -> Iterator[Path]:
    """Lock a run folder, claim it (new runs), clear leftovers of killed writes; on failure remove a
    folder that holds no finished work, so a re-run needs no --force."""
    run_dir = check_out_path(run_dir, inputs, sources)
    existed = run_dir.exists() and any(p.name not in _OWN for p in run_dir.iterdir())
    if new and existed and not force:
        raise OutputExistsError(run_dir)
    with run_lock(run_dir, command):
        if new:
            claim_output_dir(run_dir, command, force=force, inputs=inputs, sources=sources)
        remove_leftovers(run_dir)
        try:
            yield run_dir
        except BaseException:
            if new:
                discard_if_unfinished(run_dir, finished)
            raise
        finally:
            if run_dir.is_dir():
                seal(run_dir)


def refuse_existing_run(run_dir: str | Path, force: bool) -> None:
    """A new run may not start in a symlinked or non-empty folder (without --force)."""
    run_dir = check_out_path(run_dir)
    if not force and run_dir.exists() and any(p.name not in _OWN for p in run_dir.iterdir()):
        raise OutputExistsError(run_dir)



def prepare_output_dir(path: str | Path, force: bool = False, allow_existing: bool = False, *,
                       command: str = "output", inputs=(), sources=()) -> Path:
    """Create an output folder; refuse a non-empty existing one unless force.

    force replaces only what textseg wrote there (textseg_cli.storage.outputs.claim_output_dir): a folder holding
    anything else, an input of the command (`inputs`: out may not be or contain them; `sources`: nor sit
    inside them) or a symlinked --out is refused.
    """
    return claim_output_dir(path, command, force=force, allow_existing=allow_existing, inputs=inputs,
                            sources=sources)


def guard_output_file(path: str | Path, force: bool = False) -> Path:
    path = check_out_path(path)  # a symlinked output is refused, not written through
    if path.exists() and not force:
        raise OutputExistsError(path)
    return path
