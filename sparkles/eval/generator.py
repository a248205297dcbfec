"""The evaluated model behind one small interface: answer ``(prompt, image files)`` requests.

Upstream answered every request in a fresh single-user-message conversation (system text, ``###Human: ...
###Assistant:``); so does this. Greedy requests go through :func:`generate_batch` ``batch_size`` at a time
(identical answers to one-by-one decoding). Sampled requests are answered one at a time, each with its own
seed, so that an answer depends on its item and attempt only — not on batch composition or sharding.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

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


class ModelGenerator:
    """Answers requests with a SparklesChat model through the chat engine."""

    def __init__(self, model, image_processor, *, batch_size: int = 1) -> None:
        from ..engine.chat import Chat

        self.model = model.eval()
        self.chat = Chat(model, image_processor)
        self.batch_size = max(1, int(batch_size))
        self._warned = False

    def _one(self, req: Request, gen: dict[str, Any]) -> str:
        session = self.chat.session()
        for path in req.images:
            try:
                session.add_image(path)
            except ImageLoadError as exc:
                raise InputError(f"{req.where}: {exc}") from None
        session.ask(req.prompt)
        if req.seed is not None:
            import torch

            torch.manual_seed(req.seed)  # beam sampling goes through transformers' global RNG
        return session.answer(**{**gen, "seed": req.seed})

    def generate(self, requests: Sequence[Request], gen: dict[str, Any]) -> list[str]:
        """One answer per request, in order."""
        import torch

        with torch.no_grad():
            return self._generate(requests, gen)

    def _generate(self, requests: Sequence[Request], gen: dict[str, Any]) -> list[str]:
        if not requests:
            return []
        sampled = bool(gen.get("do_sample"))
        if self.batch_size == 1 or sampled or len(requests) == 1:
            if sampled and self.batch_size > 1 and not self._warned:
                log.info("sampling: answering one request at a time so that per-item seeds hold "
                         "(--batch-size applies to greedy decoding)")
                self._warned = True
            return [self._one(r, gen) for r in requests]
        from ..engine.batch import generate_batch

        for r in requests:  # fail on a bad image with its record before the batched vision pass
            for path in r.images:
                if not Path(path).is_file():
                    raise InputError(f"{r.where}: image not found: {path}")
        try:
            return generate_batch(self.chat, [(r.prompt, list(r.images)) for r in requests],
                                  **{**gen, "seed": None})
        except ImageLoadError as exc:
            raise InputError(f"one of records {', '.join(r.where for r in requests)}: {exc}") from None
