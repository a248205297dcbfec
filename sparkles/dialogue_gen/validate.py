"""Validation of one generated conversation (the original's rules, with its gaps closed).

A conversation is accepted when: it has four messages in the order user, assistant, user, assistant with
non-empty text; each user message lists image ids; the second user message brings exactly one image that
the first did not use — for every conversation of a reply, the first included (upstream skipped index 0);
every id is one of the candidates offered in that call; slot markers are inserted after the first whole-word
mention of each id when GPT wrote none; the slot count equals the id count; and the images are ordered by
where their slots appear. The first turn's image count differing from the one asked for is a warning (as
upstream), or a rejection with ``strict_first_turn``.

The result is a released-format dialogue: user messages carry ``images`` = ``[{image_id, caption}]`` with the
candidate's own id type (CC strings, VG integers).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Mapping

from .schema import IMAGE_SLOT, ROLES, count_slots

REJECT_REASONS = (
    "unparseable_reply", "unparseable_dialogue", "truncated", "wrong_message_count", "bad_role", "empty_content",
    "missing_image_ids", "duplicate_image_id", "first_turn_image_count", "second_turn_image_count",
    "second_turn_image_reused", "unknown_image_id", "slot_count_mismatch", "slot_id_mismatch",
)


class Rejected(ValueError):
    """A conversation failed validation; ``reason`` is one of ``REJECT_REASONS``."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


@dataclass
class Accepted:
    dialogue: list[dict]
    warnings: list[str] = field(default_factory=list)


def _ids(value: Any, where: str) -> list[str]:
    if isinstance(value, (str, int)):
        value = [v for v in str(value).split(",")]
    if not isinstance(value, list):
        raise Rejected("missing_image_ids", f"{where}: image_ids is {type(value).__name__}, not a list")
    ids = []
    for v in value:
        s = str(v).strip().strip("\"'").strip()
        if s.upper().startswith("IMAGE#"):
            s = s[6:]
        if s:
            ids.append(s)
    if not ids:
        raise Rejected("missing_image_ids", f"{where}: no image ids")
    if len(set(ids)) != len(ids):
        raise Rejected("duplicate_image_id", f"{where}: image ids repeat: {ids}")
    return ids


def insert_slots(content: str, ids: list[str]) -> str:
    """Put a slot marker right after the first mention of each id: ``IMAGE#<id>`` if present, otherwise the
    id as a whole word (so id 14 never matches inside 1417). Ids that are not mentioned get no slot."""
    for iid in ids:
        esc = re.escape(iid)
        m = (re.search(rf"IMAGE#{esc}(?![\w])", content, flags=re.IGNORECASE)
             or re.search(rf"(?<![\w]){esc}(?![\w])", content))
        if m:
            content = content[:m.end()] + IMAGE_SLOT + content[m.end():]
    return content


def order_by_slots(content: str, ids: list[str], where: str) -> list[str]:
    """Ids sorted by the position of ``<id><slot>`` in the text (image order = order of appearance)."""
    positions = {}
    for iid in ids:
        m = re.search(rf"(?<![\w]){re.escape(iid)}{re.escape(IMAGE_SLOT)}", content)
        if not m:
            raise Rejected("slot_id_mismatch", f"{where}: no slot marker right after image id {iid}")
        positions[iid] = m.start()
    return sorted(ids, key=positions.__getitem__)


def validate_dialogue(messages: Any, candidates: Mapping[str, dict], *, first_turn_images: int | None = None,
                      strict_first_turn: bool = False) -> Accepted:
    """Check one parsed conversation against the candidates of its call; raise ``Rejected`` or return it.

    ``candidates``: str(image_id) → ``{"image_id", "caption"}`` for the images offered in that call.
    """
    if not isinstance(messages, list) or len(messages) != 4:
        n = len(messages) if isinstance(messages, list) else type(messages).__name__
        raise Rejected("wrong_message_count", f"expected 4 messages, got {n}")
    warnings: list[str] = []
    out: list[dict] = []
    user_ids: list[list[str]] = []
    for i, (msg, role) in enumerate(zip(messages, ROLES)):
        where = f"message {i}"
        if not isinstance(msg, dict) or str(msg.get("role", "")).strip().lower() != role:
            got = msg.get("role") if isinstance(msg, dict) else type(msg).__name__
            raise Rejected("bad_role", f"{where}: role should be {role!r}, got {got!r}")
        content = msg.get("content", msg.get("caption"))  # 'caption' is a substitute GPT sometimes uses
        if not isinstance(content, str) or not content.strip() or content.strip() == "...":
            raise Rejected("empty_content", f"{where}: content is missing or empty")
        content = content.strip()
        if role == "assistant":
            out.append({"role": "assistant", "content": content})
            continue
        if "image_ids" not in msg:
            raise Rejected("missing_image_ids", f"{where}: no image_ids field")
        ids = _ids(msg["image_ids"], where)
        user_ids.append(ids)
        if i == 0 and first_turn_images is not None and len(ids) != first_turn_images:
            note = f"{where}: {len(ids)} image(s), the prompt asked for {first_turn_images}"
            if strict_first_turn:
                raise Rejected("first_turn_image_count", note)
            warnings.append("first_turn_image_count")
        if i == 2:
            if len(ids) != 1:
                raise Rejected("second_turn_image_count", f"{where}: {len(ids)} new images, expected exactly 1")
            if ids[0] in user_ids[0]:
                raise Rejected("second_turn_image_reused", f"{where}: image {ids[0]} was already used in message 0")
        unknown = [x for x in ids if x not in candidates]
        if unknown:
            raise Rejected("unknown_image_id", f"{where}: image id(s) {unknown} are not among the "
                                               f"{len(candidates)} candidates of this call")
        if count_slots(content) == 0:
            content = insert_slots(content, ids)
        if count_slots(content) != len(ids):
            raise Rejected("slot_count_mismatch", f"{where}: {count_slots(content)} image slot(s) for "
                                                  f"{len(ids)} image id(s) {ids} (is every id mentioned?)")
        ordered = order_by_slots(content, ids, where)
        if ordered != ids:
            warnings.append("image_order_fixed")
        out.append({"role": "user", "content": content,
                    "images": [{"image_id": candidates[x]["image_id"], "caption": candidates[x]["caption"]}
                               for x in ordered]})
    return Accepted(out, warnings)
