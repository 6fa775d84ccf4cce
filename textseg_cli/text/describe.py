"""`textseg describe`: LLM-written task descriptions (LLM-SegNet) and per-case auxiliary prompts
(TGC-Net's DATE), with caching, retries and offline fallbacks.

`describe()` asks a chat model for `n` descriptions of at least `min_words` words each, using the
data set's prompt file, parses the reply into exactly `n` items and writes a JSON record with the
model, base URL (never the key), prompt messages, parameters, reply timestamp, raw reply and the
parsed list. `llm="offline"` uses the prompt file's bundled descriptions instead.

`describe_per_case()` rewrites each case's primary text of a prepared (2D) data set into one short
clinically worded auxiliary prompt, with the LLM or offline by the rule in `prompts/aux_prompt.yaml`.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from textseg_cli import __version__
from textseg_cli.console import err_console, progress
from textseg_cli.data.prepared import load_prepared
from textseg_cli.errors import ConfigError, DataError, OutputExistsError
from textseg_cli.storage.files import atomic_write_json, read_json, read_text
from textseg_cli.storage.outputs import check_out_path
from textseg_cli.text.llm import (
    DEFAULT_API_KEY_ENV,
    LLMClient,
    LLMError,
    LLMSettings,
    is_local_url,
)
from textseg_cli.text.prompts import PromptSet, load_aux_template, load_prompts

OFFLINE = "offline"
AUTO = "auto"
DEFAULT_MODEL = "gpt-4"
DESCRIPTIONS_FORMAT = "textseg-descriptions/1"
AUX_FORMAT = "textseg-aux-texts/1"
AUX_FILE = "aux_texts.json"
ON_SHORT = ("error", "retry")

_WORD = re.compile(r"[A-Za-z0-9][\w'’-]*")
_NUMBERED = re.compile(r"^\s*(?:[-*•]\s*)?(?:\*\*|__)?\s*(?:(?:description|feature|item)\s*)?\(?(\d{1,3})\s*[.):\]](?=[\s*_]|$)\s*",
                       re.IGNORECASE)
_BULLET = re.compile(r"^\s*[-*•+]\s+")
_HEADING = re.compile(r"^\s*(?:#{1,6}\s+\S|(?:\*\*|__)[^*_]{1,120}(?:\*\*|__)\s*:?\s*$)")


# --- parsing ------------------------------------------------------------------------------------

def count_words(text: str) -> int:
    """Words as people count them: runs starting with a letter or digit (hyphenated words count once)."""
    return len(_WORD.findall(text))


def parse_descriptions(reply: str) -> list[str]:
    """Split an LLM reply into its list items.

    Handles numbered lists ("1.", "2)", "**3.**", "Description 4:"), bullet lists, markdown
    headings or bold titles followed by a paragraph, and plain blank-line-separated paragraphs.
    Preamble ("Here are 15 features:") and a closing paragraph after the last item are dropped;
    markdown emphasis is removed and whitespace collapsed. A short title line ("**Shape**") is
    joined with the paragraph that follows it.
    """
    text = reply.replace("\r\n", "\n").replace("\r", "\n")
    text = re.sub(r"^\s*```[^\n]*$", "", text, flags=re.MULTILINE)
    lines = text.split("\n")
    for marker in (_NUMBERED, _BULLET, _HEADING):
        starts = [i for i, line in enumerate(lines) if marker.match(line)]
        if len(starts) >= 2:
            return [d for d in (_clean(b) for b in _items(lines, starts, marker)) if d]
    paragraphs = [p for p in re.split(r"\n\s*\n", text) if p.strip()]
    out = [_clean(p.split("\n")) for p in paragraphs]
    out = [p for p in out if p and not (p.endswith(":") and count_words(p) < 25)]  # drop "Here are ...:"
    return out


def _items(lines: list[str], starts: list[int], marker: re.Pattern) -> list[list[str]]:
    items = []
    for k, s in enumerate(starts):
        end = starts[k + 1] if k + 1 < len(starts) else len(lines)
        block = [marker.sub("", lines[s], count=1) if marker is not _HEADING else lines[s]]
        blank_seen = False
        for line in lines[s + 1:end]:
            if not line.strip():
                blank_seen = True
                continue
            # After a blank line, text continues the item only while the item is still a title
            # ("**Shape**" / "Shape:"); otherwise it is a closing remark and ends the item.
            if blank_seen and count_words(" ".join(block)) > 15 and not " ".join(block).rstrip().endswith(":"):
                break
            block.append(line)
        items.append(block)
    return items


def _clean(block: list[str]) -> str:
    text = " ".join(line.strip() for line in block)
    text = re.sub(r"^#{1,6}\s*", "", text)
    text = re.sub(r"(\*\*|__)(.+?)\1", r"\2", text)
    text = re.sub(r"(?<![\w*])\*(?!\s)(.+?)(?<!\s)\*(?![\w*])", r"\1", text)
    text = text.replace("**", "").replace("`", "")
    text = re.sub(r"\s+", " ", text).strip()
    text = re.sub(r"^(\S[^:]{0,60}):\s*:", r"\1:", text)
    return text.strip(" -–—")


def select_descriptions(items: list[str], n: int, min_words: int) -> tuple[list[str] | None, str | None]:
    """Exactly `n` distinct items of at least `min_words` words, or (None, the problem in words)."""
    seen, unique = set(), []
    for d in items:
        k = " ".join(d.lower().split())
        if k not in seen:
            seen.add(k)
            unique.append(d)
    long_enough = [d for d in unique if count_words(d) >= min_words]
    if len(long_enough) >= n:
        return long_enough[:n], None
    short = len(unique) - len(long_enough)
    problem = f"the reply holds {len(unique)} distinct description(s), {len(long_enough)} of at least {min_words} words"
    if short:
        problem += f" ({short} shorter)"
    return None, problem + f"; {n} are needed"


# --- describe -----------------------------------------------------------------------------------

@dataclass
class DescribeResult:
    record: dict[str, Any]
    out: Path | None
    written: bool  # False when an identical file already existed
    cached: bool  # every reply came from the cache
    requests: int  # HTTP requests made


def resolve_llm(llm: str | None, api_key_env: str = DEFAULT_API_KEY_ENV, base_url: str | None = None) -> str:
    """'auto' → the default model when an API key (or a local --base-url) is available, else offline."""
    llm = (llm or AUTO).strip()
    if llm.lower() != AUTO:
        return OFFLINE if llm.lower() == OFFLINE else llm
    url = base_url or os.environ.get("OPENAI_BASE_URL")
    if os.environ.get(api_key_env, "").strip() or is_local_url(url):
        return DEFAULT_MODEL
    err_console.print(f"[yellow]notice:[/] ${api_key_env} is not set: using the bundled offline texts "
                      "(--llm offline); pass --llm MODEL with a key to ask an LLM", highlight=False)
    return OFFLINE


def describe(dataset: str = "synthetic", llm: str | None = AUTO, n: int = 15, min_words: int = 60, *,
             base_url: str | None = None, api_key_env: str = DEFAULT_API_KEY_ENV, out: str | Path | None = None,
             force: bool = False, refresh: bool = False, temperature: float | None = 0.7,
             max_tokens: int | None = None, seed: int | None = None, retries: int = 4, on_short: str = "error",
             backoff: float = 1.0, timeout: float = 120.0, cache_dir: str | Path | None = None,
             prompts_dir: str | Path | None = None) -> DescribeResult:
    """Get `n` task descriptions of `dataset` (≥ `min_words` words each) from an LLM or the bundle.

    llm: a model name served at `base_url` (default $OPENAI_BASE_URL or OpenAI), "offline", or
    "auto" (the default model when $OPENAI_API_KEY is set, else offline with a notice).
    on_short: "error" stops when the reply has too few / too short descriptions; "retry" asks again
    (up to `retries` more draws, each cached under its own key).
    out: JSON file to write; an existing file is kept when identical, else needs `force`.
    """
    if n < 1 or min_words < 0:
        raise ConfigError(f"--n must be ≥ 1 and --min-words ≥ 0 (got {n}, {min_words})")
    if on_short not in ON_SHORT:
        raise ConfigError(f"--on-short must be one of {ON_SHORT}, got {on_short!r}")
    ps = load_prompts(dataset, prompts_dir)
    model = resolve_llm(llm, api_key_env, base_url)
    messages = ps.llm_messages(n, min_words)
    base = {"format": DESCRIPTIONS_FORMAT, "dataset": ps.name, "target": ps.target, "modality": ps.modality,
            "prompt_file": str(ps.path), "prompt_file_sha256": ps.sha256, "n": n, "min_words": min_words,
            "prompt": messages, "tool_version": __version__}
    if model == OFFLINE:
        record = {**base, **_offline_descriptions(ps, n, min_words)}
        return _finish(record, out, force, cached=True, requests=0)

    settings = LLMSettings(model=model, base_url=base_url, api_key_env=api_key_env, temperature=temperature,
                           max_tokens=max_tokens, seed=seed, timeout=timeout, retries=retries, backoff=backoff,
                           cache_dir=Path(cache_dir) if cache_dir else None, refresh=refresh)
    client = LLMClient(settings)
    draws = 1 + (retries if on_short == "retry" else 0)
    rejected: list[dict[str, Any]] = []
    all_cached = True
    for sample in range(draws):
        reply = client.chat(messages, sample=sample)
        all_cached &= reply.cached
        items = parse_descriptions(reply.text)
        chosen, problem = select_descriptions(items, n, min_words)
        if chosen is not None:
            record = {**base, "model": model, "base_url": client.base_url, "parameters": settings.parameters(),
                      "response_model": reply.response_model, "timestamp": reply.timestamp,
                      "cache_key": reply.key, "finish_reason": reply.finish_reason, "usage": reply.usage,
                      "raw_reply": reply.text, "parsed_items": len(items), "descriptions": chosen,
                      "word_counts": [count_words(d) for d in chosen], "rejected_replies": rejected}
            return _finish(record, out, force, cached=all_cached, requests=client.requests_made)
        client.reject(reply, problem)
        rejected.append({"cache_key": reply.key, "timestamp": reply.timestamp, "problem": problem})
        if sample + 1 < draws:
            err_console.print(f"[yellow]reply rejected ({problem}); asking again ({sample + 1}/{draws - 1})[/]",
                              highlight=False)
    hint = ("pass --on-short retry to ask again, lower --min-words, or use --refresh"
            if on_short == "error" else "raise --retries, lower --min-words, or try another model")
    raise LLMError(f"{rejected[-1]['problem']} (raw reply cached in {client.cache_dir / (rejected[-1]['cache_key'] + '.json')})",
                   hint=hint)


def _offline_descriptions(ps: PromptSet, n: int, min_words: int) -> dict[str, Any]:
    if not ps.descriptions:
        raise ConfigError(f"no bundled descriptions for '{ps.name}'", ps.path,
                          hint="write some under 'descriptions:' or ask an LLM with --llm MODEL")
    chosen, problem = select_descriptions(ps.descriptions, n, min_words)
    if chosen is None:
        raise ConfigError(f"bundled descriptions do not suffice: {problem}", ps.path)
    return {"model": OFFLINE, "base_url": None, "parameters": {}, "timestamp": None, "raw_reply": None,
            "source": f"bundled descriptions in {ps.path.name}", "descriptions": chosen,
            "word_counts": [count_words(d) for d in chosen]}


def _finish(record: dict[str, Any], out: str | Path | None, force: bool, cached: bool, requests: int) -> DescribeResult:
    written = False
    if out is not None:
        written = write_json_once(out, record, force)
    return DescribeResult(record, Path(out) if out is not None else None, written, cached, requests)


def write_json_once(path: str | Path, obj: dict[str, Any], force: bool) -> bool:
    """Write `obj`; an existing identical file is left alone, a different one needs `force`."""
    path = check_out_path(path)
    if path.exists() and not force:
        try:
            same = json.loads(path.read_text(encoding="utf-8")) == json.loads(json.dumps(obj, default=str))
        except (OSError, json.JSONDecodeError):
            same = False
        if same:
            return False
        raise OutputExistsError(path)
    atomic_write_json(path, obj)
    return True


def load_descriptions(path: str | Path) -> tuple[list[str], dict[str, Any]]:
    """Texts and provenance from a `describe` JSON file, or one description per line of a text file."""
    path = Path(path)
    if not path.is_file():
        raise DataError("descriptions file not found", path)
    raw = read_text(path)  # not UTF-8: names the file
    if path.suffix.lower() == ".json":
        try:
            data = json.loads(raw)
        except json.JSONDecodeError as exc:
            raise DataError(f"invalid JSON ({exc})", path) from exc
        texts = data.get("descriptions") if isinstance(data, dict) else data
        if not isinstance(texts, list) or not all(isinstance(t, str) for t in texts):
            raise DataError("expected a 'descriptions' list of strings (the output of `textseg describe`)", path)
        meta = {k: data.get(k) for k in ("dataset", "model", "base_url", "prompt", "parameters", "timestamp",
                                          "cache_key", "prompt_file", "prompt_file_sha256")} if isinstance(data, dict) else {}
        return [t.strip() for t in texts], meta
    texts = [line.strip() for line in raw.splitlines() if line.strip()]
    return texts, {}


# --- per-case auxiliary prompts -----------------------------------------------------------------

@dataclass
class PerCaseResult:
    record: dict[str, Any]
    out: Path
    written: bool
    cached: bool
    requests: int


def offline_aux_prompt(text: str, modality: str | None, template: dict[str, Any]) -> str:
    """The deterministic rule-based rewrite documented in `prompts/aux_prompt.yaml` (no LLM)."""
    off = template.get("offline") or {}
    max_words = int(template.get("max_words", 16))
    out = " ".join(text.split())
    for pattern, repl in off.get("rewrites") or []:
        out = re.sub(pattern, repl, out, flags=re.IGNORECASE)
    drop = {w.lower() for w in off.get("drop_words") or []}
    words = [w for w in out.split(" ") if w.strip(",.;:").lower() not in drop or not w.strip(",.;:")]
    words = words[:max_words]
    body = " ".join(words).strip(" ,;:.")
    body = re.sub(r"\s+([,;:.])", r"\1", body)
    prefixes = {str(k).lower(): str(v) for k, v in (off.get("modality_prefix") or {}).items()}
    prefix = prefixes.get((modality or "").strip().lower(), (modality or "").strip() or "Image")
    return f"{prefix}: {body}." if body else f"{prefix}."


def _clean_aux_reply(reply: str) -> str:
    for line in reply.replace("\r", "\n").split("\n"):
        line = line.strip()
        if not line:
            continue
        line = re.sub(r"^(?:\*\*|__)?(?:auxiliary prompt|prompt|answer)\s*:?(?:\*\*|__)?\s*:?\s*", "", line,
                      flags=re.IGNORECASE)
        return line.strip().strip("\"'“”*`").strip()
    return ""


def describe_per_case(data_dir: str | Path, llm: str | None = AUTO, *, base_url: str | None = None,
                      api_key_env: str = DEFAULT_API_KEY_ENV, out: str | Path | None = None, force: bool = False,
                      refresh: bool = False, temperature: float | None = 0.2, max_tokens: int | None = None,
                      seed: int | None = None, retries: int = 4, on_short: str = "error", backoff: float = 1.0,
                      timeout: float = 120.0, cache_dir: str | Path | None = None,
                      prompts_dir: str | Path | None = None) -> PerCaseResult:
    """One auxiliary prompt per case that has a `text` in `data_dir/dataset.json`.

    Writes `aux_texts.json` beside dataset.json (or `out`): {"aux_texts": {case_id: text}, ...}
    with the primary texts, skipped cases (no text) and provenance. With an LLM each request is
    cached by (model, template, input text); offline the rule of `aux_prompt.yaml` is applied.
    """
    if on_short not in ON_SHORT:
        raise ConfigError(f"--on-short must be one of {ON_SHORT}, got {on_short!r}")
    ds = load_prepared(data_dir, check_files=False)
    modality = ds.spec.get("modality")
    texts = {cid: ds.text(cid) for cid in ds.case_ids}
    primary = {cid: " ".join(t.split()) for cid, t in texts.items() if isinstance(t, str) and t.strip()}
    skipped = sorted(cid for cid in texts if cid not in primary)
    if not primary:
        raise DataError("no case has a 'text' (per-case descriptions); prepare a data set with texts first",
                        Path(data_dir) / "dataset.json")
    template = load_aux_template(prompts_dir)
    max_words = int(template.get("max_words", 16))
    model = resolve_llm(llm, api_key_env, base_url)
    out_path = Path(out) if out is not None else Path(data_dir) / AUX_FILE
    record: dict[str, Any] = {"format": AUX_FORMAT, "dataset": ds.name, "data_dir": str(Path(data_dir).resolve()),
                              "modality": modality, "template_file": template["path"],
                              "template_sha256": template["sha256"], "model": model, "tool_version": __version__}
    aux: dict[str, str] = {}
    if model == OFFLINE:
        for cid, t in primary.items():
            aux[cid] = offline_aux_prompt(t, modality, template)
        record.update({"mode": "offline-rules", "base_url": None, "parameters": {}})
        cached, requests = True, 0
    else:
        settings = LLMSettings(model=model, base_url=base_url, api_key_env=api_key_env, temperature=temperature,
                               max_tokens=max_tokens, seed=seed, timeout=timeout, retries=retries, backoff=backoff,
                               cache_dir=Path(cache_dir) if cache_dir else None, refresh=refresh)
        client = LLMClient(settings)
        per_case: dict[str, dict[str, Any]] = {}
        cached = True
        with progress() as bar:
            task = bar.add_task("auxiliary prompts", total=len(primary), info="")
            for cid, t in primary.items():
                messages = _aux_messages(template, t, modality, max_words)
                draws = 1 + (retries if on_short == "retry" else 0)
                for sample in range(draws):
                    reply = client.chat(messages, sample=sample)
                    cached &= reply.cached
                    cleaned = _clean_aux_reply(reply.text)
                    n_words = count_words(cleaned)
                    if 0 < n_words <= 2 * max_words:
                        break
                    problem = "an empty reply" if not n_words else f"a reply of {n_words} words (limit {2 * max_words})"
                    client.reject(reply, problem)
                    if sample + 1 == draws:
                        raise LLMError(f"case '{cid}': the model gave {problem} (cached in {reply.cache_path})",
                                       hint="pass --on-short retry, or use --refresh")
                aux[cid] = cleaned
                per_case[cid] = {"cache_key": reply.key, "timestamp": reply.timestamp}
                bar.update(task, advance=1, info=cid)
        record.update({"mode": "llm", "base_url": client.base_url, "parameters": settings.parameters(),
                       "per_case": per_case})
        requests = client.requests_made
    record.update({"aux_texts": aux, "primary_texts": primary, "skipped": skipped})
    written = write_json_once(out_path, record, force)
    return PerCaseResult(record, out_path, written, cached, requests)


def _aux_messages(template: dict[str, Any], text: str, modality: str | None, max_words: int) -> list[dict[str, str]]:
    values = {"text": text, "modality": modality or "medical", "max_words": max_words}
    llm = template["llm"]
    messages = []
    try:
        if llm.get("system"):
            messages.append({"role": "system", "content": str(llm["system"]).format(**values).strip()})
        messages.append({"role": "user", "content": llm["user"].format(**values).strip()})
    except (KeyError, IndexError) as exc:
        raise ConfigError(f"field 'llm' uses an unknown placeholder {exc}; allowed: {sorted(values)}",
                          template["path"]) from None
    return messages


def load_aux_texts(path: str | Path) -> dict[str, str]:
    """{case_id: auxiliary prompt} from an `aux_texts.json` file (or the prepared folder holding one)."""
    path = Path(path)
    if path.is_dir():
        path = path / AUX_FILE
    if not path.is_file():
        raise DataError("auxiliary prompts not found; run `textseg describe --per-case DATA_DIR`", path)
    data = read_json(path)
    aux = data.get("aux_texts") if isinstance(data, dict) else None
    if data.get("format") != AUX_FORMAT or not isinstance(aux, dict):
        raise DataError(f"not an auxiliary-prompts file (expected format {AUX_FORMAT!r})", path)
    return {str(k): str(v) for k, v in aux.items()}
