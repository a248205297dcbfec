"""Re-scoring and re-judging a finished result file (ours or a released one) without touching it.

``evaluate.py --results-file F --merge-results [--judge_models ...] [--protocol ...]``:

- BISON / NLVR2: every stored ``response`` is read again with the protocol's extraction rule (``sparkles`` by
  default, the original's under ``--protocol upstream`` or a protocol file that says so); the item keeps the
  stored choice as ``original_predict``, and the metrics give the file's own accuracy beside the new one.
- SparklesEval: the file's judge entries are kept under ``<judge>@original`` and scored again with the paper's
  formula; each judge of ``--judge_models`` rates every answered dialogue anew (with the protocol's judge texts,
  through the reply cache, resumable like any run).

Outputs go to ``--output-dir`` (default: the file's folder): a working directory
``<dataset>_<model>_rescored/`` (for SparklesEval, the judged copy of the items) and the merged files
``<dataset>_<model>_rescored[_acc<x.xxx>].json``, their page and ``_metrics.json``, as a merge writes them.
"""

from __future__ import annotations

import copy
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

from ..common.io import read_json
from .benchmarks import CHOICE_BENCHMARKS
from .benchmarks.sparkleseval import SCORE_KEYS
from .merge import MergeError, MergeResult, score_and_write
from .store import ShardFile

log = logging.getLogger(__name__)

ORIGINAL_SUFFIX = "@original"  # the result file's own judge entries, kept beside the new ones
_ACC_SUFFIX = re.compile(r"_acc\d+(?:\.\d+)?$")


class ResultsFileError(ValueError):
    """A result file that cannot be re-scored; the message names the file and what is wrong."""


@dataclass
class ResultsFile:
    """A result file read back: its items, which benchmark they belong to and the model they answer for."""

    path: Path
    items: list
    dataset: str
    model_name: str


def infer_dataset(items: Sequence[Any], path: Path) -> str:
    """SparklesEval when items hold dialogues; BISON or NLVR2 from the file name, else from the labels."""
    if all(isinstance(it, dict) and isinstance(it.get("dialogue"), list) for it in items):
        return "SparklesEval"
    if not all(isinstance(it, dict) and "response" in it and "label" in it for it in items):
        raise ResultsFileError(f"{path}: items are neither SparklesEval dialogues (a 'dialogue' list) nor "
                               "BISON/NLVR2 answers ('label' and 'response')")
    for name in CHOICE_BENCHMARKS:
        if path.name.startswith(name + "_"):
            return name
    labels = {str(it.get("label", "")).lower() for it in items}
    if labels <= {"image#1", "image#2"}:
        return "BISON"
    if labels <= {"true", "false"}:
        return "NLVR2"
    raise ResultsFileError(f"{path}: cannot tell BISON from NLVR2 (labels {sorted(labels)[:4]}); pass --dataset")


def read_results_file(path: str | Path, dataset: Optional[str] = None,
                      model_name: Optional[str] = None) -> ResultsFile:
    path = Path(path)
    items = read_json(path, what="result file", error=ResultsFileError)
    if not isinstance(items, list) or not items:
        raise ResultsFileError(f"{path}: a result file holds a non-empty JSON list of items")
    missing_ids = [k for k, it in enumerate(items) if not isinstance(it, dict) or "evaluation_id" not in it]
    if missing_ids:
        raise ResultsFileError(f"{path}: item(s) {missing_ids[:5]} have no 'evaluation_id'")
    found = infer_dataset(items, path)
    if dataset is not None and dataset != found:
        raise ResultsFileError(f"{path}: holds {found} results, not {dataset}")
    if model_name is None:
        stem = path.stem.removeprefix(found + "_")
        model_name = _ACC_SUFFIX.sub("", stem) or stem
    return ResultsFile(path, items, found, model_name)


def _rescore_choices(results: ResultsFile, rule: str) -> tuple[list, dict]:
    benchmark = CHOICE_BENCHMARKS[results.dataset]
    before = benchmark.score(results.items)
    items = []
    for item in results.items:
        new = copy.deepcopy(item)
        new["original_predict"] = item.get("predict")
        response = item.get("response")
        new["predict"] = benchmark.extract(response, rule) if isinstance(response, str) and not item.get("error") \
            else None
        items.append(new)
    changed = sum(new["predict"] != new["original_predict"] for new in items)
    return items, {"extraction": rule, "original_accuracy": before["accuracy"], "changed_predictions": changed}


def _imported(results: ResultsFile) -> list:
    """The file's items with its judge entries renamed ``<judge>@original``."""
    out = []
    for item in results.items:
        new = {}
        for key, value in item.items():
            is_judge = isinstance(value, dict) and (SCORE_KEYS[0] in value or "error" in value) and key != "dialogue"
            new[key + ORIGINAL_SUFFIX if is_judge and not key.endswith(ORIGINAL_SUFFIX) else key] = \
                copy.deepcopy(value)
        out.append(new)
    return out


def rescore(results: ResultsFile, *, out_dir: Optional[Path] = None, rule: str = "sparkles",
            judges: Sequence[Any] = (), judge_runner=None, write_html: bool = True) -> MergeResult:
    """Score ``results`` again (and have ``judges`` rate SparklesEval dialogues); see the module docstring.

    ``judge_runner(shard, eids, judges)`` does the judging (:func:`sparkles.eval.runner.run_judging` with the
    caller's settings); the judged copy lives in the working directory, so a re-run continues.
    """
    out_dir = Path(out_dir) if out_dir is not None else results.path.parent
    base = f"{results.dataset}_{results.model_name}_rescored"
    extra: dict[str, Any] = {"rescored_from": str(results.path)}
    if results.dataset == "SparklesEval":
        shard = ShardFile(out_dir / base / f"{base}_items.json")
        for item in _imported(results):
            if item["evaluation_id"] not in shard:
                shard.put(item, save=False)
        shard.save()
        eids = [it["evaluation_id"] for it in results.items]
        if judges:
            judge_runner(shard, eids, judges)
        items = [shard.get(e) for e in eids]
        originals = sorted({k for it in items for k in it if k.endswith(ORIGINAL_SUFFIX)})
        names = [j.model for j in judges] + originals
        extra["judge_settings"] = {j.model: j.settings() for j in judges}
    else:
        if judges:
            raise MergeError("--judge_models applies to SparklesEval result files only")
        items, info = _rescore_choices(results, rule)
        extra.update(info)
        names = None
    return score_and_write(items, dataset=results.dataset, out_dir=out_dir, base=base,
                           model_name=results.model_name, judges=names, extra=extra, write_html=write_html,
                           protected=(results.path,))
