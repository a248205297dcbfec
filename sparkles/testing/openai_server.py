"""A local OpenAI-compatible HTTP server for tests: real HTTP on 127.0.0.1, scripted answers, injected faults.

Tests of everything that talks to GPT (dialogue generation, the SparklesEval judge) point the real ``openai``
client at this server instead of mocking our own code. It runs in a background thread on an ephemeral port
and needs only the standard library.

API
---
``OpenAICompatServer(reply=None, *, model_list=("gpt-4", "gpt-3.5-turbo"))`` — a context manager::

    from sparkles.testing.openai_server import OpenAICompatServer, Reply

    def reply(request: dict):                       # the parsed JSON body of /chat/completions
        return "hello " + request["model"]          # str | Reply

    with OpenAICompatServer(reply) as srv:
        srv.enqueue(Reply.error(429), Reply.error(500))   # scripted items are served first, in order
        client = openai.OpenAI(base_url=srv.base_url, api_key="dummy")
        ...
        assert srv.request_count == 3

Endpoints
    ``POST /v1/chat/completions`` (OpenAI style) and
    ``POST /openai/deployments/<deployment>/chat/completions?api-version=...`` (Azure style), both answered
    the same way; ``GET /v1/models`` lists ``model_list``. Anything else is a 404.

Where an answer comes from (per chat request)
    1. the next scripted item, if any were queued with ``enqueue(*items)``;
    2. else ``reply(request)``; a reply function may also return a ``Reply`` (to fail on demand);
    3. else (no reply function) the text ``"ok"``.
    An exception raised by the reply function becomes an HTTP 500 whose body names it (so a broken test
    helper shows up as a server error, not as a hang).

``Reply`` — one answer, with factories for faults:
    ``Reply(text, finish_reason="stop", usage=None, model=None, delay=0.0)``: a normal completion;
        ``usage`` overrides the token counts (dict with prompt_tokens / completion_tokens); ``model`` overrides
        the echoed model name; ``delay`` seconds of waiting before the answer (longer than the client's timeout
        = a timeout).
    ``Reply.error(status, message=None, retry_after=None)``: an OpenAI-shaped JSON error with that status
        (429, 500, 401, 400, ...); ``retry_after`` sets the ``Retry-After`` header.
    ``Reply.malformed(body='{"choices": [', status=200)``: a raw, broken body.
    ``Reply.timeout(seconds)``: waits ``seconds`` and then answers ``"late"``.

Token counts (deterministic, so tests can check cost arithmetic): ``prompt_tokens`` = number of
whitespace-separated words over all message contents, ``completion_tokens`` = words of the reply text,
``total_tokens`` = their sum; unless the ``Reply`` sets ``usage``.

Inspection (all thread-safe snapshots)
    ``base_url``          ``http://127.0.0.1:<port>/v1`` — give it to ``openai.OpenAI(base_url=...)``;
    ``endpoint``          ``http://127.0.0.1:<port>`` — for Azure's ``azure_endpoint``;
    ``request_count``     chat requests received (faulted ones included);
    ``requests``          their parsed JSON bodies, in arrival order;
    ``records``           ``RecordedRequest(path, query, headers, body)`` per chat request;
    ``completed``         number of normal (non-fault) answers fully written to the socket;
    ``max_in_flight``     the largest number of chat requests being handled at once;
    ``reset()``           clears the counters and the recorded requests (the queue is kept).
"""

from __future__ import annotations

import json
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Callable
from urllib.parse import parse_qs, urlsplit

__all__ = ["OpenAICompatServer", "Reply", "RecordedRequest", "count_words"]


def count_words(text: str) -> int:
    """The server's token count: whitespace-separated words."""
    return len(text.split())


@dataclass
class Reply:
    """One scripted answer (see the module docstring)."""

    text: str = "ok"
    finish_reason: str = "stop"
    usage: dict | None = None
    model: str | None = None
    delay: float = 0.0
    status: int = 200
    raw_body: bytes | None = None
    headers: dict = field(default_factory=dict)

    @property
    def is_fault(self) -> bool:
        return self.status != 200 or self.raw_body is not None

    @classmethod
    def error(cls, status: int, message: str | None = None, retry_after: float | None = None) -> "Reply":
        body = {"error": {"message": message or f"injected HTTP {status}", "type": "injected_error",
                          "param": None, "code": str(status)}}
        headers = {"Retry-After": str(retry_after)} if retry_after is not None else {}
        return cls(status=status, raw_body=json.dumps(body).encode(), headers=headers)

    @classmethod
    def malformed(cls, body: str = '{"choices": [', status: int = 200) -> "Reply":
        return cls(status=status, raw_body=body.encode())

    @classmethod
    def timeout(cls, seconds: float) -> "Reply":
        return cls(text="late", delay=seconds)


@dataclass(frozen=True)
class RecordedRequest:
    path: str
    query: dict
    headers: dict
    body: Any


class OpenAICompatServer:
    """Background-thread OpenAI-compatible server on 127.0.0.1 (see the module docstring)."""

    def __init__(self, reply: Callable[[dict], "str | Reply"] | None = None, *,
                 model_list: tuple[str, ...] = ("gpt-4", "gpt-3.5-turbo")) -> None:
        self._reply_fn = reply
        self.model_list = tuple(model_list)
        self._lock = threading.Lock()
        self._queue: deque[Reply | str] = deque()
        self._records: list[RecordedRequest] = []
        self._completed = 0
        self._in_flight = 0
        self._max_in_flight = 0
        self._closing = threading.Event()  # wakes handlers that are sleeping through an injected delay
        self._httpd: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self._ids = 0

    # --- lifecycle ----------------------------------------------------------------------
    def start(self) -> "OpenAICompatServer":
        if self._httpd is not None:
            return self
        handler = _make_handler(self)
        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self._httpd.daemon_threads = True
        self._thread = threading.Thread(target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05},
                                        name="openai-compat-server", daemon=True)
        self._thread.start()
        return self

    def close(self) -> None:
        if self._httpd is None:
            return
        self._closing.set()
        self._httpd.shutdown()
        self._httpd.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)
        self._httpd = None

    def __enter__(self) -> "OpenAICompatServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()

    # --- scripting ----------------------------------------------------------------------
    def enqueue(self, *items: "Reply | str") -> None:
        with self._lock:
            self._queue.extend(items)

    def set_reply(self, reply: Callable[[dict], "str | Reply"] | None) -> None:
        self._reply_fn = reply

    # --- inspection ---------------------------------------------------------------------
    @property
    def port(self) -> int:
        if self._httpd is None:
            raise RuntimeError("server is not running; use it as a context manager or call start()")
        return self._httpd.server_address[1]

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def base_url(self) -> str:
        return self.endpoint + "/v1"

    @property
    def request_count(self) -> int:
        with self._lock:
            return len(self._records)

    @property
    def requests(self) -> list[Any]:
        with self._lock:
            return [r.body for r in self._records]

    @property
    def records(self) -> list[RecordedRequest]:
        with self._lock:
            return list(self._records)

    @property
    def completed(self) -> int:
        with self._lock:
            return self._completed

    @property
    def max_in_flight(self) -> int:
        with self._lock:
            return self._max_in_flight

    def reset(self) -> None:
        with self._lock:
            self._records.clear()
            self._completed = 0
            self._max_in_flight = 0

    # --- request handling (called from handler threads) ---------------------------------
    def _answer_chat(self, record: RecordedRequest) -> Reply:
        with self._lock:
            self._records.append(record)
            scripted = self._queue.popleft() if self._queue else None
        if scripted is not None:
            return scripted if isinstance(scripted, Reply) else Reply(text=str(scripted))
        if not isinstance(record.body, dict):
            return Reply.error(400, "request body is not a JSON object")
        if self._reply_fn is None:
            return Reply()
        try:
            out = self._reply_fn(record.body)
        except Exception as exc:  # surface helper bugs as a server error the client can see
            return Reply.error(500, f"reply function raised {type(exc).__name__}: {exc}")
        return out if isinstance(out, Reply) else Reply(text=str(out))

    def _completion_body(self, request: dict, reply: Reply) -> bytes:
        prompt_tokens = sum(count_words(m.get("content") or "") for m in request.get("messages", [])
                            if isinstance(m, dict) and isinstance(m.get("content"), str))
        usage = {"prompt_tokens": prompt_tokens, "completion_tokens": count_words(reply.text)}
        usage.update(reply.usage or {})
        usage["total_tokens"] = usage["prompt_tokens"] + usage["completion_tokens"]
        with self._lock:
            self._ids += 1
            cid = self._ids
        body = {
            "id": f"chatcmpl-local-{cid}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": reply.model or request.get("model", "unknown"),
            "choices": [{"index": 0, "finish_reason": reply.finish_reason,
                         "message": {"role": "assistant", "content": reply.text}}],
            "usage": usage,
        }
        return json.dumps(body).encode()


def _make_handler(server: OpenAICompatServer):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive, as the openai client expects
        disable_nagle_algorithm = True  # headers and body go out as separate writes: avoid the ~40 ms stall

        def log_message(self, *args) -> None:  # keep test output quiet
            pass

        def _send(self, status: int, body: bytes, headers: dict | None = None) -> bool:
            try:
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                for k, v in (headers or {}).items():
                    self.send_header(k, v)
                self.end_headers()
                self.wfile.write(body)
                self.wfile.flush()
                return True
            except (BrokenPipeError, ConnectionResetError):  # the client gave up (timeout)
                self.close_connection = True
                return False

        def do_GET(self) -> None:
            path = urlsplit(self.path).path.rstrip("/")
            if path in ("/v1/models", "/models"):
                data = [{"id": m, "object": "model", "created": 0, "owned_by": "local"} for m in server.model_list]
                self._send(200, json.dumps({"object": "list", "data": data}).encode())
            else:
                self._send(404, json.dumps({"error": {"message": f"no route {path}"}}).encode())

        def do_POST(self) -> None:
            parts = urlsplit(self.path)
            length = int(self.headers.get("Content-Length") or 0)
            raw = self.rfile.read(length) if length else b""
            path = parts.path.rstrip("/")
            if not (path.endswith("/chat/completions")
                    and (path.startswith("/v1/") or path.startswith("/openai/deployments/")
                         or path == "/chat/completions")):
                self._send(404, json.dumps({"error": {"message": f"no route {path}"}}).encode())
                return
            try:
                body = json.loads(raw or b"null")
            except json.JSONDecodeError:
                body = raw.decode("utf-8", "replace")
            record = RecordedRequest(path=path, query={k: v[0] for k, v in parse_qs(parts.query).items()},
                                     headers=dict(self.headers.items()), body=body)
            with server._lock:
                server._in_flight += 1
                server._max_in_flight = max(server._max_in_flight, server._in_flight)
            try:
                reply = server._answer_chat(record)
                if reply.delay > 0 and server._closing.wait(reply.delay):
                    return
                if reply.is_fault:
                    self._send(reply.status, reply.raw_body or b"", reply.headers)
                    return
                ok = self._send(200, server._completion_body(body, reply), reply.headers)
                if ok:
                    with server._lock:
                        server._completed += 1
            finally:
                with server._lock:
                    server._in_flight -= 1

    return Handler
