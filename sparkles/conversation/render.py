"""The one renderer: a conversation → ``input_ids``, an image-slot mask and ``labels``.

Training and inference share this code; they differ only in the :class:`~.template.Layout` (system text,
spacing) and in whether a target answer is given. Text is cut at image placeholders; each text run is
tokenised on its own (as upstream inference does), each image placeholder becomes one slot position per image
token (``SparklesChat.image_tokens``), and a target answer plus the end symbol is tokenised as its own run, so
the label mask follows segment boundaries instead of re-tokenising a prefix. Only the target carries loss,
less any character spans of it that the sample marks as unsupervised (a text-only drill's facts, which no
text determines): the tokens that overlap them keep their place in the input but carry no loss.

Over-long conversations never lose part of an image: whole earlier turns (a user message and its answer,
with their images) are dropped, and if the last turn alone does not fit, :class:`SampleTooLong` is raised.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Sequence

import torch

from ..common.tensors import IGNORE_INDEX
from .template import ASSISTANT, END_SYM, IMAGE_PLACEHOLDER, ROLE_NAMES, SEP, USER, Layout, count_slots, strip_slots


class SampleTooLong(ValueError):
    """Even the last turn alone exceeds ``max_length`` tokens."""


@dataclass(frozen=True)
class Message:
    role: str  # "user" | "assistant"
    content: str

    def __post_init__(self) -> None:
        if self.role not in (USER, ASSISTANT):
            raise ValueError(f"message role must be 'user' or 'assistant', got {self.role!r}")


@dataclass
class Rendered:
    """One rendered sequence (lists of python ints; see :func:`collate`)."""

    input_ids: list[int]
    image_slot_mask: list[bool]
    labels: list[int]
    image_indices: list[int]  # which of the conversation's images fill the slots, in order
    text: str  # prompt + target as one string (the upstream text layout)
    dropped_turns: int = 0
    # Identity of every position for prefix matching: token id, or -(1 + image*nq + j) for slot j of an image.
    keys: list[int] = field(default_factory=list)
    # The user message that shows each image, in slot order, without its image markup: what an
    # instruction-reading Q-Former reads with that image. Filled by Renderer.render (tokenize() knows no messages).
    image_messages: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.input_ids)

    @property
    def num_images(self) -> int:
        return len(self.image_indices)


def render_text(messages: Sequence[Message], layout: Layout, *, pending: bool = True) -> str:
    """The prompt string of ``messages`` in ``layout`` (ending with the pending assistant header)."""
    text = layout.system or ""
    for msg in messages:
        text += SEP + ROLE_NAMES[msg.role] + ": " + msg.content
    if pending:
        text += SEP + layout.pending_assistant
    return text


def _check_roles(messages: Sequence[Message]) -> None:
    for i, msg in enumerate(messages):
        want = USER if i % 2 == 0 else ASSISTANT
        if msg.role != want:
            raise ValueError(f"message {i} has role {msg.role!r}; conversations alternate user/assistant "
                             "starting with the user")


class Renderer:
    """Tokenises conversations for one tokenizer and slot width."""

    def __init__(self, tokenizer, tokens_per_image: int, *, end_sym: str = END_SYM) -> None:
        self.tokenizer = tokenizer
        self.nq = int(tokens_per_image)
        self.end_sym = end_sym
        self.bos_id = tokenizer.bos_token_id
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        # Slots hold a valid id (never an out-of-vocabulary placeholder); its embedding is overwritten.
        self.slot_filler_id = self.pad_id

    def encode(self, text: str) -> list[int]:
        if not text:
            return []
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def _encode_target(self, target: str, unsupervised: Sequence[tuple[int, int]]) -> tuple[list[int], list[bool]]:
        """The target's tokens and, per token, whether it carries loss (not when it overlaps an unsupervised span;
        the character offsets come from the fast tokenizer, so the ids are those of :meth:`encode`)."""
        if not unsupervised:
            toks = self.encode(target)
            return toks, [True] * len(toks)
        for start, end in unsupervised:
            if not 0 <= start < end <= len(target):
                raise ValueError(f"unsupervised span [{start}, {end}) is not inside the {len(target)}-character target")
        if not getattr(self.tokenizer, "is_fast", False):
            raise ValueError("unsupervised target spans need a fast tokenizer (character offsets); "
                             f"{type(self.tokenizer).__name__} is not one")
        enc = self.tokenizer(target, add_special_tokens=False, return_offsets_mapping=True)
        supervised = [not any(a < end and start < b for start, end in unsupervised) for a, b in enc["offset_mapping"]]
        return list(enc["input_ids"]), supervised

    def tokenize(self, prompt: str, target: Optional[str] = None, *, image_offset: int = 0,
                 add_bos: bool = True, unsupervised: Sequence[tuple[int, int]] = ()) -> Rendered:
        """Tokenise a prompt string with image placeholders, and optionally a target (loss) string; the target's
        tokens that overlap a ``[start, end)`` character span of ``unsupervised`` carry no loss."""
        ids: list[int] = []
        mask: list[bool] = []
        keys: list[int] = []
        if add_bos and self.bos_id is not None:
            ids.append(self.bos_id), mask.append(False), keys.append(self.bos_id)
        pieces = prompt.split(IMAGE_PLACEHOLDER)
        if target is not None:
            # The space after "Assistant:" belongs to the answer's first word (SentencePiece-style prefix).
            pieces[-1] = pieces[-1].rstrip(" ")
        for k, piece in enumerate(pieces):
            if k > 0:
                image = image_offset + k - 1
                ids.extend([self.slot_filler_id] * self.nq)
                mask.extend([True] * self.nq)
                keys.extend(-(1 + image * self.nq + j) for j in range(self.nq))
            toks = self.encode(piece)
            ids.extend(toks), mask.extend([False] * len(toks)), keys.extend(toks)
        labels = [IGNORE_INDEX] * len(ids)
        text = prompt
        if target is not None:
            if IMAGE_PLACEHOLDER in target:
                raise ValueError("a target answer cannot contain an image slot")
            toks, supervised = self._encode_target(target, unsupervised)
            if not toks:
                raise ValueError("empty target answer")
            ids.extend(toks), mask.extend([False] * len(toks)), keys.extend(toks)
            labels.extend(t if keep else IGNORE_INDEX for t, keep in zip(toks, supervised))
            text = prompt + target
        n_img = len(pieces) - 1
        return Rendered(ids, mask, labels, list(range(image_offset, image_offset + n_img)), text, 0, keys)

    def render(self, messages: Sequence[Message], layout: Layout, *, target: Optional[str] = None,
               max_length: Optional[int] = None, unsupervised: Sequence[tuple[int, int]] = ()) -> Rendered:
        """Render ``messages`` (ending with a user message) for ``layout``.

        With ``target`` (training), the answer plus the end symbol is appended and carries the loss, except on
        the ``unsupervised`` character spans of ``target``. Without it (generation), the sequence ends with the
        pending assistant header. Earlier whole turns are dropped to fit ``max_length``; their images are dropped
        with them.
        """
        messages = list(messages)
        _check_roles(messages)
        if not messages or messages[-1].role != USER:
            raise ValueError("the conversation must end with a user message")
        slots_per_msg = [count_slots(m.content) for m in messages]
        full_target = None if target is None else target + self.end_sym
        dropped = 0
        while True:
            first_image = sum(slots_per_msg[: 2 * dropped])
            kept = messages[2 * dropped:]
            # System text survives truncation: it is the layout's, not a turn's.
            prompt = render_text(kept, layout)
            out = self.tokenize(prompt, full_target, image_offset=first_image, unsupervised=unsupervised)
            if max_length is None or len(out) <= max_length:
                out.dropped_turns = dropped
                out.image_messages = [strip_slots(m.content) for m, n in zip(kept, slots_per_msg[2 * dropped:])
                                      for _ in range(n)]
                return out
            if len(kept) <= 1:
                raise SampleTooLong(f"the last turn alone needs {len(out)} tokens, more than max_length="
                                    f"{max_length}")
            dropped += 1


def collate(batch: Sequence[Rendered], *, pad_id: int, padding_side: str = "right") -> dict[str, torch.Tensor]:
    """Pad to the longest sequence: ``input_ids``, ``attention_mask``, ``image_slot_mask``, ``labels``."""
    if padding_side not in ("left", "right"):
        raise ValueError("padding_side must be 'left' or 'right'")
    width = max(len(r) for r in batch)
    out = {k: [] for k in ("input_ids", "attention_mask", "image_slot_mask", "labels")}
    for r in batch:
        pad = width - len(r)
        rows = (r.input_ids, [1] * len(r), r.image_slot_mask, r.labels)
        fills = (pad_id, 0, False, IGNORE_INDEX)
        for key, row, fill in zip(out, rows, fills):
            out[key].append(row + [fill] * pad if padding_side == "right" else [fill] * pad + row)
    return {
        "input_ids": torch.tensor(out["input_ids"], dtype=torch.long),
        "attention_mask": torch.tensor(out["attention_mask"], dtype=torch.long),
        "image_slot_mask": torch.tensor(out["image_slot_mask"], dtype=torch.bool),
        "labels": torch.tensor(out["labels"], dtype=torch.long),
    }
