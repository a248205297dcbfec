"""GPT reply text → candidate dialogues (lists of message dicts), before any validation.

We ask for a bare JSON array, so the strict path is ``json.loads``. Replies still arrive in code fences, as
Python literals (single quotes, copied from how older prompts showed demos), or cut off by ``max_tokens``.
The fallbacks, tried in order, are:

1. ``json``         — the whole reply (or the body of its first code fence, method ``fenced_json``);
2. ``python``       — the same text as a Python literal (``ast.literal_eval``: data only, never code);
3. ``salvaged``     — a quote-aware scan of the outer array that keeps every complete conversation and
                      reports the unfinished tail as truncated (braces inside strings do not confuse it);
4. ``regex``        — message by message, split at each ``{"role": ...`` opening, reading role, image ids and
                      content with regular expressions (survives unescaped quotes inside content).

A structure such as ``{"dialogues": [...]}`` or a single conversation (a list of four messages) is
normalised to a list of conversations.
"""

from __future__ import annotations

import ast
import json
import re
from dataclasses import dataclass, field
from typing import Any

_FENCE = re.compile(r"```[ \t]*([A-Za-z]*)[ \t]*\n?")
_WRAPPER_KEYS = ("dialogues", "conversations", "dialogue", "conversation", "messages")


@dataclass
class ParsedReply:
    """Candidate dialogues from one reply. ``failed`` holds ``(index, reason, text)`` for parts that could not
    be read as a conversation (``truncated`` or ``unparseable_dialogue``)."""

    dialogues: list[tuple[int, Any]]
    method: str
    failed: list[tuple[int, str, str]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


class ReplyParseError(ValueError):
    """Nothing in the reply could be read as a conversation."""


def strip_fence(text: str) -> tuple[str, bool]:
    """The body of the first code fence (to the closing fence, or to the end when it was cut off)."""
    m = _FENCE.search(text)
    if not m:
        return text.strip(), False
    rest = text[m.end():]
    end = rest.find("```")
    return (rest if end < 0 else rest[:end]).strip(), True


def _is_message(x: Any) -> bool:
    return isinstance(x, dict) and ("role" in x or "content" in x)


def normalise(obj: Any) -> list[Any] | None:
    """A parsed structure → list of conversations, or None when it has no recognisable shape."""
    if isinstance(obj, dict):
        for key in _WRAPPER_KEYS:
            if key in obj:
                return normalise(obj[key])
        values = list(obj.values())  # {"conversation_1": [...], "conversation_2": [...]}
        if values and all(isinstance(v, list) and v and all(_is_message(m) for m in v) for v in values):
            return values
        return None
    if not isinstance(obj, list) or not obj:
        return None
    if all(_is_message(x) for x in obj):  # one conversation given on its own
        return [obj]
    out = []
    for conv in obj:
        if isinstance(conv, dict):
            inner = next((conv[k] for k in _WRAPPER_KEYS if isinstance(conv.get(k), list)), None)
            out.append(inner if inner is not None else conv)
        else:
            out.append(conv)
    return out


def _load_any(text: str) -> Any:
    """JSON, else a Python literal; raises ValueError when neither reads it."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        pass
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError) as exc:
        raise ValueError(str(exc)) from None


def _scan_elements(text: str, start: int) -> tuple[list[tuple[int, int]], int | None, bool]:
    """Spans of the top-level elements of the array opening at ``text[start]``.

    Returns (complete element spans, start of an unfinished element or None, array closed?). Quote-aware for
    both quote characters, with backslash escapes.
    """
    spans: list[tuple[int, int]] = []
    depth = 0
    quote: str | None = None
    elem_start: int | None = None
    i = start
    n = len(text)
    while i < n:
        ch = text[i]
        if quote:
            if ch == "\\":
                i += 2
                continue
            if ch == quote:
                quote = None
                if depth == 1 and elem_start is not None and text[elem_start] in "\"'":
                    spans.append((elem_start, i + 1))
                    elem_start = None
        elif ch in "\"'":
            quote = ch
            if depth == 1 and elem_start is None:
                elem_start = i
        elif ch in "[{":
            depth += 1
            if depth == 2 and elem_start is None:
                elem_start = i
        elif ch in "]}":
            depth -= 1
            if depth == 1 and elem_start is not None:
                spans.append((elem_start, i + 1))
                elem_start = None
            elif depth == 0:
                return spans, None, True
        i += 1
    return spans, elem_start, False


_ARRAY_START = re.compile(r"\[\s*[\[{]")  # an array of arrays or of objects, not "[three]" in prose


def _salvage(text: str) -> ParsedReply | None:
    m = _ARRAY_START.search(text)
    if not m:
        return None
    start = m.start()
    spans, tail, closed = _scan_elements(text, start)
    if not spans:
        return None
    parsed: list[tuple[int, Any]] = []
    failed: list[tuple[int, str, str]] = []
    for idx, (a, b) in enumerate(spans):
        chunk = text[a:b]
        try:
            conv = _load_any(chunk)
            if isinstance(conv, dict) and not _is_message(conv):
                conv = next((conv[k] for k in _WRAPPER_KEYS if isinstance(conv.get(k), list)), conv)
            parsed.append((idx, conv))
        except ValueError:
            messages = _regex_messages(chunk)
            if len(messages) == 4:
                parsed.append((idx, messages))
            else:
                failed.append((idx, "unparseable_dialogue", chunk))
    if parsed and all(_is_message(d) for _, d in parsed) and not failed:
        # the reply was one bare conversation, so its elements are messages
        if tail is not None:
            return ParsedReply([], "salvaged", [(0, "truncated", text[start:])],
                               ["the only conversation is cut off"])
        parsed = [(0, [d for _, d in parsed])]
    elif tail is not None:
        failed.append((len(spans), "truncated", text[tail:]))
    notes = [] if closed else ["reply ends before the JSON array is closed (cut off by max_tokens?)"]
    if not parsed and not failed:
        return None
    return ParsedReply(parsed, "salvaged", failed, notes)


# --- message-level regex fallback ------------------------------------------------------------------
_MSG_START = re.compile(r"\{\s*[\"']role[\"']\s*:")
_ROLE = re.compile(r"[\"']role[\"']\s*:\s*[\"'](\w+)[\"']")
_IDS = re.compile(r"[\"']image_ids[\"']\s*:\s*\[([^\]]*)\]")
_CONTENT = re.compile(r"[\"'](?:content|caption)[\"']\s*:\s*([\"'])")
_TRAILER = re.compile(r"[\"']\s*[}\]\s,]*$")


def _regex_messages(text: str) -> list[dict]:
    starts = [m.start() for m in _MSG_START.finditer(text)]
    messages = []
    for a, b in zip(starts, starts[1:] + [len(text)]):
        chunk = text[a:b]
        role = _ROLE.search(chunk)
        content = _CONTENT.search(chunk)
        if not role or not content:
            continue
        msg: dict[str, Any] = {"role": role.group(1).lower()}
        body = chunk[content.end():]
        ids = _IDS.search(chunk)
        if ids:
            msg["image_ids"] = [x.strip().strip("\"'") for x in ids.group(1).split(",") if x.strip().strip("\"'")]
            if ids.start() > content.end():  # image_ids written after the content: cut it off
                body = chunk[content.end():ids.start()]
        body = _TRAILER.sub("", body.rstrip())
        msg["content"] = body.replace("\\n", "\n").replace('\\"', '"').replace("\\'", "'")
        messages.append(msg)
    return messages


def _regex_fallback(text: str) -> ParsedReply | None:
    messages = _regex_messages(text)
    if not messages:
        return None
    dialogues = []
    failed = []
    for k in range(0, len(messages), 4):
        group = messages[k:k + 4]
        if len(group) == 4:
            dialogues.append((k // 4, group))
        else:
            failed.append((k // 4, "truncated", json.dumps(group, ensure_ascii=False)))
    return ParsedReply(dialogues, "regex", failed, ["read message by message with regular expressions"])


def parse_reply(text: str, expected: int | None = None) -> ParsedReply:
    """Read the conversations in a reply; raises ``ReplyParseError`` when there are none.

    ``expected`` (3 for CC, 1 for VG) only adds a note when the count differs.
    """
    if not isinstance(text, str) or not text.strip():
        raise ReplyParseError("the reply is empty")
    body, fenced = strip_fence(text)
    result: ParsedReply | None = None
    for method, loader in (("json", json.loads), ("python", ast.literal_eval)):
        try:
            obj = loader(body)
        except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
            continue
        convs = normalise(obj)
        if convs is not None:
            name = "fenced_json" if (fenced and method == "json") else method
            result = ParsedReply(list(enumerate(convs)), name)
            break
    if result is None:
        result = _salvage(body) or _salvage(text) or _regex_fallback(text)
    if result is None:
        raise ReplyParseError("no JSON array of conversations and no message objects found in the reply")
    found = len(result.dialogues) + len(result.failed)
    if expected is not None and found != expected:
        result.notes.append(f"expected {expected} conversation(s), found {found}")
    return result
