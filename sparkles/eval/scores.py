"""Metrics: BISON/NLVR2 accuracy and the SparklesEval headline score.

SparklesEval (UPSTREAM_FACTS §11.5): for one judge, take the dialogues it rated successfully; average their
``A1_C123_scores`` and ``A2_C123_scores`` vectors element-wise; a turn's score is the mean of its C1, C2, C3
means (the judge's own overall rating, element 0, is reported but not used); the headline is the mean of the
two turns. Because every counted dialogue has both vectors, this equals the mean over dialogues of
(mean C1–C3 of A1 + mean C1–C3 of A2) / 2.
"""

from __future__ import annotations

from typing import Any, Iterable, Mapping, Sequence

from .judge import SCORE_KEYS, judge_entry_status


def _mean(values: Sequence[float]) -> float:
    return sum(values) / len(values)


def sparkleseval_summary(items: Iterable[Mapping[str, Any]], judge: str) -> dict[str, Any]:
    """Per-judge numbers: counts, mean A1/A2 vectors, A1, A2 and overall (None when nothing was rated)."""
    items = list(items)
    rows: dict[str, list[list[float]]] = {k: [] for k in SCORE_KEYS}
    failed, missing = [], []
    for item in items:
        entry = item.get(judge)
        status = judge_entry_status(entry)
        if status == "missing":
            missing.append(item.get("evaluation_id"))
            continue
        if status == "failed":
            failed.append(item.get("evaluation_id"))
            continue
        for key in SCORE_KEYS:
            rows[key].append([float(v) for v in entry[key]])
    n = len(rows[SCORE_KEYS[0]])
    out: dict[str, Any] = {"judge": judge, "dialogues": len(items), "rated": n, "failed": len(failed),
                           "failed_ids": failed, "unjudged": len(missing), "unjudged_ids": missing,
                           "A1_vector": None, "A2_vector": None, "A1": None, "A2": None, "overall": None}
    if n == 0:
        return out
    turns = []
    for key, label in zip(SCORE_KEYS, ("A1", "A2")):
        vector = [_mean(col) for col in zip(*rows[key])]
        out[f"{label}_vector"] = vector
        out[label] = _mean(vector[1:])  # C1..C3; element 0 is the judge's own overall
        turns.append(out[label])
    out["overall"] = _mean(turns)
    return out


def choice_summary(items: Iterable[Mapping[str, Any]]) -> dict[str, Any]:
    """BISON/NLVR2: accuracy over all items (an unparseable answer counts as wrong), plus the parse counts."""
    items = list(items)
    correct = unparseable = generations = 0
    for item in items:
        predict = item.get("predict")
        if predict is None:
            unparseable += 1
        elif str(predict).strip().lower() == str(item.get("label", "")).strip().lower():
            correct += 1
        generations += int(item.get("generations", 1))
    total = len(items)
    parsed = total - unparseable
    return {"total": total, "correct": correct, "accuracy": correct / total if total else None,
            "unparseable": unparseable, "accuracy_parsed": correct / parsed if parsed else None,
            "generations": generations}
