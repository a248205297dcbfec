"""Continuous batching: independent chat requests decoded together, joining and leaving between decode steps.

A :class:`Scheduler` owns the model on one thread. Requests (:meth:`Scheduler.submit`) wait in arrival order;
between two decode steps every waiting request that fits in the batch (``max_batch``) is admitted: its images
go through the vision tower (and the Q-Former with the messages that show them), its conversation is rendered
and embedded exactly as :class:`~.chat.ChatSession` does it, and it is prefilled **on its own** (batch 1, a
fresh KV cache), so its first token is the one it would get alone. It then joins the running batch. Every
step feeds each sequence's last token through the decoder as one batch and picks each row's next token with
that row's own settings — greedy or sampled (temperature, top-p, repetition penalty, minimum length, and a
``torch.Generator`` of its own when it has a seed), its ``max_new_tokens``, its stop strings. A sequence that
finishes, or whose client cancels, leaves the batch before the next step.

How the batch's KV state is kept: one ``DynamicCache`` (layers from :func:`.kv_cache.new_kv_cache`, which
append without copying) holds all rows, **left-padded** to a common length, with a ``[B, L]`` attention mask
that is 0 on padding. Each row has its own position counter, so its rotary positions are those it would have
alone; padding is masked out of attention, so a row's logits are those of its solo run up to float rounding
(greedy answers are tested identical). A joining row's cache is padded on the left (or the batch's is, when the
newcomer is longer) and concatenated along the batch; a leaving row is dropped with an index along the batch,
and columns that have become padding in every remaining row are cut from the left, so the padding never
outgrows the longest live row. Joins and leaves copy the cache once; decode steps only append.

Events reach the submitter through a :class:`Handle`: ``started`` (admitted and prefilled), ``text`` after
every token (the answer so far for streaming, never ending in a piece of a stop string), then ``done``
(finish reason ``stop``, ``length`` or ``cancelled``) or ``error``. Greedy requests get the same text as
``ChatSession.answer(do_sample=False)``.

    scheduler = Scheduler(chat, max_batch=8)
    handle = scheduler.submit([Message("user", "Describe IMAGE#1✨.")], [image], max_new_tokens=64)
    for text in handle.stream():
        print(text)
    scheduler.close()
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from dataclasses import dataclass
from typing import Callable, Iterator, Optional, Sequence

import torch

from ..conversation.render import Message
from ..conversation.template import count_slots
from .chat import Chat, ChatError
from .decoding import (GenerationConfig, StopChecker, clean_answer, forward_last, logits_processors,
                       partial_answer)
from .kv_cache import new_kv_cache

log = logging.getLogger(__name__)

DEFAULT_MAX_BATCH = 8


@dataclass
class Event:
    """What happened to a request. ``kind``: ``started`` | ``text`` | ``done`` | ``error``."""

    kind: str
    text: str = ""
    tokens: int = 0  # new tokens generated so far
    prompt_tokens: int = 0
    finish_reason: Optional[str] = None  # done: "stop" | "length" | "cancelled"
    error: Optional[BaseException] = None


class Handle:
    """A submitted request: its cancellation and its events (to ``listener`` when given, else kept here)."""

    def __init__(self, cancelled: Optional[threading.Event] = None,
                 listener: Optional[Callable[[Event], None]] = None) -> None:
        self.cancelled = cancelled if cancelled is not None else threading.Event()
        self._listener = listener
        self._events: "queue.SimpleQueue[Event]" = queue.SimpleQueue()
        self.submitted_at = time.perf_counter()
        self.finished = threading.Event()

    def cancel(self) -> None:
        """Stop this request: it leaves the batch (or the queue) before the next step."""
        self.cancelled.set()

    def _emit(self, event: Event) -> None:
        if event.kind in ("done", "error"):
            self.finished.set()
        if self._listener is not None:
            self._listener(event)
        else:
            self._events.put(event)

    def events(self) -> Iterator[Event]:
        """Every event until ``done`` or ``error`` (only without a listener)."""
        if self._listener is not None:
            raise RuntimeError("this request's events go to its listener")
        while True:
            event = self._events.get()
            yield event
            if event.kind in ("done", "error"):
                return

    def stream(self) -> Iterator[str]:
        """The answer so far after every token; a failure is raised."""
        for event in self.events():
            if event.kind == "text":
                yield event.text
            elif event.kind == "error":
                raise event.error

    def result(self) -> str:
        text = ""
        for text in self.stream():
            pass
        return text


class _Request:
    def __init__(self, chat: Chat, messages: list[Message], images: list, gen: GenerationConfig,
                 handle: Handle) -> None:
        self.chat, self.messages, self.images, self.gen, self.handle = chat, messages, images, gen, handle


class _Seq:
    """A sequence in the batch: its own settings, generator, stop checker, tokens and position."""

    def __init__(self, req: _Request, prompt_tokens: int, next_position: int) -> None:
        self.req, self.gen, self.handle = req, req.gen, req.handle
        tok = req.chat.tokenizer
        self.tokenizer = tok
        self.eos_id = getattr(tok, "eos_token_id", None)
        self.checker = StopChecker(tok, self.gen.stop_strings, eos_id=self.eos_id if self.gen.stop_on_eos else None)
        self.procs = logits_processors(self.gen, tok)
        self.generator = None
        self.prompt_tokens = prompt_tokens
        self.position = next_position  # the position id of the next token fed to the decoder
        self.generated: list[int] = []
        self.text = ""

    def pick(self, logits: torch.Tensor) -> bool:
        """Choose the next token from this row's ``logits [1, V]`` as ``decode_tokens`` does for a batch of one;
        emit the text so far; return True when the sequence is finished."""
        gen, step = self.gen, len(self.generated)
        if gen.do_sample and gen.seed is not None and self.generator is None:
            self.generator = torch.Generator(device=logits.device).manual_seed(int(gen.seed))
        hist = torch.tensor([self.generated], dtype=torch.long, device=logits.device) if step else \
            torch.zeros(1, 0, dtype=torch.long, device=logits.device)
        scores = self.procs(hist, logits) if len(self.procs) else logits
        if self.eos_id is not None and step < gen.min_length:
            scores = scores.clone()
            scores[:, self.eos_id] = float("-inf")
        if gen.do_sample:
            nxt = torch.multinomial(torch.softmax(scores, dim=-1), 1, generator=self.generator).squeeze(1)
        else:
            nxt = scores.argmax(dim=-1)
        self.generated.append(int(nxt[0]))
        stopped = self.checker.should_stop(self.generated)
        finished = stopped or len(self.generated) >= gen.max_new_tokens
        # while it goes on, a tail that may still become a stop string is held back (decoding.partial_answer)
        answer = clean_answer if finished else partial_answer
        self.text = answer(self.tokenizer, self.generated, gen.stop_strings)
        self.handle._emit(Event("text", self.text, len(self.generated), self.prompt_tokens))
        if finished:
            self.finish("stop" if stopped else "length")
            return True
        return False

    def finish(self, reason: str) -> None:
        self.handle._emit(Event("done", self.text, len(self.generated), self.prompt_tokens, reason))


def _pad_left(t: torch.Tensor, length: int) -> torch.Tensor:
    """``t [B, H, L, D]`` (or a mask ``[B, L]``) with zeros prepended along the sequence to ``length``."""
    dim = -2 if t.ndim == 4 else -1
    missing = length - t.shape[dim]
    if missing <= 0:
        return t
    shape = list(t.shape)
    shape[dim] = missing
    return torch.cat([t.new_zeros(shape), t], dim=dim)


def _layers(cache) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(layer.keys, layer.values) for layer in cache.layers]


def _cache_of(layers: Sequence[tuple[torch.Tensor, torch.Tensor]]):
    """A fresh growing cache holding ``layers`` (one copy, into buffers with room to append)."""
    cache = new_kv_cache()
    for i, (k, v) in enumerate(layers):
        cache.update(k, v, i)
    return cache


class Scheduler:
    """Continuous batching of independent requests over ``chat``'s model; see the module docstring.

    ``max_batch`` bounds the sequences decoded together; more wait in arrival order. The model thread starts
    with the first request. A request may bring its own :class:`~.chat.Chat` over the same model (e.g. another
    system text).
    """

    def __init__(self, chat: Chat, *, max_batch: int = DEFAULT_MAX_BATCH) -> None:
        if max_batch < 1:
            raise ValueError(f"max_batch must be at least 1; got {max_batch}")
        self.chat = chat
        self.max_batch = max_batch
        self._cond = threading.Condition()
        self._waiting: list[_Request] = []
        self._closed = False
        self._thread: Optional[threading.Thread] = None
        # the batch: one sequence per row of the cache and the mask
        self._rows: list[_Seq] = []
        self._cache = None
        self._mask: Optional[torch.Tensor] = None
        self.stats = {"steps": 0, "rows_stepped": 0, "admitted": 0, "max_rows": 0}

    # ----------------------------------------------------------------- the submitter's side
    def submit(self, messages: Sequence[Message], images: Sequence = (), *, chat: Optional[Chat] = None,
               gen: Optional[GenerationConfig] = None, cancelled: Optional[threading.Event] = None,
               listener: Optional[Callable[[Event], None]] = None, **options) -> Handle:
        """Queue a conversation ending with a user message, with the images for its slots (paths, PIL images or
        ``[3, H, W]`` tensors, encoded when it is admitted). ``gen`` or ``options`` (``GenerationConfig``
        fields) set its decoding. ``listener`` receives its events on the model thread (keep it quick)."""
        engine = chat or self.chat
        if engine.model is not self.chat.model:
            raise ChatError("a request's chat must use the scheduler's model")
        gen = gen if gen is not None else engine.generation.updated(**options)
        if gen.num_beams > 1:
            raise ChatError("beam search is not batched; answer it with a ChatSession")
        handle = Handle(cancelled, listener)
        req = _Request(engine, list(messages), list(images), gen, handle)
        with self._cond:
            if self._closed:
                raise RuntimeError("the scheduler is closed")
            self._waiting.append(req)
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="sparkles-scheduler", daemon=True)
                self._thread.start()
            self._cond.notify()
        return handle

    def close(self) -> None:
        """Stop the model thread; requests still waiting or running end with ``cancelled``."""
        with self._cond:
            self._closed = True
            self._cond.notify()

    @property
    def running(self) -> int:
        return len(self._rows)

    @property
    def waiting(self) -> int:
        with self._cond:
            return len(self._waiting)

    # ----------------------------------------------------------------- the model thread
    def _run(self) -> None:
        with torch.no_grad():
            while True:
                with self._cond:
                    while not self._closed and not self._waiting and not self._rows:
                        self._cond.wait()
                    if self._closed:
                        leftovers, self._waiting = self._waiting, []
                        break
                    # drop those whose client left while waiting; take as many as fit in the batch
                    for req in [r for r in self._waiting if r.handle.cancelled.is_set()]:
                        self._waiting.remove(req)
                        req.handle._emit(Event("done", finish_reason="cancelled"))
                    room = self.max_batch - len(self._rows)
                    admitted, self._waiting = self._waiting[:room], self._waiting[room:]
                self._admit(admitted)
                self._drop_cancelled()
                if self._rows:
                    self._step()
        for req in leftovers:
            req.handle._emit(Event("done", finish_reason="cancelled"))
        for seq in self._rows:
            seq.finish("cancelled")
        self._rows, self._cache, self._mask = [], None, None

    def _admit(self, requests: list[_Request]) -> None:
        """Prepare and prefill each request alone, pick its first token, and join the survivors to the batch."""
        joining: list[tuple[_Seq, object]] = []
        for req in requests:
            if req.handle.cancelled.is_set():
                req.handle._emit(Event("done", finish_reason="cancelled"))
                continue
            try:
                seq, cache, logits = self._prefill(req)
                self.stats["admitted"] += 1
                req.handle._emit(Event("started", prompt_tokens=seq.prompt_tokens))
                if not seq.pick(logits):
                    joining.append((seq, cache))
            except Exception as exc:  # this request's own failure (bad conversation, image, ...): the rest go on
                if not isinstance(exc, (ChatError, ValueError)):
                    log.exception("a request failed while it was being admitted")
                req.handle._emit(Event("error", error=exc))
        if joining:
            self._join(joining)

    def _prefill(self, req: _Request):
        """Render, encode the images and prefill one request as ``ChatSession`` does (a fresh cache, batch 1)."""
        chat, gen, model = req.chat, req.gen, req.chat.model
        slots = sum(count_slots(m.content) for m in req.messages)
        if slots != len(req.images):
            raise ChatError(f"the conversation has {slots} image slot(s) but {len(req.images)} image(s) were "
                            "given; every image needs exactly one ✨/⭐ (or <Img><ImageHere></Img>)")
        if not req.messages or req.messages[-1].role != "user":
            raise ChatError("the conversation must end with a user message")
        context = chat.context(req.messages, gen)
        rendered, cut = context.rendered, context.cut
        if context.warning:
            log.warning(context.warning)
        images = [req.images[i] for i in rendered.image_indices]
        image_embeds = chat.encode_images(images, rendered.image_messages) if images else None
        ids = torch.tensor([rendered.input_ids], device=model.device)
        slot_mask = torch.tensor([rendered.image_slot_mask], device=model.device)
        embeds = model.embed_inputs(ids, slot_mask, image_embeds)[:, cut:]
        length = embeds.shape[1]
        mask = torch.ones(1, length, dtype=torch.long, device=embeds.device)
        positions = torch.arange(length, device=embeds.device)[None]
        cache = new_kv_cache()
        logits = forward_last(model.llama_model, inputs_embeds=embeds, attention_mask=mask, position_ids=positions,
                              cache=cache)
        return _Seq(req, length, length), cache, logits

    def _join(self, joining: list[tuple["_Seq", object]]) -> None:
        """Append prefilled sequences to the batch: left-pad every part to the longest, concatenate rows."""
        parts = [] if self._cache is None else [(_layers(self._cache), self._mask)]
        for seq, cache in joining:
            n = cache.get_seq_length()
            parts.append((_layers(cache), torch.ones(1, n, dtype=torch.long, device=self._device(cache))))
        length = max(mask.shape[1] for _, mask in parts)
        layers = []
        for i in range(len(parts[0][0])):
            keys = torch.cat([_pad_left(p[0][i][0], length) for p in parts], dim=0)
            values = torch.cat([_pad_left(p[0][i][1], length) for p in parts], dim=0)
            layers.append((keys, values))
        self._cache = _cache_of(layers)
        self._mask = torch.cat([_pad_left(mask, length) for _, mask in parts], dim=0)
        self._rows += [seq for seq, _ in joining]
        self.stats["max_rows"] = max(self.stats["max_rows"], len(self._rows))

    def _device(self, cache) -> torch.device:
        return self.chat.model.device if not cache.layers else cache.layers[0].keys.device

    def _leave(self, finished: set[int]) -> None:
        """Drop finished rows, and the left columns that are padding in every row that stays."""
        keep = [b for b in range(len(self._rows)) if b not in finished]
        if not keep:
            self._rows, self._cache, self._mask = [], None, None
            return
        mask = self._mask[keep]
        start = int(mask.any(dim=0).int().argmax())  # the first column some remaining row uses
        mask = mask[:, start:]
        layers = []
        for k, v in _layers(self._cache):
            index = torch.tensor(keep, device=k.device)
            layers.append((k.index_select(0, index)[:, :, start:], v.index_select(0, index)[:, :, start:]))
        self._cache = _cache_of(layers)
        self._mask = mask
        self._rows = [self._rows[b] for b in keep]

    def _drop_cancelled(self) -> None:
        gone = {b for b, seq in enumerate(self._rows) if seq.handle.cancelled.is_set()}
        for b in gone:
            self._rows[b].finish("cancelled")
        if gone:
            self._leave(gone)

    def _step(self) -> None:
        """One decode step for the whole batch; rows that finish leave it."""
        try:
            llm = self.chat.model.llama_model
            device = self._mask.device
            last = torch.tensor([seq.generated[-1] for seq in self._rows], dtype=torch.long, device=device)
            positions = torch.tensor([[seq.position] for seq in self._rows], dtype=torch.long, device=device)
            self._mask = torch.cat([self._mask, self._mask.new_ones(len(self._rows), 1)], dim=1)
            embeds = llm.get_input_embeddings()(last[:, None])
            logits = forward_last(llm, inputs_embeds=embeds, attention_mask=self._mask, position_ids=positions,
                                  cache=self._cache)
        except Exception as exc:  # the batch's state is unusable: every sequence in it fails
            log.exception("a batched decode step failed")
            for seq in self._rows:
                seq.handle._emit(Event("error", seq.text, len(seq.generated), seq.prompt_tokens, error=exc))
            self._rows, self._cache, self._mask = [], None, None
            return
        self.stats["steps"] += 1
        self.stats["rows_stepped"] += len(self._rows)
        finished = set()
        for b, seq in enumerate(self._rows):
            seq.position += 1
            try:
                if seq.pick(logits[b:b + 1]):
                    finished.add(b)
            except Exception as exc:  # e.g. a listener that failed: this row alone ends
                log.exception("picking a token failed")
                seq.handle._emit(Event("error", seq.text, len(seq.generated), seq.prompt_tokens, error=exc))
                finished.add(b)
        if finished:
            self._leave(finished)
