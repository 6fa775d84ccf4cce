"""Run configuration: packaged YAML defaults per method and data set, plus command-line overrides.

Merge order (later wins): `configs/defaults.yaml` → its `datasets.<profile>` → `configs/<method>.yaml` (or the
file a method defined outside the package names in its class's `config_path`) → its `datasets.<profile>` → a user
`--config FILE` → first-class flags and `--set KEY=VALUE`.
`<profile>` is `data.profile` or, when unset, the prepared data set's name (lower case).
"""

from __future__ import annotations

import copy
import math
from importlib import resources
from pathlib import Path
from typing import Any, Iterable, Mapping

import yaml

from textseg_cli.data.names import canonical_name
from textseg_cli.errors import ConfigError
from textseg_cli.methods.registry import method_config_path
from textseg_cli.metrics.case import EMPTY_POLICIES
from textseg_cli.runtime.precision import inference_request
from textseg_cli.storage.files import atomic_write_text, read_text

SCHEDULES = ("constant", "poly", "step", "linear", "cosine_restarts")
INFERENCE_MODES = ("sliding", "whole")



SELECTIONS = ("val", "legacy-test")


def selection_split(cfg: dict[str, Any]) -> str:
    """The split best.pt is selected on: `val.split`, or the test split under `val.select: legacy-test`."""
    val = cfg.get("val") or {}
    return "test" if str(val.get("select", "val")) == "legacy-test" else str(val.get("split", "val"))


def selection_rule(cfg: dict[str, Any]) -> str:
    """How best.pt was chosen, as every table states it (`checkpoint_rule` of an evaluation)."""
    val = cfg.get("val") or {}
    if str(val.get("select", "val")) == "legacy-test":
        return f"best-on-test every {val.get('every')} it (legacy, as the official code: optimistic)"
    return "best-on-val"


def _read_yaml(text: str, where: str) -> dict[str, Any]:
    try:
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"invalid YAML ({exc})", where) from exc
    if not isinstance(data, dict):
        raise ConfigError("a config file must hold a mapping", where)
    return data


_PARSED: dict[tuple[str, int, int], dict[str, Any]] = {}


def _yaml_file(path: Path, where: str) -> dict[str, Any]:
    """A config file parsed once per (path, mtime, size) and handed out as a fresh copy: an experiment plan
    resolves the same few method configs hundreds of times (the LA preset: 144), and YAML parsing dominated."""
    st = path.stat()
    key = (str(path), st.st_mtime_ns, st.st_size)
    if key not in _PARSED:
        _PARSED[key] = _read_yaml(read_text(path, ConfigError), where)
    return copy.deepcopy(_PARSED[key])


def packaged_config(name: str) -> dict[str, Any]:
    """`textseg_cli/configs/<name>.yaml` as a dict ({} when the method ships no file)."""
    ref = resources.files("textseg_cli").joinpath("configs", f"{config_file_stem(name)}.yaml")
    if not ref.is_file():
        return {}
    if isinstance(ref, Path):
        return _yaml_file(ref, f"textseg_cli/configs/{ref.name}")
    return _read_yaml(ref.read_text(encoding="utf-8"), f"textseg_cli/configs/{ref.name}")


def config_file_stem(method: str) -> str:
    """'mcnet+' → 'mcnet_plus' (file names avoid '+')."""
    return method.replace("+", "_plus")


def method_config(method: str) -> dict[str, Any]:
    """A method's own config: the YAML file its class names in `config_path` (a method defined outside the
    package keeps it beside its module), else the packaged `textseg_cli/configs/<stem>.yaml` ({} when none)."""
    path = method_config_path(method)
    if path is None:
        return packaged_config(method)
    if not path.is_file():
        raise ConfigError(f"config file of method '{method}' not found (its class's config_path)", path)
    return _yaml_file(path, str(path))


def deep_merge(base: Mapping[str, Any], over: Mapping[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(dict(base))
    for k, v in over.items():
        if isinstance(v, Mapping) and isinstance(out.get(k), Mapping):
            out[k] = deep_merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


def parse_set(items: Iterable[str]) -> list[tuple[list[str], Any]]:
    """'optim.lr=0.005' → (['optim', 'lr'], 0.005); values are parsed as YAML scalars/lists."""
    out = []
    for item in items:
        if "=" not in item:
            raise ConfigError(f"--set {item!r}: expected KEY=VALUE, e.g. optim.lr=0.005")
        key, raw = item.split("=", 1)
        path = [p for p in key.strip().split(".") if p]
        if not path:
            raise ConfigError(f"--set {item!r}: empty key")
        try:
            value = yaml.safe_load(raw) if raw.strip() else None
        except yaml.YAMLError:
            value = raw
        out.append((path, value))
    return out


def apply_set(cfg: dict[str, Any], path: list[str], value: Any, strict: bool = True) -> None:
    """Set cfg[a][b]... = value. With strict, keys outside `method` and `datasets` must already exist,
    so a typo such as `optim.lrr` is an error instead of a silently ignored setting."""
    node = cfg
    free = path[0] in ("method", "published", "datasets")
    for i, key in enumerate(path[:-1]):
        nxt = node.get(key)
        if nxt is None and (free or not strict):
            nxt = node[key] = {}
        if not isinstance(nxt, dict):
            raise ConfigError(f"--set {'.'.join(path)}: '{'.'.join(path[: i + 1])}' is not a section")
        node = nxt
    last = path[-1]
    if strict and not free and last not in node:
        known = ", ".join(sorted(node)) or "(none)"
        raise ConfigError(f"unknown config key '{'.'.join(path)}' (known here: {known})")
    node[last] = value


def _as_int_list(value: Any, n: int | None, field: str) -> list[int] | None:
    if value is None:
        return None
    if isinstance(value, str):
        value = [v for v in value.replace("x", ",").replace(" ", ",").split(",") if v]
    if isinstance(value, (int, float)):
        value = [value] * (n or 1)
    try:
        out = [int(v) for v in value]
    except (TypeError, ValueError):
        raise ConfigError(f"{field}: expected integers such as 112,112,80, got {value!r}") from None
    if n is not None and len(out) != n:
        raise ConfigError(f"{field}: expected {n} values for {n}D data, got {out}")
    if any(v <= 0 for v in out):
        raise ConfigError(f"{field}: sizes must be positive, got {out}")
    return out


def build_config(method: str, dataset_name: str | None = None, dataset_dim: int | None = None,
                 dataset_patch: list[int] | None = None, user_config: str | Path | dict | None = None,
                 flags: Mapping[str, Any] | None = None, sets: Iterable[str] = ()) -> dict[str, Any]:
    """Resolve the full config of a run (see the module docstring for the merge order)."""
    defaults = packaged_config("defaults")
    method_cfg = method_config(method)
    user: dict[str, Any] = {}
    if isinstance(user_config, (str, Path)):
        p = Path(user_config)
        if not p.exists():
            raise ConfigError("config file not found", p)
        user = _read_yaml(read_text(p, ConfigError), str(p))  # --config: not UTF-8 names the file
    elif isinstance(user_config, dict):
        user = copy.deepcopy(user_config)
    parsed_sets = parse_set(sets)

    # the profile may itself come from --set data.profile=... or the user file
    profile = None
    for path, value in parsed_sets:
        if path == ["data", "profile"]:
            profile = value
    profile = profile or (user.get("data") or {}).get("profile") or canonical_name(dataset_name) or None

    cfg = {k: v for k, v in defaults.items() if k != "datasets"}
    layers = [(defaults.get("datasets") or {}).get(profile, {}) if profile else {},
              {k: v for k, v in method_cfg.items() if k != "datasets"},
              (method_cfg.get("datasets") or {}).get(profile, {}) if profile else {},
              {k: v for k, v in user.items() if k != "datasets"}]
    for layer in layers:
        cfg = deep_merge(cfg, layer or {})
    cfg.setdefault("method", {})
    cfg["method"]["name"] = method
    for dotted, value in (flags or {}).items():
        if value is not None:
            apply_set(cfg, dotted.split("."), value)
    for path, value in parsed_sets:
        apply_set(cfg, path, value)
    cfg["method"]["name"] = method
    cfg["data"]["profile"] = profile
    return resolve(cfg, dataset_dim, dataset_patch)


def default_stride(patch: Iterable[int]) -> tuple[int, ...]:
    """The sliding-window stride when none is set: half the patch, rounded up (`ceil(p / 2)`, at least 1).

    The one rule for the run config (`resolve`), `InferenceSettings`, the sliding-window functions' own
    defaults and `textseg bench`; a patch of 75 gets 38. Papers that state their strides set them per
    data-set profile (`configs/*.yaml`, `inference.stride`)."""
    return tuple(max(1, math.ceil(int(p) / 2)) for p in patch)


def resolve(cfg: dict[str, Any], dim: int | None, dataset_patch: list[int] | None) -> dict[str, Any]:
    """Fill derived values (patch sizes, strides) and check types, naming the field at fault."""
    data, train, optim, val, inf = cfg["data"], cfg["train"], cfg["optim"], cfg["val"], cfg["inference"]
    patch = _as_int_list(data.get("patch_size"), dim, "data.patch_size") or _as_int_list(dataset_patch, dim,
                                                                                       "dataset.json patch_size")
    if patch is None and dim is not None:
        raise ConfigError("data.patch_size is not set and the prepared data set records none; "
                          "pass --set data.patch_size=112,112,80")
    data["patch_size"] = patch
    inf["patch_size"] = _as_int_list(inf.get("patch_size"), dim, "inference.patch_size") or patch
    stride = _as_int_list(inf.get("stride"), dim, "inference.stride")
    if stride is None and inf["patch_size"] is not None:
        stride = list(default_stride(inf["patch_size"]))
    inf["stride"] = stride
    val["stride"] = _as_int_list(val.get("stride"), dim, "val.stride")
    for sect, key, typ in [("train", "iterations", int), ("train", "batch_labeled", int),
                           ("train", "batch_unlabeled", int), ("train", "log_every", int),
                           ("train", "checkpoint_every", int), ("val", "every", int), ("optim", "lr", float),
                           ("optim", "momentum", float), ("optim", "weight_decay", float), ("seed", None, int),
                           ("inference", "sw_batch_size", int)]:
        node = cfg if key is None else cfg[sect]
        k = sect if key is None else key
        try:
            node[k] = typ(node[k])
        except (TypeError, ValueError):
            raise ConfigError(f"{sect}{'.' + key if key else ''}: expected {typ.__name__}, got {node[k]!r}") from None
    if train["iterations"] < 0 or train["batch_labeled"] < 1 or train["batch_unlabeled"] < 0:
        raise ConfigError("train.iterations must be ≥ 0, train.batch_labeled ≥ 1, train.batch_unlabeled ≥ 0")
    if train["log_every"] < 1 or train["checkpoint_every"] < 1:
        raise ConfigError("train.log_every and train.checkpoint_every must be ≥ 1")
    if val["every"] < 0:
        raise ConfigError(f"val.every (--val-every) {val['every']}: expected ≥ 0 (0 turns validation off)")
    if optim["schedule"] not in SCHEDULES:
        raise ConfigError(f"optim.schedule {optim['schedule']!r}: expected one of {', '.join(SCHEDULES)}")
    if optim["name"] not in ("sgd", "adam", "adamw"):
        raise ConfigError(f"optim.name {optim['name']!r}: expected sgd, adam or adamw")
    for sect in (inf, val):
        if sect.get("mode") is not None and sect["mode"] not in INFERENCE_MODES:
            raise ConfigError(f"mode {sect['mode']!r}: expected sliding or whole")

    inference_request(cfg)  # names train.precision / inference.precision when either is not auto|fp32|bf16
    if val.get("empty_policy") is not None and str(val["empty_policy"]) not in EMPTY_POLICIES:
        raise ConfigError(f"val.empty_policy {val['empty_policy']!r}: expected one of {', '.join(EMPTY_POLICIES)}")
    if str(val.get("select", "val")) not in SELECTIONS:
        raise ConfigError(f"val.select {val['select']!r}: expected one of {', '.join(SELECTIONS)}")
    if str(val.get("split")) == "test" and str(val.get("select", "val")) != "legacy-test":
        raise ConfigError("val.split=test: selecting checkpoints on the test split is refused; use a validation "
                          "split carved from the training cases (or, to reproduce an official script like for "
                          "like, --select legacy-test, which every table marks)")
    return cfg


class _NoAliasDumper(yaml.SafeDumper):
    """Write shared values in full (no &id001 anchors) so the saved config reads like the packaged ones."""
    def ignore_aliases(self, data: Any) -> bool:
        return True


def dump_config(cfg: dict[str, Any]) -> str:
    return yaml.dump(cfg, Dumper=_NoAliasDumper, sort_keys=False, default_flow_style=None, width=100)


def save_config(cfg: dict[str, Any], path: str | Path) -> None:
    atomic_write_text(path, dump_config(cfg))


def load_config(path: str | Path) -> dict[str, Any]:
    p = Path(path)
    if not p.exists():
        raise ConfigError("config.yaml not found (is this a run folder?)", p)
    return _read_yaml(read_text(p, ConfigError), str(p))
