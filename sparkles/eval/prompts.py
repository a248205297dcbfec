"""Prompts that the evaluated model sees for BISON and NLVR2 (our own wording, upstream structure).

Both show two images as ``IMAGE#1``/``IMAGE#2`` slots, give the caption or statement in quotes, ask for
step-by-step reasoning that opens with a fixed phrase and closes with a fixed answer phrase, so that
``sparkles.eval.extract`` can read the choice. The synthetic CPU world trains on these same templates
(with other scenes), which is why they live in one module.
"""

from __future__ import annotations

from ..conversation.template import IMAGE_MARKER as SLOT  # one home for the marker
REASONING_OPENER = "Let's think step by step."

BISON_OPTIONS = ("IMAGE#1", "IMAGE#2")
BISON_ANSWER_PHRASE = "Therefore, the answer (IMAGE#1 or IMAGE#2) is"
BISON_TEMPLATE = (
    "Look closely at two similar pictures, IMAGE#1" + SLOT + " and IMAGE#2" + SLOT + ". "
    "Below is a caption that describes exactly one of them: '{caption}'. "
    "Decide which picture the caption fits better; small visual details decide it, so reason step by step. "
    "Begin your reply with \"" + REASONING_OPENER + "\" and finish it with \"" + BISON_ANSWER_PHRASE + "\" "
    "followed by your choice."
)

NLVR2_OPTIONS = ("TRUE", "FALSE")
NLVR2_ANSWER_PHRASE = "Therefore, the answer (TRUE or FALSE) is"
NLVR2_TEMPLATE = (
    "Here is a pair of pictures: the left one, IMAGE#1" + SLOT + ", and the right one, IMAGE#2" + SLOT + ". "
    "Is this statement about the pair true: '{statement}'? "
    "Reason about both pictures together, paying attention to counts, comparisons and relations, step by step. "
    "Begin your reply with \"" + REASONING_OPENER + "\" and finish it with \"" + NLVR2_ANSWER_PHRASE + "\" "
    "followed by TRUE or FALSE."
)


def bison_prompt(caption: str) -> str:
    """The BISON question for one caption (images go in candidate order)."""
    return BISON_TEMPLATE.format(caption=caption)


def nlvr2_prompt(statement: str) -> str:
    """The NLVR2 question for one statement (left image first)."""
    return NLVR2_TEMPLATE.format(statement=statement)
