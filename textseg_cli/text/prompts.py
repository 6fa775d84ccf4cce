"""Per-data-set prompt files (`prompts/<name>.yaml`): class names, CLIP templates, the LLM request
template and bundled offline descriptions.

Prompt files are data, not code. They are looked up, first match wins, in:

1. the folder given explicitly (``--prompts-dir`` / ``prompts_dir=``),
2. the folders in the ``TEXTSEG_PROMPTS`` environment variable (``os.pathsep``-separated),
3. the repository's ``prompts/`` folder next to the ``textseg_cli`` package (editable installs).

A data set may also be named by the path of a YAML file. Keys a file leaves out are inherited from
``generic.yaml`` (found on the same search path), so a custom data set needs only its own facts.
"""

from __future__ import annotations

import hashlib
import os
import string
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from textseg_cli.errors import ConfigError
from textseg_cli.storage.files import read_text

PROMPTS_ENV = "TEXTSEG_PROMPTS"
GENERIC = "generic"
LLM_PLACEHOLDERS = {"n", "min_words", "target", "modality", "structures", "dimension"}


@dataclass
class PromptSet:
    """The resolved contents of one prompt file (with generic defaults filled in)."""

    name: str
    target: str
    modality: str
    dimension: str
    structures: str
    class_names: list[str]
    clip_templates: list[str]
    llm_system: str
    llm_user: str
    descriptions: list[str]
    path: Path
    sha256: str
    raw: dict[str, Any] = field(repr=False, default_factory=dict)

    def llm_messages(self, n: int, min_words: int) -> list[dict[str, str]]:
        """The chat messages asking an LLM for `n` descriptions of at least `min_words` words."""
        values = {"n": n, "min_words": min_words, "target": self.target, "modality": self.modality,
                  "structures": self.structures, "dimension": self.dimension}
        messages = []
        if self.llm_system.strip():
            messages.append({"role": "system", "content": _fill(self.llm_system, values, self.path, "llm.system")})
        messages.append({"role": "user", "content": _fill(self.llm_user, values, self.path, "llm.user")})
        return messages

    def class_prompts(self, template: str | None = None, class_names: list[str] | None = None) -> list[str]:
        """One CLIP prompt per class (background included), e.g. "A pixel of a pancreas."."""
        template = self.clip_templates[0] if template is None else template
        if "{class}" not in template:
            raise ConfigError(f"CLIP template {template!r} has no '{{class}}' placeholder")
        names = self.class_names if class_names is None else class_names
        return [template.replace("{class}", c).replace("{modality}", self.modality) for c in names]


def search_dirs(prompts_dir: str | Path | None = None) -> list[Path]:
    """Folders searched for prompt files, in priority order (existing or not; see module doc)."""
    dirs: list[Path] = []
    if prompts_dir is not None:
        dirs.append(Path(prompts_dir).expanduser())
    for part in os.environ.get(PROMPTS_ENV, "").split(os.pathsep):
        if part.strip():
            dirs.append(Path(part.strip()).expanduser())
    dirs.append(Path(__file__).resolve().parents[2] / "prompts")  # source checkout / editable install
    dirs.append(Path(sys.prefix) / "share" / "textseg" / "prompts")  # wheel install (pyproject data-files)
    return dirs


def find_prompt_file(name: str, prompts_dir: str | Path | None = None) -> Path:
    """Locate `<name>.yaml` (or accept a path to a YAML file); the error says where it looked."""
    as_path = Path(name).expanduser()
    if as_path.suffix in (".yaml", ".yml") or os.sep in name:
        if as_path.is_file():
            return as_path
        raise ConfigError("prompt file not found", as_path)
    dirs = search_dirs(prompts_dir)
    for d in dirs:
        for ext in (".yaml", ".yml"):
            if (d / f"{name}{ext}").is_file():
                return d / f"{name}{ext}"
    known = list_datasets(prompts_dir)
    where = ", ".join(str(d) for d in dirs)
    raise ConfigError(f"no prompt file '{name}.yaml' (looked in {where}; set --prompts-dir or {PROMPTS_ENV})",
                      hint=f"known data sets: {', '.join(known) if known else 'none'}")


def list_datasets(prompts_dir: str | Path | None = None) -> list[str]:
    """Names of all prompt files on the search path (excluding the auxiliary-prompt template)."""
    names: set[str] = set()
    for d in search_dirs(prompts_dir):
        if d.is_dir():
            names.update(p.stem for p in d.glob("*.y*ml") if p.suffix in (".yaml", ".yml"))
    names.discard("aux_prompt")
    return sorted(names)


def read_yaml(path: Path) -> dict[str, Any]:
    try:
        data = yaml.safe_load(read_text(path, ConfigError))  # not UTF-8, unreadable: names the prompt file
    except yaml.YAMLError as exc:
        raise ConfigError(f"invalid YAML ({exc})".replace("\n", " "), path) from exc
    if not isinstance(data, dict):
        raise ConfigError("a prompt file must hold a YAML mapping", path)
    return data


def load_prompts(dataset: str, prompts_dir: str | Path | None = None) -> PromptSet:
    """Load and validate the prompt file of `dataset` (a name on the search path or a YAML path)."""
    path = find_prompt_file(dataset, prompts_dir)
    data = read_yaml(path)
    if path.stem != GENERIC:
        try:
            base = read_yaml(find_prompt_file(GENERIC, prompts_dir))
        except ConfigError:
            base = {}
        data = _merge(base, data)
    return _build(data, path)


def _merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _build(data: dict[str, Any], path: Path) -> PromptSet:
    def text(key: str, default: str | None = None) -> str:
        v = data.get(key, default)
        if isinstance(v, list) and key == "structures":
            v = ", ".join(str(x) for x in v)
        if not isinstance(v, str) or not v.strip():
            raise ConfigError(f"field '{key}' must be a non-empty string", path)
        return " ".join(v.split())

    names = data.get("class_names")
    if not isinstance(names, list) or len(names) < 2 or not all(isinstance(c, str) and c.strip() for c in names):
        raise ConfigError("field 'class_names' must list background and at least one class (strings)", path)
    templates = data.get("clip_templates")
    if not isinstance(templates, list) or not templates or not all(isinstance(t, str) for t in templates):
        raise ConfigError("field 'clip_templates' must be a non-empty list of strings", path)
    for t in templates:
        if "{class}" not in t:
            raise ConfigError(f"clip_templates entry {t!r} has no '{{class}}' placeholder", path)
    llm = data.get("llm")
    if not isinstance(llm, dict) or not isinstance(llm.get("user"), str):
        raise ConfigError("field 'llm.user' (the LLM request template) is missing", path)
    descriptions = data.get("descriptions") or []
    if not isinstance(descriptions, list) or not all(isinstance(d, str) for d in descriptions):
        raise ConfigError("field 'descriptions' must be a list of strings", path)
    ps = PromptSet(
        name=text("name", path.stem),
        target=text("target"),
        modality=text("modality"),
        dimension=text("dimension", "3D"),
        structures=text("structures"),
        class_names=[c.strip() for c in names],
        clip_templates=list(templates),
        llm_system=str(llm.get("system") or ""),
        llm_user=llm["user"],
        descriptions=[" ".join(d.split()) for d in descriptions],
        path=path.resolve(),
        sha256=hashlib.sha256(path.read_bytes()).hexdigest(),
        raw=data,
    )
    ps.llm_messages(15, 60)  # validates the placeholders now, naming the file
    return ps


def _fill(template: str, values: dict[str, Any], path: Path, field_name: str) -> str:
    """str.format with a clear error for unknown placeholders (templates are user-editable data)."""
    used = {f for _, f, _, _ in string.Formatter().parse(template) if f}
    unknown = sorted(used - set(values))
    if unknown:
        raise ConfigError(f"field '{field_name}' uses unknown placeholder(s) {unknown}; "
                          f"allowed: {sorted(values)}", path)
    return template.format(**values).strip()


def load_aux_template(prompts_dir: str | Path | None = None) -> dict[str, Any]:
    """The auxiliary-prompt template (`aux_prompt.yaml`) used by `describe --per-case`."""
    path = find_prompt_file("aux_prompt", prompts_dir)
    data = read_yaml(path)
    llm = data.get("llm")
    if not isinstance(llm, dict) or not isinstance(llm.get("user"), str) or "{text}" not in llm["user"]:
        raise ConfigError("field 'llm.user' must be a string containing '{text}'", path)
    off = data.get("offline") or {}
    if not isinstance(off, dict):
        raise ConfigError("field 'offline' must be a mapping", path)
    for i, pair in enumerate(off.get("rewrites") or []):
        if not (isinstance(pair, list) and len(pair) == 2 and all(isinstance(x, str) for x in pair)):
            raise ConfigError(f"offline.rewrites[{i}] must be a [pattern, replacement] pair", path)
    data["path"] = str(path.resolve())
    data["sha256"] = hashlib.sha256(path.read_bytes()).hexdigest()
    return data
