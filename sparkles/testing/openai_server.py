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
    the same way; ``GET /v1/models`` lists ``model_list``; the Batch API (below). Anything else is a 404.

The Batch API (under ``/v1`` and, Azure style, ``/openai``)
    ``POST /files`` (multipart upload with ``purpose``), ``GET /files/<id>``, ``GET /files/<id>/content``,
    ``POST /batches``, ``GET /batches/<id>``, ``POST /batches/<id>/cancel``. Creating a batch checks its input
    file the way the API does (``custom_id`` unique, ``method`` POST, ``url`` = the batch's endpoint; else the
    batch ends ``failed``). A batch is answered when it finishes, line by line, exactly as chat requests are
    (scripted items first, then the reply function); answers go to its output file, non-200 answers to its
    error file. Its progress is the test's to control:

    ``batch_polls_to_finish`` (default 1)  a batch finishes at its N-th ``GET /batches/<id>`` (before that it is
                                          ``validating`` / ``in_progress``);
    ``hold_batches()`` / ``release_batches()``  while held, no batch finishes (a client can be killed while
                                          its batch is in flight);
    ``script_batches(*BatchEnd(...))``    how the next created batches end: ``BatchEnd("failed")`` (no line
                                          answered), ``BatchEnd("expired", answered=1)`` (the first line
                                          answered, the others in the error file with ``batch_expired``).

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
    ``api_records``       ``RecordedRequest`` per files / batches request (uploads carry ``{"purpose",
                          "filename", "lines"}`` as body);
    ``uploads``           ids of the files clients uploaded, in order; ``file_content(id)`` any file's bytes;
    ``batches``           the batch objects as a client would read them now;
    ``batch_requests``    the chat request bodies answered inside batches, in order;
    ``batch_polls``       ``GET /batches/<id>`` requests received;
    ``wait_for(predicate, timeout)``  blocks until ``predicate(server)`` holds (checked after every request);
    ``reset()``           clears the counters and the recorded requests (the queue is kept).
"""

from __future__ import annotations

import json
import re
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from email.parser import BytesParser
from email.policy import HTTP
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Callable
from urllib.parse import parse_qs, urlsplit

__all__ = ["BatchEnd", "OpenAICompatServer", "Reply", "RecordedRequest", "count_words"]

BATCH_TERMINAL = ("completed", "failed", "expired", "cancelled")


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
class BatchEnd:
    """How a scripted batch ends (see the module docstring): ``status`` is completed / failed / expired /
    cancelled; ``answered`` is how many of its lines are answered before an expiry or cancellation."""

    status: str = "completed"
    answered: int = 0

    def __post_init__(self) -> None:
        if self.status not in BATCH_TERMINAL:
            raise ValueError(f"a batch ends {' / '.join(BATCH_TERMINAL)}, not {self.status!r}")


@dataclass
class _Batch:
    """A batch as the server keeps it: the object clients read, its polls and how it is to end."""

    obj: dict
    end: BatchEnd
    polls: int = 0


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
        # Batch API state
        self.batch_polls_to_finish = 1
        self._changed = threading.Condition(self._lock)  # notified after every request, for wait_for
        self._api_records: list[RecordedRequest] = []
        self._files: dict[str, dict] = {}
        self._batches: dict[str, _Batch] = {}
        self._batch_ends: deque[BatchEnd] = deque()
        self._batch_requests: list[dict] = []
        self._batch_polls = 0
        self._held = False

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

    def hold_batches(self) -> None:
        with self._lock:
            self._held = True

    def release_batches(self) -> None:
        with self._lock:
            self._held = False

    def script_batches(self, *ends: BatchEnd) -> None:
        with self._lock:
            self._batch_ends.extend(ends)

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

    @property
    def api_records(self) -> list[RecordedRequest]:
        with self._lock:
            return list(self._api_records)

    @property
    def uploads(self) -> list[str]:
        with self._lock:
            return [i for i, f in self._files.items() if f["obj"]["purpose"] != "batch_output"]

    def file_content(self, file_id: str) -> bytes:
        with self._lock:
            return self._files[file_id]["content"]

    @property
    def batches(self) -> list[dict]:
        with self._lock:
            return [json.loads(json.dumps(b.obj)) for b in self._batches.values()]

    @property
    def batch_requests(self) -> list[dict]:
        with self._lock:
            return list(self._batch_requests)

    @property
    def batch_polls(self) -> int:
        with self._lock:
            return self._batch_polls

    def wait_for(self, predicate: Callable[["OpenAICompatServer"], bool], timeout: float = 30.0) -> bool:
        """Block until ``predicate(self)`` is true (re-checked after each request); False after ``timeout``."""
        deadline = time.monotonic() + timeout
        while not predicate(self):
            with self._changed:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._changed.wait(min(left, 0.5))
        return True

    def reset(self) -> None:
        with self._lock:
            self._records.clear()
            self._api_records.clear()
            self._batch_requests.clear()
            self._batch_polls = 0
            self._completed = 0
            self._max_in_flight = 0

    # --- request handling (called from handler threads) ---------------------------------
    def _answer_chat(self, record: RecordedRequest) -> Reply:
        with self._lock:
            self._records.append(record)
        return self._answer(record.body)

    def _answer(self, body: Any) -> Reply:
        """The reply to one chat request body: the next scripted item, else the reply function."""
        with self._lock:
            scripted = self._queue.popleft() if self._queue else None
        if scripted is not None:
            return scripted if isinstance(scripted, Reply) else Reply(text=str(scripted))
        if not isinstance(body, dict):
            return Reply.error(400, "request body is not a JSON object")
        if self._reply_fn is None:
            return Reply()
        try:
            out = self._reply_fn(body)
        except Exception as exc:  # surface helper bugs as a server error the client can see
            return Reply.error(500, f"reply function raised {type(exc).__name__}: {exc}")
        return out if isinstance(out, Reply) else Reply(text=str(out))

    def _completion_body(self, request: dict, reply: Reply) -> bytes:
        return json.dumps(self._completion(request, reply)).encode()

    def _completion(self, request: dict, reply: Reply) -> dict:
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
        return body

    # --- the Batch API (called from handler threads) ------------------------------------
    def _next_id(self, prefix: str) -> str:
        with self._lock:
            self._ids += 1
            return f"{prefix}-local-{self._ids}"

    def _add_file(self, content: bytes, purpose: str, filename: str) -> dict:
        obj = {"id": self._next_id("file"), "object": "file", "bytes": len(content), "created_at": int(time.time()),
               "filename": filename, "purpose": purpose, "status": "processed"}
        with self._lock:
            self._files[obj["id"]] = {"obj": obj, "content": content}
        return obj

    def _file(self, file_id: str) -> dict | None:
        with self._lock:
            return self._files.get(file_id)

    def _create_batch(self, body: dict) -> tuple[int, dict]:
        source = self._file(str(body.get("input_file_id")))
        if source is None:
            return 404, {"error": {"message": f"no file {body.get('input_file_id')!r}",
                                   "type": "invalid_request_error"}}
        endpoint = body.get("endpoint")
        if body.get("completion_window") != "24h" or endpoint not in ("/v1/chat/completions", "/chat/completions"):
            return 400, {"error": {"message": "completion_window must be 24h and endpoint /v1/chat/completions",
                                   "type": "invalid_request_error"}}
        with self._lock:
            end = self._batch_ends.popleft() if self._batch_ends else BatchEnd()
        problem = _check_batch_input(source["content"], endpoint)
        if problem:
            end = BatchEnd("failed")
        obj = {"id": self._next_id("batch"), "object": "batch", "endpoint": endpoint, "errors": None,
               "input_file_id": source["obj"]["id"], "completion_window": "24h", "status": "validating",
               "output_file_id": None, "error_file_id": None, "created_at": int(time.time()),
               "request_counts": {"total": 0, "completed": 0, "failed": 0}, "metadata": body.get("metadata")}
        if problem:
            obj["errors"] = {"object": "list", "data": [{"code": "invalid_request", "message": problem, "line": None}]}
        with self._lock:
            self._batches[obj["id"]] = _Batch(obj, end)
        return 200, obj

    def _poll_batch(self, batch_id: str, cancel: bool = False) -> tuple[int, dict]:
        with self._lock:
            batch = self._batches.get(batch_id)
            if batch is None:
                return 404, {"error": {"message": f"no batch {batch_id!r}", "type": "invalid_request_error"}}
            if not cancel:
                self._batch_polls += 1
                batch.polls += 1
            status = batch.obj["status"]
            finish = status not in BATCH_TERMINAL + ("finalizing",) and (
                cancel or (not self._held and batch.polls >= self.batch_polls_to_finish))
            # "finalizing" while its lines are answered: a concurrent poll does not finish it a second time
            batch.obj["status"] = "finalizing" if finish else ("in_progress" if status == "validating" else status)
        if finish:
            self._finish_batch(batch, BatchEnd("cancelled") if cancel else batch.end)
        with self._lock:
            return 200, json.loads(json.dumps(batch.obj))

    def _finish_batch(self, batch: _Batch, end: BatchEnd) -> None:
        """Answer the batch's lines (as far as ``end`` lets it) and write its output and error files."""
        obj = batch.obj
        content = self._file(obj["input_file_id"])["content"]
        # a failed batch (its input was refused) runs no line and writes no file, as the API's do
        lines = [] if end.status == "failed" else [json.loads(x) for x in content.splitlines() if x.strip()]
        if end.status == "failed" and not obj["errors"]:
            obj["errors"] = {"object": "list", "data": [{"code": "injected_failure", "message": "the batch failed "
                                                         "(scripted by the test)", "line": None}]}
        answered = len(lines) if end.status == "completed" else min(end.answered, len(lines))
        outputs, errors = [], []
        for i, line in enumerate(lines):
            rid = self._next_id("batch_req")
            if i >= answered:
                errors.append({"id": rid, "custom_id": line["custom_id"], "response": None,
                               "error": {"code": f"batch_{end.status}",
                                         "message": f"this request was not run: the batch {end.status}"}})
                continue
            with self._lock:
                self._batch_requests.append(line["body"])
            reply = self._answer(line["body"])
            if reply.is_fault:
                try:
                    body = json.loads(reply.raw_body or b"null")
                except json.JSONDecodeError:
                    body = (reply.raw_body or b"").decode("utf-8", "replace")
                out = {"id": rid, "custom_id": line["custom_id"], "error": None,
                       "response": {"status_code": reply.status, "request_id": rid, "body": body}}
                (outputs if reply.status == 200 else errors).append(out)
            else:
                outputs.append({"id": rid, "custom_id": line["custom_id"], "error": None,
                                "response": {"status_code": 200, "request_id": rid,
                                             "body": self._completion(line["body"], reply)}})
        files = {}
        for key, rows in (("output_file_id", outputs), ("error_file_id", errors)):
            if rows:
                content = "".join(json.dumps(r) + "\n" for r in rows).encode()
                files[key] = self._add_file(content, "batch_output", f"{obj['id']}_{key[:-8]}.jsonl")["id"]
        with self._lock:
            obj.update(files)
            obj["status"] = end.status
            obj["request_counts"] = {"total": len(lines), "completed": len(outputs), "failed": len(errors)}
            obj[f"{end.status}_at"] = int(time.time())


def _check_batch_input(content: bytes, endpoint: str) -> str:
    """What makes a batch input file invalid for ``endpoint`` (empty when nothing does)."""
    seen = set()
    for number, text in enumerate(content.splitlines(), 1):
        if not text.strip():
            continue
        try:
            line = json.loads(text)
        except json.JSONDecodeError:
            return f"line {number} is not JSON"
        if not isinstance(line, dict) or not isinstance(line.get("body"), dict):
            return f"line {number} has no request body"
        if line.get("custom_id") in seen or not line.get("custom_id"):
            return f"line {number}: custom_id {line.get('custom_id')!r} is missing or not unique"
        seen.add(line["custom_id"])
        if line.get("method") != "POST" or line.get("url") != endpoint:
            return f"line {number}: method must be POST and url {endpoint}"
    return "" if seen else "the input file holds no request"


def _upload(content_type: str, raw: bytes) -> dict:
    """The form fields of a multipart upload: ``{name: (filename, bytes)}``."""
    message = BytesParser(policy=HTTP).parsebytes(f"Content-Type: {content_type}\r\n\r\n".encode() + raw)
    if not message.is_multipart():
        return {}
    return {part.get_param("name", header="content-disposition"): (part.get_filename(), part.get_payload(decode=True))
            for part in message.iter_parts()}


_API_ROUTE = re.compile(r"^/(?:v1|openai)/(files|batches)(?:/([^/]+))?(?:/(content|cancel))?$")


def _make_handler(server: OpenAICompatServer):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive, as the openai client expects
        disable_nagle_algorithm = True  # headers and body go out as separate writes: avoid the ~40 ms stall

        def log_message(self, *args) -> None:  # keep test output quiet
            pass

        def _send(self, status: int, body: bytes, headers: dict | None = None,
                  content_type: str = "application/json") -> bool:
            try:
                self.send_response(status)
                self.send_header("Content-Type", content_type)
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

        def _api(self, method: str, path: str, raw: bytes) -> None:
            """Files and batches (see the module docstring); every request is recorded."""
            kind, ident, action = _API_ROUTE.match(path).groups()
            body: Any = None
            status, reply, content = 404, {"error": {"message": f"no route {method} {path}"}}, None
            if kind == "files" and method == "POST" and ident is None:
                fields = _upload(self.headers.get("Content-Type", ""), raw)
                filename, data = fields.get("file", (None, None))
                purpose = (fields.get("purpose", (None, b""))[1] or b"").decode()
                body = {"purpose": purpose, "filename": filename, "lines": len((data or b"").splitlines())}
                if data is None or not purpose:
                    status, reply = 400, {"error": {"message": "a file upload needs 'file' and 'purpose'"}}
                else:
                    status, reply = 200, server._add_file(data, purpose, filename or "upload.jsonl")
            elif kind == "files" and method == "GET" and ident is not None:
                stored = server._file(ident)
                if stored is not None:
                    status, reply = 200, stored["obj"]
                    content = stored["content"] if action == "content" else None
            elif kind == "batches" and method == "POST" and ident is None:
                try:
                    body = json.loads(raw or b"null")
                except json.JSONDecodeError:
                    body = None
                status, reply = (server._create_batch(body) if isinstance(body, dict)
                                 else (400, {"error": {"message": "request body is not a JSON object"}}))
            elif kind == "batches" and ident is not None and (method, action) in (("GET", None), ("POST", "cancel")):
                status, reply = server._poll_batch(ident, cancel=action == "cancel")
            with server._changed:
                server._api_records.append(RecordedRequest(path=path, query={}, headers=dict(self.headers.items()),
                                                           body=body))
            try:
                if content is not None:
                    self._send(200, content, content_type="application/octet-stream")
                else:
                    self._send(status, json.dumps(reply).encode())
            finally:
                with server._changed:
                    server._changed.notify_all()

        def do_GET(self) -> None:
            path = urlsplit(self.path).path.rstrip("/")
            if _API_ROUTE.match(path):
                self._api("GET", path, b"")
                return
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
            if _API_ROUTE.match(path):
                self._api("POST", path, raw)
                return
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
                with server._changed:
                    server._in_flight -= 1
                    server._changed.notify_all()

    return Handler
