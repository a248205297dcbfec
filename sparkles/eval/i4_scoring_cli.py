"""Command lines that score I4 predictions: ``calculate_I4.py`` (per dataset) and ``i4_score.py`` (per category).

``calculate_I4.py --result-dir R --i4-dir D [--dataset NAME ...] [--protocol default|upstream]`` scores every
``R/<dataset>/pred.json`` (or the named datasets) against the question type and choices of
``D/<dataset>/core/core.json`` and writes ``R/<dataset>/eval.json`` and ``R/<dataset>/eval_score.json``.
``i4_score.py --result-dir R [--protocol ...]`` reads every ``R/<dataset>/eval.json`` and writes the category
table as ``R/i4-score.txt`` (for people) and ``R/i4-score.json`` (for programs). The rules are in
:mod:`sparkles.eval.benchmarks.i4`; ``default`` uses its ``sparkles`` rule, ``upstream`` the original's.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any, Optional, Sequence

from ..common.io import atomic_write, atomic_write_json, read_json
from ..common.paths import MissingPathError
from .benchmarks import i4

PROTOCOL_RULES = {"default": "sparkles", "upstream": "upstream"}
PRED_FILE, EVAL_FILE, EVAL_SCORE_FILE = "pred.json", "eval.json", "eval_score.json"
SCORE_TXT, SCORE_JSON = "i4-score.txt", "i4-score.json"
RULE_NAMES = {"image-choice": "image-choice", "multi-choice": "TF-IDF multi-choice", "open-ended": "ROUGE-L"}


def _protocol_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--protocol", choices=tuple(PROTOCOL_RULES), default="default",
                        help="default: the corrected rules; upstream: the original scorer's rules, flaws included "
                             "(see sparkles/eval/benchmarks/i4.py)")


def _error(message: str) -> None:
    print(f"error: {message}", file=sys.stderr)


# ------------------------------------------------------------------------------------------------ calculate_I4

def _with_choices(predictions: Any, records: list[dict], pred_path: Path) -> list[dict]:
    """Each prediction with the choices of its core.json record (a prediction's own ``choices`` win)."""
    if not isinstance(predictions, list):
        raise i4.I4FormatError(f"{pred_path}: must be a JSON list of predictions")
    by_id = {str(r["sample_id"]): r for r in records}
    seen: set[str] = set()
    out = []
    for i, item in enumerate(predictions):
        if not isinstance(item, dict) or "sample_id" not in item:
            raise i4.I4FormatError(f"{pred_path}: item {i}: must be an object with a 'sample_id'")
        sid = str(item["sample_id"])
        if sid not in by_id:
            raise i4.I4FormatError(f"{pred_path}: item {i}: sample_id {sid!r} is not in core.json")
        if sid in seen:
            raise i4.I4FormatError(f"{pred_path}: item {i}: sample_id {sid!r} appears twice")
        seen.add(sid)
        choices = item.get("choices") or by_id[sid]["task_instance"].get("choice_list")
        out.append({**item, "choices": choices} if choices else dict(item))
    return out


def score_one(result_dir: Path, i4_dir: Path, dataset: str, rule: str) -> str:
    """Score one dataset, write its two files, and return the line to print."""
    pred_path = result_dir / dataset / PRED_FILE
    predictions = read_json(pred_path, what=f"I4 {dataset} predictions")
    metadata, records = i4.load_core(i4_dir, dataset)
    items = _with_choices(predictions, records, pred_path)
    question_type = metadata["question_type"]
    metric, per_item = i4.score_dataset(items, question_type, dataset, rule)
    atomic_write_json(result_dir / dataset / EVAL_FILE, metric)
    atomic_write_json(result_dir / dataset / EVAL_SCORE_FILE, per_item)
    (key, value), = metric.items()
    errors = sum(1 for item in items if item.get("error"))
    unanswered = len(records) - len(items)
    how = i4.scoring_rule(dataset, question_type, rule)
    line = (f"{dataset:<30} {how:<12} {key} = {value:.5f}  ({len(items)} predictions, {errors} not asked, "
            f"{unanswered} core samples without a prediction)")
    upstream_how = i4.scoring_rule(dataset, question_type, "upstream")
    if how != upstream_how:
        line += (f"\n  note: {dataset} was scored by the {RULE_NAMES[how]} rule; the original scorer's dataset list "
                 f"misspells it, so the original scored it by the {RULE_NAMES[upstream_how]} rule "
                 "(--protocol upstream reproduces that)")
    return line


def _datasets(result_dir: Path, names: Optional[Sequence[str]]) -> list[str]:
    if names:
        return list(dict.fromkeys(names))
    return sorted(p.parent.name for p in result_dir.glob(f"*/{PRED_FILE}"))


def calculate_main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="calculate_I4.py", description=(
        "Score I4 (DEMON core) predictions: writes <result-dir>/<dataset>/eval.json and eval_score.json."))
    parser.add_argument("--result-dir", required=True, type=Path,
                        help="holds <dataset>/pred.json for each dataset that was run")
    parser.add_argument("--i4-dir", required=True, type=Path, help="the benchmark: <i4-dir>/<dataset>/core/core.json")
    parser.add_argument("--dataset", nargs="+", action="extend", metavar="NAME",
                        help="only these datasets (default: every <result-dir>/<dataset>/pred.json)")
    _protocol_arg(parser)
    args = parser.parse_args(argv)
    rule = PROTOCOL_RULES[args.protocol]
    datasets = _datasets(args.result_dir, args.dataset)
    if not datasets:
        _error(f"no <dataset>/{PRED_FILE} under {args.result_dir}")
        return 1
    failed = 0
    for dataset in datasets:
        try:
            print(score_one(args.result_dir, args.i4_dir, dataset, rule), flush=True)
        except (i4.I4FormatError, MissingPathError, ValueError) as exc:
            _error(f"{dataset}: {exc}")
            failed += 1
    if failed:
        _error(f"{failed} of {len(datasets)} dataset(s) could not be scored")
    return 1 if failed else 0


# --------------------------------------------------------------------------------------------------- i4_score

def format_table(summary: dict, protocol: str) -> str:
    """The category table of :func:`~sparkles.eval.benchmarks.i4.category_scores`, one line per category."""
    lines = [f"I4 (DEMON core), protocol {protocol}: per category, the mean of its dataset scores x 100",
             f"{'category':<28} {'score':>9}  datasets"]
    for name, cat in summary["categories"].items():
        score = "-" if cat["score"] is None else f"{cat['score']:.5f}"
        note = f"{cat['present']}/{cat['total']}"
        if cat["missing"]:
            skipped = cat["score"] is None and cat["present"] > 0
            note += (" (skipped, missing: " if skipped else " (missing: ") + ", ".join(cat["missing"]) + ")"
        lines.append(f"{name:<28} {score:>9}  {note}")
    mean = "-" if summary["mean"] is None else f"{summary['mean']:.5f}"
    lines.append(f"{'mean':<28} {mean:>9}  {summary['categories_scored']}/{summary['categories_total']} categories")
    if summary["unknown_datasets"]:
        lines.append("not in any category (not counted): " + ", ".join(summary["unknown_datasets"]))
    return "\n".join(lines) + "\n"


def score_main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="i4_score.py", description=(
        "Average I4 dataset scores (<result-dir>/<dataset>/eval.json) per category; writes i4-score.txt and "
        "i4-score.json in the result directory."))
    parser.add_argument("--result-dir", required=True, type=Path, help="the directory calculate_I4.py scored")
    _protocol_arg(parser)
    args = parser.parse_args(argv)
    try:
        per_dataset = {p.parent.name: read_json(p, what="I4 eval.json", error=i4.I4FormatError)
                       for p in sorted(args.result_dir.glob(f"*/{EVAL_FILE}"))}
        if not per_dataset:
            raise MissingPathError(f"no <dataset>/{EVAL_FILE} under {args.result_dir}; run calculate_I4.py first")
        summary = i4.category_scores(per_dataset, PROTOCOL_RULES[args.protocol])
    except (i4.I4FormatError, MissingPathError) as exc:
        _error(str(exc))
        return 1
    table = format_table(summary, args.protocol)
    atomic_write(args.result_dir / SCORE_TXT, table)
    atomic_write_json(args.result_dir / SCORE_JSON, {"protocol": args.protocol, **summary})
    print(table, end="")
    return 0
