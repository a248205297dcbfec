"""I4 (the DEMON benchmark's core split): its 29 datasets in 7 categories, the prompt for one sample, and the score.

Data: ``<i4_dir>/<dataset>/core/core.json`` holds ``metadata`` (a list of task instructions and the question type,
``open-ended`` or ``multi-choice``) and ``data`` records, each with a ``sample_id``, a ``task_instruction_id``, a
``task_instance`` (``context`` text naming its images as ``{image#k}`` / ``{table#k}``, ``images_path`` relative to
``core/``, an optional ``choice_list``) and the reference ``response``. :func:`build_sample` turns a record into
the user message (instruction, context with every placeholder replaced by an image slot, the choices listed
Python-list style) and its image files, and refuses a record whose placeholders and images differ in number.

Scoring (:func:`score_dataset`) reads ``pred.json`` items ``{"sample_id", "pred_response", "gt_response"}``. Both
texts are normalised VQA-style (:func:`normalize`), then one of three rules applies:

- image-choice datasets (:data:`IMAGE_CHOICE`): correct when the first 7 characters agree (e.g. ``"image b"``)
  and the prediction names at most one of "image a" .. "image d" → ``{"Accuracy": x}``;
- other ``multi-choice`` datasets: the choice whose TF-IDF vector is most cosine-similar to the prediction's is
  the answer, compared with the reference; if TF-IDF cannot be built (e.g. no word of two or more letters
  anywhere) the prediction itself must equal the reference → ``{"Accuracy": x}``;
- ``open-ended`` datasets: ROUGE-L F of the ``rouge`` package (which counts distinct words), 0 for an empty
  prediction or reference → ``{"Rouge-L f": x}``. Predictions are not truncated (some copies of the original
  scorer cut them at 512 characters; nothing says the one the paper's repository used did); the recursion limit
  is raised for the call instead, as the package's LCS backtracking recurses once per word.

An item carrying ``"error"`` (it could not be asked) scores 0 and is counted, under both rules.

Rules: ``upstream`` is the original scorer, flaws included: its image-choice list misspells
``RecipeQA_VisualCloze`` (:data:`IMAGE_CHOICE_UPSTREAM`), so that dataset falls to the TF-IDF rule; a
prediction sharing no word with any choice picks the first choice; "image a" is found inside "image and".
``sparkles`` (the default) fixes these three: the corrected list (:data:`IMAGE_CHOICE`), no word in common
means no choice (wrong), and image names match as whole words; an empty answer is never a correct image choice.

:func:`category_scores` averages each category's dataset values (each rounded to 5 decimals, then ×100) and the
categories; ``upstream`` skips a category with any member missing, ``sparkles`` averages the members present
and says how many of how many.
"""

from __future__ import annotations

import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

from ...common.io import read_json
from ...common.paths import MissingPathError
from ...conversation.protocol_file import fill
from ...conversation.template import IMAGE_MARKER

NAME = "I4"

CATEGORIES: dict[str, tuple[str, ...]] = {
    "multi_modal_dialogue": ("MMCoQA", "ALFRED"),
    "visual_storytelling": ("AESOP", "DiDeMoSV", "FlintstonesSV", "PororoSV", "VIST"),
    "visual_relation_inference": ("IEdit", "Spot-the-Diff", "Birds-to-Words", "CLEVR-Change"),
    "multi_modal_cloze": ("COMICS_Dialogue", "COMICS_Panel", "RecipeQA_VisualCloze", "RecipeQA_TextCloze"),
    "knowledge_grounded_qa": ("WebQA", "TQA", "MultiModalQA"),
    "text_rich_images_qa": ("SlideVQA", "OCR-VQA", "DocVQA"),
    "multi_image_reasoning": ("Fashion200K", "NLVR2", "nuscenes", "VizWiz", "MIT-States_StateCoherence",
                              "MIT-States_PropertyCoherence", "VISION", "RecipeQA_ImageCoherence"),
}
DATASETS: tuple[str, ...] = tuple(d for members in CATEGORIES.values() for d in members)

IMAGE_CHOICE_UPSTREAM: tuple[str, ...] = ("recipeqa-RecipeQA_VisualCloze", "RecipeQA_ImageCoherence", "COMICS_Panel")
IMAGE_CHOICE: tuple[str, ...] = ("RecipeQA_VisualCloze", "RecipeQA_ImageCoherence", "COMICS_Panel")

METRIC_KEYS = ("Rouge-L f", "Accuracy")
ROUGE_KEY, ACCURACY_KEY = METRIC_KEYS
QUESTION_TYPES = ("open-ended", "multi-choice")
RULES = ("sparkles", "upstream")

# The instruction states the task and the context carries the images; a blank line keeps them apart.
INSTRUCTION_JOIN = "\n\n"
# The options come last, right before the model answers, so the answer is likely to quote one of them verbatim.
CHOICES_SUFFIX = "\nPick your answer from these options: {choices}\nAnswer:"

_SLOT_RE = re.compile(r"\{(?:image|table)#\d+\}")


class I4FormatError(ValueError):
    """A malformed ``core.json`` or ``pred.json``; the message names the file, the record index and the field."""


class I4ItemError(ValueError):
    """One sample that cannot be asked (e.g. its placeholders and images differ in number); names its sample_id."""


@dataclass
class I4Sample:
    """One I4 question, ready for the model."""

    sample_id: str
    dataset: str
    question_type: str  # "open-ended" | "multi-choice"
    prompt: str  # the user message, with one image slot marker per image
    images: list[Path]  # absolute image files, in slot order
    gt_response: str
    choices: Optional[list[str]]


# --------------------------------------------------------------------------------------------------- reading data

def core_path(i4_dir: str | os.PathLike, dataset: str) -> Path:
    return Path(i4_dir) / dataset / "core" / "core.json"


def _check(ok: bool, where: str, message: str) -> None:
    if not ok:
        raise I4FormatError(f"{where}: {message}")


def _is_str_list(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(v, str) for v in value)


def load_core(i4_dir: str | os.PathLike, dataset: str) -> tuple[dict, list[dict]]:
    """``(metadata, data records)`` of one dataset's ``core.json``, every field :func:`build_sample` uses checked."""
    path = core_path(i4_dir, dataset)
    if not path.is_file():
        raise MissingPathError(f"I4 {dataset}: core.json not found: {path}")
    content = read_json(path, what=f"I4 {dataset} core.json", error=I4FormatError)
    _check(isinstance(content, dict), str(path), "must be a JSON object with 'metadata' and 'data'")
    metadata, data = content.get("metadata"), content.get("data")
    _check(isinstance(metadata, dict), str(path), "field 'metadata' must be an object")
    question_type = metadata.get("question_type")
    _check(question_type in QUESTION_TYPES, str(path),
           f"field 'metadata.question_type' must be one of {list(QUESTION_TYPES)}, got {question_type!r}")
    instructions = metadata.get("task_instruction")
    _check(_is_str_list(instructions) and len(instructions) > 0, str(path),
           "field 'metadata.task_instruction' must be a non-empty list of strings")
    _check(isinstance(data, list), str(path), "field 'data' must be a list")
    for i, record in enumerate(data):
        where = f"{path}: record {i}"
        _check(isinstance(record, dict), where, "must be an object")
        _check(isinstance(record.get("sample_id"), (str, int)), where, "field 'sample_id' must be a string or number")
        tid = record.get("task_instruction_id")
        _check(isinstance(tid, int) and not isinstance(tid, bool) and 0 <= tid < len(instructions), where,
               f"field 'task_instruction_id' must index metadata.task_instruction (0..{len(instructions) - 1}), "
               f"got {tid!r}")
        instance = record.get("task_instance")
        _check(isinstance(instance, dict), where, "field 'task_instance' must be an object")
        _check(isinstance(instance.get("context"), str), where, "field 'task_instance.context' must be a string")
        _check(_is_str_list(instance.get("images_path")), where,
               "field 'task_instance.images_path' must be a list of strings")
        if instance.get("choice_list") is not None:
            _check(_is_str_list(instance["choice_list"]), where,
                   "field 'task_instance.choice_list' must be a list of strings")
        _check("response" in record and record["response"] is not None, where, "field 'response' is missing")
    return metadata, data


def _image_file(core_dir: Path, rel: str, sample_id: str) -> Path:
    path = core_dir / rel
    if not path.is_file():
        fallback = core_dir / "images" / Path(rel).name
        if not fallback.is_file():
            raise I4ItemError(f"sample {sample_id}: image not found: {path} (nor {fallback})")
        path = fallback
    return Path(os.path.abspath(path))


def format_choices(choices: Sequence[str]) -> str:
    """The options written as a Python list (``['a', 'b']``), as the original wrote them."""
    return str(list(choices))


def build_sample(i4_dir: str | os.PathLike, dataset: str, metadata: Mapping[str, Any],
                 record: Mapping[str, Any]) -> I4Sample:
    """One validated record (from :func:`load_core`) as a question; images in ``images_path`` order."""
    sample_id = str(record["sample_id"])
    instance = record["task_instance"]
    context = instance["context"]
    rels = instance["images_path"]
    slots = len(_SLOT_RE.findall(context))
    if slots != len(rels):
        raise I4ItemError(f"sample {sample_id} ({dataset}): the context names {slots} {{image#k}}/{{table#k}} "
                          f"placeholder(s) but the record has {len(rels)} image(s)")
    core_dir = Path(i4_dir) / dataset / "core"
    images = [_image_file(core_dir, rel, sample_id) for rel in rels]
    choices = instance.get("choice_list")
    prompt = metadata["task_instruction"][record["task_instruction_id"]] + INSTRUCTION_JOIN \
        + _SLOT_RE.sub(IMAGE_MARKER, context)
    if choices:
        prompt += fill(CHOICES_SUFFIX, choices=format_choices(choices))
    response = record["response"]
    return I4Sample(sample_id=sample_id, dataset=dataset, question_type=metadata["question_type"], prompt=prompt,
                    images=images, gt_response=response if isinstance(response, str) else str(response),
                    choices=list(choices) if choices else None)


# ------------------------------------------------------------------------------------------------------- scoring

_PUNCTUATION = (";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",",
                "?", "!")
_DIGIT_COMMA = re.compile(r"(\d)(,)(\d)")
# Written as in the VQA evaluation code: "(?!<=\d)" is a look-ahead that always holds before a period, so in
# effect every period not followed by a digit goes ("3.5" stays, "end." and "5. next" lose theirs).
_PERIOD = re.compile(r"(?!<=\d)(\.)(?!\d)")
_IMAGE_NAMES = tuple(f"image {c}" for c in "abcd")
_IMAGE_NAME_RE = {name: re.compile(r"\b" + name + r"\b") for name in _IMAGE_NAMES}


def normalize(text: str) -> str:
    """VQA-style normalisation: whitespace, punctuation (dropped when it touches a space, else a space; all dropped
    when the text has a digit,digit comma), periods, surrounding quotes and brackets, lower case."""
    text = str(text or "").replace("\n", " ").replace("\t", " ").strip()
    # the conditions read the text as it was before any punctuation was handled
    drop_all = _DIGIT_COMMA.search(text) is not None
    out = text
    for p in _PUNCTUATION:
        if drop_all or p + " " in text or " " + p in text:
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    out = _PERIOD.sub("", out)
    return out.strip("'").strip('"').strip(")").strip("(").strip().lower()


def rouge_l_f(pred: str, gt: str) -> float:
    """ROUGE-L F of the ``rouge`` package between two normalised texts; 0 when either is empty."""
    if not pred.strip() or not gt.strip():
        return 0.0
    from rouge import Rouge

    # the package backtracks its LCS table recursively, one frame per word of the two texts
    needed = len(pred.split()) + len(gt.split()) + 200
    old = sys.getrecursionlimit()
    if needed > old:
        sys.setrecursionlimit(needed)
    try:
        return float(Rouge(metrics=["rouge-l"]).get_scores(pred, gt)[0]["rouge-l"]["f"])
    finally:
        sys.setrecursionlimit(old)


def pick_choice(pred: str, choices: Sequence[str], rule: str = "sparkles") -> Optional[int]:
    """Index of the choice most TF-IDF-cosine-similar to ``pred`` (normalised texts; the first on ties).

    Raises ``ValueError`` when no TF-IDF vocabulary can be built. When nothing is similar (every cosine 0),
    ``upstream`` returns the first choice as the original's arg-max did and ``sparkles`` returns None.
    """
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.metrics.pairwise import cosine_similarity

    if not choices:
        raise ValueError("no choices to pick from")
    vectors = TfidfVectorizer().fit_transform([pred, *choices])
    sims = cosine_similarity(vectors[0], vectors[1:])[0]
    best = int(sims.argmax())
    if rule == "sparkles" and sims[best] <= 0:
        return None
    return best


def _image_names(pred: str, rule: str) -> int:
    if rule == "upstream":
        return sum(name in pred for name in _IMAGE_NAMES)
    return sum(bool(_IMAGE_NAME_RE[name].search(pred)) for name in _IMAGE_NAMES)


def image_choice_correct(pred: str, gt: str, rule: str = "sparkles") -> bool:
    """The image-choice rule on normalised texts: same first 7 characters, at most one image named."""
    if rule == "sparkles" and not pred:
        return False  # an empty answer chooses nothing, even against an empty reference
    return pred[:7] == gt[:7] and _image_names(pred, rule) <= 1


def multi_choice_correct(pred: str, gt: str, choices: Optional[Sequence[str]], rule: str = "sparkles") -> bool:
    """The TF-IDF rule on normalised texts; without choices or a vocabulary, exact match decides."""
    try:
        if not choices:
            raise ValueError("no choices")
        picked = pick_choice(pred, [normalize(c) for c in choices], rule)
    except ValueError:
        return pred == gt
    return picked is not None and normalize(choices[picked]) == gt


def scoring_rule(dataset: str, question_type: str, rule: str = "sparkles") -> str:
    """Which rule scores a dataset: ``"image-choice"``, ``"multi-choice"`` or ``"open-ended"``."""
    if rule not in RULES:
        raise ValueError(f"unknown I4 scoring rule {rule!r}; choose from {list(RULES)}")
    if question_type not in QUESTION_TYPES:
        raise ValueError(f"unknown I4 question type {question_type!r}; choose from {list(QUESTION_TYPES)}")
    if dataset in (IMAGE_CHOICE_UPSTREAM if rule == "upstream" else IMAGE_CHOICE):
        return "image-choice"
    return question_type


def _check_predictions(predictions: Any, dataset: str) -> None:
    where = f"I4 {dataset} predictions"
    _check(isinstance(predictions, list) and len(predictions) > 0, where, "must be a non-empty list")
    for i, item in enumerate(predictions):
        _check(isinstance(item, Mapping), f"{where}: item {i}", "must be an object")
        _check("sample_id" in item, f"{where}: item {i}", "field 'sample_id' is missing")
        _check(isinstance(item.get("gt_response"), str), f"{where}: item {i}", "field 'gt_response' must be a string")
        if not item.get("error"):
            _check(isinstance(item.get("pred_response"), str), f"{where}: item {i}",
                   "field 'pred_response' must be a string (or the item must carry an 'error')")


def score_dataset(predictions: list[dict], question_type: str, dataset: str,
                  rule: str = "sparkles") -> tuple[dict, list[dict]]:
    """``({"Rouge-L f": mean} or {"Accuracy": mean}, [{"id", "score"} per item])``, as eval.json / eval_score.json.

    Items may carry ``"choices"`` (needed by the TF-IDF rule) and ``"error"`` (scores 0).
    """
    how = scoring_rule(dataset, question_type, rule)
    _check_predictions(predictions, dataset)
    scores: list[float] = []
    per_item = []
    for item in predictions:
        if item.get("error"):
            score: float = 0
        else:
            pred, gt = normalize(item["pred_response"]), normalize(item["gt_response"])
            if how == "open-ended":
                score = rouge_l_f(pred, gt)
            elif how == "image-choice":
                score = int(image_choice_correct(pred, gt, rule))
            else:
                score = int(multi_choice_correct(pred, gt, item.get("choices"), rule))
        if how == "open-ended":
            score = float(score)
        scores.append(score)
        per_item.append({"id": str(item["sample_id"]), "score": str(score)})
    key = ROUGE_KEY if how == "open-ended" else ACCURACY_KEY
    return {key: sum(scores) / len(scores)}, per_item


# ---------------------------------------------------------------------------------------------- category table

def metric_value(result: Mapping[str, Any], where: str = "eval.json") -> tuple[str, float]:
    """``(key, value)`` of the one metric an eval.json holds."""
    keys = [k for k in METRIC_KEYS if k in result] if isinstance(result, Mapping) else []
    _check(len(keys) == 1, where, f"must hold exactly one of {list(METRIC_KEYS)}")
    value = result[keys[0]]
    _check(isinstance(value, (int, float)) and not isinstance(value, bool), where, f"'{keys[0]}' must be a number")
    return keys[0], float(value)


def category_scores(per_dataset: Mapping[str, Mapping[str, Any]], rule: str = "sparkles") -> dict:
    """Per category the mean of its datasets' values (each rounded to 5 decimals) × 100, and the mean of those.

    ``per_dataset`` maps dataset → its eval.json content. A dataset outside the 29 is listed under
    ``"unknown_datasets"`` and not counted.
    """
    if rule not in RULES:
        raise ValueError(f"unknown I4 scoring rule {rule!r}; choose from {list(RULES)}")
    values = {name: metric_value(result, f"I4 {name} eval.json") for name, result in per_dataset.items()}
    categories = {}
    for category, members in CATEGORIES.items():
        present = [d for d in members if d in values]
        missing = [d for d in members if d not in values]
        scored = bool(present) and (rule == "sparkles" or not missing)
        score = sum(round(values[d][1], 5) for d in present) / len(present) * 100 if scored else None
        categories[category] = {
            "score": score, "present": len(present), "total": len(members), "missing": missing,
            "datasets": {d: {"metric": values[d][0], "value": values[d][1]} for d in present},
            "metrics": sorted({values[d][0] for d in present}),  # ROUGE-L F and accuracy may share a category
        }
    scored = [c["score"] for c in categories.values() if c["score"] is not None]
    return {
        "rule": rule,
        "categories": categories,
        "mean": sum(scored) / len(scored) if scored else None,
        "categories_scored": len(scored),
        "categories_total": len(CATEGORIES),
        "unknown_datasets": sorted(d for d in values if d not in DATASETS),
    }
