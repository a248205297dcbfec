"""SparklesEval: two-turn, multi-image dialogues answered by the model and rated by a judge; the questions, the
judge's prompt, reading its ratings, and the score.

The model answers turn 1 with the first user message and its images, and turn 2 with one user message that
reproduces the two-turn template around its own first answer (:func:`turn2_prompt`), with the images of both
turns (as the original did). The judge prompt follows the original's structure in our own words: the task, the
images as a real JSON list of ``{"image_id", "caption"}``, the dialogue in four headed sections ("###User Q1:",
"###Assistant A1:", "###User Q2:", "###Assistant A2:", image slot markers removed, ``IMAGE#id`` kept), the
three criteria C1–C3 rated 1–10 for A1 and A2 separately, and a strict output layout::

    * Evaluating A1
    - (C1) Explanation: "..." Rating: [[x]]
    - (C2) Explanation: "..." Rating: [[x]]
    - (C3) Explanation: "..." Rating: [[x]]
    Therefore, the overall rating of A1 is [[x]]
    * Evaluating A2
    ...

A parsed reply becomes ``A1_C123_scores`` / ``A2_C123_scores`` = ``[overall, C1, C2, C3]`` (floats). A reply
missing any of the eight numbers, or with a number outside 1–10, raises :class:`JudgeParseError`. The judges
themselves are in :mod:`sparkles.eval.judges`.

The score (the paper's formula), per judge: the mean over the dialogues it rated of the ``A1_C123_scores`` and
``A2_C123_scores`` vectors; a turn's score is the mean of its C1, C2, C3 means (the judge's own overall rating,
element 0, is reported but not used); the headline is the mean of the two turns. Because every counted dialogue
has both vectors, this equals the mean over dialogues of (mean C1–C3 of A1 + mean C1–C3 of A2) / 2.
"""

from __future__ import annotations

import json
import logging
import re
from typing import Any, Iterable, Mapping, Optional, Sequence

from ...conversation.protocol_file import fill
from ...conversation.template import count_slots, strip_slots

log = logging.getLogger(__name__)

NAME = "SparklesEval"

SCORE_KEYS = ("A1_C123_scores", "A2_C123_scores")
CRITERIA = ("C1", "C2", "C3")
MIN_RATING, MAX_RATING = 1.0, 10.0

JUDGE_SYSTEM = "You are a fair and meticulous reviewer of AI assistants. Follow the requested output format exactly."

_INTRO = (
    "Below is a conversation between a user and an AI assistant whose job is to look at several images, "
    "analyse them and reason about them across two rounds of questions. The user expects answers that are "
    "genuinely helpful, rich in detail and carefully reasoned, and that stay true to what the images contain.\n\n"
    "You cannot see the images, but each one is described for you. The images, each with its identifier and "
    "a caption describing it, are listed in this JSON array:"
)
_DIALOGUE_INTRO = "The conversation (the user refers to each image as IMAGE#<identifier>):"
_TASK = (
    "Please act as an impartial judge of the assistant's two answers. Rate A1 and A2 each on its own, on a "
    "scale of 1 to 10 where a higher number means a better answer, for each of these three criteria:\n"
    "(C1) Image understanding and reasoning: are the objects, their attributes, the scene and the relations "
    "within each image and between images identified and described correctly?\n"
    "(C2) Cross-image and cross-turn coherence: does the answer keep one consistent understanding of the "
    "different images and of both rounds of the conversation?\n"
    "(C3) Relevance and completeness of the response: does the answer address the question and the content "
    "of the images, and is it thorough?\n\n"
    "For every criterion write a short explanation first and then the rating. Reply in exactly the layout "
    "below, replacing each <...> with your text or with a whole number from 1 to 10 (keep the double square "
    "brackets around every rating), and add nothing else:"
)
_LAYOUT_BLOCK = (
    "* Evaluating {a}\n"
    "- (C1) Explanation: \"<explanation>\" Rating: [[<rating>]]\n"
    "- (C2) Explanation: \"<explanation>\" Rating: [[<rating>]]\n"
    "- (C3) Explanation: \"<explanation>\" Rating: [[<rating>]]\n"
    "Therefore, the overall rating of {a} is [[<rating>]]"
)
# The whole judge prompt, with the placeholders a protocol file's judge_template has too.
JUDGE_TEMPLATE = (
    _INTRO + "\n```json\n{images}\n```\n\n" + _DIALOGUE_INTRO + "\n```\n"
    "###User Q1: {q1}\n\n###Assistant A1: {a1}\n\n###User Q2: {q2}\n\n###Assistant A2: {a2}\n```\n\n"
    + _TASK + "\n\n" + _LAYOUT_BLOCK.format(a="A1") + "\n" + _LAYOUT_BLOCK.format(a="A2")
)


class JudgeParseError(ValueError):
    """A judge reply that does not follow the rating layout; the message says what is missing."""


class DialogueFormatError(ValueError):
    """A SparklesEval record that is not a two-turn user/assistant dialogue with matching images."""


# ---------------------------------------------------------------------------------------------- prompt
def check_dialogue(item: Mapping[str, Any], where: str = "record") -> list[dict]:
    """The four messages of a SparklesEval item, validated (roles, contents, image lists vs slots)."""
    dialogue = item.get("dialogue") if isinstance(item, Mapping) else None
    if not isinstance(dialogue, list) or len(dialogue) != 4:
        raise DialogueFormatError(f"{where}: field 'dialogue' must be a list of 4 messages "
                                  f"(user, assistant, user, assistant)")
    for j, (msg, role) in enumerate(zip(dialogue, ("user", "assistant", "user", "assistant"))):
        if not isinstance(msg, Mapping) or msg.get("role") != role:
            raise DialogueFormatError(f"{where}: dialogue[{j}].role must be {role!r}")
        if not isinstance(msg.get("content"), str):
            raise DialogueFormatError(f"{where}: dialogue[{j}].content must be a string")
        if role == "user":
            images = msg.get("images")
            if not isinstance(images, list) or not all(isinstance(i, Mapping) and "image_id" in i for i in images):
                raise DialogueFormatError(f"{where}: dialogue[{j}].images must be a list of {{image_id, caption}}")
            slots = count_slots(msg["content"])
            if slots != len(images):
                raise DialogueFormatError(f"{where}: dialogue[{j}].content has {slots} image slot(s) but "
                                          f"dialogue[{j}].images lists {len(images)} image(s)")
    return list(dialogue)


def dialogue_images(dialogue: Sequence[Mapping[str, Any]]) -> list[dict]:
    """Every image of the user messages, in order, without repeats: ``[{"image_id", "caption"}]``."""
    seen, out = set(), []
    for msg in dialogue:
        for img in msg.get("images") or []:
            key = str(img["image_id"])
            if key not in seen:
                seen.add(key)
                out.append({"image_id": img["image_id"], "caption": img.get("caption", "")})
    return out


def build_judge_prompt(dialogue: Sequence[Mapping[str, Any]], template: Optional[str] = None,
                       images_format: Optional[str] = None) -> str:
    """The judge prompt for one two-turn dialogue (assistant messages = the answers being judged).

    ``template`` (default :data:`JUDGE_TEMPLATE`) gets the images, written as a JSON array or, with
    ``images_format="python_repr"``, as the Python ``repr`` of the list (the original's way), and the four
    messages without image slot markers (``IMAGE#id`` kept).
    """
    listed = dialogue_images(dialogue)
    images = repr(listed) if images_format == "python_repr" else json.dumps(listed, ensure_ascii=False, indent=2)
    q1, a1, q2, a2 = (strip_slots(str(m["content"])).strip() for m in dialogue)
    return fill(template or JUDGE_TEMPLATE, images=images, q1=q1, a1=a1, q2=q2, a2=a2)


# ---------------------------------------------------------------------------------------------- parsing
_NUMBER = r"(\d+(?:\.\d+)?)"
# "[[8]]", "[8]", "8", optionally bold (**8**) or followed by "/10"
_RATING_VALUE = r"[\s*]*\[{0,2}\s*" + _NUMBER + r"\s*\]{0,2}"
_SECTION = re.compile(r"evaluating\s+\**\s*(a[12])\b", re.IGNORECASE)


def _criterion_regex(c: str) -> re.Pattern:
    # the rating belonging to (Ck): the text up to it may not run into another criterion's marker
    return re.compile(r"\(\s*" + c + r"\s*\)((?:(?!\(\s*C[1-9]\s*\)).)*?)rating\s*:" + _RATING_VALUE,
                      re.IGNORECASE | re.DOTALL)


_CRITERION_RE = {c: _criterion_regex(c) for c in CRITERIA}


def _overall_regex(answer: str) -> re.Pattern:
    return re.compile(r"rating\s+of\s+\**\s*" + answer + r"\s*\**\s+is\s*:?" + _RATING_VALUE, re.IGNORECASE)


_OVERALL_RE = {a: _overall_regex(a) for a in ("A1", "A2")}


def _check_range(value: float, what: str) -> float:
    if not MIN_RATING <= value <= MAX_RATING:
        raise JudgeParseError(f"{what} rating {value:g} is outside {MIN_RATING:g}-{MAX_RATING:g}")
    return value


def _sections(text: str) -> dict[str, str]:
    """``{"A1": chunk, "A2": chunk}``: text from each first "Evaluating Ak" to the next section heading."""
    marks = list(_SECTION.finditer(text))
    out: dict[str, str] = {}
    for i, m in enumerate(marks):
        name = m.group(1).upper()
        end = marks[i + 1].start() if i + 1 < len(marks) else len(text)
        out.setdefault(name, text[m.end():end])
    return out


def parse_judge_reply(text: str) -> dict[str, list[float]]:
    """``{"A1_C123_scores": [overall, C1, C2, C3], "A2_C123_scores": [...]}`` from a judge reply.

    Raises :class:`JudgeParseError` naming the first missing or invalid rating.
    """
    if not isinstance(text, str) or not text.strip():
        raise JudgeParseError("empty reply")
    sections = _sections(text)
    scores: dict[str, list[float]] = {}
    for answer, key in zip(("A1", "A2"), SCORE_KEYS):
        chunk = sections.get(answer)
        if chunk is None:
            raise JudgeParseError(f"no 'Evaluating {answer}' section")
        overall_m = _OVERALL_RE[answer].search(text)
        if overall_m is None:
            raise JudgeParseError(f"no 'overall rating of {answer} is [[x]]' line")
        vector = [_check_range(float(overall_m.group(1)), f"{answer} overall")]
        for c in CRITERIA:
            m = _CRITERION_RE[c].search(chunk)
            if m is None:
                raise JudgeParseError(f"no '({c}) ... Rating: [[x]]' in the {answer} section")
            vector.append(_check_range(float(m.group(2)), f"{answer} {c}"))
        if int(sum(vector[1:]) / 3) != int(vector[0]):
            log.debug("judge overall for %s (%g) differs from its criteria mean (%g)", answer, vector[0],
                      sum(vector[1:]) / 3)
        scores[key] = vector
    return scores


def has_scores(entry: Any) -> bool:
    """A judge entry that holds both score vectors (failed entries carry ``error`` instead)."""
    return (isinstance(entry, Mapping)
            and all(isinstance(entry.get(k), list) and len(entry[k]) == 4 for k in SCORE_KEYS))


def judge_entry_status(entry: Optional[Mapping[str, Any]]) -> str:
    """``"missing"`` (not judged yet), ``"ok"`` or ``"failed"``."""
    if entry is None:
        return "missing"
    return "ok" if has_scores(entry) else "failed"


# ---------------------------------------------------------------------------------------------- the questions
TURN_SEP_ASSISTANT = "###Assistant: "
TURN_SEP_HUMAN = "###Human: "


def turn2_prompt(q1: str, a1: str, q2: str) -> str:
    """The one user message of turn 2: Q1 ``###Assistant: `` A1 ``###Human: `` Q2 (the model's own A1)."""
    return q1 + TURN_SEP_ASSISTANT + a1 + TURN_SEP_HUMAN + q2


# ---------------------------------------------------------------------------------------------- the score
def _mean(values: Sequence[float]) -> float:
    return sum(values) / len(values)


def score(items: Iterable[Mapping[str, Any]], judge: str) -> dict[str, Any]:
    """Per-judge numbers: counts, mean A1/A2 vectors, A1, A2 and overall (None when nothing was rated).

    Dialogues the model could not answer (an item ``error``) are counted as ``unanswered``, apart from those the
    judge could not rate (``failed``) or has not rated yet (``unjudged``).
    """
    items = list(items)
    rows: dict[str, list[list[float]]] = {k: [] for k in SCORE_KEYS}
    failed, missing, unanswered = [], [], []
    for item in items:
        if item.get("error"):
            unanswered.append(item.get("evaluation_id"))
            continue
        entry = item.get(judge)
        status = judge_entry_status(entry)
        if status == "missing":
            missing.append(item.get("evaluation_id"))
            continue
        if status == "failed":
            failed.append(item.get("evaluation_id"))
            continue
        for key in SCORE_KEYS:
            rows[key].append([float(v) for v in entry[key]])
    n = len(rows[SCORE_KEYS[0]])
    out: dict[str, Any] = {"judge": judge, "dialogues": len(items), "rated": n, "failed": len(failed),
                           "failed_ids": failed, "unjudged": len(missing), "unjudged_ids": missing,
                           "unanswered": len(unanswered), "unanswered_ids": unanswered,
                           "A1_vector": None, "A2_vector": None, "A1": None, "A2": None, "overall": None}
    if n == 0:
        return out
    turns = []
    for key, label in zip(SCORE_KEYS, ("A1", "A2")):
        vector = [_mean(col) for col in zip(*rows[key])]
        out[f"{label}_vector"] = vector
        out[label] = _mean(vector[1:])  # C1..C3; element 0 is the judge's own overall
        turns.append(out[label])
    out["overall"] = _mean(turns)
    return out
