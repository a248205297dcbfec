"""Answering lmms-eval's chat requests with the project's generators, without lmms-eval itself.

The two lmms-eval models of :mod:`.models` are thin shells around :class:`Answerer`. It turns each conversation
(lmms-eval messages, read by :func:`~.messages.to_turns`, and lmms-eval's generation settings) into the project's
:class:`~sparkles.eval.generator.Request` — earlier turns as its history, images in slot order — and has a
generator answer it: :class:`~sparkles.eval.generator.ModelGenerator` (the model ``evaluate.py`` loads, greedy
requests batched as ``evaluate.py`` batches them, so the answers are ``evaluate.py``'s) or
:class:`~sparkles.eval.endpoint.EndpointGenerator` (an OpenAI-compatible API, each image sent as an
``image_url`` part at its slot).

A conversation may have further rounds (lmms-eval's ``generate_until_multi_round``, which SparklesEval uses):
round k+1 is asked once every round-k answer is known, with the model's own earlier answers in its messages
(:class:`TaskRounds` follows lmms-eval's round protocol). Images that arrive as PIL objects (lmms-eval's stock
tasks) are written as lossless PNG files for the request, so both generators read files, as the server reads
the PNG data lmms-eval's own API client sends.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

from ..common.logging import progress_bar
from ..eval.protocol import DEFAULT_MAX_LENGTH, DEFAULT_MAX_NEW_TOKENS, item_seed, make_protocol
from .messages import to_turns

log = logging.getLogger(__name__)

MAX_ROUNDS = 100  # a task whose rounds never end is an error, not a hang


def generation(gen_kwargs: Optional[dict], *, max_length: int = DEFAULT_MAX_LENGTH) -> tuple[dict, tuple[str, ...]]:
    """lmms-eval's generation settings as the project's (``ChatSession.answer`` keywords) and the ``until`` strings.

    Greedy unless a temperature above 0 is asked for (and ``do_sample`` is not false); ``max_new_tokens`` defaults
    to the project's 1000, ``num_beams`` is kept, ``top_p`` applies to sampling.
    """
    kw = dict(gen_kwargs or {})
    until = kw.get("until") or ()
    until = tuple(s for s in ([until] if isinstance(until, str) else until) if s)
    temperature = float(kw.get("temperature") or 0.0)
    gen = make_protocol("default", num_beams=int(kw.get("num_beams") or 1), max_length=int(max_length),
                        max_new_tokens=int(kw.get("max_new_tokens") or DEFAULT_MAX_NEW_TOKENS)).generation()
    if temperature > 0 and kw.get("do_sample", True) is not False:
        gen.update(do_sample=True, temperature=temperature, top_p=float(kw.get("top_p") or 1.0))
    return gen, until


def cut_at(text: str, until: Sequence[str]) -> str:
    """``text`` up to the first of the ``until`` strings (lmms-eval's stop sequences)."""
    ends = [text.find(s) for s in until if s in text]
    return text[:min(ends)] if ends else text


@dataclass
class Conversation:
    """One lmms-eval request: its first round's messages, generation settings, a name for errors and seeds, and
    ``next_round(k, answers)`` giving round k's messages after the answers so far (None: no further round)."""

    messages: list
    gen_kwargs: dict
    where: str
    next_round: Optional[Callable[[int, list], Optional[list]]] = None


class TaskRounds:
    """``next_round`` for lmms-eval's multi-round protocol: ``doc_to_messages(doc, round_idx=k,
    previous_output=answers, previous_round_info=info)`` returns ``(messages, terminal, output, info)``; a
    terminal round, or anything else returned, ends the conversation."""

    def __init__(self, doc_to_messages: Callable, doc: Any) -> None:
        self.doc_to_messages, self.doc, self.info = doc_to_messages, doc, None

    def __call__(self, round_idx: int, answers: list) -> Optional[list]:
        payload = self.doc_to_messages(self.doc, round_idx=round_idx, previous_output=list(answers),
                                       previous_round_info=self.info)
        if not (isinstance(payload, tuple) and len(payload) == 4):
            return None
        messages, terminal, _, self.info = payload
        return None if terminal or messages is None else messages


class Answerer:
    """Answers :class:`Conversation` lists with a project generator (see the module docstring).

    ``image_tokens``: place images at ``<image>`` tokens of stock-layout messages (:func:`~.messages.to_turns`);
    ``max_length``: the context plus answer limit of the in-process model; ``seed``: sampled answers get
    per-conversation, per-round seeds derived from it.
    """

    def __init__(self, generator, *, image_tokens: bool = True, max_length: int = DEFAULT_MAX_LENGTH,
                 seed: int = 2023, progress: bool = True) -> None:
        self.generator = generator
        self.image_tokens = bool(image_tokens)
        self.max_length = int(max_length)
        self.seed = int(seed)
        self.progress = progress

    def answer(self, conversations: Sequence[Conversation]) -> list[list[str]]:
        """Every conversation's answers, one per round, in order."""
        answers: list[list[str]] = [[] for _ in conversations]
        pending = {i: c.messages for i, c in enumerate(conversations)}
        round_idx = 0
        while pending:
            if round_idx >= MAX_ROUNDS:
                where = conversations[next(iter(pending))].where
                raise RuntimeError(f"{where}: still asking after {MAX_ROUNDS} rounds")
            texts = self._answer_round(conversations, pending, round_idx)
            following = {}
            for i, text in texts.items():
                answers[i].append(text)
                step = conversations[i].next_round
                messages = step(round_idx + 1, answers[i]) if step is not None else None
                if messages is not None:
                    following[i] = messages
            pending, round_idx = following, round_idx + 1
        return answers

    def _answer_round(self, conversations: Sequence[Conversation], pending: dict, round_idx: int) -> dict:
        from ..eval.generator import Request

        bar = progress_bar(total=len(pending), desc=f"SparklesChat answers, round {round_idx + 1}", unit="answer",
                           enabled=self.progress and len(pending) > 1, leave=False)
        groups: dict[str, tuple[dict, tuple, list]] = {}
        with tempfile.TemporaryDirectory(prefix="sparkles_lmms_") as tmp:
            for i, messages in pending.items():
                conv = conversations[i]
                where = f"{conv.where}, round {round_idx + 1}"
                turns, images = to_turns(messages, image_tokens=self.image_tokens, where=where)
                files = [_as_file(image, Path(tmp), f"{i}_{round_idx}_{k}") for k, image in enumerate(images)]
                gen, until = generation(conv.gen_kwargs, max_length=self.max_length)
                seed = item_seed(self.seed, conv.where, 0, f"round{round_idx}") if gen["do_sample"] else None
                request = Request(turns[-1][1], files, seed, where, history=tuple(text for _, text in turns[:-1]))
                key = json.dumps([gen, until], sort_keys=True)
                groups.setdefault(key, (gen, until, []))[2].append((i, request))
            texts = {}
            size = max(1, int(getattr(self.generator, "batch_size", 1)))
            for gen, until, items in groups.values():
                for start in range(0, len(items), size):
                    chunk = items[start:start + size]
                    for (i, request), answer in zip(chunk, self.generator.generate([r for _, r in chunk], gen)):
                        if answer.error:
                            log.warning("%s", answer.error)
                        texts[i] = cut_at(answer.text or "", until)
                    bar.update(len(chunk))
        bar.close()
        return texts


def load_answerer(cfg_path: str, sparkles_root: Optional[str] = None, *, device: str = "auto", batch_size: int = 1,
                  options: Sequence[str] = (), **settings) -> Answerer:
    """SparklesChat of a run config in this process, loaded and batched as ``evaluate.py --cfg-path`` loads it;
    ``settings`` go to :class:`Answerer`."""
    import sparkles.models  # noqa: F401  (registers the sparkleschat architecture)

    from ..common.config import load_config, resolve_config_root
    from ..eval.cli import build_generator, resolve_device

    cfg = load_config(cfg_path, list(options) or None)
    root = resolve_config_root(cfg, sparkles_root)
    return Answerer(build_generator(cfg, root, resolve_device(None, device), batch_size), **settings)


def endpoint_answerer(base_url: str, model: Optional[str] = None, *, api_key: Optional[str] = None,
                      batch_size: int = 1, timeout: float = 600.0, max_retries: int = 3, **settings) -> Answerer:
    """A model behind an OpenAI-compatible API, asked as ``evaluate.py --model-endpoint`` asks it (``batch_size``
    requests in flight); ``settings`` go to :class:`Answerer`."""
    from ..eval.endpoint import EndpointGenerator

    generator = EndpointGenerator(base_url, model, api_key=api_key, batch_size=batch_size, timeout=timeout,
                                  max_retries=max_retries)
    return Answerer(generator, **settings)


def _as_file(image: Any, folder: Path, name: str) -> Path:
    """A path as it is; a PIL image written as a lossless PNG file in ``folder`` (same pixels when read back)."""
    if isinstance(image, (str, os.PathLike)):
        return Path(image)
    if not hasattr(image, "save"):
        raise TypeError(f"an image must be a path or a PIL image, got {type(image).__name__}")
    path = folder / f"{name}.png"
    try:
        image.save(path, format="PNG")
    except (OSError, ValueError):  # a mode PNG cannot hold (e.g. CMYK): the RGB image, as the model reads it
        image.convert("RGB").save(path, format="PNG")
    return path
