"""One summary of a train-and-evaluate run: ``summary.json`` plus a table on stdout.

Reads the ``*_metrics.json`` files that ``evaluate.py --merge-results`` writes under
``<root>/evaluation/<dataset>/results/`` for one model name, the ``i4-score.json`` that ``i4_score.py`` writes
for the model (``--i4-results``) and for a baseline (``--i4-baseline``), the score of chats replayed as the demo
has them (``--demo-chat``: a result file with ``score``, ``A1``, ``A2`` and ``judge``), and the timings ``run.sh``
measured.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Optional

from ..common.io import atomic_write_json, read_json

DATASETS = ("BISON", "NLVR2", "SparklesEval")


def _latest_metrics(root: Path, dataset: str, model_name: Optional[str]) -> Optional[dict]:
    results = root / "evaluation" / dataset / "results"
    found = []
    for path in results.rglob("*_metrics.json") if results.is_dir() else []:
        data = read_json(path, what="metrics file")
        if model_name is None or data.get("model_name") == model_name:
            found.append((path.stat().st_mtime, path, data))
    if not found:
        return None
    _, path, data = max(found, key=lambda t: t[0])
    data["_path"] = str(path.relative_to(root))
    return data


def i4_summary(result_dir: Path) -> Optional[dict]:
    """``{"mean", "categories": {name: score}, "datasets": {name: value}}`` (× 100) of one I4 result folder."""
    path = result_dir / "i4-score.json"
    if not path.is_file():
        return None
    data = read_json(path, what="I4 score file")
    categories = {name: c.get("score") for name, c in (data.get("categories") or {}).items()
                  if c.get("score") is not None}
    datasets = {}
    for cat in (data.get("categories") or {}).values():
        for name, value in (cat.get("datasets") or {}).items():
            datasets[name] = value
    return {"mean": data.get("mean"), "categories": categories, "datasets": datasets,
            "categories_scored": data.get("categories_scored"), "protocol": data.get("protocol")}


def build_summary(root: Path, *, model_name: Optional[str] = None, train_seconds: Optional[float] = None,
                  eval_seconds: Optional[float] = None, extra: Optional[dict] = None,
                  i4_results: Optional[Path] = None, i4_baseline: Optional[Path] = None,
                  demo_chat: Optional[Path] = None) -> dict:
    summary: dict = {"root": str(root), "model_name": model_name}
    for ds in DATASETS:
        m = _latest_metrics(root, ds, model_name)
        if m is None:
            continue
        if ds == "SparklesEval":
            head = m.get("headline") or {}
            summary["sparkleseval_score"] = head.get("overall")
            summary["sparkleseval_judge"] = head.get("judge")
            summary["sparkleseval_A1"] = head.get("A1")
            summary["sparkleseval_A2"] = head.get("A2")
        else:
            key = ds.lower()
            summary[f"{key}_acc"] = m.get("accuracy")
            summary[f"{key}_unparseable"] = m.get("unparseable")
            summary[f"{key}_items"] = m.get("total")
        summary.setdefault("metrics_files", {})[ds] = m["_path"]
    for key, folder in (("i4_score", i4_results), ("i4_baseline", i4_baseline)):
        if folder is not None:
            summary[key] = i4_summary(Path(folder))
    if demo_chat is not None:
        data = read_json(Path(demo_chat), what="demo chat result")
        summary["demo_chat_score"] = data.get("score")
        summary["demo_chat_A1"], summary["demo_chat_A2"] = data.get("A1"), data.get("A2")
        summary["demo_chat_judge"] = (data.get("judge") or {}).get("model")
    summary["train_seconds"] = train_seconds
    summary["eval_seconds"] = eval_seconds
    if extra:
        summary.update(extra)
    return summary


def format_table(summary: dict) -> str:
    def fmt(v, spec):
        return "n/a" if v is None else format(v, spec)

    rows = [
        ("BISON accuracy", fmt(summary.get("bison_acc"), ".3f"), "chance 0.500"),
        ("NLVR2 accuracy", fmt(summary.get("nlvr2_acc"), ".3f"), "chance 0.500"),
        ("SparklesEval score (/10)", fmt(summary.get("sparkleseval_score"), ".2f"),
         f"judge: {summary.get('sparkleseval_judge') or 'n/a'}"),
        ("demo chat score (/10)", fmt(summary.get("demo_chat_score"), ".2f"),
         f"judge: {summary.get('demo_chat_judge') or 'n/a'}; images labelled IMAGE#1.. as in the demo"),
        ("I4 score (mean of categories, x100)", fmt((summary.get("i4_score") or {}).get("mean"), ".1f"),
         "baseline " + fmt((summary.get("i4_baseline") or {}).get("mean"), ".1f")),
        ("train time (s)", fmt(summary.get("train_seconds"), ".0f"), ""),
        ("eval time (s)", fmt(summary.get("eval_seconds"), ".0f"), ""),
    ]
    width = max(len(r[0]) for r in rows)
    lines = [f"{'metric':<{width}}  {'value':>8}  note", "-" * (width + 24)]
    lines += [f"{name:<{width}}  {value:>8}  {note}" for name, value, note in rows]
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--root", required=True, help="the Sparkles root the run wrote into")
    p.add_argument("--model-name", default=None, help="only metrics of this model name (default: newest)")
    p.add_argument("--train-seconds", type=float, default=None)
    p.add_argument("--eval-seconds", type=float, default=None)
    p.add_argument("--extra", default=None, help="JSON object of extra fields to record")
    p.add_argument("--out", default=None, help="summary.json path (default <root>/summary.json)")
    p.add_argument("--i4-results", default=None, help="the model's I4 result folder (with i4-score.json)")
    p.add_argument("--i4-baseline", default=None, help="a baseline's I4 result folder, reported beside it")
    p.add_argument("--demo-chat", default=None, help="a demo chat result file (score, A1, A2, judge)")
    args = p.parse_args(argv)
    root = Path(args.root)
    summary = build_summary(root, model_name=args.model_name, train_seconds=args.train_seconds,
                            eval_seconds=args.eval_seconds, extra=json.loads(args.extra) if args.extra else None,
                            i4_results=args.i4_results, i4_baseline=args.i4_baseline, demo_chat=args.demo_chat)
    out = Path(args.out) if args.out else root / "summary.json"
    atomic_write_json(out, summary)
    print(format_table(summary))
    print(f"summary written to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
