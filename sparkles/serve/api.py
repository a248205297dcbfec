"""An OpenAI-compatible HTTP API for SparklesChat: ``/v1/models`` and ``/v1/chat/completions``.

The same chat engine as the demo serves every request. Requests are validated, their images decoded and
their conversation checked against the context on the web server's threads; everything that touches the model
runs on the thread of a continuous-batching :class:`~sparkles.engine.scheduler.Scheduler`: up to ``max_batch``
requests are decoded together, a new one joining the batch at the next step (its images go through the vision
tower in one pass when it is admitted) and a finished one leaving it at once; the others wait in arrival order.
Answers are streamed as server-sent events when ``stream: true``. A client that disconnects stops its
generation at the next token (or, still waiting, before it starts).

Limits and access (each a :func:`create_app` keyword): a :class:`RequestGuard` in front of the app checks the
``Host`` header against an allow-list (DNS rebinding), the API key (``Authorization: Bearer``), the JSON
content type of a POST (so no web page can post a form to it) and the body size, while the body streams in.
At most ``max_queue`` requests wait besides the ``max_batch`` being answered; more are refused with 429
and ``Retry-After``. Every failure, expected or not, is answered in the OpenAI error shape.

    app = create_app(chat, model_name="sparkleschat")
    uvicorn.run(app, host="127.0.0.1", port=8000)
"""

import asyncio
import hmac
import ipaddress
import json
import logging
import math
import threading
import time
from pathlib import Path
from typing import Optional, Sequence

from .openai_format import (DEFAULT_MAX_JSON_DEPTH, DEFAULT_MAX_STOP_CHARS, DEFAULT_MAX_STOP_STRINGS,
                            DEFAULT_MAX_TEXT_CHARS, ApiError, ChatRequest, DeltaTracker, chunk_body, completion_body,
                            completion_id, parse_chat_request, parse_json_body, usage)

log = logging.getLogger(__name__)

DEFAULT_MAX_IMAGES = 8
DEFAULT_MAX_BODY_BYTES = 32 * 1024 * 1024  # room for a 20 MiB image as base64 (27 MiB) plus the text
DEFAULT_MAX_QUEUE = 16
LOOPBACK_NAMES = ("127.0.0.1", "localhost", "[::1]")
BODY_METHODS = frozenset({"POST", "PUT", "PATCH"})


# ------------------------------------------------------------------------------------------- access
def is_loopback(host: str) -> bool:
    """Whether a server bound to ``host`` can be reached from this machine only."""
    name = host.strip().strip("[]").lower()
    if name == "localhost":
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


def loopback_hosts(port: int, host: Optional[str] = None) -> list[str]:
    """The ``Host`` headers that clients on this machine send to a server on loopback ``port`` (and ``host``)."""
    names = list(LOOPBACK_NAMES)
    if host:
        bracketed = f"[{host.strip('[]')}]" if ":" in host else host
        if bracketed.lower() not in names:
            names.append(bracketed.lower())
    return [f"{n}:{port}" for n in names] + (names if port == 80 else [])


def _split_host(value: str) -> tuple[str, Optional[str]]:
    """``"[::1]:8000"`` → ``("[::1]", "8000")``; ``"localhost"`` → ``("localhost", None)``."""
    value = value.strip().lower()
    if value.startswith("["):
        name, _, rest = value.partition("]")
        return name + "]", rest[1:] if rest.startswith(":") else None
    name, sep, port = value.rpartition(":")
    return (name, port) if sep else (value, None)


class RequestGuard:
    """ASGI middleware that refuses a request before the app sees it, in the OpenAI error shape.

    In order: a ``Host`` outside ``allowed_hosts`` (421; an entry without a port accepts any port, ``None``
    accepts every host), a missing or wrong API key (401), a POST whose ``Content-Type`` is not
    ``application/json`` (415) or whose ``Content-Length`` is over ``max_body_bytes`` (413). A body that
    arrives without a length is counted as it streams in, and reading stops with a 413 as soon as it passes
    the cap: uvicorn hands the body over in pieces and pauses the socket until the app asks for more, so an
    oversized body never sits in memory.
    """

    def __init__(self, app, *, api_key: Optional[str], allowed_hosts: Optional[Sequence[str]],
                 max_body_bytes: int) -> None:
        self.app = app
        self.key = api_key.encode("utf-8") if api_key else None
        self.hosts = None if allowed_hosts is None else [_split_host(h) for h in allowed_hosts]
        self.max_body_bytes = max_body_bytes

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        try:
            self._check(scope)
        except ApiError as exc:
            await send_error(send, exc)
            return
        if scope["method"] not in BODY_METHODS:
            await self.app(scope, receive, send)
            return
        received = 0

        async def limited_receive():
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_body_bytes:
                    raise self._too_large()
            return message

        await self.app(scope, limited_receive, send)

    def _too_large(self) -> ApiError:
        return ApiError(f"the request body is larger than {self.max_body_bytes} bytes, the most this server accepts",
                        status=413, code="request_too_large")

    def _check(self, scope) -> None:
        headers: dict[bytes, bytes] = {}
        for name, value in scope["headers"]:
            if name in (b"host", b"authorization", b"content-type", b"content-length") and name in headers:
                raise ApiError(f"the request has more than one {name.decode()} header", code="duplicate_header")
            headers[name] = value
        if self.hosts is not None:
            name, port = _split_host(headers.get(b"host", b"").decode("latin-1"))
            if not any(name == n and (p is None or p == port) for n, p in self.hosts):
                raise ApiError("this server does not answer requests for that Host header; connect to it by the "
                               "address it listens on (or start it with --allowed-host NAME)", status=421,
                               code="host_not_allowed")
        if self.key is not None:
            scheme, _, token = headers.get(b"authorization", b"").partition(b" ")
            if scheme.lower() != b"bearer" or not token.strip():
                raise ApiError("this server needs an API key: send it as 'Authorization: Bearer <key>'", status=401,
                               code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})
            if not hmac.compare_digest(token.strip(), self.key):  # constant time: no guessing byte by byte
                raise ApiError("incorrect API key", status=401, code="invalid_api_key",
                               headers={"WWW-Authenticate": "Bearer"})
        if scope["method"] in BODY_METHODS:
            media = headers.get(b"content-type", b"").split(b";")[0].strip().lower()
            if media != b"application/json":
                raise ApiError("the request body must be JSON, sent with 'Content-Type: application/json'",
                               status=415, code="unsupported_media_type")
            length = headers.get(b"content-length")
            if length is not None and length.strip().isdigit() and int(length) > self.max_body_bytes:
                raise self._too_large()


async def send_error(send, err: ApiError) -> None:
    """Answer ``err`` directly on an ASGI ``send`` channel (for refusals made before the app runs)."""
    body = json.dumps(err.body()).encode("utf-8")
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    headers += [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in err.headers.items()]
    await send({"type": "http.response.start", "status": err.status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


# ------------------------------------------------------------------------------------------- the model
class ModelWorker:
    """The model's side of the server: a :class:`~sparkles.engine.scheduler.Scheduler` decoding up to
    ``max_batch`` requests together, and the admission in front of it.

    At most ``max_batch + max_queue`` requests are in the server at once, from the moment their headers arrive
    (before their body is read, so a flood is turned away cheaply and the bodies held in memory are bounded)
    until their answer ends. ``stats`` counts what happened, for tests and monitoring.
    """

    def __init__(self, chat=None, max_queue: int = DEFAULT_MAX_QUEUE, *, max_batch: int = 1) -> None:
        if max_queue < 0:
            raise ValueError(f"max_queue must be at least 0; got {max_queue}")
        if max_batch < 1:
            raise ValueError(f"max_batch must be at least 1; got {max_batch}")
        self.chat = chat
        self.max_batch = max_batch
        self._scheduler = None  # built with the first request: nothing heavy before the server is used
        self._lock = threading.Lock()
        self.capacity = max_queue + max_batch
        self.in_flight = 0
        self._job_seconds: Optional[float] = None  # a running mean, for Retry-After
        self.stats = dict.fromkeys(("admitted", "refused_busy", "submitted", "started", "completed", "cancelled",
                                    "failed", "disconnected", "tokens"), 0)

    def count(self, key: str, n: int = 1) -> None:
        with self._lock:
            self.stats[key] += n

    def admit(self) -> bool:
        with self._lock:
            if self.in_flight >= self.capacity:
                self.stats["refused_busy"] += 1
                return False
            self.in_flight += 1
            self.stats["admitted"] += 1
            return True

    def release(self, job_seconds: Optional[float] = None) -> None:
        with self._lock:
            self.in_flight -= 1
            if job_seconds is not None:
                prev = self._job_seconds
                self._job_seconds = job_seconds if prev is None else 0.8 * prev + 0.2 * job_seconds

    def busy_error(self) -> ApiError:
        """The 429 for a full queue; ``Retry-After`` estimates when the requests ahead will be done."""
        with self._lock:
            # the batch works through the requests ahead max_batch at a time; no history yet: 1 s
            wait = (self._job_seconds or 0.0) * math.ceil(self.in_flight / self.max_batch)
        return ApiError(f"the server is busy: {self.capacity - self.max_batch} requests are already waiting; "
                        "retry later", status=429, type="rate_limit_error", code="queue_full",
                        headers={"Retry-After": str(min(60, max(1, math.ceil(wait))))})

    @property
    def scheduler(self):
        with self._lock:
            if self._scheduler is None:
                from ..engine.scheduler import Scheduler

                self._scheduler = Scheduler(self.chat, max_batch=self.max_batch)
            return self._scheduler

    def submit(self, messages, images, **kwargs):
        """Queue a request with the scheduler (``kwargs`` as :meth:`Scheduler.submit` takes them)."""
        self.count("submitted")
        return self.scheduler.submit(messages, images, **kwargs)

    def shutdown(self) -> None:
        with self._lock:
            scheduler = self._scheduler
        if scheduler is not None:
            scheduler.close()


def _prepare(chat, req: ChatRequest) -> tuple[object, list, object, dict, int]:
    """The engine, messages and decoding settings of a request; check it fits.
    Returns ``(engine, messages, gen, options, prompt_tokens)``."""
    from ..engine.chat import Chat
    from ..conversation.render import Message
    from .loading import context_limit

    engine = chat
    if req.system is not None:  # a system message replaces the model's own system text for this request
        engine = Chat(chat.model, chat.image_processor, tokenizer=chat.tokenizer,
                      layout=chat.layout.with_system(req.system), generation=chat.generation)
    options = req.generation_options()
    options["max_length"] = context_limit(chat)
    if req.stop:
        options["stop_strings"] = tuple(dict.fromkeys((*chat.generation.stop_strings, *req.stop)))
    gen = chat.generation.updated(**options)
    messages = [Message(role, text) for role, text in req.turns]
    prompt = engine.renderer.render(messages, engine.layout)
    if len(prompt) + gen.max_new_tokens > gen.max_length:
        raise ApiError(f"This model's maximum context length is {gen.max_length} tokens. The messages need "
                       f"{len(prompt)} tokens (each image takes {chat.model.image_tokens}) and "
                       f"{gen.max_new_tokens} more are requested for the answer. Shorten the messages or lower "
                       "max_tokens.", param="messages", code="context_length_exceeded")
    return engine, messages, gen, options, len(prompt)


def _finish_reason(completion_tokens: int, options: dict, default_max: int) -> str:
    return "length" if completion_tokens >= options.get("max_new_tokens", default_max) else "stop"


async def _watch_disconnect(receive, cancelled: threading.Event, worker: ModelWorker) -> None:
    """Set ``cancelled`` when the client hangs up (the body has been read, so the next message says so)."""
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            worker.count("disconnected")
            cancelled.set()
            return


def create_app(chat, *, model_name: str = "sparkleschat", allowed_image_dirs: Sequence[str | Path] = (),
               max_images: int = DEFAULT_MAX_IMAGES, max_image_bytes: Optional[int] = None,
               api_key: Optional[str] = None, allowed_hosts: Optional[Sequence[str]] = LOOPBACK_NAMES,
               max_body_bytes: int = DEFAULT_MAX_BODY_BYTES, max_text_chars: int = DEFAULT_MAX_TEXT_CHARS,
               max_queue: int = DEFAULT_MAX_QUEUE, max_stop_strings: int = DEFAULT_MAX_STOP_STRINGS,
               max_stop_chars: int = DEFAULT_MAX_STOP_CHARS, max_json_depth: int = DEFAULT_MAX_JSON_DEPTH,
               max_batch: int = 1):
    """The FastAPI app serving ``chat`` under the name ``model_name``.

    ``api_key``: when set, every request must carry ``Authorization: Bearer <api_key>``. ``allowed_hosts``:
    the ``Host`` headers answered (``name`` for any port, ``name:port`` for one; ``None`` answers all); the
    default accepts the loopback names only, which defeats DNS rebinding — a server reachable from other
    machines passes ``None`` and relies on its key. ``max_body_bytes`` (413), ``max_text_chars`` (all text
    parts together), ``max_queue`` (requests waiting besides those answered; 429 beyond),
    ``max_stop_strings`` / ``max_stop_chars`` and ``max_json_depth`` bound what one request may ask for.
    ``max_batch``: how many requests are decoded together (continuous batching; 1 answers them one at a time).
    """
    # (No ``from __future__ import annotations`` in this module: FastAPI reads the handlers' annotations,
    # and ``Request`` is imported here, inside the function, to keep the module light to import.)
    from contextlib import asynccontextmanager

    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse, Response, StreamingResponse
    from starlette.concurrency import run_in_threadpool
    from starlette.exceptions import HTTPException as StarletteHTTPException
    from starlette.requests import ClientDisconnect

    from ..engine.chat import ChatError
    from ..processors.image import ImageLoadError
    from .images import DEFAULT_MAX_IMAGE_BYTES, load_image_url

    worker = ModelWorker(chat, max_queue, max_batch=max_batch)
    created = int(time.time())
    image_limit = max_image_bytes or DEFAULT_MAX_IMAGE_BYTES
    default_max = chat.generation.max_new_tokens

    @asynccontextmanager
    async def lifespan(app):
        yield
        worker.shutdown()

    app = FastAPI(title="Sparkles API", summary="OpenAI-compatible chat completions with images for SparklesChat",
                  lifespan=lifespan)
    app.state.worker = worker
    app.add_middleware(RequestGuard, api_key=api_key, allowed_hosts=allowed_hosts, max_body_bytes=max_body_bytes)

    class EventStream(StreamingResponse):
        """A streamed answer that stops its generation however the response ends: done, failed or hung up on
        (even before the first event, when the body generator would never reach a ``finally``)."""

        def __init__(self, content, cancelled: threading.Event) -> None:
            super().__init__(content, media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
            self.cancelled = cancelled

        async def __call__(self, scope, receive, send) -> None:
            try:
                await super().__call__(scope, receive, send)
            finally:
                self.cancelled.set()

    def error_response(err: ApiError) -> JSONResponse:
        return JSONResponse(err.body(), status_code=err.status, headers=err.headers)

    def image_error(exc: ImageLoadError, param: Optional[str] = None) -> ApiError:
        return ApiError(str(exc), param=param, code=getattr(exc, "code", None) or "invalid_image")

    def as_api_error(exc: BaseException) -> ApiError:
        """A failure reported by the scheduler, in the API's terms."""
        if isinstance(exc, ApiError):
            return exc
        if isinstance(exc, ChatError):
            return ApiError(str(exc), param="messages", code="invalid_conversation")
        if isinstance(exc, ImageLoadError):
            return image_error(exc)
        worker.count("failed")
        return ApiError(f"generation failed: {type(exc).__name__}", status=500, type="server_error")

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError):
        return error_response(exc)

    @app.exception_handler(ImageLoadError)
    async def _image_error(request: Request, exc: ImageLoadError):
        return error_response(image_error(exc))

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException):
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        return error_response(ApiError(str(exc.detail), status=exc.status_code, type=kind))

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError):
        return error_response(ApiError(f"invalid request: {exc.errors()[:1]}"))

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception):
        # Starlette logs the traceback after this answer; the client learns only that it was our fault.
        return error_response(ApiError(f"internal server error ({type(exc).__name__})", status=500,
                                       type="server_error", code="internal_error"))

    @app.get("/v1/models")
    async def list_models():
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": created,
                                            "owned_by": "sparkles"}]}

    @app.get("/v1/models/{model_id}")
    async def get_model(model_id: str):
        if model_id != model_name:
            raise ApiError(f"The model '{model_id}' does not exist", status=404, param="model",
                           code="model_not_found")
        return {"id": model_name, "object": "model", "created": created, "owned_by": "sparkles"}

    def parse(raw: bytes) -> ChatRequest:
        return parse_chat_request(parse_json_body(raw, max_depth=max_json_depth), model_name=model_name,
                                  max_images=max_images, max_text_chars=max_text_chars,
                                  max_stop_strings=max_stop_strings, max_stop_chars=max_stop_chars)

    def load_images(req: ChatRequest) -> list:
        images = []
        for part in req.images:
            try:
                images.append(load_image_url(part.url, param=part.param, allowed_dirs=allowed_image_dirs,
                                             max_bytes=image_limit))
            except ImageLoadError as exc:
                raise image_error(exc, part.param) from None
        return images

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        if not worker.admit():
            raise worker.busy_error()
        handed_over = False  # once the job is submitted, the job gives the admission back when it ends
        try:
            try:  # read it ourselves rather than request.body(), which would keep the body for the whole request
                raw = b"".join([chunk async for chunk in request.stream()])
            except ClientDisconnect:
                return Response(status_code=499)  # nobody is listening
            req = await run_in_threadpool(parse, raw)  # a large body parses off the event loop
            del raw
            images = await run_in_threadpool(load_images, req)
            try:  # rendering tokenises the whole conversation: off the event loop, and off the model thread
                engine, messages, gen, options, prompt_tokens = await run_in_threadpool(_prepare, chat, req)
            except ChatError as exc:
                raise as_api_error(exc) from None
            loop = asyncio.get_running_loop()
            events: asyncio.Queue = asyncio.Queue()
            cancelled = threading.Event()
            begun: list[float] = []  # when the scheduler admitted it (for Retry-After)

            def emit(*item) -> None:
                loop.call_soon_threadsafe(events.put_nowait, item)

            def listen(event) -> None:  # runs on the model thread: forward, count, and give the admission back
                if event.kind == "started":
                    worker.count("started")
                    begun.append(time.perf_counter())
                    emit("ready", prompt_tokens)
                    return
                if event.kind == "text":
                    emit("text", event.text)
                    return
                try:
                    if event.kind == "done" and event.finish_reason == "cancelled":
                        worker.count("cancelled")
                        if begun:
                            log.info("client went away; generation stopped after %d tokens", event.tokens)
                            emit("done", event.text, event.tokens, _finish_reason(event.tokens, options, default_max))
                        else:  # the client left while waiting: it never ran
                            emit("cancelled")
                    elif event.kind == "done":
                        worker.count("completed")
                        emit("done", event.text, event.tokens, _finish_reason(event.tokens, options, default_max))
                    else:
                        emit("error", as_api_error(event.error))
                finally:
                    worker.count("tokens", event.tokens)
                    worker.release(time.perf_counter() - begun[0] if begun else None)

            worker.submit(messages, images, chat=engine, gen=gen, cancelled=cancelled, listener=listen)
            handed_over = True
        finally:
            if not handed_over:
                worker.release()

        # Until the answer starts, watch for the client hanging up; a streamed answer then watches by itself.
        watcher = asyncio.ensure_future(_watch_disconnect(request.receive, cancelled, worker))
        try:
            first = await events.get()
            if first[0] != "ready":
                cancelled.set()
                return error_response(first[1]) if first[0] == "error" else Response(status_code=499)
            prompt_tokens = first[1]
            cid = completion_id()
            if not req.stream:
                while True:
                    item = await events.get()
                    if item[0] == "error":
                        return error_response(item[1])
                    if item[0] == "done":
                        _, text, count, finish = item
                        return completion_body(id=cid, model=model_name, text=text, finish_reason=finish,
                                               prompt_tokens=prompt_tokens, completion_tokens=count)
        finally:
            watcher.cancel()

        async def sse():
            stamp = int(time.time())
            tracker = DeltaTracker()

            def frame(**kw) -> str:
                return "data: " + json.dumps(chunk_body(id=cid, model=model_name, created=stamp, **kw),
                                             ensure_ascii=False) + "\n\n"

            yield frame(delta={"role": "assistant", "content": ""})
            while True:
                item = await events.get()
                if item[0] == "text":
                    delta = tracker.update(item[1])
                    if delta:
                        yield frame(delta={"content": delta})
                elif item[0] == "done":
                    _, text, count, finish = item
                    delta = tracker.update(text)
                    if delta:
                        yield frame(delta={"content": delta})
                    yield frame(delta={}, finish_reason=finish)
                    if req.include_usage:
                        yield frame(delta={}, empty_choices=True, usage_=usage(prompt_tokens, count))
                    break
                else:  # an error after the stream began: report it in-band, OpenAI style
                    yield "data: " + json.dumps(item[1].body()) + "\n\n"
                    break
            yield "data: [DONE]\n\n"

        return EventStream(sse(), cancelled)

    return app
