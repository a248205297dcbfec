"""lmms-eval's chat messages and the project's questions, both ways, with every image at its slot.

lmms-eval gives a chat-style model the messages a task builds (``doc_to_messages``): a list of
``{"role", "content": [parts]}`` whose parts are ``{"type": "text", "text"}`` or ``{"type": "image", "url"}`` (a
path or a PIL image). SparklesChat reads one text per message with an image slot marker where each image stands.

- :func:`user_message` writes a question of the project's benchmarks (a prompt with slot markers and its images)
  as one user message. In the ``slots`` layout every slot marker becomes an image part at its place, so
  ``IMAGE#1`` is directly followed by its image, as the model was trained. ``images_first`` is the layout of
  lmms-eval's stock tasks (all images, then the text) and ``text_first`` the reverse; both drop the slot markers
  and keep the ``IMAGE#k`` names. They exist to measure what the layout does (docs/lmms_eval.md).
- :func:`to_turns` reads any task's messages back into the project's form exactly as the API server reads the
  same messages sent as ``image_url`` parts: a message's text parts are joined, each image part is one slot
  marker where it stands, consecutive messages of one role are joined with a newline. With ``image_tokens`` a
  user message laid out as the stock tasks lay it out (its images before its text) whose text names each image
  with an ``<image>`` token gets its slots at those tokens instead.

Nothing here imports lmms-eval, torch or the model.
"""

from __future__ import annotations

from typing import Any, Sequence

from ..conversation.template import ASSISTANT, IMAGE_MARKER, USER, replace_glyphs, strip_slots

LAYOUTS = ("slots", "images_first", "text_first")
IMAGE_TOKEN = "<image>"  # how interleaved prompts of lmms-eval's stock tasks name an image inside the text


class MessageError(ValueError):
    """Messages SparklesChat cannot read (a role or a part it does not take); the message says which."""


def text_part(text: str) -> dict:
    return {"type": "text", "text": text}


def image_part(image: Any) -> dict:
    return {"type": "image", "url": image}


def user_message(prompt: str, images: Sequence[Any], layout: str = "slots") -> dict:
    """One user message holding ``prompt`` (slot markers where its images go) and ``images``, in ``layout``."""
    if layout not in LAYOUTS:
        raise ValueError(f"unknown layout {layout!r}; choose one of {', '.join(LAYOUTS)}")
    prompt = replace_glyphs(prompt)  # a typed ✨ is a slot too, as the chat engine reads it
    pieces = prompt.split(IMAGE_MARKER)
    if len(pieces) - 1 != len(images):
        raise MessageError(f"the prompt has {len(pieces) - 1} image slot(s) but {len(images)} image(s) are given")
    if layout == "images_first":
        parts = [image_part(image) for image in images] + [text_part(strip_slots(prompt))]
    elif layout == "text_first":
        parts = [text_part(strip_slots(prompt))] + [image_part(image) for image in images]
    else:
        parts = []
        for k, piece in enumerate(pieces):
            if k > 0:
                parts.append(image_part(images[k - 1]))
            if piece:
                parts.append(text_part(piece))
    return {"role": USER, "content": parts}


def assistant_message(text: str) -> dict:
    return {"role": ASSISTANT, "content": [text_part(text)]}


def _parts(message: Any, where: str) -> list:
    content = message.get("content") if isinstance(message, dict) else None
    if isinstance(content, str):
        return [text_part(content)]
    if not isinstance(content, list):
        raise MessageError(f"{where}: content must be a string or a list of parts")
    return content


def _text_with_slots(parts: list, role: str, where: str, image_tokens: bool) -> tuple[str, list]:
    """A message's text (a slot marker per image part, in place) and its images, in order."""
    pieces, images = [], []
    for j, part in enumerate(parts):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text":
            pieces.append(str(part.get("text") or ""))
        elif kind == "image":
            if role != USER:
                raise MessageError(f"{where}[{j}]: only user messages may hold images")
            pieces.append(IMAGE_MARKER)
            images.append(part.get("url"))
        else:
            raise MessageError(f"{where}[{j}]: SparklesChat reads text and image parts, not {kind!r} parts")
    leading = next((k for k, piece in enumerate(pieces) if piece != IMAGE_MARKER), len(pieces))
    rest = "".join(pieces[leading:])
    if image_tokens and images and leading == len(images) and rest.count(IMAGE_TOKEN) == len(images):
        return rest.replace(IMAGE_TOKEN, IMAGE_MARKER), images
    return "".join(pieces), images


def to_turns(messages: Sequence[Any], *, image_tokens: bool = True,
             where: str = "messages") -> tuple[list[tuple[str, str]], list]:
    """``([(role, text with slot markers)], images in slot order)`` of a conversation that starts and ends with
    the user; see the module docstring. A system message is refused: the model's own system text applies."""
    turns: list[tuple[str, str]] = []
    images: list = []
    for i, message in enumerate(messages):
        role = message.get("role") if isinstance(message, dict) else None
        if role not in (USER, ASSISTANT):
            raise MessageError(f"{where}[{i}]: role {role!r} is not taken; SparklesChat reads user and assistant "
                               "messages under its own system text")
        text, own = _text_with_slots(_parts(message, f"{where}[{i}].content"), role, f"{where}[{i}].content",
                                     image_tokens)
        images.extend(own)
        if turns and turns[-1][0] == role:  # the template alternates, as the server joins them
            turns[-1] = (role, turns[-1][1] + "\n" + text)
        else:
            turns.append((role, text))
    if not turns or turns[0][0] != USER or turns[-1][0] != USER:
        raise MessageError(f"{where}: the conversation must start and end with a user message")
    return turns, images
