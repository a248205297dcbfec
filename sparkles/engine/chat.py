"""The chat engine: multi-image, multi-turn conversations with SparklesChat.

Images are encoded once, when added; with a Q-Former that reads each image's message (``reads_messages``) the
vision tower runs when the image is added and the Q-Former when the message that shows it is first answered.
Each turn renders the whole conversation with the shared renderer, finds the longest prefix that the decoder's
KV cache already holds, crops the cache there and runs only the rest, so a new turn costs its new tokens, not
the whole history — and yields exactly the tokens a full re-prefill would. :mod:`.batch` answers many
independent prompts at once.

    chat = Chat(model, image_processor)
    s = chat.session()
    s.add_image("a.jpg"); s.add_image("b.jpg")
    s.ask("Compare IMAGE#1✨ with IMAGE#2✨.")
    print(s.answer(max_new_tokens=200))
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Iterator, Optional, Sequence

import torch

from ..conversation.render import Message, Rendered, Renderer, SampleTooLong
from ..conversation.template import (ASSISTANT, END_SYM, IMAGE_MARKER, INFER_LAYOUT, USER, Layout, count_slots,
                                     replace_glyphs)
from .decoding import GenerationConfig, beam_search, clean_answer, decode_tokens, partial_answer
from .kv_cache import new_kv_cache

log = logging.getLogger(__name__)


class ChatError(ValueError):
    """A request the engine cannot serve (e.g. more image slots than images)."""


class ContextTooLong(ChatError):
    """The last message alone does not fit in the context (``overflow="drop_turns"``)."""


@dataclass
class Context:
    """A conversation rendered for the decoder: what it sees, and what was left out to make it fit."""

    rendered: Rendered
    cut: int = 0  # positions cut from the left (overflow="truncate_left")
    warning: Optional[str] = None

    @property
    def text(self) -> str:
        """The decoder's input as text, image slots written as markers (before any left cut)."""
        return self.rendered.text


def _layout_for(model, layout: Optional[Layout]) -> Layout:
    if layout is not None:
        return layout
    system = getattr(getattr(model, "cfg", None), "system_text", None)
    return INFER_LAYOUT if system is None else INFER_LAYOUT.with_system(system)


CHAT_MODES = ("sparkles", "minigpt4")


class Chat:
    """Shared, stateless parts: model, tokenizer, renderer, image transform, default settings.

    ``chat_mode``: ``sparkles`` — the user places every image with a slot (✨/⭐); ``minigpt4`` — the original
    single-image chat of MiniGPT-4: the one image goes into a slot placed before the first user message.
    """

    def __init__(self, model, image_processor=None, *, tokenizer=None, layout: Optional[Layout] = None,
                 generation: Optional[GenerationConfig] = None, reuse_cache: bool = True,
                 chat_mode: str = "sparkles") -> None:
        if chat_mode not in CHAT_MODES:
            raise ChatError(f"chat_mode must be one of {', '.join(CHAT_MODES)}, got {chat_mode!r}")
        self.chat_mode = chat_mode
        self.model = model
        self.tokenizer = tokenizer if tokenizer is not None else model.tokenizer
        if self.tokenizer is None:
            raise ChatError("the model has no tokenizer attached; pass tokenizer=...")
        self.image_processor = image_processor
        self.layout = _layout_for(model, layout)
        self.renderer = Renderer(self.tokenizer, model.image_tokens, end_sym=END_SYM)
        self.generation = generation or GenerationConfig()
        # False re-runs the whole history through the decoder every turn (the upstream way; for comparisons).
        self.reuse_cache = reuse_cache

    def session(self) -> "ChatSession":
        return ChatSession(self)

    def context(self, messages: Sequence[Message], gen: GenerationConfig) -> Context:
        """Render ``messages`` (ending with a user message) within ``gen.max_length - gen.max_new_tokens``
        positions, by ``gen.overflow``: whole earlier turns dropped, or the start cut off as the original did.
        A conversation whose last turn alone does not fit under ``drop_turns`` is a :class:`ContextTooLong`."""
        budget = gen.max_length - gen.max_new_tokens
        if budget <= 0:
            raise ChatError(f"max_length={gen.max_length} leaves no room for the context "
                            f"(max_new_tokens={gen.max_new_tokens})")
        if gen.overflow == "truncate_left":
            rendered = self.renderer.render(messages, self.layout)
            cut = max(0, len(rendered) - budget)
            warning = None if not cut else (
                f"The context needs {len(rendered)} positions but max_length={gen.max_length} leaves {budget} "
                f"besides the answer; its first {cut} positions were cut off (left truncation, as the original).")
            return Context(rendered, cut, warning)
        try:
            rendered = self.renderer.render(messages, self.layout, max_length=budget)
        except SampleTooLong as exc:
            raise ContextTooLong(f"the last message does not fit in the context ({exc}, the context's share of "
                            f"max_length={gen.max_length} besides max_new_tokens={gen.max_new_tokens})") from None
        warning = None if not rendered.dropped_turns else (
            f"The conversation is longer than the model's context; the oldest {rendered.dropped_turns} turn(s) "
            "and their images were left out.")
        return Context(rendered, 0, warning)

    @property
    def reads_messages(self) -> bool:
        """The model encodes each image together with the user message that shows it."""
        return bool(getattr(self.model, "reads_messages", False))

    def pixels_of(self, images: Sequence) -> torch.Tensor:
        """Paths / PIL images / ``[3, H, W]`` tensors → ``[N, 3, H, W]`` on the model's device."""
        pixels = []
        for image in images:
            if isinstance(image, torch.Tensor):
                pixels.append(image if image.ndim == 3 else image[0])
            else:
                if self.image_processor is None:
                    raise ChatError("no image processor configured; pass image tensors or image_processor=...")
                pixels.append(self.image_processor(image))
        return torch.stack(pixels).to(self.model.device)

    @torch.no_grad()
    def encode_image(self, image, message: Optional[str] = None) -> torch.Tensor:
        """Path / PIL image / ``[3, H, W]`` tensor (and the message that shows it) → ``[nq, D]`` image tokens."""
        return self.encode_images([image], None if message is None else [message])[0]

    @torch.no_grad()
    def encode_images(self, images: Sequence, messages: Optional[Sequence[str]] = None) -> torch.Tensor:
        """Encode several images in one pass of the vision tower; ``messages`` (one per image) are what a
        message-reading Q-Former reads with them (ignored by other models)."""
        if not images:
            return torch.zeros(0, self.model.image_tokens, self.model.llama_model.config.hidden_size,
                               device=self.model.device)
        return self.model.encode_images(self.pixels_of(images), messages if self.reads_messages else None)


@dataclass
class _CacheState:
    cache: object  # transformers DynamicCache (sparkles.engine.kv_cache layers)
    keys: list[int]  # identity of each cached position (token id or negative slot key)


class ChatSession:
    """One conversation: its messages, its images' embeddings and the decoder's KV cache."""

    def __init__(self, chat: Chat) -> None:
        self.chat = chat
        self.messages: list[Message] = []
        # decoder-space tokens per image (upload order); for a model that reads messages None until the message
        # that shows the image is answered, and the vision tokens and that message are kept beside them
        self.image_embeds: list[Optional[torch.Tensor]] = []
        self._vision: dict[int, torch.Tensor] = {}
        self._read_with: dict[int, str] = {}
        self.last_warning: Optional[str] = None
        self.last_context: Optional[Context] = None  # what the decoder saw for the last answer
        self._state: Optional[_CacheState] = None
        self.stats = {"prefill_tokens": 0, "reused_tokens": 0}

    # ----------------------------------------------------------------- building the conversation
    def add_image(self, image) -> int:
        """Encode an image now and keep its tokens; returns its 1-based number (upload order)."""
        return self.add_images([image])

    @torch.no_grad()
    def add_images(self, images: Sequence) -> int:
        """Encode several images in one vision pass; returns the number of the last one (0 if none)."""
        if not images:
            return len(self.image_embeds)
        if self.chat.reads_messages:
            vision = self.chat.model.vision_tokens(self.chat.pixels_of(images))
            for tokens in vision:
                self._vision[len(self.image_embeds)] = tokens
                self.image_embeds.append(None)
        else:
            self.image_embeds.extend(self.chat.encode_images(images).unbind(0))
        return len(self.image_embeds)

    @torch.no_grad()
    def _encode_pending(self, rendered) -> None:
        """Run the Q-Former on the images of ``rendered`` not yet read with the message that now shows them."""
        if not self.chat.reads_messages:
            return
        pending = [(i, m) for i, m in zip(rendered.image_indices, rendered.image_messages)
                   if self.image_embeds[i] is None or self._read_with.get(i) != m]
        if not pending:
            return
        if any(self.image_embeds[i] is not None for i, _ in pending):
            self._state = None  # a message was replaced (an interrupted turn asked again): its images change
        model = self.chat.model
        tokens = model.project(model.query_features(torch.stack([self._vision[i] for i, _ in pending]),
                                                    [m for _, m in pending]))
        for (i, m), t in zip(pending, tokens):
            self.image_embeds[i], self._read_with[i] = t, m

    def ask(self, text: str) -> None:
        """Add a user message; ✨/⭐ become image slots (filled by images in upload order)."""
        text = replace_glyphs(text)
        if self.messages and self.messages[-1].role == USER:
            raise ChatError("the previous question has not been answered yet")
        if self.chat.chat_mode == "minigpt4" and not self.messages and self.image_embeds and not count_slots(text):
            if len(self.image_embeds) > 1:
                raise ChatError("the MiniGPT-4 chat shows one image; start a new conversation for another")
            text = IMAGE_MARKER + " " + text  # the original joined the image message and the question with a space
        self.messages.append(Message(USER, text))

    def add_exchange(self, question: str, answer: str) -> None:
        """Add an earlier turn as it happened: a user message and the assistant's answer (e.g. a stored dialogue
        replayed, or a client that sends the whole history)."""
        self.ask(question)
        self.messages.append(Message(ASSISTANT, answer))

    def reset(self) -> None:
        self.messages.clear()
        self.image_embeds.clear()
        self._vision.clear()
        self._read_with.clear()
        self._state = None
        self.last_warning = None
        self.last_context = None

    @property
    def num_slots(self) -> int:
        return sum(count_slots(m.content) for m in self.messages)

    # ----------------------------------------------------------------- answering
    def answer(self, **options) -> str:
        text = ""
        for text in self._run(options):
            pass
        return text

    def stream(self, **options) -> Iterator[str]:
        """Yield the answer text so far after every new token, then the final text if it differs; the final text
        is stored. Each text is a prefix of the next and never ends in a piece of a stop string
        (:func:`~.decoding.partial_answer`)."""
        yield from self._run(options)

    def _run(self, options: dict) -> Iterator[str]:
        if not self.messages or self.messages[-1].role != USER:
            raise ChatError("ask a question before asking for an answer")
        gen = self.chat.generation.updated(**options)
        slots = self.num_slots
        if slots != len(self.image_embeds):
            raise ChatError(f"the conversation has {slots} image slot(s) but {len(self.image_embeds)} image(s) "
                            "were added; every image needs exactly one ✨/⭐ (or <Img><ImageHere></Img>)")
        context = self.chat.context(self.messages, gen)
        rendered, cut = context.rendered, context.cut
        self.last_context = context
        self.last_warning = context.warning
        if context.warning:
            log.warning(context.warning)
        model, tok = self.chat.model, self.chat.tokenizer
        self._encode_pending(rendered)
        images = torch.stack([self.image_embeds[i] for i in rendered.image_indices]) if rendered.image_indices \
            else None

        if gen.num_beams > 1 or cut:  # beam search / a cut context: full prefill, no cache kept
            self._state = None
            embeds = self._embed(rendered, images, 0)[:, cut:]
        if gen.num_beams > 1:  # transformers' beam search
            mask = torch.ones(1, embeds.shape[1], dtype=torch.long, device=embeds.device)
            new = beam_search(model.llama_model, inputs_embeds=embeds, attention_mask=mask, gen=gen, tokenizer=tok)[0]
            text = clean_answer(tok, new, gen.stop_strings)
            self.messages.append(Message(ASSISTANT, text))
            yield text
            return

        keys = rendered.keys[cut:]
        reuse = 0
        if self._state is not None and not rendered.dropped_turns and self.chat.reuse_cache:
            old = self._state.keys
            limit = min(len(old), len(keys) - 1)  # always run at least one new position
            while reuse < limit and old[reuse] == keys[reuse]:
                reuse += 1
        if reuse and self._state is not None:
            cache = self._state.cache
            surplus = cache.get_seq_length() - reuse
            if surplus > 0:
                cache.crop(-surplus)  # negative = drop that many (accepted by old and new transformers)
        else:
            cache, reuse = new_kv_cache(), 0
        self.stats["prefill_tokens"] += len(keys) - reuse
        self.stats["reused_tokens"] += reuse
        if not cut:
            embeds = self._embed(rendered, images, reuse)
        mask = torch.ones(1, embeds.shape[1], dtype=torch.long, device=embeds.device)
        fed: list[list[int]] = [[]]
        generated: list[int] = []
        shown = ""
        self._state = _CacheState(cache, list(keys))
        try:
            for tok_id in decode_tokens(model.llama_model, inputs_embeds=embeds, attention_mask=mask, gen=gen,
                                        tokenizer=tok, past_key_values=cache, fed_tokens=fed):
                generated.append(int(tok_id[0]))
                shown = partial_answer(tok, generated, gen.stop_strings)
                yield shown
        except Exception:
            self._state = None  # a forward that failed half-way may have grown some layers' cache and not others
            raise
        self._state.keys = list(keys) + fed[0]
        text = clean_answer(tok, generated, gen.stop_strings)
        self.messages.append(Message(ASSISTANT, text))
        if text != shown:  # a tail held back in case it became a stop string, released at the end
            yield text

    @torch.no_grad()
    def _embed(self, rendered, images, start: int) -> torch.Tensor:
        """Embeddings of positions ``start:`` of ``rendered`` (image slots filled)."""
        model = self.chat.model
        ids = torch.tensor([rendered.input_ids], device=model.device)
        mask = torch.tensor([rendered.image_slot_mask], device=model.device)
        embeds = model.embed_inputs(ids, mask, images)
        return embeds[:, start:]
