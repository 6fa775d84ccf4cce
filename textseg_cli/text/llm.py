"""A cached, retrying chat-completions client over the official `openai` package.

Every reply is cached on disk, keyed by a hash of (model, messages, parameters), so re-running a
`describe` costs no request; `refresh=True` forces a new one. The openai client's own retries are
switched off (`max_retries=0`) and replaced by the loop in `LLMClient.chat`, which retries rate
limits (429), timeouts, connection failures and 5xx with exponential backoff and turns every other
failure into a one-line `TextsegError`. The API key is read from an environment variable and never
written anywhere.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import ipaddress
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from textseg_cli.console import err_console
from textseg_cli.errors import ConfigError, TextsegError
from textseg_cli.runtime.environment import default_cache_root
from textseg_cli.storage.files import atomic_write_json

DEFAULT_API_KEY_ENV = "OPENAI_API_KEY"
DEFAULT_BASE_URL = "https://api.openai.com/v1"


class LLMError(TextsegError):
    """The LLM server could not be used (unreachable, refused, unknown model, exhausted retries)."""


def default_llm_cache_dir() -> Path:
    return default_cache_root() / "llm"


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def is_local_url(url: str | None) -> bool:
    """True for loopback servers (local vLLM / Ollama / llama.cpp), which need no real API key."""
    if not url:
        return False
    host = urlparse(url).hostname or ""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@dataclass
class LLMSettings:
    """How to reach the model and how to sample; `parameters()` are part of the cache key."""

    model: str
    base_url: str | None = None  # None: $OPENAI_BASE_URL, else OpenAI's endpoint
    api_key_env: str = DEFAULT_API_KEY_ENV
    temperature: float | None = None
    max_tokens: int | None = None
    seed: int | None = None
    timeout: float = 120.0  # seconds per request
    retries: int = 4  # extra attempts after the first one
    backoff: float = 1.0  # first retry delay in seconds; doubled after each failure
    max_backoff: float = 60.0
    cache_dir: Path | None = None
    refresh: bool = False

    def resolved_base_url(self) -> str:
        return (self.base_url or os.environ.get("OPENAI_BASE_URL") or DEFAULT_BASE_URL).rstrip("/")

    def parameters(self) -> dict[str, Any]:
        params = {"temperature": self.temperature, "max_tokens": self.max_tokens, "seed": self.seed}
        return {k: v for k, v in params.items() if v is not None}


@dataclass
class ChatReply:
    text: str
    key: str
    cached: bool
    timestamp: str
    cache_path: Path
    finish_reason: str | None = None
    usage: dict[str, Any] | None = None
    response_model: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)


class LLMClient:
    """Chat completions with an on-disk reply cache and an explicit retry loop.

    `requests_made` counts HTTP requests (cache hits make none), which tests and the CLI report.
    """

    def __init__(self, settings: LLMSettings):
        self.settings = settings
        self.base_url = settings.resolved_base_url()
        self.cache_dir = Path(settings.cache_dir) if settings.cache_dir is not None else default_llm_cache_dir()
        self.requests_made = 0
        self._client = None

    # --- cache -------------------------------------------------------------------------------
    def cache_key(self, messages: list[dict[str, str]], sample: int = 0) -> str:
        """Hash of server, model, messages and sampling parameters; `sample` > 0 asks for another draw.

        The base URL is part of the key: the same model name on two servers is two models.
        """
        payload: dict[str, Any] = {"model": self.settings.model, "messages": messages,
                                   "parameters": self.settings.parameters(), "base_url": self.base_url}
        if sample:
            payload["sample"] = sample
        blob = json.dumps(payload, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
        return hashlib.sha256(blob.encode("utf-8")).hexdigest()

    def _cache_path(self, key: str) -> Path:
        return self.cache_dir / f"{key}.json"

    def _read_cache(self, key: str) -> dict[str, Any] | None:
        path = self._cache_path(key)
        if not path.exists():
            return None
        try:
            entry = json.loads(path.read_text(encoding="utf-8"))
            if entry.get("key") == key and isinstance(entry.get("reply"), str):
                return entry  # a reply rejected earlier comes back marked (entry["rejected"]), never as good
        except (OSError, json.JSONDecodeError):
            pass
        err_console.print(f"[yellow]warning:[/] ignoring unreadable cache entry {path}", highlight=False)
        return None

    # --- requests ----------------------------------------------------------------------------
    def _api_key(self) -> str:
        env = self.settings.api_key_env
        key = os.environ.get(env, "").strip()
        if key:
            return key
        if is_local_url(self.base_url):
            return "local"  # local OpenAI-compatible servers accept any key
        raise ConfigError(f"no API key: environment variable {env} is not set",
                          hint=f"export {env}=..., choose another variable with --api-key-env, "
                               "or use --llm offline for the bundled texts")

    def _openai(self):
        if self._client is None:
            import openai  # lazy: optional at run time (an LLM backend)

            self._client = openai.OpenAI(api_key=self._api_key(), base_url=self.base_url,
                                         timeout=self.settings.timeout, max_retries=0)
        return self._client

    def chat(self, messages: list[dict[str, str]], sample: int = 0) -> ChatReply:
        """The reply text for `messages`, from the cache when present (unless refresh)."""
        key = self.cache_key(messages, sample)
        if not self.settings.refresh:
            entry = self._read_cache(key)
            if entry is not None:
                return ChatReply(entry["reply"], key, True, entry.get("timestamp", ""), self._cache_path(key),
                                 entry.get("finish_reason"), entry.get("usage"), entry.get("response_model"),
                                 {"rejected": entry["rejected"]} if entry.get("rejected") else {})
        response = self._request_with_retries(messages)
        text, finish, usage, rmodel = self._unpack(response)
        stamp = _now()
        entry = {"key": key, "model": self.settings.model, "base_url": self.base_url, "messages": messages,
                 "parameters": self.settings.parameters(), "sample": sample, "reply": text,
                 "finish_reason": finish, "usage": usage, "response_model": rmodel, "timestamp": stamp}
        atomic_write_json(self._cache_path(key), entry)
        return ChatReply(text, key, False, stamp, self._cache_path(key), finish, usage, rmodel)

    def reject(self, reply: ChatReply, problem: str) -> None:
        """Mark a cached reply that failed validation, so no later run takes it for a good one."""
        try:
            entry = json.loads(reply.cache_path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError):
            return
        if entry.get("rejected") != problem:
            entry["rejected"] = problem
            atomic_write_json(reply.cache_path, entry)

    def _request_with_retries(self, messages: list[dict[str, str]]):
        import openai  # lazy: optional at run time (an LLM backend)

        s = self.settings
        client = self._openai()
        attempts = s.retries + 1
        last: Exception | None = None
        for attempt in range(attempts):
            try:
                self.requests_made += 1
                return client.chat.completions.create(model=s.model, messages=messages, **s.parameters())
            except openai.AuthenticationError as exc:
                raise LLMError(f"the server at {self.base_url} rejected the API key from ${s.api_key_env} "
                               f"(401: {_msg(exc)})") from None
            except openai.NotFoundError as exc:
                raise LLMError(f"model '{s.model}' not found at {self.base_url} (404: {_msg(exc)})",
                               hint="check --llm, and that --base-url ends in the API root such as /v1") from None
            except (openai.BadRequestError, openai.PermissionDeniedError, openai.UnprocessableEntityError) as exc:
                raise LLMError(f"request refused by {self.base_url} ({exc.status_code}: {_msg(exc)})") from None
            except openai.RateLimitError as exc:
                if _code(exc) == "insufficient_quota":
                    raise LLMError(f"the account's quota at {self.base_url} is exhausted (429: {_msg(exc)})") from None
                last = exc
            except (openai.APIConnectionError, openai.InternalServerError) as exc:  # incl. timeouts
                last = exc
            except UnicodeDecodeError as exc:
                raise LLMError(f"the reply from {self.base_url} is not valid UTF-8 ({exc.reason} at byte {exc.start}); "
                               "check that --base-url points to an OpenAI-compatible API") from None
            except openai.APIStatusError as exc:
                if exc.status_code < 500:
                    raise LLMError(f"request refused by {self.base_url} ({exc.status_code}: {_msg(exc)})") from None
                last = exc
            if attempt + 1 < attempts:
                delay = min(s.backoff * (2 ** attempt), s.max_backoff)
                delay = max(delay, min(_retry_after(last), s.max_backoff))
                err_console.print(f"[yellow]LLM request failed ({_describe_failure(last, s.timeout)}); "
                                  f"retry {attempt + 1}/{s.retries} in {delay:.3g} s[/]", highlight=False)
                time.sleep(delay)
        raise LLMError(f"{_describe_failure(last, s.timeout)} from {self.base_url} after {attempts} attempt(s)",
                       hint="try again later, raise --retries, or use --llm offline") from None

    def _unpack(self, response: Any) -> tuple[str, str | None, dict[str, Any] | None, str | None]:
        choices = getattr(response, "choices", None)
        if not choices:
            raise LLMError(f"malformed reply from {self.base_url}: no 'choices' in the response")
        choice = choices[0]
        finish = getattr(choice, "finish_reason", None)
        message = getattr(choice, "message", None)
        text = getattr(message, "content", None) if message is not None else None
        refusal = getattr(message, "refusal", None) if message is not None else None
        if finish == "content_filter" or (refusal and not text):
            raise LLMError(f"request refused by {self.base_url} (content filter{': ' + refusal if refusal else ''})")
        usage = getattr(response, "usage", None)
        usage_d = usage.model_dump() if hasattr(usage, "model_dump") else None
        return (text or "", finish, usage_d, getattr(response, "model", None))


def _msg(exc: Exception) -> str:
    body = getattr(exc, "body", None)
    if isinstance(body, dict):
        inner = body.get("error", body)
        if isinstance(inner, dict) and inner.get("message"):
            return " ".join(str(inner["message"]).split())
    return " ".join((getattr(exc, "message", None) or str(exc)).split())


def _code(exc: Exception) -> str | None:
    body = getattr(exc, "body", None)
    if isinstance(body, dict):
        inner = body.get("error", body)
        if isinstance(inner, dict):
            return inner.get("code")
    return getattr(exc, "code", None)


def _retry_after(exc: Exception | None) -> float:
    response = getattr(exc, "response", None)
    try:
        return float(response.headers.get("retry-after", 0)) if response is not None else 0.0
    except (TypeError, ValueError):
        return 0.0


def _describe_failure(exc: Exception | None, timeout: float) -> str:
    import openai  # lazy: optional at run time (an LLM backend)

    if isinstance(exc, openai.APITimeoutError):
        return f"no answer within {timeout:g} s (timeout)"
    if isinstance(exc, openai.APIConnectionError):
        cause = exc.__cause__ or exc.__context__
        detail = " ".join(str(cause).split()) if cause is not None and str(cause) else _msg(exc)
        return f"cannot connect ({detail})"
    if isinstance(exc, openai.RateLimitError):
        return "rate limited (429)"
    if isinstance(exc, openai.APIStatusError):
        return f"server error {exc.status_code}"
    return str(exc)
