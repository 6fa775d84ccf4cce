"""The experiment file (`textseg experiment run EXP.yaml`) and its expansion into runs.

    name: la-table1                 # caption/label of the table (default: the file's stem)
    data: prepared/la               # the prepared folder (relative paths: to this file)
    dataset: la                     # config profile when `data` is absent (dry runs); default: the data's name
    dim: 3                          # and its dimensionality and patch (dry runs without data only)
    patch: null
    out: null                       # the experiment folder (default: <this file's folder>/<its stem>)
    labeled: [8, 16]                # counts or percentages ("10%") of splits.train
    seeds: [1337, 1338, 1339]
    folds: null                     # cross-validation: 5 (folds 0-4) or a list such as [0, 2]; needs a set prepared
                                    # with --folds K (dataset.json extra.folds); runs become method x labeled x seed x fold
    iterations: null                # the budget of every run; null = each method's own (official) budget
    device: null                    # cpu, cuda, cuda:N (null = cuda when present)
    threads: null                   # CPU threads per run
    reference: null                 # Wilcoxon reference row (a method's name or id; default: the first method)
    eval: {split: val, checkpoint: best-on-val, lcc: protocol, inference: null, empty_policy: nan, spacing_mm: false}
                                    # inference: null (the run's), paper, best (`textseg eval --inference`), sliding, whole
    methods:
      - method: mcnet               # a registered method (`textseg models`)
        name: MC-Net                # display name in tables (default: the method)
        id: mcnet                   # folder name (default: the method; must be unique)
        set: [optim.lr=0.01]        # `--set` overrides of this method's runs
        config: {}                  # or a mapping merged like `--config`
        iterations: null            # this method's budget (overrides the experiment's)
        lcc: null                   # true/false: this method's LCC at evaluation (overrides eval.lcc)

Runs live at `OUT/runs/<id>/<labeled>L_s<seed>/` (with folds `.../<labeled>L_s<seed>_f<k>/`, trained as
`textseg train --fold k`; a normal `textseg train` run folder; its evaluation in `eval/<split>-<checkpoint>/`, with
folds on that fold's own validation cases), their state in `OUT/status/`. A run is the same whichever launcher
started it.
"""

from __future__ import annotations

import copy
import re
import shlex
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from textseg_cli.data.names import case_id_problem
from textseg_cli.errors import ConfigError
from textseg_cli.evaluation.folders import check_empty_policy
from textseg_cli.inference.settings import INFERENCE_CHOICES
from textseg_cli.methods.registry import list_methods
from textseg_cli.runs.config import build_config
from textseg_cli.storage.files import read_text

CHECKPOINT_RULES = {"best-on-val": "best", "best": "best", "last": "last"}
LCC_MODES = ("protocol", "on", "off")
EVAL_DEFAULTS = {"split": "val", "checkpoint": "best-on-val", "lcc": "protocol", "inference": None,
                 "empty_policy": "nan", "spacing_mm": False}
_TOP_KEYS = {"name", "data", "dataset", "dim", "patch", "out", "labeled", "seeds", "folds", "iterations", "device",
             "threads", "reference", "eval", "methods", "description"}
_METHOD_KEYS = {"method", "name", "id", "set", "config", "iterations", "lcc", "note"}
SPEC_COPY = "experiment.yaml"


@dataclass
class MethodEntry:
    method: str
    name: str
    id: str
    sets: list[str] = field(default_factory=list)
    config: dict = field(default_factory=dict)
    iterations: int | None = None
    lcc: bool | None = None


@dataclass
class Run:
    entry: MethodEntry
    labeled: str
    seed: int
    dir: Path
    iterations: int | None
    fold: int | None = None  # cross-validation fold (`train --fold k`); None: the set's own train/val split

    @property
    def key(self) -> str:
        return f"{self.entry.id}/{self.dir.name}"

    @property
    def status_name(self) -> str:
        return f"{self.entry.id}__{self.dir.name}.json"


@dataclass
class Experiment:
    path: Path
    name: str
    data: Path | None
    dataset: str | None
    out: Path
    labeled: list[str]
    seeds: list[int]
    iterations: int | None
    device: str | None
    threads: int | None
    reference: str | None
    eval: dict
    methods: list[MethodEntry]
    raw: dict
    folds: list[int] | None = None  # cross-validation folds; None: no fold axis

    def runs(self) -> list[Run]:
        """method × labeled × seed (× fold), in that nesting order."""
        out = []
        for m in self.methods:
            for lab in self.labeled:
                for seed in self.seeds:
                    for fold in (self.folds if self.folds is not None else [None]):
                        d = self.out / "runs" / m.id / (f"{lab.replace('%', 'pct')}L_s{seed}"
                                                         + ("" if fold is None else f"_f{fold}"))
                        out.append(Run(m, lab, seed, d, m.iterations if m.iterations is not None else self.iterations,
                                       fold))
        return out

    def check_folds(self, dataset) -> None:
        """Refuse a fold axis the prepared set cannot serve: no `extra.folds`, or fewer folds than asked."""
        if not self.folds or dataset is None:
            return
        have = len((dataset.spec.get("extra") or {}).get("folds") or [])
        if not have:
            raise ConfigError(f"folds: {dataset.root} records no folds (prepare it with --folds K)", self.path)
        if max(self.folds) >= have:
            raise ConfigError(f"folds: asks for fold {max(self.folds)} but {dataset.root} records {have} fold(s) "
                              f"(0 to {have - 1})", self.path)

    def checkpoint(self) -> str:
        return CHECKPOINT_RULES[self.eval["checkpoint"]]

    def eval_dir(self, run: Run) -> Path:
        return run.dir / "eval" / f"{self.eval['split']}-{self.checkpoint()}"

    def reference_entry(self) -> MethodEntry:
        if self.reference is None:
            return self.methods[0]
        for m in self.methods:
            if self.reference in (m.name, m.id):
                return m
        raise ConfigError(f"reference {self.reference!r} names no method (names: "
                          f"{', '.join(m.name for m in self.methods)})", self.path)


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.+-]+", "-", text).strip("-").replace("+", "_plus") or "method"


def _labeled(value: Any, where: Path) -> str:
    text = str(value).strip()
    if not re.fullmatch(r"\d+%?|\d+(\.\d+)?%", text):
        raise ConfigError(f"labeled: {value!r} is not a count (8) or a percentage (10%)", where)
    return text


def _lcc(value: Any, where: str, path: Path) -> bool | None:
    if value is None or isinstance(value, bool):
        return value
    if str(value).lower() in ("on", "true"):
        return True
    if str(value).lower() in ("off", "false"):
        return False
    raise ConfigError(f"{where}: {value!r}: expected true or false", path)


def load_experiment(path: str | Path) -> Experiment:
    """Read and check an experiment file (or an experiment folder holding its copy)."""
    path = Path(path)
    if path.is_dir():
        path = path / SPEC_COPY
    if not path.is_file():
        raise ConfigError("experiment file not found", path)
    try:
        raw = yaml.safe_load(read_text(path, ConfigError)) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"not valid YAML ({str(exc).splitlines()[0]})", path) from None
    if not isinstance(raw, dict):
        raise ConfigError("expected a mapping at the top level", path)
    unknown = sorted(set(raw) - _TOP_KEYS)
    if unknown:
        raise ConfigError(f"unknown key(s) {unknown}; expected some of {sorted(_TOP_KEYS)}", path)
    base = path.parent
    # the copy in an experiment folder records absolute paths
    data = raw.get("data")
    data = None if data is None else (Path(data) if Path(data).is_absolute() else base / data)
    if data is None and not raw.get("dataset"):
        raise ConfigError("give `data:` (a prepared folder) or at least `dataset:` (for a dry run)", path)
    out = raw.get("out")
    out = (base / path.stem) if out is None else (Path(out) if Path(out).is_absolute() else base / out)
    if path.name == SPEC_COPY and raw.get("out") is None:
        out = base
    labeled = raw.get("labeled")
    labeled = [labeled] if isinstance(labeled, (int, str)) else labeled
    if not labeled:
        raise ConfigError("labeled: give at least one labeled count, e.g. [8, 16]", path)
    seeds = raw.get("seeds")
    seeds = [seeds] if isinstance(seeds, int) else seeds
    if not seeds or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in seeds):
        raise ConfigError(f"seeds: expected a list of whole numbers ≥ 0, got {seeds!r}", path)
    if len(set(seeds)) != len(seeds):
        raise ConfigError(f"seeds: {seeds} repeats a seed", path)
    ev = dict(EVAL_DEFAULTS)
    given = raw.get("eval") or {}
    if not isinstance(given, dict) or set(given) - set(EVAL_DEFAULTS):
        raise ConfigError(f"eval: expected a mapping with some of {sorted(EVAL_DEFAULTS)}", path)
    ev.update(given)
    if ev["split"] not in ("val", "test"):
        raise ConfigError(f"eval.split {ev['split']!r}: expected val or test", path)
    if ev["checkpoint"] not in CHECKPOINT_RULES:
        raise ConfigError(f"eval.checkpoint {ev['checkpoint']!r}: expected best-on-val or last", path)
    ev["lcc"] = {True: "on", False: "off"}.get(ev["lcc"], ev["lcc"])
    if ev["lcc"] not in LCC_MODES:
        raise ConfigError(f"eval.lcc {ev['lcc']!r}: expected protocol, on or off", path)
    if ev["inference"] not in (None, *INFERENCE_CHOICES):
        raise ConfigError(f"eval.inference {ev['inference']!r}: expected {', '.join(INFERENCE_CHOICES)}", path)
    folds = _folds(raw.get("folds"), path)

    check_empty_policy(ev["empty_policy"])

    known = list_methods()
    methods, ids = [], set()
    for i, m in enumerate(raw.get("methods") or []):
        if isinstance(m, str):
            m = {"method": m}
        if not isinstance(m, dict) or "method" not in m:
            raise ConfigError(f"methods[{i}]: expected a method name or a mapping with `method:`", path)
        bad = sorted(set(m) - _METHOD_KEYS)
        if bad:
            raise ConfigError(f"methods[{i}]: unknown key(s) {bad}; expected some of {sorted(_METHOD_KEYS)}", path)
        if m["method"] not in known:
            raise ConfigError(f"methods[{i}]: unknown method {m['method']!r}; available: {', '.join(known)}", path)
        sets = m.get("set") or []
        sets = [sets] if isinstance(sets, str) else _rejoin_sets([str(s) for s in sets], f"methods[{i}].set", path)
        if m.get("id") is not None:  # becomes the folder OUT/runs/<id>/: no separators, no '..'
            why = case_id_problem(str(m["id"]), "id")
            if why is not None:
                raise ConfigError(f"methods[{i}]: {why}", path)
        cfg = m.get("config") or {}
        if not isinstance(cfg, dict):
            raise ConfigError(f"methods[{i}].config: expected a mapping", path)
        entry = MethodEntry(method=m["method"], name=str(m.get("name") or m["method"]),
                            id=_slug(str(m.get("id") or m["method"])), sets=sets, config=copy.deepcopy(cfg),
                            iterations=None if m.get("iterations") is None else int(m["iterations"]),
                            lcc=_lcc(m.get("lcc"), f"methods[{i}].lcc", path))
        if entry.id in ids:
            raise ConfigError(f"methods[{i}]: id {entry.id!r} is used twice; give each entry its own `id:`", path)
        ids.add(entry.id)
        methods.append(entry)
    if not methods:
        raise ConfigError("methods: list at least one method", path)
    it = raw.get("iterations")
    exp = Experiment(path=path, name=str(raw.get("name") or (base.name if path.name == SPEC_COPY else path.stem)),
                     data=data, dataset=raw.get("dataset"), out=out, labeled=[_labeled(v, path) for v in labeled],
                     seeds=[int(s) for s in seeds], iterations=None if it is None else int(it),
                     device=raw.get("device"), threads=raw.get("threads"), reference=raw.get("reference"), eval=ev,
                     methods=methods, raw=raw, folds=folds)
    exp.reference_entry()
    return exp


def _folds(value: Any, path: Path) -> list[int] | None:
    """`folds: 5` -> [0, 1, 2, 3, 4]; `folds: [0, 2]` -> [0, 2]; null -> None (no fold axis)."""
    if value is None:
        return None
    if isinstance(value, int) and not isinstance(value, bool):
        if value < 1:
            raise ConfigError(f"folds: {value}: expected a number of folds ≥ 1 or a list of fold indices", path)
        return list(range(value))
    if (isinstance(value, list) and value
            and all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in value)):
        if len(set(value)) != len(value):
            raise ConfigError(f"folds: {value} repeats a fold", path)
        return [int(v) for v in value]
    raise ConfigError(f"folds: expected a number of folds (5) or a list of fold indices ([0, 2]), got {value!r}", path)


def _rejoin_sets(items: list[str], where: str, path: Path) -> list[str]:
    """Undo YAML's split of `set: [data.patch_size=64,64,32]` at its commas (into "data.patch_size=64", "64", "32"):
    an item without '=' continues the one before it, so the comma list reaches the config as written (list-valued
    keys read "64,64,32" as three values)."""
    out: list[str] = []
    for item in items:
        if "=" in item:
            out.append(item)
        elif out:
            out[-1] += f",{item}"
        else:
            raise ConfigError(f"{where}: {item!r} is not KEY=VALUE; YAML splits an unquoted list item at its "
                              'commas, so quote it: set: ["data.patch_size=[64,64,32]"]', path)
    return out


def frozen_copy(exp: Experiment) -> dict:
    """The spec as written to OUT/experiment.yaml: absolute paths, so `experiment table OUT` needs nothing else."""
    raw = copy.deepcopy(exp.raw)
    if exp.data is not None:
        raw["data"] = str(exp.data.resolve())
    raw["out"] = str(exp.out.resolve())
    raw.setdefault("name", exp.name)
    return raw


def resolved_config(exp: Experiment, run: Run, dataset=None) -> dict:
    """The config `textseg train` resolves for this run (with the prepared data's name/patch when present)."""
    name = dataset.name if dataset is not None else exp.dataset
    dim = dataset.dim if dataset is not None else int(exp.raw.get("dim") or 3)
    patch = (list(dataset.patch_size) if dataset.patch_size else None) if dataset is not None else exp.raw.get("patch")
    flags = {"data.labeled": run.labeled, "train.iterations": run.iterations, "seed": run.seed, "data.fold": run.fold}
    return build_config(run.entry.method, name, dim, patch, user_config=run.entry.config or None, flags=flags,
                        sets=run.entry.sets)


def run_lcc(exp: Experiment, run: Run, cfg: dict | None = None) -> bool:
    """The LCC setting of a run's evaluation: the method entry's, else eval.lcc on/off, else (protocol) the
    method config's own `eval.lcc`/`inference.lcc` when it declares one, else off."""
    if run.entry.lcc is not None:
        return run.entry.lcc
    if exp.eval["lcc"] != "protocol":
        return exp.eval["lcc"] == "on"
    for sect in ("eval", "inference"):
        value = ((cfg or {}).get(sect) or {}).get("lcc")
        if isinstance(value, bool):
            return value
    return False


def commands(exp: Experiment, run: Run, lcc: bool) -> tuple[str, str]:
    """The equivalent `textseg train` and `textseg eval` command lines of one run."""
    data = str(exp.data) if exp.data is not None else f"<{exp.dataset} prepared folder>"
    train = ["textseg", "train", "--method", run.entry.method, "--data", data, "--labeled", run.labeled,
             "--seed", str(run.seed), "--out", str(run.dir)]
    if run.fold is not None:
        train += ["--fold", str(run.fold)]
    if run.iterations is not None:
        train += ["--iterations", str(run.iterations)]
    if exp.device:
        train += ["--device", str(exp.device)]
    for s in run.entry.sets:
        train += ["--set", s]
    if run.entry.config:
        train += ["--config", "<methods[].config of the experiment file>"]
    ev = ["textseg", "eval", str(run.dir), "--split", exp.eval["split"], "--checkpoint", exp.checkpoint(),
          "--out", str(exp.eval_dir(run)), "--empty-policy", exp.eval["empty_policy"]]
    if lcc:
        ev.append("--lcc")
    if exp.eval["spacing_mm"]:
        ev.append("--spacing-mm")
    if exp.eval["inference"]:
        ev += ["--inference", exp.eval["inference"]]
    return shlex.join(train), shlex.join(ev)
