"""The SparklesDialogue pipeline: plan the GPT calls, run them resumably, validate the replies, export.

Planning is deterministic for a given seed and inputs, so a re-run plans the same prompts. Each finished
call is appended (and fsynced) to a JSON-lines raw log the moment it returns — with its prompt, reply,
candidates and usage — and the GPT client's SQLite cache keeps even the answers that were in flight when a
run was killed. A re-run skips every case already in the raw log, so it never pays for it again; a raw log
made with other settings (a different prompt for the same case id) is an error, not a silent mix.

Parsing, validation and export read only the raw logs, so they can be re-run (``--step export``) without an
API key, and they cover every call ever made into that output directory.

A run holds the output directory's lock file (:func:`generation_lock`) from start to end, so two runs on one
directory never interleave; the second stops at once with an error naming the holder. Only the run holding the
lock repairs a raw log (drops a line torn by a killed run); everything else reads logs without rewriting them.
Before the first call the run prints the planned cost (calls x estimated cost,
:func:`sparkles.gpt.estimate_cost`); with a spending cap on the client (``--max_usd``) the calls stop before the
spend would pass it. Existing output files that this pipeline did not write (e.g. the released annotations) are
never overwritten unless ``force`` is set (:func:`.export.claim_outputs`), and that is checked before any call.
With ``batch_api`` the calls go through the OpenAI Batch API (:mod:`sparkles.gpt.batch`: half price, same cache,
same replies in the same order); a run killed while its batch is in flight re-attaches to it when started again.

Output files in the output directory, for ``<Name>`` = ``SparklesDialogueCC`` / ``SparklesDialogueVG``:
``<Name>_raw.jsonl`` (CC) or ``<Name>_raw_<m>img.jsonl`` (VG) raw logs and their ``.json`` twins (the original's format),
``<Name>.json`` and the ``_turn{1,2}_{n}img.json`` splits, ``<Name>_rejects.json`` (every rejected
conversation with its reason), ``<Name>_summary.json``, ``<Name>_cost.json``, ``<Name>_files.json`` (what the
pipeline wrote there) and the lock file ``.generation.lock``.
"""

from __future__ import annotations

import copy
import os
import random
import socket
import sys
import time
from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterator

from sparkles.common.paths import MissingPathError, SparklesLayout
from sparkles.gpt.client import ChatRequest, GPTClient
from sparkles.gpt.cost import PriceTable, UsageLedger, estimate_cost
from sparkles.gpt.errors import GPTCallError
from sparkles.common.io import append_jsonl, read_jsonl, atomic_write_json
from sparkles.common.logging import progress_bar

from . import sources
from .demos import GroupFn, for_display, select_vg_demos
from .export import claim_outputs, export_dialogues
from .parse import ReplyParseError, parse_reply
from .prompts import cc_prompt, vg_prompt
from .schema import check_dialogue_record
from .validate import Rejected, validate_dialogue

CC_DEMO_COUNTS = (1, 2, 3)  # demo-seed files SparklesDialogueCC_50demo_img{k}1.json
LOCK_FILE = ".generation.lock"


class OutputDirBusy(RuntimeError):
    """Another generation run holds the output directory's lock."""


@contextmanager
def generation_lock(out_dir: str | os.PathLike) -> Iterator[Path]:
    """Hold ``out_dir``'s lock file while the block runs; a second holder gets :class:`OutputDirBusy` at once.

    The lock is the operating system's (``flock``): it ends with the process, so a killed run leaves no stale
    lock behind. The file keeps the holder's pid, host and start time for the error message.
    """
    import fcntl

    path = Path(out_dir) / LOCK_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+", encoding="utf-8") as f:
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            holder = f.read().strip() or "a process that has not written its name yet"
            raise OutputDirBusy(f"{out_dir} is in use by another generation run ({holder}; lock file {path}); "
                                "wait for it to finish, or use another --output_dir") from None
        f.seek(0)
        f.truncate()
        f.write(f"pid {os.getpid()} on {socket.gethostname()}, started "
                f"{datetime.now(timezone.utc).isoformat(timespec='seconds')}\n")
        f.flush()
        yield path


@dataclass
class GenerationOptions:
    """Everything a generation run needs besides the GPT client (CLI flags map onto these)."""

    subset: str = "CC"
    case_num: int = 1220
    seed: int = 0
    sparkles_root: str | None = None
    output_dir: str | None = None
    model: str = "gpt-4"
    temperature: float = 1.0
    max_tokens: int = 2048
    top_p: float = 1.0
    concurrency: int = 4
    cc_candidates: int = 9
    vg_candidates: int = 4
    vg_first_turn_images: tuple[int, ...] = (2, 3)
    vg_reserved_max_id: int = 100
    min_answer_words: int = 100
    demo_dir: str | None = None
    cc_dialogue_path: str | None = None
    include_demos: bool = False
    strict_first_turn: bool = False
    progress: bool = True
    step: str = "all"  # all | generate | export
    force: bool = False  # overwrite existing output files this pipeline did not write (e.g. released annotations)
    batch_api: bool = False  # send the calls as OpenAI Batch API jobs (half price, answers within 24 h)
    batch_poll_interval: float = 30.0  # seconds between two looks at a submitted batch

    @property
    def name(self) -> str:
        return f"SparklesDialogue{self.subset}"

    def layout(self) -> SparklesLayout:
        return SparklesLayout.from_root(self.sparkles_root)

    def out_dir(self) -> Path:
        if self.output_dir:
            return Path(self.output_dir)
        return self.layout().dialogue_dir(self.subset) / "generated"


@dataclass
class Case:
    """One planned GPT call."""

    case_id: str
    log: str  # raw-log file name
    prompt: str
    candidates: list[dict]
    first_turn_images: list[int]

    def candidate_map(self) -> dict[str, dict]:
        return {str(c["image_id"]): c for c in self.candidates}


# --- planning --------------------------------------------------------------------------------------------
def plan_cc_cases(seeds: dict[int, list[dict]], pool: dict[str, dict], *, case_num: int, seed: int,
                  num_candidates: int = 9, log: str = "SparklesDialogueCC_raw.jsonl") -> list[Case]:
    """Each call: one random demo per seed file, ``num_candidates`` images drawn from the pool (images may
    recur across calls, as upstream), conversations whose first turns use 1, 2, 3 images."""
    if len(pool) < num_candidates:
        raise ValueError(f"the CC candidate pool has {len(pool)} images, fewer than the {num_candidates} per call")
    rng = random.Random(seed)
    ids = sorted(pool)
    counts = sorted(seeds)
    cases = []
    for i in range(case_num):
        demos = [for_display(rng.choice(seeds[k])) for k in counts]
        cands = [dict(pool[x]) for x in rng.sample(ids, num_candidates)]
        cases.append(Case(f"CC-{i:05d}", log, cc_prompt(demos, cands, counts), cands, list(counts)))
    return cases


def plan_vg_cases(demos_by_m: dict[int, list[dict]], pool: dict[str, dict], *, case_num: int, seed: int,
                  num_candidates: int = 4, name: str = "SparklesDialogueVG") -> list[Case]:
    """Each call: one random demo, ``num_candidates`` images that no other call gets (drawn without
    replacement over all calls of all first-turn counts)."""
    needed = case_num * num_candidates * len(demos_by_m)
    if len(pool) < needed:
        raise ValueError(f"the VG candidate pool has {len(pool)} images; {case_num} calls x {len(demos_by_m)} "
                         f"first-turn counts x {num_candidates} candidates need {needed}")
    rng = random.Random(seed)
    order = sorted(pool, key=int)
    rng.shuffle(order)
    taken = 0
    cases = []
    for m in sorted(demos_by_m):
        if not demos_by_m[m]:
            raise ValueError(f"no VG demo dialogue with {m} first-turn images")
        for i in range(case_num):
            demo = for_display(rng.choice(demos_by_m[m]))
            cands = [dict(pool[x]) for x in order[taken:taken + num_candidates]]
            taken += num_candidates
            cases.append(Case(f"VG-{m}img-{i:05d}", f"{name}_raw_{m}img.jsonl", vg_prompt(demo, cands, m), cands, [m]))
    return cases


def load_cc_inputs(opts: GenerationOptions) -> tuple[dict[int, list[dict]], dict[str, dict]]:
    layout = opts.layout()
    demo_dir = Path(opts.demo_dir) if opts.demo_dir else layout.dialogue_dir("CC") / "annotations"
    seeds = {k: sources.load_dialogues(demo_dir / f"SparklesDialogueCC_50demo_img{k}1.json", f"CC demo seed file (k={k})")
             for k in CC_DEMO_COUNTS}
    for k, records in seeds.items():
        if not records:
            raise ValueError(f"CC demo seed file for k={k} in {demo_dir} is empty")
    pool = sources.load_cc_captions(layout.cc_sbu_align / "filter_cap.json")
    used = set().union(*(sources.image_ids_of(r) for r in seeds.values()))
    return seeds, {k: v for k, v in pool.items() if k not in used}


def cc_dialogue_source(opts: GenerationOptions) -> Path:
    """The SparklesDialogueCC file whose dialogues serve as VG demos: ``--cc_dialogue_path``, else a generated
    one (next to this run's output, then the default generated dir), else the released file."""
    layout = opts.layout()
    options = ([Path(opts.cc_dialogue_path)] if opts.cc_dialogue_path else [
        opts.out_dir() / "SparklesDialogueCC.json",
        layout.dialogue_dir("CC") / "generated" / "SparklesDialogueCC.json",
        layout.dialogue_file("CC")])
    for path in options:
        if path.exists():
            return path
    raise MissingPathError("no SparklesDialogueCC file for the VG demos; looked at: "
                           + ", ".join(str(p) for p in options) + " (run --subset CC first or pass --cc_dialogue_path)")


def load_vg_inputs(opts: GenerationOptions, group_fn: GroupFn | None = None
                   ) -> tuple[dict[int, list[dict]], dict[str, dict], dict[str, Any]]:
    layout = opts.layout()
    cc_path = cc_dialogue_source(opts)
    cc_records = sources.load_dialogues(cc_path, "SparklesDialogueCC file")
    demos = {}
    for m in opts.vg_first_turn_images:
        cache = layout.root / "data" / f"grouped_questions_CC_first_turn_{m}img.json"
        demos[m] = select_vg_demos(cc_records, m, group_fn=group_fn, min_answer_words=opts.min_answer_words,
                                   cache_path=cache)
        if not demos[m]:
            raise ValueError(f"{cc_path}: no dialogue qualifies as a VG demo for {m} first-turn images (first "
                             f"message with {m} slots, unique verb-noun, both answers >= {opts.min_answer_words} words)")
    pool = sources.load_svit_descriptions(layout.svit_descriptions)
    excluded_eval: set[str] = set()
    eval_file = layout.eval_annotations("SparklesEval")
    if eval_file.exists():  # keep the benchmark's images out of the training data
        excluded_eval = sources.image_ids_of(sources.load_dialogues(eval_file, "SparklesEval annotations"))
    kept = {k: v for k, v in pool.items() if int(k) > opts.vg_reserved_max_id and k not in excluded_eval}
    info = {"cc_demo_source": str(cc_path), "demos_per_first_turn_count": {m: len(d) for m, d in demos.items()},
            "svit_images": len(pool), "excluded_reserved_ids": sum(int(k) <= opts.vg_reserved_max_id for k in pool),
            "excluded_sparkleseval_images": len(excluded_eval & set(pool)), "pool": len(kept)}
    return demos, kept, info


# --- running ---------------------------------------------------------------------------------------------
@dataclass
class RunReport:
    planned: int = 0
    already_done: int = 0
    new_calls: int = 0
    failed: list[dict] = field(default_factory=list)
    over_budget: int = 0  # calls not made because the spending cap would have been passed
    planned_cost_usd: float | None = None  # estimate for the calls to make (None: a model without a price)


def planned_cost(requests: list[ChatRequest], client: GPTClient, *, batch: bool = False) -> tuple[float | None, str]:
    """The estimated cost of ``requests`` (None if one cannot be priced; at batch prices with ``batch``) and a
    line saying so."""
    if not requests:
        return 0.0, "planned: no new GPT calls"
    bodies = [client.build_request(r.prompt, model=r.model, temperature=r.temperature, max_tokens=r.max_tokens,
                                   top_p=r.top_p, **r.params) for r in requests]
    costs = [estimate_cost(client.ledger.prices, b, batch=batch) for b in bodies]
    models = ", ".join(sorted({b["model"] for b in bodies}))
    if any(c is None for c in costs):
        return None, (f"planned: {len(requests)} GPT call(s) to {models}; cost unknown (no price for the model, or "
                      "no max_tokens; add a price with --price_table)")
    total = sum(costs)
    line = (f"planned: {len(requests)} GPT call(s) to {models} x ~${total / len(requests):.4f} each (estimated; the "
            f"answers counted at their max_tokens{'; Batch API prices' if batch else ''}) = ~${total:.4f}")
    if client.cap is not None:
        line += f"; spending cap ${client.cap.max_usd:.2f}"
    return total, line


def run_calls(cases: list[Case], client: GPTClient, out_dir: Path, opts: GenerationOptions) -> RunReport:
    """Make the calls not yet in the raw logs; append each result the moment it arrives.

    Call only while holding :func:`generation_lock`: a raw log's torn last line is repaired here before new
    lines are appended after it.
    """
    done: dict[str, dict] = {}
    for log in sorted({c.log for c in cases}):
        for rec in read_jsonl(out_dir / log, repair=True):
            done[rec["case_id"]] = rec
    for case in cases:
        rec = done.get(case.case_id)
        if rec is not None and rec["prompt"] != case.prompt:
            raise ValueError(
                f"{out_dir / case.log}: case {case.case_id} was generated from a different prompt (other seed, "
                "inputs or options); use the original settings to resume, or another --output_dir")
    todo = [c for c in cases if c.case_id not in done]
    report = RunReport(planned=len(cases), already_done=len(cases) - len(todo))
    requests = [ChatRequest(prompt=c.prompt, model=opts.model, temperature=opts.temperature,
                            max_tokens=opts.max_tokens, top_p=opts.top_p, cache_tag=c.case_id) for c in todo]
    report.planned_cost_usd, line = planned_cost(requests, client, batch=opts.batch_api)
    print(line, flush=True)
    if client.cap is not None and report.planned_cost_usd is None:
        raise ValueError("a spending cap (--max_usd) needs a price for the model (--price_table) and a max_tokens "
                         "limit, to estimate each call before it is sent")
    if not todo:
        return report
    bar = progress_bar(total=len(cases), initial=report.already_done, desc=f"GPT calls ({opts.subset})", unit="call",
                       enabled=opts.progress)

    def on_result(i: int, result) -> None:
        case = todo[i]
        if isinstance(result, GPTCallError) and result.kind == "budget":
            report.over_budget += 1
        elif isinstance(result, GPTCallError):
            report.failed.append({"case_id": case.case_id, **result.to_dict()})
        else:
            append_jsonl(out_dir / case.log, {
                "case_id": case.case_id, "prompt": case.prompt, "response": result.text,
                "candidates": case.candidates, "first_turn_images": case.first_turn_images,
                "model": result.model, "response_model": result.response_model,
                "finish_reason": result.finish_reason, "usage": result.usage.to_dict(),
                "cached": result.cached, **({"batch_api": True} if result.batch else {}), "time": time.time()})
            report.new_calls += 1
        bar.update(1)

    try:
        if opts.batch_api:
            from sparkles.gpt.batch import BatchRunner

            BatchRunner(client, poll_interval=opts.batch_poll_interval,
                        notify=lambda line: print(line, file=sys.stderr, flush=True)).map_chat(requests,
                                                                                                on_result=on_result)
        else:
            client.map_chat(requests, concurrency=opts.concurrency, on_result=on_result)
    finally:
        bar.close()
    return report


# --- collecting ------------------------------------------------------------------------------------------
def raw_log_names(opts: GenerationOptions, out_dir: Path) -> list[str]:
    if opts.subset == "CC":
        return [f"{opts.name}_raw.jsonl"]
    return sorted(p.name for p in out_dir.glob(f"{opts.name}_raw_*img.jsonl"))


def collect(raw_records: list[dict], *, strict_first_turn: bool = False) -> dict[str, Any]:
    """Parse and validate every raw record; returns accepted records, rejects and counters."""
    accepted: list[dict] = []
    rejects: list[dict] = []
    methods: Counter = Counter()
    warnings: Counter = Counter()
    notes: Counter = Counter()
    for rec in raw_records:
        raw = [{"prompt": rec["prompt"], "response": rec["response"]}]
        expected = rec.get("first_turn_images") or []
        candidates = {str(c["image_id"]): c for c in rec.get("candidates", [])}
        if rec.get("finish_reason") == "length":
            notes["reply_cut_by_max_tokens"] += 1
        try:
            parsed = parse_reply(rec["response"], expected=len(expected) or None)
        except ReplyParseError as exc:
            rejects.append({"case_id": rec["case_id"], "dialogue_index": None, "reason": "unparseable_reply",
                            "detail": str(exc), "response": rec["response"]})
            continue
        methods[parsed.method] += 1
        for note in parsed.notes:
            notes["conversation_count_differs" if note.startswith("expected") else note] += 1
        for idx, reason, text in parsed.failed:
            rejects.append({"case_id": rec["case_id"], "dialogue_index": idx, "reason": reason,
                            "detail": f"conversation {idx} could not be read", "text": text})
        for idx, conv in parsed.dialogues:
            want = expected[idx] if idx < len(expected) else None
            try:
                ok = validate_dialogue(conv, candidates, first_turn_images=want, strict_first_turn=strict_first_turn)
            except Rejected as r:
                rejects.append({"case_id": rec["case_id"], "dialogue_index": idx, "reason": r.reason,
                                "detail": r.detail, "dialogue": conv})
                continue
            warnings.update(ok.warnings)
            accepted.append({"dialogue": ok.dialogue, "raw": copy.deepcopy(raw)})
    return {"accepted": accepted, "rejects": rejects, "parse_methods": dict(methods), "warnings": dict(warnings),
            "notes": dict(notes)}


def raw_cost(raw_records: list[dict], prices: PriceTable) -> dict[str, Any]:
    """Tokens and cost of every call in the raw logs (this run and earlier ones)."""
    ledger = UsageLedger(prices)
    for rec in raw_records:
        u = rec.get("usage") or {}
        ledger.record(rec.get("model", "unknown"), int(u.get("prompt_tokens", 0)), int(u.get("completion_tokens", 0)),
                      cached=False, batch=bool(rec.get("batch_api")))
    return ledger.summary()


# --- the whole job ---------------------------------------------------------------------------------------
def plan(opts: GenerationOptions, group_fn: GroupFn | None = None) -> tuple[list[Case], dict[str, Any]]:
    if opts.subset == "CC":
        seeds, pool = load_cc_inputs(opts)
        info = {"seed_dialogues": {k: len(v) for k, v in seeds.items()}, "pool": len(pool)}
        return plan_cc_cases(seeds, pool, case_num=opts.case_num, seed=opts.seed,
                             num_candidates=opts.cc_candidates, log=f"{opts.name}_raw.jsonl"), info
    if opts.subset == "VG":
        demos, pool, info = load_vg_inputs(opts, group_fn)
        return plan_vg_cases(demos, pool, case_num=opts.case_num, seed=opts.seed,
                             num_candidates=opts.vg_candidates, name=opts.name), info
    raise ValueError(f"unknown subset {opts.subset!r}; known: CC, VG")


def run_job(opts: GenerationOptions, client: GPTClient | None = None, *, group_fn: GroupFn | None = None,
            prices: PriceTable | None = None) -> dict[str, Any]:
    """Generate (``step`` all/generate, needs ``client``) and export (all/export), holding the output directory's
    lock throughout. Returns the summary, which is also written to ``<Name>_summary.json``."""
    out_dir = opts.out_dir()
    out_dir.mkdir(parents=True, exist_ok=True)
    with generation_lock(out_dir):
        return _run_job(opts, client, out_dir, group_fn=group_fn, prices=prices)


def _run_job(opts: GenerationOptions, client: GPTClient | None, out_dir: Path, *, group_fn: GroupFn | None,
             prices: PriceTable | None) -> dict[str, Any]:
    name = opts.name
    generating = opts.step in ("all", "generate")
    if generating and client is None:
        raise ValueError("generation needs a GPT client")
    cases, info = plan(opts, group_fn) if generating else ([], {})
    logs = sorted({c.log for c in cases} | set(raw_log_names(opts, out_dir)))
    # Every file this run may write is checked before the first paid call, not after it.
    claim_outputs(out_dir, name, [f"{name}.json", f"{name}_rejects.json", f"{name}_summary.json", f"{name}_cost.json",
                                  *(log.replace(".jsonl", ".json") for log in logs)],
                  force=opts.force, splits=True)
    summary: dict[str, Any] = {"subset": opts.subset, "model": opts.model, "seed": opts.seed,
                               "case_num": opts.case_num, "output_dir": str(out_dir)}
    if generating:
        summary["inputs"] = info
        report = run_calls(cases, client, out_dir, opts)
        summary["calls"] = {"planned": report.planned, "already_done": report.already_done,
                            "new": report.new_calls, "failed": len(report.failed)}
        summary["failed_calls"] = report.failed
        summary["spending"] = {"planned_cost_usd": report.planned_cost_usd,
                               "max_usd": client.cap.max_usd if client.cap is not None else None,
                               "calls_not_made": report.over_budget}
        for log in sorted({c.log for c in cases}):
            records = read_jsonl(out_dir / log, repair=False)
            atomic_write_json(out_dir / log.replace(".jsonl", ".json"),
                              [{"raw": [{"prompt": r["prompt"], "response": r["response"]}]} for r in records])
    raw_records = [r for log in raw_log_names(opts, out_dir) for r in read_jsonl(out_dir / log, repair=False)]
    prices = prices or (client.ledger.prices if client is not None else PriceTable())
    if opts.step in ("all", "export"):
        result = collect(raw_records, strict_first_turn=opts.strict_first_turn)
        records = result["accepted"]
        if opts.include_demos:
            records = records + demo_records(opts)
        files = export_dialogues(records, out_dir, name, force=opts.force) if records else []
        atomic_write_json(out_dir / f"{name}_rejects.json", result["rejects"])
        by_reason = Counter(r["reason"] for r in result["rejects"])
        first_counts = Counter(len(r["dialogue"][0]["images"]) for r in result["accepted"])
        summary["dialogues"] = {
            "raw_calls": len(raw_records), "accepted": len(result["accepted"]), "rejected": len(result["rejects"]),
            "rejected_by_reason": dict(sorted(by_reason.items())), "warnings": result["warnings"],
            "parse_methods": result["parse_methods"], "notes": result["notes"],
            "accepted_by_first_turn_images": {str(k): v for k, v in sorted(first_counts.items())},
            "demo_dialogues_included": len(records) - len(result["accepted"])}
        summary["files"] = [str(p) for p in files]
    cost = {"all_raw_calls": raw_cost(raw_records, prices)}
    if client is not None:
        cost["this_run"] = client.ledger.summary()
    atomic_write_json(out_dir / f"{name}_cost.json", cost)
    summary["cost_usd"] = {"this_run": cost.get("this_run", {}).get("total", {}).get("cost_usd"),
                           "all_raw_calls": cost["all_raw_calls"]["total"]["cost_usd"]}
    atomic_write_json(out_dir / f"{name}_summary.json", summary)
    return summary


def demo_records(opts: GenerationOptions) -> list[dict]:
    """The CC seed dialogues, deep-copied and checked, for ``--include_demos`` (no ``raw``: GPT did not write
    them in this run)."""
    if opts.subset != "CC":
        raise ValueError("--include_demos applies to the CC subset (its seeds are CC dialogues)")
    seeds, _ = load_cc_inputs(opts)
    out = []
    for k in sorted(seeds):
        for i, rec in enumerate(seeds[k]):
            check_dialogue_record(rec, f"CC demo seed file k={k}: record {i}")
            out.append({"dialogue": copy.deepcopy(rec["dialogue"])})
    return out
