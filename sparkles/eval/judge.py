"""The SparklesEval judge: the prompt, the parsing of its ratings, and the judges that produce them.

The prompt follows the upstream structure (UPSTREAM_FACTS §11.5) in our own words: the task, the images as a
real JSON list of ``{"image_id", "caption"}``, the dialogue in four headed sections ("###User Q1:",
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
missing any of the eight numbers, or with a number outside 1–10, raises :class:`JudgeParseError`.

Judges: :class:`GPTJudge` (any chat model behind the project's GPT client, with bounded re-asks when a
reply does not parse; every reply is cached by the client, so re-runs are free) and :class:`ReferenceJudge`
(synthetic world only: rates answers against the known scenes, no network).
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass
from typing import Any, Mapping, Optional, Sequence

from ..conversation.template import strip_slots

log = logging.getLogger(__name__)

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


class JudgeParseError(ValueError):
    """A judge reply that does not follow the rating layout; the message says what is missing."""


class JudgeSetupError(RuntimeError):
    """A judge that cannot work here (e.g. the reference judge on data without synthetic scenes)."""


class DialogueFormatError(ValueError):
    """A SparklesEval record that is not a two-turn user/assistant dialogue with matching images."""


# ---------------------------------------------------------------------------------------------- prompt
def check_dialogue(item: Mapping[str, Any], where: str = "record") -> list[dict]:
    """The four messages of a SparklesEval item, validated (roles, contents, image lists vs slots)."""
    from ..conversation.template import count_slots

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


def build_judge_prompt(dialogue: Sequence[Mapping[str, Any]]) -> str:
    """The judge prompt for one two-turn dialogue (assistant messages = the answers being judged)."""
    images = json.dumps(dialogue_images(dialogue), ensure_ascii=False, indent=2)
    q1, a1, q2, a2 = (strip_slots(str(m["content"])).strip() for m in dialogue)
    conversation = (f"###User Q1: {q1}\n\n###Assistant A1: {a1}\n\n"
                    f"###User Q2: {q2}\n\n###Assistant A2: {a2}")
    layout = _LAYOUT_BLOCK.format(a="A1") + "\n" + _LAYOUT_BLOCK.format(a="A2")
    return (f"{_INTRO}\n```json\n{images}\n```\n\n{_DIALOGUE_INTRO}\n```\n{conversation}\n```\n\n"
            f"{_TASK}\n\n{layout}")


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


# ---------------------------------------------------------------------------------------------- judges
@dataclass
class JudgeOutcome:
    """One judgement: the §12.5 entry (scores, prompt, response) or a recorded failure."""

    entry: dict
    ok: bool
    calls: int = 0  # replies obtained (paid or cached)
    paid_calls: int = 0


class GPTJudge:
    """A chat model judging through :class:`sparkles.gpt.GPTClient`, re-asking while replies do not parse.

    Attempt ``k`` carries its own cache tag, so a re-run replays the same sequence of replies from the cache
    (even at temperature 0, where re-sending one request would just return the cached failure again).
    """

    kind = "gpt"

    def __init__(self, client, model: str, *, temperature: float = 0.0, max_tokens: int = 1024,
                 max_attempts: int = 3) -> None:
        if max_attempts < 1:
            raise ValueError("the judge needs at least one attempt")
        self.client = client
        self.model = model
        self.temperature = temperature
        self.max_tokens = max_tokens
        self.max_attempts = max_attempts

    def settings(self) -> dict:
        return {"kind": self.kind, "model": self.model, "temperature": self.temperature,
                "max_tokens": self.max_tokens, "max_attempts": self.max_attempts}

    def request(self, prompt: str, attempt: int) -> dict:
        """Arguments of ``GPTClient.chat`` for one attempt (1-based)."""
        return {"prompt": [{"role": "system", "content": JUDGE_SYSTEM}, {"role": "user", "content": prompt}],
                "model": self.model, "temperature": self.temperature, "max_tokens": self.max_tokens,
                "cache_tag": f"sparkleseval-judge:attempt{attempt}"}

    def judge(self, dialogue: Sequence[Mapping[str, Any]]) -> JudgeOutcome:
        """Judge one dialogue. A ``GPTCallError`` (API failure) propagates: nothing is recorded then."""
        prompt = build_judge_prompt(dialogue)
        reply, error, calls, paid = "", "", 0, 0
        for attempt in range(1, self.max_attempts + 1):
            result = self.client.chat(**self.request(prompt, attempt))
            calls += 1
            paid += not result.cached
            reply = result.text
            try:
                scores = parse_judge_reply(reply)
            except JudgeParseError as exc:
                error = str(exc)
                log.info("judge %s: reply %d does not parse (%s)", self.model, attempt, error)
                continue
            return JudgeOutcome({**scores, "prompt": prompt, "response": reply}, True, calls, paid)
        return JudgeOutcome({"prompt": prompt, "response": reply, "attempts": self.max_attempts,
                             "error": f"no parseable reply in {self.max_attempts} attempt(s): {error}"},
                            False, calls, paid)


class ReferenceJudge:
    """Synthetic world only: scores answers against the generator's known scenes (no network, no cost).

    Uses ``sparkles.data.synthetic.load_scenes(root)`` and ``judge_reference(dialogue, scenes)``; on real
    SparklesEval data there are no scenes, so it refuses to run.
    """

    kind = "reference"
    model = "reference"

    def __init__(self, root) -> None:
        try:
            from ..data.synthetic import judge_reference, load_scenes
        except ImportError as exc:
            raise JudgeSetupError("--judge_models reference needs sparkles.data.synthetic (load_scenes, "
                                  f"judge_reference), which is not available: {exc}") from None
        try:
            self.scenes = load_scenes(root)
        except (FileNotFoundError, ValueError) as exc:
            raise JudgeSetupError(f"--judge_models reference works only on the synthetic world, whose scene "
                                  f"records it reads: {exc}") from None
        self._judge = judge_reference

    def settings(self) -> dict:
        return {"kind": self.kind, "model": self.model}

    def judge(self, dialogue: Sequence[Mapping[str, Any]]) -> JudgeOutcome:
        try:
            out = dict(self._judge([dict(m) for m in dialogue], self.scenes))
        except (KeyError, ValueError) as exc:  # e.g. an image without a scene: not a synthetic dialogue
            raise JudgeSetupError(f"reference judge: {exc}") from None
        ok = has_scores(out)
        if ok:
            out = {k: [float(v) for v in out[k]] if k in SCORE_KEYS else out[k] for k in out}
        else:
            out.setdefault("error", "reference judge returned no scores")
        return JudgeOutcome(out, ok, 0, 0)


def judge_entry_status(entry: Optional[Mapping[str, Any]]) -> str:
    """``"missing"`` (not judged yet), ``"ok"`` or ``"failed"``."""
    if entry is None:
        return "missing"
    return "ok" if has_scores(entry) else "failed"
