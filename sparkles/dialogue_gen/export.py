"""Export of accepted dialogues: the full dialogue file and the training split files (the released formats).

``<Name>.json`` holds every dialogue with its raw GPT exchange. ``<Name>_turn1_<n>img.json`` holds one
sample per dialogue for the first answer (instruction ``###Human: <Q1>###Assistant: ``, images of Q1);
``<Name>_turn2_<n>img.json`` one per dialogue for the second answer (the instruction carries the whole first
exchange; images of Q1 then Q2). ``n`` is the sample's image count — any count, not only up to four.
"""

from __future__ import annotations

import re
import sys
from collections import defaultdict
from pathlib import Path

from sparkles.common.io import atomic_write_json

from .schema import ASSISTANT_PREFIX, HUMAN_PREFIX, check_dialogue_record


def turn_samples(record: dict, turn: int) -> dict:
    """The training sample for answer ``turn`` (1 or 2) of one dialogue record."""
    q1, a1, q2, a2 = record["dialogue"]
    if turn == 1:
        return {"uniform_question": q1["content"],
                "instruction": f"{HUMAN_PREFIX}{q1['content']}{ASSISTANT_PREFIX}",
                "answer": a1["content"],
                "tgt_imgs": [dict(img) for img in q1["images"]]}
    if turn == 2:
        return {"uniform_question": q2["content"],
                "instruction": (f"{HUMAN_PREFIX}{q1['content']}{ASSISTANT_PREFIX}{a1['content']}"
                                f"{HUMAN_PREFIX}{q2['content']}{ASSISTANT_PREFIX}"),
                "answer": a2["content"],
                "tgt_imgs": [dict(img) for img in q1["images"] + q2["images"]]}
    raise ValueError(f"turn must be 1 or 2, got {turn}")


def split_by_image_count(records: list[dict], turn: int) -> dict[int, list[dict]]:
    groups: dict[int, list[dict]] = defaultdict(list)
    for record in records:
        sample = turn_samples(record, turn)
        groups[len(sample["tgt_imgs"])].append(sample)
    return dict(sorted(groups.items()))


def export_dialogues(records: list[dict], out_dir: str | Path, name: str) -> list[Path]:
    """Write ``<name>.json`` and every non-empty ``<name>_turn{1,2}_{n}img.json``; returns the paths.

    Every record is checked first (an error names the record and field), so a bad record never produces
    samples whose images and slots disagree. Split files of this name left from an earlier export that this
    one does not rewrite are reported in a warning, not deleted.
    """
    out_dir = Path(out_dir)
    for i, record in enumerate(records):
        check_dialogue_record(record, f"{name}: record {i}")
    written = [atomic_write_json(out_dir / f"{name}.json", records)]
    for turn in (1, 2):
        for n, samples in split_by_image_count(records, turn).items():
            written.append(atomic_write_json(out_dir / f"{name}_turn{turn}_{n}img.json", samples))
    pattern = re.compile(rf"{re.escape(name)}_turn[12]_\d+img\.json")
    stale = sorted(p for p in out_dir.glob(f"{name}_turn*img.json") if pattern.fullmatch(p.name) and p not in written)
    if stale:
        print(f"warning: split files from an earlier export were not rewritten: {', '.join(p.name for p in stale)}",
              file=sys.stderr)
    return written
