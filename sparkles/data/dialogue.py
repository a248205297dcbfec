"""SparklesDialogue training split files (``<Name>_turn{1,2}_{n}img.json``): one sample per assistant turn.

Field rules (upstream): the question is ``uniform_question`` if present, else ``question``; the prompt is the
``instruction`` if present (for turn 2 it already holds the whole first exchange), else the single-turn
template around the question; the target is ``fix_answer`` if given, else ``answer``; ``tgt_imgs`` lists the
images in slot order (turn-1 images first for turn-2 samples). Only the target answer and the end symbol
carry loss; earlier turns are teacher-forced history. Our own optional field ``unsupervised_spans``
(``[[start, end], ...]``, character offsets into ``answer``) marks parts of the answer that carry no loss:
text-only drills mark the facts that no text can determine.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..conversation.template import USER, parse_upstream_instruction
from .base import DataError, Record, RecordSet, check_messages, collect_records, read_annotations


def _text_field(rec: dict, key: str, where: str) -> str:
    value = rec[key]
    if not isinstance(value, str):
        raise DataError(f"{where}: field {key!r} must be a string, found {type(value).__name__}")
    return value


def image_ids_of(rec: dict, where: str) -> list[str]:
    imgs = rec.get("tgt_imgs")
    if not isinstance(imgs, list):
        raise DataError(f"{where}: field 'tgt_imgs' missing or not a list")
    ids = []
    for k, img in enumerate(imgs):
        if not isinstance(img, dict) or "image_id" not in img:
            raise DataError(f"{where}: tgt_imgs[{k}] has no 'image_id'")
        ids.append(str(img["image_id"]))  # VG ids are ints, CC ids strings; files are named by the text
    return ids


def parse_dialogue_record(rec: Any, index: int, where: str, *, name: str) -> Record:
    """One split-file item → :class:`Record` (messages before the target, target, images)."""
    if not isinstance(rec, dict):
        raise DataError(f"{where}: expected a JSON object, found {type(rec).__name__}")
    if rec.get("instruction") is not None:
        try:
            messages = parse_upstream_instruction(_text_field(rec, "instruction", where))
        except ValueError as exc:
            raise DataError(f"{where}: field 'instruction': {exc}") from None
    else:
        key = "uniform_question" if rec.get("uniform_question") is not None else "question"
        if rec.get(key) is None:
            raise DataError(f"{where}: needs 'instruction', 'uniform_question' or 'question'")
        messages = [(USER, _text_field(rec, key, where))]
    fixed = isinstance(rec.get("fix_answer"), str) and bool(rec["fix_answer"].strip())
    if fixed:
        target = rec["fix_answer"]
    elif "answer" in rec:
        target = _text_field(rec, "answer", where)
    else:
        raise DataError(f"{where}: field 'answer' missing")
    if not target.strip():
        raise DataError(f"{where}: field 'answer' is empty")
    image_ids = image_ids_of(rec, where)
    check_messages(messages, len(image_ids), where)
    return Record(id=f"{name}/{index}", index=index, messages=messages, target=target, image_ids=image_ids,
                  unsupervised=_unsupervised_spans(rec, target, where, fixed=fixed))


def _unsupervised_spans(rec: dict, target: str, where: str, *, fixed: bool) -> list[tuple[int, int]]:
    spans = rec.get("unsupervised_spans")
    if spans is None:
        return []
    if fixed:
        raise DataError(f"{where}: 'unsupervised_spans' index into 'answer', but 'fix_answer' replaces it")
    if not isinstance(spans, list):
        raise DataError(f"{where}: field 'unsupervised_spans' must be a list of [start, end] pairs")
    out = []
    for k, span in enumerate(spans):
        if (not isinstance(span, list) or len(span) != 2 or not all(type(v) is int for v in span)
                or not 0 <= span[0] < span[1] <= len(target)):
            raise DataError(f"{where}: unsupervised_spans[{k}] = {span!r} is not a [start, end) pair of character "
                            f"offsets inside the {len(target)}-character answer")
        out.append((span[0], span[1]))
    if len(out) == 1 and out[0] == (0, len(target)):
        raise DataError(f"{where}: 'unsupervised_spans' cover the whole answer: nothing would carry loss")
    return out


def load_dialogue_records(name: str, anno_file: Path, image_dir: Path, *, skip_bad: bool = False) -> RecordSet:
    """Read and validate a split file (a JSON list); every image must exist under ``image_dir``."""
    data = read_annotations(anno_file)
    if not isinstance(data, list):
        raise DataError(f"{anno_file}: expected a JSON list of samples, found {type(data).__name__}")

    def parse(item, index, where):
        return parse_dialogue_record(item, index, where, name=name)

    return collect_records(name, anno_file, image_dir, data, parse, skip_bad=skip_bad)
