"""A model behind an OpenAI-compatible chat API as the evaluated model (``evaluate.py --model-endpoint URL``).

The same small interface as :class:`~.generator.ModelGenerator` — ``generate(requests, gen) -> [Answer]`` — so
BISON, NLVR2, SparklesEval and I4 run with the same protocols, sharding, resume, judges and result files as the
in-process model. Each request becomes one chat completion: the earlier turns as messages, and every user
message split at its image slots into text parts with an ``image_url`` part (the image file as a data URL)
exactly where each slot stood, so a server that keeps the parts in order (this project's own, vLLM, SGLang, a
hosted GPT-4-class model) sees every image at its place. Greedy decoding is asked for as ``temperature 0``;
the upstream protocol's sampling as its temperature and top-p, with the item's seed. ``batch_size`` requests are
in flight at once.

The remote server's own system text and template apply (``model_input`` is not known here and stays empty); a
request the server refuses as too long is recorded as that item's ``error``, as an in-process context overflow
is.
"""

from __future__ import annotations

import base64
import logging
import mimetypes
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Optional, Sequence

from ..conversation.template import ASSISTANT, IMAGE_MARKER, USER, replace_glyphs
from .generator import Answer, InputError, Request

log = logging.getLogger(__name__)

API_KEY_ENV = "MODEL_ENDPOINT_API_KEY"  # the evaluated model's key (OPENAI_API_KEY stays the judge's)


class EndpointError(RuntimeError):
    """The endpoint cannot be used (unreachable, no such model, an unsupported setting)."""


def _data_url(path: Path, where: str) -> str:
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise InputError(f"{where}: cannot read image {path}: {exc.strerror or exc}") from None
    mime = mimetypes.guess_type(str(path))[0] or "image/png"
    return f"data:{mime};base64," + base64.b64encode(data).decode()


def chat_messages(req: Request) -> list[dict]:
    """The OpenAI messages of one request: earlier turns, then the question, images placed at their slots."""
    images = iter(req.images)
    messages = []
    for msg in req.messages():
        if msg.role == ASSISTANT:
            messages.append({"role": "assistant", "content": msg.content})
            continue
        pieces = replace_glyphs(msg.content).split(IMAGE_MARKER)
        parts: list[dict] = []
        for k, piece in enumerate(pieces):
            if k > 0:
                path = next(images, None)
                if path is None:
                    raise InputError(f"{req.where}: more image slots than images")
                parts.append({"type": "image_url", "image_url": {"url": _data_url(path, req.where)}})
            if piece:
                parts.append({"type": "text", "text": piece})
        messages.append({"role": USER, "content": parts if len(parts) != 1 or parts[0]["type"] != "text"
                         else parts[0]["text"]})
    if next(images, None) is not None:
        raise InputError(f"{req.where}: more images than image slots")
    return messages


class EndpointGenerator:
    """Answers requests through an OpenAI-compatible ``/chat/completions`` endpoint (see the module docstring)."""

    def __init__(self, base_url: str, model: Optional[str] = None, *, api_key: Optional[str] = None,
                 batch_size: int = 1, timeout: float = 600.0, max_retries: int = 3) -> None:
        from openai import OpenAI

        self.client = OpenAI(base_url=base_url, api_key=api_key or os.environ.get(API_KEY_ENV) or "EMPTY",
                             timeout=timeout, max_retries=max_retries)
        self.base_url = base_url
        self.batch_size = max(1, int(batch_size))
        self.model = model or self._only_model()

    def _only_model(self) -> str:
        import openai

        try:
            names = [m.id for m in self.client.models.list().data]
        except openai.OpenAIError as exc:
            raise EndpointError(f"cannot list the models of {self.base_url}: {exc}") from None
        if len(names) != 1:
            raise EndpointError(f"{self.base_url} serves {len(names)} models ({', '.join(names[:8])}); name one "
                                "with --model-name")
        return names[0]

    def _options(self, req: Request, gen: dict[str, Any]) -> dict[str, Any]:
        if int(gen.get("num_beams") or 1) > 1:
            raise EndpointError("beam search is not part of the chat completions API; use --num-beams 1")
        sampled = bool(gen.get("do_sample"))
        options: dict[str, Any] = {"model": self.model, "max_tokens": int(gen["max_new_tokens"]),
                                   "temperature": float(gen.get("temperature") or 1.0) if sampled else 0.0}
        if sampled:
            options["top_p"] = gen.get("top_p")
        if req.seed is not None:
            options["seed"] = int(req.seed)
        return options

    def _one(self, req: Request, gen: dict[str, Any]) -> Answer:
        import openai

        options = self._options(req, gen)
        try:
            reply = self.client.chat.completions.create(messages=chat_messages(req), **options)
        except openai.BadRequestError as exc:  # e.g. the context does not fit: this item fails, the run goes on
            message = exc.body.get("message") if isinstance(exc.body, dict) else None
            return Answer(None, error=f"{req.where}: the endpoint refused the request: {message or exc}")
        except openai.OpenAIError as exc:
            raise EndpointError(f"{self.base_url}: {exc}") from None
        return Answer(reply.choices[0].message.content or "")

    def generate(self, requests: Sequence[Request], gen: dict[str, Any]) -> list[Answer]:
        """One :class:`~.generator.Answer` per request, in order."""
        if self.batch_size == 1 or len(requests) <= 1:
            return [self._one(r, gen) for r in requests]
        with ThreadPoolExecutor(max_workers=min(self.batch_size, len(requests)),
                                thread_name_prefix="endpoint") as pool:
            return list(pool.map(lambda r: self._one(r, gen), requests))
