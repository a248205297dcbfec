"""Demo (illustrative) dialogues: how GPT sees them, and the VG demo choice by unique verb–noun.

Demos are always deep-copied before they are reshaped for a prompt — upstream mutated the seed objects in
place and later wrote the mutated copies into the dataset.
"""

from __future__ import annotations

import copy
import hashlib
import json
from pathlib import Path
from typing import Callable

from sparkles.common.io import atomic_write_json, read_json

from .schema import count_slots, strip_slots

GroupFn = Callable[[list[str]], list[dict]]


def for_display(record: dict) -> list[dict]:
    """A demo as shown to GPT: user messages list their ``image_ids`` before the text, slot markers are
    removed, and the last answer is shortened to ``...`` (GPT is asked to write its own in full)."""
    shown = []
    msgs = copy.deepcopy(record["dialogue"])
    for i, msg in enumerate(msgs):
        if msg["role"] == "user":
            shown.append({"role": "user", "image_ids": [img["image_id"] for img in msg.get("images", [])],
                          "content": strip_slots(msg["content"])})
        else:
            shown.append({"role": "assistant", "content": "..." if i == len(msgs) - 1 else msg["content"]})
    return shown


def _words(text: str) -> int:
    return len(text.split())


def select_vg_demos(cc_records: list[dict], first_turn_images: int, *, group_fn: GroupFn | None = None,
                    min_answer_words: int = 100, cache_path: str | Path | None = None) -> list[dict]:
    """CC dialogues usable as the single VG demo for ``first_turn_images`` images (as the original chose them).

    Keeps dialogues whose first user message has exactly that many slots, whose first request is the only
    one with its (root verb, object noun) pair, and whose two answers both have at least
    ``min_answer_words`` words. ``group_fn(messages)`` returns groups ``{"verb", "noun", "instr_dialogue":
    [{"instruction", "dialogue_idx"}], "count"}``; by default spaCy's grouping from ``sparkles.stats``.
    With the default grouping, groups are cached in ``cache_path`` (keyed by a hash of the messages).
    Returns deep copies.
    """
    chosen = [r for r in cc_records if count_slots(r["dialogue"][0]["content"]) == first_turn_images]
    messages = [strip_slots(r["dialogue"][0]["content"]) for r in chosen]
    groups = _groups(messages, group_fn, cache_path)
    unique_idx = sorted(g["instr_dialogue"][0]["dialogue_idx"] for g in groups if g["count"] == 1)
    demos = []
    for idx in unique_idx:
        record = chosen[idx]
        answers = [record["dialogue"][1]["content"], record["dialogue"][3]["content"]]
        if all(_words(a) >= min_answer_words for a in answers):
            demos.append(copy.deepcopy(record))
    return demos


def _groups(messages: list[str], group_fn: GroupFn | None, cache_path: str | Path | None) -> list[dict]:
    if group_fn is not None:
        return group_fn(messages)
    digest = hashlib.sha256(json.dumps(messages, ensure_ascii=False).encode()).hexdigest()
    if cache_path is not None and Path(cache_path).exists():
        cached = read_json(cache_path, what="demo grouping cache")
        if isinstance(cached, dict) and cached.get("messages_sha256") == digest:
            return cached["groups"]
    # spaCy is heavy and optional: imported only on this path
    from sparkles.stats.verb_noun import group_by_verb_noun, load_spacy_pipeline

    groups = group_by_verb_noun(messages, nlp=load_spacy_pipeline())
    if cache_path is not None:
        atomic_write_json(cache_path, {"messages_sha256": digest, "groups": groups})
    return groups
