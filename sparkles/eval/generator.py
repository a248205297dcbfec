"""The evaluated model behind one small interface: answer ``(prompt, image files)`` requests.

Upstream answered every request in a fresh single-user-message conversation (system text, ``###Human: ...
###Assistant:``); so does this, unless a request carries earlier turns (``history``), which are then laid out
as the conversation they were. Greedy requests go through :func:`generate_batch` ``batch_size`` at a time
(identical answers to one-by-one decoding). Sampled requests, and contexts cut from the left, are answered
one at a time, sampled ones each with its own seed, so that an answer depends on its item and attempt only —
not on batch composition or sharding.

Every answer comes with the decoder's input as text and any warning about what was left out to fit; a request
whose last turn alone does not fit is answered with an error instead, and the other requests go on.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

from ..conversation.render import Message
from ..conversation.template import ASSISTANT, USER
from ..processors.image import ImageLoadError

log = logging.getLogger(__name__)


class InputError(ValueError):
    """A bad evaluation input (e.g. an image that is missing or unreadable), naming the record and field."""


@dataclass
class Request:
    prompt: str
    images: list[Path]
    seed: Optional[int]
    where: str  # "record 12 (evaluation_id 17), dialogue[0].images" — for error messages
    history: tuple[str, ...] = ()  # earlier turns: user, assistant, user, assistant, ...

    def messages(self) -> list[Message]:
        roles = [USER if i % 2 == 0 else ASSISTANT for i in range(len(self.history))]
        return [Message(r, t) for r, t in zip(roles, self.history)] + [Message(USER, self.prompt)]


@dataclass
class Answer:
    """One request's outcome: the answer, or why there is none; the decoder's input and what was left out."""

    text: Optional[str]
    model_input: Optional[str] = None
    warnings: list[str] = field(default_factory=list)
    error: Optional[str] = None


class ModelGenerator:
    """Answers requests with a SparklesChat model through the chat engine."""

    def __init__(self, model, image_processor, *, batch_size: int = 1, decode_mode: str = "plain") -> None:
        from ..engine.chat import Chat
        from ..engine.decoding import GenerationConfig

        self.model = model.eval()
        self.chat = Chat(model, image_processor, generation=GenerationConfig().updated(decode_mode=decode_mode))
        self.batch_size = max(1, int(batch_size))
        self._warned = False

    def _context(self, req: Request, gen: dict[str, Any]):
        """The decoder's context for ``req`` as the engine will build it, or the error that it does not fit."""
        from ..engine.batch import as_messages
        from ..engine.chat import ContextTooLong

        try:
            return self.chat.context(as_messages(req.messages()), self.chat.generation.updated(**gen)), None
        except ContextTooLong as exc:
            return None, f"{req.where}: {exc}"

    def _one(self, req: Request, gen: dict[str, Any]) -> Answer:
        session = self.chat.session()
        for path in req.images:
            try:
                session.add_image(path)
            except ImageLoadError as exc:
                raise InputError(f"{req.where}: {exc}") from None
        for question, answer in zip(req.history[0::2], req.history[1::2]):
            session.add_exchange(question, answer)
        session.ask(req.prompt)
        if req.seed is not None:
            import torch

            torch.manual_seed(req.seed)  # beam sampling goes through transformers' global RNG
        from ..engine.chat import ContextTooLong

        try:
            text = session.answer(**{**gen, "seed": req.seed})
        except ContextTooLong as exc:
            error = f"{req.where}: {exc}"
            log.warning("%s", error)
            return Answer(None, error=error)
        context = session.last_context
        return Answer(text, context.text, [context.warning] if context.warning else [])

    def generate(self, requests: Sequence[Request], gen: dict[str, Any]) -> list[Answer]:
        """One :class:`Answer` per request, in order."""
        import torch

        with torch.no_grad():
            return self._generate(requests, gen)

    def _generate(self, requests: Sequence[Request], gen: dict[str, Any]) -> list[Answer]:
        sampled = bool(gen.get("do_sample"))
        if self.batch_size == 1 or sampled or len(requests) <= 1:
            if sampled and self.batch_size > 1 and not self._warned:
                log.info("sampling: answering one request at a time so that per-item seeds hold "
                         "(--batch-size applies to greedy decoding)")
                self._warned = True
            return [self._one(r, gen) for r in requests]
        # a batch: render each prompt once, here; those that do not fit fail alone, cut ones go one at a time
        out: list[Optional[Answer]] = [None] * len(requests)
        contexts = {}
        for k, req in enumerate(requests):
            context, error = self._context(req, gen)
            if error is not None:
                log.warning("%s", error)
                out[k] = Answer(None, error=error)
            elif context.cut:
                out[k] = self._one(req, gen)
            else:
                contexts[k] = context
        if len(contexts) == 1:
            [(k, _)] = contexts.items()
            out[k] = self._one(requests[k], gen)
        elif contexts:
            from ..engine.batch import generate_batch

            batchable = list(contexts)
            chosen = [requests[k] for k in batchable]
            for r in chosen:  # fail on a bad image with its record before the batched vision pass
                for path in r.images:
                    if not Path(path).is_file():
                        raise InputError(f"{r.where}: image not found: {path}")
            try:
                texts = generate_batch(self.chat, [(r.messages(), list(r.images)) for r in chosen],
                                       contexts=[contexts[k] for k in batchable], **{**gen, "seed": None})
            except ImageLoadError as exc:
                raise InputError(f"one of records {', '.join(r.where for r in chosen)}: {exc}") from None
            for k, text in zip(batchable, texts):
                c = contexts[k]
                out[k] = Answer(text, c.text, [c.warning] if c.warning else [])
        return out
