"""Merging a run's shards into the final result file, its HTML page and a metrics JSON.

The manifest lists the shards; their files are read (never deleted), items are joined by
``evaluation_id`` and checked:

- duplicates (the same id in two shards, e.g. after re-sharding) are kept once when they agree;
  for SparklesEval the judge entries of both copies are combined (upstream's rule); conflicting copies are
  an error;
- gaps: an id inside a registered shard range, or inside the planned slice of ``--shard I/N`` / torchrun
  shards, with no finished item (a shard still running, crashed or never started) is an error unless
  ``allow_partial``; annotation items outside every range are reported as not covered, with a warning, except
  those outside the slice that the merging command names (``--data-from``/``--data-to``): an evaluation of a
  deliberate slice gets one info line about the rest, while a slice whose shards leave a hole still warns.

Outputs, next to the run directory in ``<root>/evaluation/<dataset>/results/``:
``<dataset>_<model>.json`` (SparklesEval) or ``<dataset>_<model>_acc<x.xxx>.json`` (BISON/NLVR2) in the
upstream schema, the same name with ``.html`` (:mod:`sparkles.viz.html`), and
``<dataset>_<model>_metrics.json``. :func:`score_and_write` is that last step on its own (re-scoring a result
file goes through it too, :mod:`.rescore`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

from ..common.io import atomic_write_json, read_json
from ..viz import html as viz
from .benchmarks import CHOICE_BENCHMARKS, sparkleseval
from .benchmarks.sparkleseval import SCORE_KEYS, has_scores
from .data import EvalSet
from .store import RunDir, eid_key

log = logging.getLogger(__name__)


class MergeError(RuntimeError):
    """Shards that cannot be merged (gaps, conflicting duplicates, nothing to merge)."""


@dataclass
class MergeResult:
    items: list
    metrics: dict
    result_path: Path
    metrics_path: Path
    html_paths: list = field(default_factory=list)


def _ranges(ids: Sequence[int]) -> list[list[int]]:
    """Compress sorted indices into ``[from, to)`` ranges."""
    out: list[list[int]] = []
    for i in ids:
        if out and out[-1][1] == i:
            out[-1][1] = i + 1
        else:
            out.append([i, i + 1])
    return out


def _combine(first: dict, other: dict, dataset: str, eid: Any) -> dict:
    if dataset != "SparklesEval":
        if first != other:
            raise MergeError(f"evaluation_id {eid!r} appears in two shards with different results; remove the "
                             "stale shard file (see manifest.json) and merge again")
        return first
    if first.get("dialogue") != other.get("dialogue"):
        raise MergeError(f"evaluation_id {eid!r} appears in two shards with different answers")
    merged = dict(first)
    for key, value in other.items():
        if isinstance(value, dict) and (key not in merged or (not has_scores(merged[key]) and has_scores(value))):
            merged[key] = value
    return merged


def collect(run: RunDir, evalset: EvalSet, *, allow_partial: bool = False,
            scope: Optional[tuple[int, Optional[int]]] = None) -> tuple[list[dict], dict]:
    """The run's items joined by id (in id order) and a report of duplicates, gaps and coverage.

    ``scope``: the ``[from, to)`` slice the merging command names (``to`` None: to the end), None for the whole
    set; annotation items outside it are not expected in any shard.
    """
    manifest = run.read_manifest()
    shards = manifest.get("shards") or []
    if not shards:
        raise MergeError(f"{run.manifest_path} lists no shards")
    by_id: dict[Any, dict] = {}
    duplicates = []
    for shard in shards:
        path = run.path / shard["file"]
        if not path.is_file():
            continue  # a shard that never finished its first item; its range shows up as a gap
        for item in read_json(path, what="shard file"):
            key = eid_key(item.get("evaluation_id"))
            if key in by_id:
                duplicates.append(item.get("evaluation_id"))
                by_id[key] = _combine(by_id[key], item, evalset.dataset, item.get("evaluation_id"))
            else:
                by_id[key] = item
    annotations = evalset.items
    index_of = {eid_key(a["evaluation_id"]): i for i, a in enumerate(annotations)}
    unknown = [by_id[k].get("evaluation_id") for k in by_id if k not in index_of]
    if unknown:
        raise MergeError(f"shards hold evaluation ids not in {evalset.annotation_path}: {unknown[:10]}")
    spans = [(s["from"], s["to"]) for s in shards] + [tuple(p) for p in manifest.get("planned") or []]
    requested = sorted({i for lo, hi in spans for i in range(lo, min(hi, len(annotations)))})
    missing = [i for i in requested if eid_key(annotations[i]["evaluation_id"]) not in by_id]
    covered = set(requested)
    first, end = _slice_bounds(scope, len(annotations))
    not_covered = [i for i in range(first, end) if i not in covered]
    outside_slice = len(annotations) - (end - first)
    report = {"shards": [{k: s.get(k) for k in ("file", "from", "to", "status")} for s in shards],
              "duplicates": len(duplicates), "duplicate_ids": duplicates,
              "missing": len(missing), "missing_ranges": _ranges(missing),
              "not_covered": len(not_covered), "not_covered_ranges": _ranges(not_covered),
              "complete": not missing and not not_covered}
    if outside_slice:
        report.update(slice=[first, end], outside_slice=outside_slice)
    if duplicates:
        log.warning("%d evaluation id(s) found in more than one shard; merged: %s", len(duplicates), duplicates[:10])
    if missing:
        unfinished = [s["file"] for s in shards if s.get("status") != "done"]
        msg = (f"{len(missing)} item(s) of the requested ranges have no result (index ranges "
               f"{_ranges(missing)}); unfinished shards: {unfinished or 'none'}. Re-run those shards with "
               "--inference (finished items are kept), or pass --allow-partial.")
        if not allow_partial:
            raise MergeError(msg)
        log.warning("%s", msg)
    if not_covered:
        where = f"items of the slice [{first}, {end})" if outside_slice else "annotation items"
        log.warning("%d of %d %s are outside every shard range: %s", len(not_covered), end - first, where,
                    _ranges(not_covered))
    if outside_slice:
        earlier = sum(1 for k in by_id if not first <= index_of[k] < end)  # finished by earlier commands
        log.info("merging the slice [%d, %d) of %d annotation items (the other %d were not asked for)%s", first,
                 end, len(annotations), outside_slice,
                 f"; {earlier} finished item(s) outside it are merged too" if earlier else "")
    items = [by_id[k] for k in sorted(by_id)]
    if not items:
        raise MergeError(f"no finished items in {run.path}")
    return items, report


def _slice_bounds(scope: Optional[tuple[int, Optional[int]]], n: int) -> tuple[int, int]:
    """``[from, to)`` of ``scope`` clipped to ``n`` annotation items (the whole set for None)."""
    if scope is None:
        return 0, n
    start, stop = scope
    lo = min(max(0, start), n)
    return lo, max(lo, n if stop is None else min(stop, n))


def merge_run(run: RunDir, evalset: EvalSet, *, judges: Optional[Sequence[str]] = None,
              allow_partial: bool = False, write_html: bool = True,
              scope: Optional[tuple[int, Optional[int]]] = None) -> MergeResult:
    """Merge, score and write the outputs (see the module docstring); ``scope`` as in :func:`collect`."""
    items, report = collect(run, evalset, allow_partial=allow_partial, scope=scope)
    manifest = run.read_manifest()
    extra = {**report, "settings": manifest.get("settings"), "judge_settings": manifest.get("judges")}
    # A run of the reference dialogues themselves carries upstream's name (gpt-4); its page names their author.
    reference_run = (manifest.get("settings") or {}).get("mode") == "reference_dialogues"
    return score_and_write(items, dataset=evalset.dataset, out_dir=run.results_dir, base=run.base,
                           model_name=run.model_name, judges=judges, extra=extra, write_html=write_html,
                           image_url_fn=evalset.image_url, protected=(evalset.annotation_path,),
                           protected_dirs=(evalset.annotation_path.parent,),
                           page_model_name=viz.reference_dialogues_label(evalset.annotation_path)
                           if reference_run else None)


def score_and_write(items: list, *, dataset: str, out_dir: Path, base: str, model_name: str,
                    judges: Optional[Sequence[str]] = None, extra: Optional[dict] = None, write_html: bool = True,
                    image_url_fn=None, protected: Sequence[Path] = (),
                    protected_dirs: Sequence[Path] = (), page_model_name: Optional[str] = None) -> MergeResult:
    """Score finished items and write ``<base>.json`` / ``<base>_acc<x.xxx>.json``, its page and the metrics.

    SparklesEval: one score per judge (``judges``, default every judge found, ``gpt-4`` first), the first being
    the headline. BISON/NLVR2: accuracy of the items' ``predict``. ``protected`` / ``protected_dirs``: files and
    folders never written into (the annotations, a result file being re-scored). ``page_model_name``: the model
    named on the HTML page when it differs from the run's name.
    """
    metrics: dict[str, Any] = {"dataset": dataset, "model_name": model_name, "items": len(items)}
    if dataset == "SparklesEval":
        found = sorted({k for it in items for k, v in it.items()
                        if isinstance(v, dict) and ("error" in v or SCORE_KEYS[0] in v)})
        names = list(dict.fromkeys(judges)) if judges else sorted(found, key=lambda n: (n != "gpt-4", n))
        metrics["judges"] = {name: sparkleseval.score(items, name) for name in names}
        if names:  # the reported number: the first judge asked for (gpt-4 when present otherwise)
            first = metrics["judges"][names[0]]
            metrics["headline"] = {"judge": names[0], "overall": first["overall"], "A1": first["A1"],
                                   "A2": first["A2"], "rated": first["rated"]}
        result_path = out_dir / f"{base}.json"
        for name, s in metrics["judges"].items():
            if s["overall"] is None:
                log.warning("judge %s: no rated dialogues (%d failed, %d unjudged)", name, s["failed"], s["unjudged"])
                continue
            print(f"[{dataset}] {model_name} judged by {name}: "
                  f"A1 vector {_fmt(s['A1_vector'])}, A2 vector {_fmt(s['A2_vector'])}; "
                  f"A1 {s['A1']:.2f}, A2 {s['A2']:.2f}, overall {s['overall']:.2f} "
                  f"({s['rated']} rated, {s['failed']} unparseable, {s['unjudged']} unjudged, "
                  f"{s['unanswered']} unanswered)")
    else:
        summary = CHOICE_BENCHMARKS[dataset].score(items)
        metrics.update(summary)
        acc = summary["accuracy"] or 0.0
        result_path = out_dir / f"{base}_acc{acc:.3f}.json"
        print(f"[{dataset}] {model_name}: accuracy {acc:.3f} ({summary['correct']}/{summary['total']}; "
              f"{summary['unparseable']} unparseable, {summary['failed']} failed, {summary['generations']} "
              "generations)")
    _report_failures(items, metrics, dataset)
    metrics.update(extra or {})
    metrics_path = out_dir / f"{base}_metrics.json"
    metrics["files"] = {"results": result_path.name}
    for path in (result_path, metrics_path, result_path.with_suffix(".html")):
        _check_not_input(path, protected, protected_dirs)
    atomic_write_json(result_path, items)
    html_paths = (_write_html(items, result_path, dataset, page_model_name or model_name, metrics, image_url_fn)
                  if write_html else [])
    if html_paths:
        metrics["files"]["html"] = [p.name for p in html_paths]
    atomic_write_json(metrics_path, metrics)
    print(f"[{dataset}] wrote {result_path}" + (f" and {html_paths[0].name}" if html_paths else ""))
    return MergeResult(items, metrics, result_path, metrics_path, html_paths)


def _report_failures(items: Sequence[dict], metrics: dict, dataset: str) -> None:
    """Count (and print) the items that could not be answered and those whose context was shortened."""
    failed = [it for it in items if it.get("error")]
    warned = [it for it in items if it.get("warnings")]
    metrics.update(failed_items=len(failed), failed_item_ids=[it.get("evaluation_id") for it in failed],
                   shortened_items=len(warned), shortened_item_ids=[it.get("evaluation_id") for it in warned])
    if failed:
        shown = "; ".join(f"{it.get('evaluation_id')}: {it['error']}" for it in failed[:3])
        print(f"[{dataset}] {len(failed)} item(s) could not be answered and count as failed ({shown}"
              + (" ..." if len(failed) > 3 else "") + ")")
    if warned:
        print(f"[{dataset}] {len(warned)} item(s) were answered from a shortened context (their 'warnings' say how)")


def _fmt(vector) -> str:
    return "[" + ", ".join(f"{v:.2f}" for v in vector) + "]"


def _check_not_input(path: Path, protected: Sequence[Path], protected_dirs: Sequence[Path]) -> None:
    target = path.resolve()
    if any(target == p.resolve() for p in protected) or any(d.resolve() in target.parents for d in protected_dirs):
        raise MergeError(f"refusing to write results over an input or into its directory: {path}")


def _write_html(items, result_path: Path, dataset: str, model_name: str, metrics: dict, image_url_fn) -> list[Path]:
    html_path = result_path.with_suffix(".html")
    try:
        if dataset == "SparklesEval":
            return viz.write_dialogue_page(items, html_path, image_url_fn=image_url_fn,
                                           title=result_path.stem, model_name=model_name)
        return viz.write_choice_results_page(items, html_path, metrics.get("accuracy"), title=result_path.stem,
                                             model_name=model_name)
    except Exception as exc:  # a page is a convenience; the JSON results are already written
        log.warning("could not write the HTML page %s: %s", html_path, exc)
        return []
