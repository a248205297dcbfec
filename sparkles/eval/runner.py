"""Running one shard of an evaluation: generate the missing answers, judge the unjudged, save as we go.

Every finished item is written to the shard file at once (atomically), and judge replies are cached by
the GPT client, so a shard that is killed and started again redoes nothing it had finished. Items that
another shard of the same run already finished (e.g. after re-sharding) are copied, not recomputed.
"""

from __future__ import annotations

import copy
import logging
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Sequence

from ..common.io import read_json
from ..common.logging import progress_bar
from ..gpt.errors import GPTCallError
from .benchmarks import CHOICE_BENCHMARKS
from .benchmarks.sparkleseval import check_dialogue, judge_entry_status, turn2_prompt
from .data import EvalSet
from .generator import Request
from .judges import JudgeOutcome
from .protocol import Protocol, item_seed
from .store import RunDir, ShardFile, eid_key

log = logging.getLogger(__name__)


@dataclass
class ShardStats:
    """What this invocation did (not what earlier invocations did)."""

    items: int = 0            # items in the shard range
    reused: int = 0           # finished before this invocation (this shard or a sibling shard)
    generated: int = 0        # items whose answers were generated now
    generations: int = 0      # model answers produced now (retries included)
    unparseable: int = 0      # BISON/NLVR2 items left without a readable choice now
    failed: int = 0           # items that could not be answered now (recorded with their error)
    judged: dict = field(default_factory=dict)       # judge → judgements recorded now
    judge_failed: dict = field(default_factory=dict)  # judge → replies that never parsed (recorded)
    judge_calls: int = 0      # replies obtained (cached or paid)
    paid_calls: int = 0       # replies actually requested from the API
    api_errors: list = field(default_factory=list)   # "evaluation_id: message" (not recorded; re-run)

    def to_dict(self) -> dict:
        return dict(self.__dict__)


def _chunks(seq: Sequence, size: int):
    for i in range(0, len(seq), size):
        yield seq[i:i + size]


def adopt_from_siblings(run: RunDir, shard: ShardFile, wanted: set, *, merge_judges: bool) -> int:
    """Copy finished items of ``wanted`` ids from the run's other shard files; returns how many were new."""
    adopted = 0
    for path in run.shard_files():
        if path == shard.path:
            continue
        try:
            items = read_json(path, what="shard file")
        except (ValueError, OSError) as exc:
            log.warning("skipping unreadable shard file %s: %s", path, exc)
            continue
        for item in items if isinstance(items, list) else []:
            eid = item.get("evaluation_id")
            if eid_key(eid) not in wanted:
                continue
            mine = shard.get(eid)
            if mine is None:
                shard.put(copy.deepcopy(item), save=False)
                adopted += 1
            elif merge_judges and mine.get("dialogue") == item.get("dialogue"):
                for key, value in item.items():
                    if key not in mine and isinstance(value, dict):
                        mine[key] = copy.deepcopy(value)
    if adopted or merge_judges:
        shard.save()
    return adopted


# -------------------------------------------------------------------------------------------- BISON / NLVR2
def run_choice_shard(evalset: EvalSet, indices: Sequence[int], shard: ShardFile, generator_factory: Callable,
                     protocol: Protocol, seed: int, stats: ShardStats, progress: bool = True) -> None:
    """Answer every question of ``indices`` that the shard does not hold yet.

    Each item records the question (``prompt``), the decoder's input (``model_input``) and any ``warnings``; an
    item that cannot be answered (its context does not fit) is recorded with its ``error`` and counts as wrong.
    """
    benchmark = CHOICE_BENCHMARKS[evalset.dataset]
    template = getattr(protocol.texts, benchmark.TEMPLATE_KEY)
    questions = [benchmark.question(evalset, i, template) for i in indices]
    pending = [(i, q) for i, q in zip(indices, questions) if q.evaluation_id not in shard]
    stats.items, stats.reused = len(questions), len(questions) - len(pending)
    if not pending:
        return
    generator = generator_factory()
    bar = _bar(len(pending), f"{evalset.dataset} answers", progress)
    for batch in _chunks(pending, generator.batch_size):
        reqs = [Request(q.prompt, [evalset.abspath(p) for p in q.img_paths],
                        item_seed(seed, q.evaluation_id, 0), _where(evalset, i, "img_paths")) for i, q in batch]
        answers = generator.generate(reqs, protocol.generation())
        for (i, q), req, answer in zip(batch, reqs, answers):
            generations = 1
            predict = None if answer.error else benchmark.extract(answer.text, protocol.extraction)
            while predict is None and not answer.error and generations <= protocol.max_retries:
                retry = Request(req.prompt, req.images, item_seed(seed, q.evaluation_id, generations), req.where)
                answer = generator.generate([retry], protocol.generation())[0]
                generations += 1
                predict = None if answer.error else benchmark.extract(answer.text, protocol.extraction)
            stats.generations += generations
            item = {"label": q.label, "prompt": q.prompt, "img_paths": q.img_paths, "predict": predict,
                    "response": answer.text, "sentence": q.sentence, "evaluation_id": q.evaluation_id,
                    "generations": generations, "model_input": answer.model_input}
            if answer.warnings:
                item["warnings"] = answer.warnings
            if answer.error:
                item["error"] = answer.error
                stats.failed += 1
            else:
                stats.unparseable += predict is None
            shard.put(item)
            stats.generated += 1
            bar.update(1)
    bar.close()


# -------------------------------------------------------------------------------------------- SparklesEval
def _where(evalset: EvalSet, index: int, field_name: str) -> str:
    item = evalset.items[index]
    return f"{evalset.annotation_path}: record {index} (evaluation_id {item.get('evaluation_id')!r}), {field_name}"


def _image_files(evalset: EvalSet, message: dict) -> list:
    return [evalset.image_file(img["image_id"]) for img in message.get("images") or []]


def run_sparkleseval_generation(evalset: EvalSet, indices: Sequence[int], shard: ShardFile,
                                generator_factory: Optional[Callable], protocol: Protocol, seed: int,
                                stats: ShardStats, progress: bool = True) -> None:
    """Two-turn answers for every dialogue of ``indices`` not in the shard yet.

    Turn 1 asks the first user message with its images. Turn 2 asks the second with the images of both turns:
    after the first turn as it happened (the model's own A1), or, under ``protocol.turn2 == "inline"``, as the
    one user message :func:`~.benchmarks.sparkleseval.turn2_prompt` (the original's way). The item records both
    questions (``prompt``) and decoder inputs (``model_input``); a dialogue that cannot be answered is recorded
    with its ``error`` and is not judged. ``generator_factory=None`` keeps the reference answers (judging the
    GPT-4 dialogues themselves).
    """
    dialogues = {i: check_dialogue(evalset.items[i], _where(evalset, i, "dialogue")) for i in indices}
    pending = [i for i in indices if evalset.items[i]["evaluation_id"] not in shard]
    stats.items, stats.reused = len(indices), len(indices) - len(pending)
    if not pending:
        return
    if generator_factory is None:
        for i in pending:
            item = evalset.items[i]
            shard.put({"evaluation_id": item["evaluation_id"], "dialogue": copy.deepcopy(dialogues[i])}, save=False)
        shard.save()
        return
    generator = generator_factory()
    bar = _bar(len(pending), "SparklesEval dialogues", progress)
    for batch in _chunks(pending, generator.batch_size):
        turn1 = []
        for i in batch:
            q1 = dialogues[i][0]
            eid = evalset.items[i]["evaluation_id"]
            turn1.append(Request(q1["content"], _image_files(evalset, q1), item_seed(seed, eid, 0, "turn1"),
                                 _where(evalset, i, "dialogue[0]")))
        answers1 = generator.generate(turn1, protocol.generation())
        turn2, asked2 = [], []
        for i, a1 in zip(batch, answers1):
            if a1.error:
                continue
            q1, q2 = dialogues[i][0], dialogues[i][2]
            eid = evalset.items[i]["evaluation_id"]
            images = _image_files(evalset, q1) + _image_files(evalset, q2)
            where, seed2 = _where(evalset, i, "dialogue[2]"), item_seed(seed, eid, 0, "turn2")
            if protocol.turn2 == "inline":
                req = Request(turn2_prompt(q1["content"], a1.text, q2["content"]), images, seed2, where)
            else:
                req = Request(q2["content"], images, seed2, where, history=(q1["content"], a1.text))
            turn2.append(req)
            asked2.append(i)
        answers2 = dict(zip(asked2, generator.generate(turn2, protocol.generation())))
        prompts2 = dict(zip(asked2, (r.prompt for r in turn2)))
        stats.generations += len(batch) + len(asked2)
        for i, a1 in zip(batch, answers1):
            a2 = answers2.get(i)
            dialogue = copy.deepcopy(dialogues[i])
            item = {"evaluation_id": evalset.items[i]["evaluation_id"], "dialogue": dialogue}
            answers = [a for a in (a1, a2) if a is not None]
            failed = next((a for a in answers if a.error), None)
            if failed is None:
                dialogue[1]["content"], dialogue[3]["content"] = a1.text, a2.text
            item["prompt"] = [dialogues[i][0]["content"]] + ([prompts2[i]] if i in prompts2 else [])
            item["model_input"] = [a.model_input for a in answers]
            warnings = [w for a in answers for w in a.warnings]
            if warnings:
                item["warnings"] = warnings
            if failed is not None:
                item["error"] = failed.error
                stats.failed += 1
            shard.put(item)
            stats.generated += 1
            bar.update(1)
    bar.close()


def run_judging(shard: ShardFile, eids: Sequence[Any], judges: Sequence[Any], stats: ShardStats, *,
                concurrency: int = 4, progress: bool = True, rejudge_failed: bool = False) -> None:
    """Judge every item of ``eids`` that has no entry for a judge yet; record each judgement at once.

    A reply that never parses is recorded as a failure entry (``error``, ``prompt``, ``response``) and is not
    asked again on re-runs unless ``rejudge_failed``. An API failure records nothing: the next run retries.
    Dialogues the model could not answer (an item ``error``) are not judged.
    """
    redo = ("missing", "failed") if rejudge_failed else ("missing",)
    for judge in judges:
        name = judge.model
        todo = [e for e in eids
                if judge_entry_status(shard.get(e).get(name)) in redo and not shard.get(e).get("error")]
        stats.judged.setdefault(name, 0)
        stats.judge_failed.setdefault(name, 0)
        if not todo:
            continue
        bar = _bar(len(todo), f"judge {name}", progress)

        def record(eid: Any, outcome: JudgeOutcome, *, save: bool = True) -> None:
            item = shard.get(eid)
            item[name] = outcome.entry
            shard.put(item, save=save)
            stats.judge_calls += outcome.calls
            stats.paid_calls += outcome.paid_calls
            stats.judged[name] += 1
            stats.judge_failed[name] += not outcome.ok
            bar.update(1)

        workers = max(1, min(concurrency, len(todo))) if judge.kind == "gpt" else 1
        if getattr(judge, "ask_many", None) is not None:  # --batch-api: every pending dialogue in one batch
            outcomes = judge.judge_all([shard.get(e)["dialogue"] for e in todo])
            for eid, outcome in zip(todo, outcomes):
                if isinstance(outcome, GPTCallError):
                    stats.api_errors.append(f"{name} / evaluation_id {eid}: {outcome}")
                else:
                    record(eid, outcome, save=False)  # all at once: the shard is written once below
            shard.save()
        elif workers == 1:
            for eid in todo:
                try:
                    record(eid, judge.judge(shard.get(eid)["dialogue"]))
                except GPTCallError as exc:
                    stats.api_errors.append(f"{name} / evaluation_id {eid}: {exc}")
        else:
            with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="judge") as pool:
                futures = {pool.submit(judge.judge, copy.deepcopy(shard.get(e)["dialogue"])): e for e in todo}
                for fut in as_completed(futures):  # results are written from this thread only
                    eid = futures[fut]
                    try:
                        record(eid, fut.result())
                    except GPTCallError as exc:
                        stats.api_errors.append(f"{name} / evaluation_id {eid}: {exc}")
        bar.close()


def _bar(total: int, desc: str, enabled: bool):
    return progress_bar(total=total, desc=desc, unit="item", enabled=enabled and total > 0, leave=False)
