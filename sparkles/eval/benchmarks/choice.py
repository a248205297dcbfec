"""What BISON and NLVR2 share: a two-option question, reading the chosen option out of an answer, accuracy.

Reading the choice follows the original implementation's rule, with two of its flaws fixed. The prompts ask the
model to end with "Therefore, the answer (<o1> or <o2>) is <choice>". Only the text after the *last* "therefore"
counts. It is normalised (the option list in the phrase is dropped, "image #1" is written "image#1", and "not <o1>"
means <o2> — and, unlike upstream, "not <o2>" means <o1>), then:

- an explicit "the answer is <o>" (followed by punctuation, "because" or the end) decides;
- otherwise, if both options are mentioned the answer is ambiguous (unparseable);
- otherwise the one option mentioned is the answer; none → unparseable.

Upstream returned the option that occurs *first* even when an explicit "the answer is <o>" names the other
one; here the explicit statement wins. Options match as whole tokens, so "image#1" is not found in
"image#12" and "true" is not found in "untrue".

:func:`extract_choice_upstream` is the original rule itself, flaws included (the ``upstream`` protocol uses it,
so that its accuracies are computed as the paper's were).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Iterable, Mapping, Optional, Sequence

REASONING_OPENER = "Let's think step by step."  # how both prompts ask the answer to begin


@dataclass
class ChoiceQuestion:
    """One BISON / NLVR2 question, ready for the model."""

    evaluation_id: Any
    prompt: str
    img_paths: list[str]  # relative to the root
    label: str
    sentence: str
    options: tuple[str, str]

_IMAGE_SPACE = re.compile(r"image\s+#\s*(\d+)")
_SPACES = re.compile(r"\s+")


def _option_pattern(option: str) -> str:
    # whole-token match: no letter/digit/# glued to either side
    return r"(?<![a-z0-9#])" + re.escape(option) + r"(?![a-z0-9])"


def normalise_tail(text: str, options: Sequence[str]) -> str:
    """Lower-cased text after the last "therefore", normalised as described in the module docstring."""
    o1, o2 = (o.lower() for o in options)
    text = _SPACES.sub(" ", text.lower())
    text = _IMAGE_SPACE.sub(r"image#\1", text)
    # "answer (true or false) is" / "answer (image#1 or image#2) is" → "answer is"
    text = re.sub(r"answer\s*\(\s*" + re.escape(o1) + r"\s+or\s+" + re.escape(o2) + r"\s*\)\s*is", "answer is", text)
    # a negated option is the other one; swap through a placeholder so the two rewrites do not chain
    text = re.sub(r"\bnot\s+" + _option_pattern(o1), "\x00", text)
    text = re.sub(r"\bnot\s+" + _option_pattern(o2), o1, text)
    return text.replace("\x00", o2)


def extract_choice(response: str, options: Sequence[str]) -> Optional[str]:
    """The option (lower-cased, e.g. ``"image#2"`` or ``"true"``) chosen in ``response``, or None.

    ``options`` is the pair offered in the prompt, e.g. ``("IMAGE#1", "IMAGE#2")`` or ``("TRUE", "FALSE")``.
    """
    if len(options) != 2:
        raise ValueError(f"extract_choice expects two options, got {list(options)}")
    lowered = (response or "").lower()
    if "therefore" not in lowered:
        return None
    tail = normalise_tail(lowered.rsplit("therefore", 1)[1].strip(), options)
    opts = [o.lower() for o in options]
    explicit = []
    for opt in opts:
        m = re.search(r"the answer is\s*\**\s*" + _option_pattern(opt) + r"\s*\**\s*(?:[,.:;!]|\s+because\b|$)",
                      tail)
        if m:
            explicit.append((m.start(), opt))
    if explicit:
        return min(explicit)[1]  # the first explicit statement
    found = [(m.start(), opt) for opt in opts if (m := re.search(_option_pattern(opt), tail))]
    if len(found) != 1:
        return None  # neither option, or both without an explicit statement: ambiguous
    return found[0][1]


_EXPLICIT_ENDINGS = (",", ".", ":", " because")


def extract_choice_upstream(response: str, options: Sequence[str]) -> Optional[str]:
    """The original rule: after the last "therefore", plain substring tests, and the first option mentioned wins.

    Normalisation rewrites "answer (<o1> or <o2>) is" as "answer is", "image #k" as "image#k" and "not <o1>" as
    <o2> ("not <o2>" stays); if no explicit "the answer is <o>" followed by ",", ".", ":" or " because" is
    present and both options occur, the answer is ambiguous; otherwise the option occurring first is returned.
    """
    if len(options) != 2:
        raise ValueError(f"extract_choice_upstream expects two options, got {list(options)}")
    o1, o2 = (o.lower() for o in options)
    lowered = (response or "").lower()
    if "therefore" not in lowered:
        return None
    tail = lowered.rsplit("therefore", 1)[1].strip()
    tail = tail.replace("answer (true or false) is", "answer is")
    tail = tail.replace("image #1", "image#1").replace("image #2", "image#2")
    tail = tail.replace("answer (image#1 or image#2) is", "answer is")
    tail = tail.replace("not " + o1, o2)
    explicit = any(f"the answer is {o}{end}" in tail for o in (o1, o2) for end in _EXPLICIT_ENDINGS)
    if not explicit and o1 in tail and o2 in tail:
        return None
    found = [(tail.find(o), o) for o in (o1, o2) if o in tail]
    return min(found)[1] if found else None


EXTRACTORS = {"sparkles": extract_choice, "upstream": extract_choice_upstream}


def choice_summary(items: Iterable[Mapping[str, Any]]) -> dict[str, Any]:
    """Accuracy over all items (an unparseable answer, ``predict`` None, counts as wrong; so does an item that could
    not be answered, which carries an ``error``), plus the parse and failure counts."""
    items = list(items)
    correct = unparseable = generations = 0
    failed = []
    for item in items:
        predict = item.get("predict")
        if item.get("error"):
            failed.append(item.get("evaluation_id"))
        elif predict is None:
            unparseable += 1
        elif str(predict).strip().lower() == str(item.get("label", "")).strip().lower():
            correct += 1
        generations += int(item.get("generations", 1))
    total = len(items)
    parsed = total - unparseable - len(failed)
    return {"total": total, "correct": correct, "accuracy": correct / total if total else None,
            "unparseable": unparseable, "accuracy_parsed": correct / parsed if parsed else None,
            "generations": generations, "failed": len(failed), "failed_ids": failed}
