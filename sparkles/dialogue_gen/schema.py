"""Shared format facts for SparklesDialogue records: the image slot marker and the training template strings.

A user message refers to an image as ``IMAGE#<id>`` immediately followed by the slot marker; the k-th slot
in reading order takes the k-th entry of the message's ``images``. Training instructions use the upstream
single-turn template ``###Human: <question>###Assistant: `` (no space before the second ``###``, one after).
"""

from __future__ import annotations

from typing import Any

from ..conversation.template import ASSISTANT, ROLE_NAMES, SEP, TRAIN_LAYOUT, USER
from ..conversation.template import IMAGE_MARKER as IMAGE_SLOT  # noqa: F401  (re-exported for this package)
from ..conversation.template import count_slots, strip_slots  # noqa: F401  (re-exported for this package)

# The training layout's strings, from the one template module.
HUMAN_PREFIX = SEP + ROLE_NAMES[USER] + ": "
ASSISTANT_PREFIX = SEP + TRAIN_LAYOUT.pending_assistant
ROLES = (USER, ASSISTANT, USER, ASSISTANT)


def check_dialogue_record(record: Any, where: str) -> None:
    """Raise ``ValueError`` naming ``where`` (file/record) and the field when a dialogue record is malformed."""
    if not isinstance(record, dict) or not isinstance(record.get("dialogue"), list):
        raise ValueError(f"{where}: expected an object with a 'dialogue' list")
    msgs = record["dialogue"]
    if len(msgs) != 4:
        raise ValueError(f"{where}: 'dialogue' has {len(msgs)} messages, expected 4")
    for i, (msg, role) in enumerate(zip(msgs, ROLES)):
        if not isinstance(msg, dict) or msg.get("role") != role:
            raise ValueError(f"{where}: dialogue[{i}].role should be {role!r}")
        if not isinstance(msg.get("content"), str):
            raise ValueError(f"{where}: dialogue[{i}].content is missing or not text")
        if role == "user":
            images = msg.get("images")
            if not isinstance(images, list) or not images:
                raise ValueError(f"{where}: dialogue[{i}].images is missing or empty")
            for j, img in enumerate(images):
                if not isinstance(img, dict) or "image_id" not in img or "caption" not in img:
                    raise ValueError(f"{where}: dialogue[{i}].images[{j}] needs 'image_id' and 'caption'")
            if count_slots(msg["content"]) != len(images):
                raise ValueError(f"{where}: dialogue[{i}].content has {count_slots(msg['content'])} image slots "
                                 f"but {len(images)} images")
