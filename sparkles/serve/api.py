"""An OpenAI-compatible HTTP API for SparklesChat: ``/v1/models`` and ``/v1/chat/completions``.

The same chat engine as the demo serves every request. Requests are validated and their images decoded
on the web server's threads; everything that touches the model runs on one worker thread, so requests
are served one at a time, in arrival order. Per request, all images go through the vision tower in one
pass, then the engine answers (streamed as server-sent events when ``stream: true``). A client that
disconnects mid-stream stops its generation at the next token.

    app = create_app(chat, model_name="sparkleschat")
    uvicorn.run(app, host="127.0.0.1", port=8000)
"""

import asyncio
import json
import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Optional, Sequence

from .openai_format import (ApiError, ChatRequest, DeltaTracker, chunk_body, completion_body, completion_id,
                            parse_chat_request, usage)

log = logging.getLogger(__name__)

DEFAULT_MAX_IMAGES = 8


class ModelWorker:
    """One thread that owns the model: jobs run one at a time, in the order they were submitted."""

    def __init__(self) -> None:
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sparkles-model")

    def submit(self, fn, *args):
        return self._executor.submit(fn, *args)

    def shutdown(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)


def _prepare(chat, req: ChatRequest, images: list) -> tuple[object, dict, int]:
    """Build the engine session for a request; check it fits. Returns ``(session, options, prompt_tokens)``."""
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
    session = engine.session()
    if images:
        session.add_images(images)  # one vision pass
    session.messages.extend(messages)
    return session, options, len(prompt)


def _finish_reason(completion_tokens: int, options: dict, default_max: int) -> str:
    return "length" if completion_tokens >= options.get("max_new_tokens", default_max) else "stop"


def create_app(chat, *, model_name: str = "sparkleschat", allowed_image_dirs: Sequence[str | Path] = (),
               max_images: int = DEFAULT_MAX_IMAGES, max_image_bytes: Optional[int] = None):
    """The FastAPI app serving ``chat`` under the name ``model_name``."""
    # (No ``from __future__ import annotations`` in this module: FastAPI reads the handlers' annotations,
    # and ``Request`` is imported here, inside the function, to keep the module light to import.)
    from contextlib import asynccontextmanager

    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse, StreamingResponse
    from starlette.concurrency import run_in_threadpool
    from starlette.exceptions import HTTPException as StarletteHTTPException

    from ..engine.chat import ChatError
    from .images import DEFAULT_MAX_IMAGE_BYTES, load_image_url

    worker = ModelWorker()
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

    def error_response(err: ApiError) -> JSONResponse:
        return JSONResponse(err.body(), status_code=err.status)

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError):
        return error_response(exc)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException):
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        return error_response(ApiError(str(exc.detail), status=exc.status_code, type=kind))

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError):
        return error_response(ApiError(f"invalid request: {exc.errors()[:1]}"))

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

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        try:
            body = json.loads(await request.body())
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ApiError(f"the request body is not valid JSON: {exc}", code="invalid_json") from None
        req = parse_chat_request(body, model_name=model_name, max_images=max_images)
        images = await run_in_threadpool(
            lambda: [load_image_url(p.url, param=p.param, allowed_dirs=allowed_image_dirs, max_bytes=image_limit)
                     for p in req.images])
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()
        cancelled = threading.Event()

        def emit(*item) -> None:
            loop.call_soon_threadsafe(events.put_nowait, item)

        def job() -> None:  # runs on the model thread
            try:
                session, options, prompt_tokens = _prepare(chat, req, images)
                emit("ready", prompt_tokens)
                text, count = "", 0
                for text in session.stream(**options):
                    count += 1
                    emit("text", text)
                    if cancelled.is_set():
                        log.info("client went away; generation stopped after %d tokens", count)
                        break
                emit("done", text, count, _finish_reason(count, options, default_max))
            except ApiError as exc:
                emit("error", exc)
            except ChatError as exc:
                emit("error", ApiError(str(exc), param="messages", code="invalid_conversation"))
            except Exception as exc:  # never leave the client waiting
                log.exception("generation failed")
                emit("error", ApiError(f"generation failed: {type(exc).__name__}", status=500, type="server_error"))

        worker.submit(job)
        first = await events.get()
        if first[0] == "error":
            cancelled.set()
            return error_response(first[1])
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

        async def sse():
            stamp = int(time.time())
            tracker = DeltaTracker(req.stop + list(chat.generation.stop_strings))

            def frame(**kw) -> str:
                return "data: " + json.dumps(chunk_body(id=cid, model=model_name, created=stamp, **kw),
                                             ensure_ascii=False) + "\n\n"

            try:
                yield frame(delta={"role": "assistant", "content": ""})
                while True:
                    item = await events.get()
                    if item[0] == "text":
                        delta = tracker.update(item[1])
                        if delta:
                            yield frame(delta={"content": delta})
                    elif item[0] == "done":
                        _, text, count, finish = item
                        delta = tracker.update(text, final=True)
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
            finally:
                cancelled.set()

        return StreamingResponse(sse(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    return app
