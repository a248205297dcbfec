"""SparklesDialogue training split files (``<Name>_turn{1,2}_{n}img.json``): one sample per assistant turn.

Field rules (upstream): the question is ``uniform_question`` if present, else ``question``; the prompt is the
``instruction`` if present (for turn 2 it already holds the whole first exchange), else the single-turn
template around the question; the target is ``fix_answer`` if given, else ``answer``; ``tgt_imgs`` lists the
images in slot order (turn-1 images first for turn-2 samples). Only the target answer and the end symbol
carry loss; earlier turns are teacher-forced history.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..conversation.template import USER, parse_upstream_instruction
from .base import DataError, Record, RecordSet, check_messages, collect_records, read_json


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
    if isinstance(rec.get("fix_answer"), str) and rec["fix_answer"].strip():
        target = rec["fix_answer"]
    elif "answer" in rec:
        target = _text_field(rec, "answer", where)
    else:
        raise DataError(f"{where}: field 'answer' missing")
    if not target.strip():
        raise DataError(f"{where}: field 'answer' is empty")
    image_ids = image_ids_of(rec, where)
    check_messages(messages, len(image_ids), where)
    return Record(id=f"{name}/{index}", index=index, messages=messages, target=target, image_ids=image_ids)


def load_dialogue_records(name: str, anno_file: Path, image_dir: Path, *, skip_bad: bool = False) -> RecordSet:
    """Read and validate a split file (a JSON list); every image must exist under ``image_dir``."""
    data = read_json(anno_file)
    if not isinstance(data, list):
        raise DataError(f"{anno_file}: expected a JSON list of samples, found {type(data).__name__}")

    def parse(item, index, where):
        return parse_dialogue_record(item, index, where, name=name)

    return collect_records(name, anno_file, image_dir, data, parse, skip_bad=skip_bad)
