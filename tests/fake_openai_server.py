"""A small OpenAI-compatible chat-completions server for tests (real HTTP on 127.0.0.1).

Usage::

    with FakeOpenAIServer() as server:
        server.push(status=429)                 # scripted responses, consumed in order
        server.push(content="1. ...")           # then a normal completion
        ... base_url=server.url ...
        assert len(server.requests) == 2

When the script is empty the server answers with `server.default_content`. Requests for a model
not in `known_models` get the 404 that OpenAI sends for unknown models.
"""

from __future__ import annotations

import json
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


@dataclass
class Scripted:
    status: int = 200
    content: str | None = None
    body: Any = None  # raw JSON body (overrides content)
    delay: float = 0.0
    finish_reason: str = "stop"
    headers: dict[str, str] = field(default_factory=dict)


def completion(content: str, model: str, finish_reason: str = "stop") -> dict[str, Any]:
    return {
        "id": "chatcmpl-test", "object": "chat.completion", "created": 1700000000, "model": model,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": content},
                     "finish_reason": finish_reason}],
        "usage": {"prompt_tokens": 10, "completion_tokens": 20, "total_tokens": 30},
    }


def error_body(status: int, message: str | None = None, code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message or f"error {status}", "type": "test_error", "param": None, "code": code}}


class FakeOpenAIServer:
    def __init__(self, default_content: str = "ok", known_models: tuple[str, ...] = ("gpt-4", "local-model")):
        self.default_content = default_content
        self.known_models = set(known_models)
        self.script: deque[Scripted] = deque()
        self.requests: list[dict[str, Any]] = []
        self._lock = threading.Lock()
        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self._httpd.daemon_threads = True
        self._thread = threading.Thread(target=self._httpd.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._httpd.server_address[1]}/v1"

    def push(self, status: int = 200, content: str | None = None, body: Any = None, delay: float = 0.0,
             finish_reason: str = "stop", headers: dict[str, str] | None = None, times: int = 1) -> None:
        for _ in range(times):
            self.script.append(Scripted(status, content, body, delay, finish_reason, headers or {}))

    def __enter__(self) -> "FakeOpenAIServer":
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()

    def _next(self) -> Scripted | None:
        with self._lock:
            return self.script.popleft() if self.script else None

    def _handler(self):
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:  # keep test output clean
                pass

            def do_POST(self) -> None:  # noqa: N802 - http.server naming
                length = int(self.headers.get("Content-Length", 0))
                raw = self.rfile.read(length)
                try:
                    payload = json.loads(raw or b"{}")
                except json.JSONDecodeError:
                    payload = {}
                with server._lock:
                    server.requests.append({"path": self.path, "json": payload,
                                            "authorization": self.headers.get("Authorization")})
                if not self.path.endswith("/chat/completions"):
                    return self._send(404, error_body(404, f"no route {self.path}"))
                model = payload.get("model", "")
                step = server._next() or Scripted(content=server.default_content)
                if step.delay:
                    time.sleep(step.delay)
                if step.status == 200 and model not in server.known_models:
                    return self._send(404, error_body(404, f"The model `{model}` does not exist", "model_not_found"))
                if step.body is not None:
                    return self._send(step.status, step.body, step.headers)
                if step.status != 200:
                    return self._send(step.status, error_body(step.status), step.headers)
                return self._send(200, completion(step.content if step.content is not None else server.default_content,
                                                  model, step.finish_reason), step.headers)

            def _send(self, status: int, body: Any, headers: dict[str, str] | None = None) -> None:
                data = json.dumps(body).encode() if not isinstance(body, (bytes, str)) else (
                    body.encode() if isinstance(body, str) else body)
                try:
                    self.send_response(status)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(data)))
                    for k, v in (headers or {}).items():
                        self.send_header(k, v)
                    self.end_headers()
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):  # the client gave up (timeout tests)
                    pass

        return Handler
