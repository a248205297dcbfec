"""NLVR2: whether a statement about a left/right image pair is true; the prompt, reading the answer, accuracy.

The prompt (our own wording, the original's structure) shows the left image as ``IMAGE#1`` and the right one as
``IMAGE#2``, quotes the statement, and asks for step-by-step reasoning that ends with a fixed answer phrase,
from which :func:`extract` reads TRUE or FALSE. Images are ``<identifier without its last 2 characters>-img0.png``
and ``-img1.png`` (the last two characters number the sentence of a pair).
"""

from __future__ import annotations

from typing import Any, Iterable, Mapping, Optional

from ...conversation.template import IMAGE_MARKER as SLOT
from ..data import AnnotationError, EvalSet
from ...conversation.protocol_file import fill
from .choice import EXTRACTORS, REASONING_OPENER, ChoiceQuestion, choice_summary

NAME = "NLVR2"
TEMPLATE_KEY = "nlvr2_template"  # the protocol file's key for TEMPLATE
OPTIONS = ("TRUE", "FALSE")
ANSWER_PHRASE = "Therefore, the answer (TRUE or FALSE) is"
TEMPLATE = (
    "Here is a pair of pictures: the left one, IMAGE#1" + SLOT + ", and the right one, IMAGE#2" + SLOT + ". "
    "Is this statement about the pair true: '{statement}'? "
    "Reason about both pictures together, paying attention to counts, comparisons and relations, step by step. "
    "Begin your reply with \"" + REASONING_OPENER + "\" and finish it with \"" + ANSWER_PHRASE + "\" "
    "followed by TRUE or FALSE."
)


def prompt(statement: str, template: Optional[str] = None) -> str:
    """The question for one statement (left image first)."""
    return fill(template or TEMPLATE, statement=statement)


def question(evalset: EvalSet, index: int, template: Optional[str] = None) -> ChoiceQuestion:
    """Annotation ``index`` (``sentence``, ``identifier``, ``label``) as a question."""
    item = evalset.items[index]
    sentence = evalset.field(index, "sentence")
    identifier = evalset.field(index, "identifier")
    label = str(evalset.field(index, "label", kind=None))
    if label.lower() not in ("true", "false"):
        raise AnnotationError(f"{evalset.where(index)}: field 'label' must be True or False, got {label!r}")
    paths = evalset.layout.nlvr2_pair(identifier)
    return ChoiceQuestion(item["evaluation_id"], prompt(sentence, template), [evalset.relpath(p) for p in paths], label,
                          sentence, OPTIONS)


def extract(response: str, rule: str = "sparkles") -> Optional[str]:
    """The verdict of the answer (``"true"`` / ``"false"``), or None."""
    return EXTRACTORS[rule](response, OPTIONS)


def score(items: Iterable[Mapping[str, Any]]) -> dict[str, Any]:
    """Accuracy of merged result items (:func:`~.choice.choice_summary`)."""
    return choice_summary(items)
