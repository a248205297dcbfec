"""The conversation template as data: roles, separators, image markers, system text, layouts.

SparklesChat follows the MiniGPT-4 v0 ("SINGLE") template::

    <system>###Human: <user text>###Assistant: <answer>###Human: ...###Assistant:

Upstream trains *without* the system text and with ``###Assistant: `` (trailing space) before the target,
and infers *with* the system text and ``###Assistant:`` (no space). Both are :class:`Layout` values of the
one renderer; the released weights expect exactly this pairing.

An image occupies a slot written ``<Img><ImageHere></Img>`` in text; datasets name images
``IMAGE#<id>`` right before their slot. The demo lets users type ✨ or ⭐ for a slot.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Optional

SEP = "###"
END_SYM = "###"  # appended to every training target; generation stops on it
USER, ASSISTANT = "user", "assistant"
ROLE_NAMES = {USER: "Human", ASSISTANT: "Assistant"}
IMAGE_PLACEHOLDER = "<ImageHere>"
IMAGE_MARKER = "<Img><ImageHere></Img>"
IMAGE_GLYPHS = ("✨", "⭐")

# The upstream model was tuned under MiniGPT-4's v0 system message, which opens with
# "Give the following image: <Img>ImageContent</Img>." and then tells the assistant it will see the image
# and should answer. This is our own wording of that message; set ``model.system_text`` to the exact
# MiniGPT-4 v0 text to reproduce the paper's inference prompt token for token.
DEFAULT_SYSTEM_TEXT = (
    "Give the following image: <Img>ImageContent</Img>. "
    "Once I share an image you can look at it; reply to what I ask about it."
)


@dataclass(frozen=True)
class Layout:
    """How a conversation is laid out as text.

    ``system``: text placed before the first separator (``None`` = none).
    ``pending_assistant``: what follows the last user message when the assistant is to speak.
    """

    system: Optional[str]
    pending_assistant: str

    def with_system(self, system: Optional[str]) -> "Layout":
        return Layout(system=system, pending_assistant=self.pending_assistant)


TRAIN_LAYOUT = Layout(system=None, pending_assistant=ROLE_NAMES[ASSISTANT] + ": ")
INFER_LAYOUT = Layout(system=DEFAULT_SYSTEM_TEXT, pending_assistant=ROLE_NAMES[ASSISTANT] + ":")


def replace_glyphs(text: str) -> str:
    """Turn every ✨ / ⭐ typed by a user into an image slot marker."""
    for glyph in IMAGE_GLYPHS:
        text = text.replace(glyph, IMAGE_MARKER)
    return text


def count_slots(text: str) -> int:
    return text.count(IMAGE_PLACEHOLDER)


def count_glyphs(text: str) -> int:
    return sum(text.count(g) for g in IMAGE_GLYPHS)


def strip_slots(text: str) -> str:
    """Remove slot markers (``IMAGE#id`` mentions stay), e.g. for judge prompts and statistics."""
    return text.replace(IMAGE_MARKER, "").replace(IMAGE_PLACEHOLDER, "")


_TURN_SPLIT = re.compile(r"###(Human|Assistant): ?")


def parse_upstream_instruction(instruction: str) -> list[tuple[str, str]]:
    """Split an upstream training ``instruction`` (``###Human: q###Assistant: a...###Assistant: ``)
    into ``[(role, content), ...]`` for the messages before the target answer."""
    if not instruction.startswith("###Human:"):
        raise ValueError("instruction does not start with '###Human:'")
    parts = _TURN_SPLIT.split(instruction)
    # parts = ['', 'Human', q1, 'Assistant', a1, ..., 'Assistant', '']
    messages: list[tuple[str, str]] = []
    for i in range(1, len(parts), 2):
        role = USER if parts[i] == "Human" else ASSISTANT
        messages.append((role, parts[i + 1]))
    if not messages or messages[-1] != (ASSISTANT, ""):
        raise ValueError("instruction does not end with the pending '###Assistant: '")
    return messages[:-1]
