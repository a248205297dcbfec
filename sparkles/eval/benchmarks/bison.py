"""BISON: which of two similar images a caption describes; the prompt, reading the answer, accuracy.

The prompt (our own wording, the original's structure) shows the two candidates as ``IMAGE#1``/``IMAGE#2`` slots
in candidate order, quotes the caption, and asks for step-by-step reasoning that ends with a fixed answer phrase,
from which :func:`extract` reads the choice.
"""

from __future__ import annotations

from typing import Any, Iterable, Mapping, Optional

from ...conversation.template import IMAGE_MARKER as SLOT
from ..data import AnnotationError, EvalSet
from ...conversation.protocol_file import fill
from .choice import EXTRACTORS, REASONING_OPENER, ChoiceQuestion, choice_summary

NAME = "BISON"
TEMPLATE_KEY = "bison_template"  # the protocol file's key for TEMPLATE
OPTIONS = ("IMAGE#1", "IMAGE#2")
ANSWER_PHRASE = "Therefore, the answer (IMAGE#1 or IMAGE#2) is"
TEMPLATE = (
    "Look closely at two similar pictures, IMAGE#1" + SLOT + " and IMAGE#2" + SLOT + ". "
    "Below is a caption that describes exactly one of them: '{caption}'. "
    "Decide which picture the caption fits better; small visual details decide it, so reason step by step. "
    "Begin your reply with \"" + REASONING_OPENER + "\" and finish it with \"" + ANSWER_PHRASE + "\" "
    "followed by your choice."
)


def prompt(caption: str, template: Optional[str] = None) -> str:
    """The question for one caption (images go in candidate order)."""
    return fill(template or TEMPLATE, caption=caption)


def question(evalset: EvalSet, index: int, template: Optional[str] = None) -> ChoiceQuestion:
    """Annotation ``index`` (``caption``, two ``image_candidates``, ``true_image_id``) as a question."""
    item = evalset.items[index]
    caption = evalset.field(index, "caption")
    cands = item.get("image_candidates")
    if not isinstance(cands, list) or len(cands) != 2 or not all(
            isinstance(c, Mapping) and "image_id" in c and "image_filename" in c for c in cands):
        raise AnnotationError(f"{evalset.where(index)}: field 'image_candidates' must list two "
                              "{image_id, image_filename}")
    if "true_image_id" not in item:
        raise AnnotationError(f"{evalset.where(index)}: field 'true_image_id' is missing")
    truth = str(item["true_image_id"])
    if truth not in (str(cands[0]["image_id"]), str(cands[1]["image_id"])):
        raise AnnotationError(f"{evalset.where(index)}: true_image_id {truth} is not a candidate")
    label = OPTIONS[0] if truth == str(cands[0]["image_id"]) else OPTIONS[1]
    paths = [evalset.image_dir / str(c["image_filename"]) for c in cands]
    return ChoiceQuestion(item["evaluation_id"], prompt(caption, template), [evalset.relpath(p) for p in paths],
                          label, caption, OPTIONS)


def extract(response: str, rule: str = "sparkles") -> Optional[str]:
    """The image the answer chose (``"image#1"`` / ``"image#2"``), or None."""
    return EXTRACTORS[rule](response, OPTIONS)


def score(items: Iterable[Mapping[str, Any]]) -> dict[str, Any]:
    """Accuracy of merged result items (:func:`~.choice.choice_summary`)."""
    return choice_summary(items)
