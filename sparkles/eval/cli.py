"""``evaluate.py``: BISON / NLVR2 accuracy and the GPT-judged SparklesEval, sharded, resumable, mergeable.

The original's command line plus ``--protocol``, ``--batch-size``, ``--device``,
``--max-new-tokens``, ``--shard``, ``--model-name`` and judge options. Typical use::

    # one process: answer items 0..37 of BISON, then merge whatever the run holds
    python evaluate.py --sparkles_root ROOT --cfg-path eval_configs/sparkles_eval.yaml --dataset BISON \\
        --data-from 0 --data-to 38 --inference
    python evaluate.py ... --dataset BISON --merge-results

    # judge the GPT-4 reference dialogues of SparklesEval (no model)
    python evaluate.py --sparkles_root ROOT --dataset SparklesEval --inference --merge-results

    # the paper's protocol with the original's texts (imported by python -m sparkles.tools.import_protocol)
    python evaluate.py ... --protocol upstream --protocol-file protocol_upstream.yaml --inference --merge-results

    # score a finished (e.g. released) result file again, or have other judges rate its dialogues
    python evaluate.py --results-file SparklesEval_models_pretrained_sparkleschat_7b.json --merge-results \
        --judge_models gpt-4o

Under ``torchrun`` each rank takes its part of the range (``RANK`` / ``WORLD_SIZE``) and, with
``--merge-results``, rank 0 merges after all ranks finished.
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import sys
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

from ..common.config import ConfigError, import_modules, load_config, resolve_config_root, to_container
from ..common.paths import EVAL_DATASETS, MissingPathError, resolve_root
from ..conversation.protocol_file import ProtocolFileError, load_protocol_file
from .benchmarks import CHOICE_BENCHMARKS
from .benchmarks.sparkleseval import DialogueFormatError
from .data import AnnotationError, EvalSet
from .judges import JudgeSetupError, make_judges
from .protocol import PROTOCOLS, comparability_warning, make_protocol
from .store import ManifestError, RunDir, ShardFile, eid_key

log = logging.getLogger("sparkles.eval")

REFERENCE_MODEL_NAME = "gpt-4"  # upstream's name for the GPT-4 reference dialogues
EXIT_INCOMPLETE = 3  # some judgements could not be obtained (API errors); re-run to continue


class EvalError(RuntimeError):
    """A user-facing problem with the command (bad combination of flags, missing inputs)."""


@dataclass
class EvalReport:
    """What one invocation did; ``main`` turns it into an exit code, tests read it directly."""

    dataset: str
    model_name: str
    run_dir: Path
    shard: Optional[tuple[int, int]] = None
    stats: Optional[dict] = None
    merged: Optional[dict] = None
    result_path: Optional[Path] = None
    exit_code: int = 0
    messages: list = field(default_factory=list)


# ------------------------------------------------------------------------------------------------ arguments
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="evaluate.py", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cfg-path", default=None,
                   help="model config (eval_configs/*.yaml); omit to judge SparklesEval's GPT-4 reference dialogues")
    p.add_argument("--model-endpoint", default=None, metavar="URL",
                   help="evaluate the model behind an OpenAI-compatible chat API (e.g. http://host:8000/v1) instead "
                        "of a config; --model-name names the served model (default: the only one it lists); its "
                        "key comes from $MODEL_ENDPOINT_API_KEY")
    p.add_argument("--sparkles_root", "--sparkles-root", dest="sparkles_root", default=None,
                   help="Sparkles root (default: $SPARKLES_ROOT, then run.sparkles_root of the config)")
    p.add_argument("--dataset", default=None, choices=EVAL_DATASETS,
                   help="default NLVR2 (with --results-file: what the file holds)")
    p.add_argument("--data-from", type=int, default=0, help="first annotation index of the slice")
    p.add_argument("--data-to", type=int, default=None, help="end of the slice (exclusive; default: all)")
    p.add_argument("--shard", default=None, metavar="I/N",
                   help="take part I (0-based) of N equal parts of the slice (default under torchrun: RANK/WORLD_SIZE)")
    p.add_argument("--inference", action="store_true", help="answer (and judge) the slice")
    p.add_argument("--merge-results", action="store_true", help="merge the run's shards and compute the metric")
    p.add_argument("--allow-partial", action="store_true", help="merge even if some requested items are missing")
    p.add_argument("--protocol", default="default", choices=PROTOCOLS,
                   help="default: greedy, deterministic; upstream: the paper's sampling, re-asking, answer reading "
                        "and left truncation")
    p.add_argument("--protocol-file", default=None, metavar="F",
                   help="YAML with the protocol's texts (system text, BISON/NLVR2 prompts, judge prompt and system "
                        "message, extraction rule); default: the project's own wording. "
                        "python -m sparkles.tools.import_protocol writes the original's")
    p.add_argument("--results-file", default=None, metavar="F",
                   help="with --merge-results: score this finished result file again (BISON/NLVR2: read its "
                        "answers with the protocol's rule; SparklesEval: its judge scores, plus --judge_models "
                        "judging anew). F is never modified")
    p.add_argument("--output-dir", default=None,
                   help="where --results-file writes (default: the file's folder)")
    p.add_argument("--num-beams", type=int, default=1)
    p.add_argument("--temperature", type=float, default=None,
                   help="sampling temperature (upstream protocol; default 1.0). The default protocol is greedy.")
    p.add_argument("--max-new-tokens", type=int, default=None, help="default 1000")
    p.add_argument("--max-length", type=int, default=None, help="context + new tokens (default 2000)")
    p.add_argument("--max-retries", type=int, default=None,
                   help="extra generations for an unparseable BISON/NLVR2 answer (default: 0 default / 10 upstream)")
    p.add_argument("--batch-size", type=int, default=1, help="greedy answers generated together")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--gpu-id", type=int, default=None, help="upstream flag: same as --device cuda:N")
    p.add_argument("--judge_models", "--judge-models", dest="judge_models", nargs="+", default=None,
                   help="SparklesEval judges: gpt-4 (default), gpt-3.5-turbo, any chat model name, or a judge that a "
                        "module of run.imports / --imports registers. With --merge-results alone: every judge found.")
    p.add_argument("--imports", nargs="+", default=None, metavar="MODULE",
                   help="Python modules to import first (besides the config's run.imports): they register judges, "
                        "datasets or model presets, e.g. for runs without --cfg-path")
    p.add_argument("--judge-temperature", type=float, default=None, help="default 0 (upstream protocol: 1.0)")
    p.add_argument("--judge-attempts", type=int, default=None,
                   help="replies asked for per dialogue until one parses (default 3; upstream protocol 10)")
    p.add_argument("--rejudge-failed", action="store_true",
                   help="ask again for judgements recorded as unparseable (earlier attempts replay from the cache)")
    p.add_argument("--judge-max-tokens", type=int, default=1024)
    p.add_argument("--judge-concurrency", type=int, default=4)
    p.add_argument("--batch-api", "--batch_api", dest="batch_api", action="store_true",
                   help="GPT judges rate every pending dialogue through the OpenAI Batch API (one batch per attempt): "
                        "half price, answers within 24 hours, same cache and scores; a killed run re-attaches")
    p.add_argument("--batch-poll-interval", type=float, default=30.0,
                   help="seconds between two looks at a submitted batch (--batch-api)")
    p.add_argument("--gpt-cache", default=None,
                   help="SQLite cache of judge replies (default <root>/evaluation/SparklesEval/results/"
                        "gpt_judge_cache.sqlite)")
    p.add_argument("--model-name", default=None, help="override the name derived from model.ckpt")
    p.add_argument("--seed", type=int, default=2023)
    p.add_argument("--options", nargs="+", default=None, help="config overrides key=value")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    return p


def _parse_shard(value: Optional[str]) -> Optional[tuple[int, int]]:
    env_world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    if value is None:
        if env_world > 1:
            return int(os.environ.get("RANK", "0")), env_world
        return None
    return parse_shard_spec(value)


def parse_shard_spec(value: str) -> tuple[int, int]:
    """``"I/N"`` → ``(I, N)`` with ``0 <= I < N`` (an :class:`EvalError` otherwise)."""
    try:
        index, count = (int(x) for x in value.split("/"))
    except ValueError:
        raise EvalError(f"--shard must look like I/N (e.g. 0/4), got {value!r}") from None
    if count < 1 or not 0 <= index < count:
        raise EvalError(f"--shard {value}: need 0 <= I < N")
    return index, count


def shard_range(start: int, stop: int, index: int, count: int) -> tuple[int, int]:
    """Part ``index`` of ``count`` contiguous, near-equal parts of ``[start, stop)``."""
    n = stop - start
    lo = start + (n * index) // count
    hi = start + (n * (index + 1)) // count
    return lo, hi


def model_name_from_ckpt(ckpt: Path, num_beams: int = 1) -> str:
    """Upstream naming: ``<parent of parent>_<parent>_<stem>`` of the checkpoint, ``_beam<N>`` for N > 1."""
    ckpt = ckpt.resolve()
    name = f"{ckpt.parent.parent.name}_{ckpt.parent.name}_{ckpt.stem}"
    return name + (f"_beam{num_beams}" if num_beams > 1 else "")


def protocol_from_args(args):
    """The protocol of ``--protocol`` and its overrides, with the texts of ``--protocol-file``; warns (once, loudly)
    when an upstream run lacks the original's texts."""
    texts = load_protocol_file(args.protocol_file)
    protocol = make_protocol(args.protocol, num_beams=args.num_beams, temperature=args.temperature,
                             max_new_tokens=args.max_new_tokens, max_length=args.max_length,
                             max_retries=args.max_retries, judge_temperature=args.judge_temperature,
                             judge_attempts=args.judge_attempts, texts=texts)
    if args.temperature is not None and not protocol.do_sample:
        log.warning("--temperature is ignored: the default protocol decodes greedily (use --protocol upstream)")
    warning = comparability_warning(protocol)
    if warning:
        bar = "!" * 100
        log.warning("\n%s\n%s\n%s", bar, warning, bar)
    return protocol


def resolve_device(gpu_id: Optional[int], device: str = "auto") -> str:
    """``--gpu-id N`` → ``cuda:N``; else ``--device``; ``auto`` = this rank's GPU when CUDA is there, else the CPU."""
    if gpu_id is not None:
        return f"cuda:{gpu_id}"
    if device != "auto":
        return device
    import torch

    if torch.cuda.is_available():
        return f"cuda:{int(os.environ.get('LOCAL_RANK', '0') or 0)}"
    return "cpu"


def processor_spec(cfg) -> dict:
    """The eval image transform of a config (``run.eval_vis_processor``, the model's image size by default)."""
    spec = cfg.run.get("eval_vis_processor") or {}
    return {"name": spec.get("name") or "blip2_image_eval",
            "image_size": spec.get("image_size") or cfg.model.image_size}


def build_generator(cfg, root: Path, device: str, batch_size: int):
    """The config's model on ``device`` behind :class:`~.generator.ModelGenerator`."""
    from ..models.sparkleschat import SparklesChat
    from ..processors.image import build_processor
    from .generator import ModelGenerator

    log.info("loading the model on %s", device)
    model = SparklesChat.from_config(cfg.model, root=root, device=device)
    return ModelGenerator(model, build_processor(processor_spec(cfg)), batch_size=batch_size,
                          decode_mode=cfg.run.get("decode_mode") or "plain")


# ------------------------------------------------------------------------------------------------ the run
class _Context:
    """Resolved inputs of one invocation: config, root, protocol, names and lazily built model/judges."""

    def __init__(self, args) -> None:
        self.args = args
        import_modules(args.imports, source="--imports")
        self.endpoint = None
        self.reference_mode = args.cfg_path is None and args.model_endpoint is None
        if args.model_endpoint is not None:
            if args.cfg_path is not None:
                raise EvalError("--model-endpoint evaluates the model behind that API; leave out --cfg-path")
            from .endpoint import EndpointGenerator

            self.endpoint = EndpointGenerator(args.model_endpoint, args.model_name, batch_size=args.batch_size)
            self.cfg = None
            self.root = resolve_root(args.sparkles_root)
        elif self.reference_mode:
            if args.dataset != "SparklesEval":
                raise EvalError("without --cfg-path only SparklesEval can be evaluated (its GPT-4 reference "
                                "dialogues are judged); pass --cfg-path for BISON/NLVR2")
            self.cfg = None
            self.root = resolve_root(args.sparkles_root)
        else:
            import sparkles.models  # noqa: F401  (registers the sparkleschat model)

            self.cfg = load_config(args.cfg_path, args.options)
            self.root = resolve_config_root(self.cfg, args.sparkles_root)
        self.protocol = protocol_from_args(args)
        if self.cfg is not None and self.protocol.texts.system_text is not None:
            self.cfg.model.system_text = self.protocol.texts.system_text
        self.evalset = EvalSet(self.root, args.dataset)
        self.model_name = args.model_name or self._model_name()
        self.run = RunDir(self.evalset.results_dir, args.dataset, self.model_name)

    def _model_name(self) -> str:
        if self.reference_mode:
            return REFERENCE_MODEL_NAME
        if self.endpoint is not None:
            name = re.sub(r"[^A-Za-z0-9._-]+", "_", self.endpoint.model)
            return name + ("" if self.protocol.name == "default" else f"_{self.protocol.name}")
        ckpt = self.cfg.model.get("ckpt") or ""
        if not ckpt:
            name = Path(self.args.cfg_path).stem
            log.warning("model.ckpt is empty; naming the run after the config: %s", name)
        else:
            ckpt_path = Path(ckpt).expanduser()
            name = model_name_from_ckpt(ckpt_path if ckpt_path.is_absolute() else self.root / ckpt_path, 1)
        if self.protocol.num_beams > 1:
            name += f"_beam{self.protocol.num_beams}"
        if self.protocol.name != "default":
            name += f"_{self.protocol.name}"
        return name

    def settings(self) -> dict:
        """What determines the answers; a run directory only ever holds results of one such setting."""
        proto = self.protocol.to_dict()
        for key in ("judge_temperature", "judge_attempts"):
            proto.pop(key)
        if self.reference_mode:
            return {"mode": "reference_dialogues"}
        if self.endpoint is not None:
            return {"mode": "endpoint", "endpoint": self.endpoint.base_url, "model": self.endpoint.model,
                    "protocol": proto, "seed": self.args.seed}
        return {"mode": "model", "protocol": proto, "seed": self.args.seed, "model": to_container(self.cfg.model),
                "eval_vis_processor": self._processor_spec()}

    def _processor_spec(self) -> dict:
        return processor_spec(self.cfg)

    def generator_factory(self):
        if self.reference_mode:
            return None
        if self.endpoint is not None:
            return lambda: self.endpoint
        cache: dict[str, Any] = {}

        def build():
            if "g" not in cache:
                cache["g"] = build_generator(self.cfg, self.root, resolve_device(self.args.gpu_id, self.args.device),
                                             self.args.batch_size)
            return cache["g"]

        return build

    def judges(self) -> list:
        return _judges(self.args, self.protocol, self.root,
                       self.evalset.layout.eval_results("SparklesEval") / "gpt_judge_cache.sqlite")


def _judges(args, protocol, root: Optional[Path], default_cache: Path, names=("gpt-4",)) -> list:
    def client():
        from ..gpt import GPTClient

        path = Path(args.gpt_cache) if args.gpt_cache else default_cache
        return GPTClient.from_env(cache=path, concurrency=max(1, args.judge_concurrency))

    lazy = _LazyClient(client)
    ask_many = None
    if args.batch_api:
        from ..gpt.batch import BatchRunner

        def ask_many(requests):
            return BatchRunner(lazy._get(), poll_interval=args.batch_poll_interval).map_chat(requests)

    return make_judges(args.judge_models or list(names), root=root, client=lazy,
                       temperature=protocol.judge_temperature, max_tokens=args.judge_max_tokens,
                       max_attempts=protocol.judge_attempts, texts=protocol.texts, ask_many=ask_many)


class _LazyClient:
    """The GPT client, built on the first call: no API key is needed when nothing is left to judge."""

    def __init__(self, factory) -> None:
        self._factory = factory
        self._client = None
        self._lock = threading.Lock()

    def _get(self):
        with self._lock:
            if self._client is None:
                self._client = self._factory()
            return self._client

    def chat(self, *args, **kwargs):
        return self._get().chat(*args, **kwargs)

    @property
    def ledger(self):
        return None if self._client is None else self._client.ledger

    def close(self) -> None:
        if self._client is not None:
            self._client.close()


def _slice(args, n: int) -> tuple[tuple[int, int], Optional[tuple[int, int]]]:
    """This process's ``[start, stop)`` and, when it is one of several shards, the whole planned slice."""
    start = max(0, args.data_from)
    stop = n if args.data_to is None else min(args.data_to, n)
    if start >= stop:
        raise EvalError(f"empty slice: --data-from {args.data_from} --data-to {args.data_to} of {n} items")
    shard = _parse_shard(args.shard)
    if shard is None:
        return (start, stop), None
    return shard_range(start, stop, *shard), (start, stop)


def run_inference(ctx: _Context, report: EvalReport) -> None:
    from .runner import (ShardStats, adopt_from_siblings, run_choice_shard, run_judging,
                         run_sparkleseval_generation)

    args, evalset, run = ctx.args, ctx.evalset, ctx.run
    n = len(evalset.items)
    (start, stop), planned = _slice(args, n)
    report.shard = (start, stop)
    if start >= stop:
        log.info("shard %s of [%d, %d) is empty; nothing to do", args.shard, args.data_from, stop)
        return
    from ..common.tensors import seed_everything

    seed_everything(args.seed)
    judges = ctx.judges() if evalset.dataset == "SparklesEval" else []
    run.register_shard(start=start, stop=stop, settings=ctx.settings(),
                       annotation_file=evalset.relpath(evalset.annotation_path), num_annotations=n, planned=planned)
    if judges:
        run.record_judges({j.model: j.settings() for j in judges}, free=("max_attempts",))
    shard = ShardFile(run.shard_path(start, stop))
    indices = list(range(start, stop))
    wanted = {eid_key(evalset.items[i]["evaluation_id"]) for i in indices}
    stats = ShardStats()
    try:
        adopted = adopt_from_siblings(run, shard, wanted, merge_judges=evalset.dataset == "SparklesEval")
        if adopted:
            log.info("copied %d finished item(s) from other shards of this run", adopted)
        progress = not args.no_progress
        if evalset.dataset in CHOICE_BENCHMARKS:
            run_choice_shard(evalset, indices, shard, ctx.generator_factory(), ctx.protocol, args.seed, stats,
                             progress)
        else:
            run_sparkleseval_generation(evalset, indices, shard, ctx.generator_factory(), ctx.protocol, args.seed,
                                        stats, progress)
            eids = [evalset.items[i]["evaluation_id"] for i in indices]
            run_judging(shard, eids, judges, stats, concurrency=args.judge_concurrency, progress=progress,
                        rejudge_failed=args.rejudge_failed)
    except BaseException as exc:
        run.update_shard(start, stop, status="failed", done=len(shard), error=f"{type(exc).__name__}: {exc}")
        raise
    status = "incomplete" if stats.api_errors else "done"
    run.update_shard(start, stop, status=status, done=len(shard), error=None)
    report.stats = stats.to_dict()
    _print_shard_summary(ctx, start, stop, stats)
    for judge in judges:
        client = getattr(judge, "client", None)
        if client is not None and client.ledger is not None:
            print(client.ledger.format())
            client.close()
            break
    if stats.api_errors:
        for line in stats.api_errors[:10]:
            log.error("judge call failed: %s", line)
        report.exit_code = EXIT_INCOMPLETE
        report.messages.append(f"{len(stats.api_errors)} judgement(s) could not be obtained because of API errors; "
                               "run the same command again to continue (finished work is kept)")


def _print_shard_summary(ctx: _Context, start: int, stop: int, stats) -> None:
    parts = [f"{stats.items} items", f"{stats.reused} already done", f"{stats.generated} generated"]
    if ctx.evalset.dataset in CHOICE_BENCHMARKS:
        parts.append(f"{stats.unparseable} unparseable")
    if stats.failed:
        parts.append(f"{stats.failed} could not be answered")
    for name, count in stats.judged.items():
        parts.append(f"{count} judged by {name} ({stats.judge_failed.get(name, 0)} unparseable)")
    if stats.judge_calls:
        parts.append(f"{stats.judge_calls} judge replies ({stats.paid_calls} paid)")
    print(f"[{ctx.evalset.dataset}] {ctx.model_name} [{start}, {stop}): " + ", ".join(parts))


def _is_rank0() -> bool:
    return int(os.environ.get("RANK", "0") or 0) == 0


def _barrier_then_is_rank0() -> bool:
    """Under torchrun: wait for every rank (gloo barrier) and tell whether this is rank 0."""
    world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    if world <= 1:
        return True
    from datetime import timedelta

    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group("gloo", timeout=timedelta(hours=24))
    dist.barrier()
    rank = dist.get_rank()
    dist.destroy_process_group()
    return rank == 0


def run(argv: Optional[Sequence[str]] = None) -> EvalReport:
    """Parse ``argv`` and do the work; raises on errors (``main`` reports them)."""
    args = build_parser().parse_args(argv)
    if args.results_file is not None:
        return run_rescore(args)
    args.dataset = args.dataset or "NLVR2"
    if not (args.inference or args.merge_results):
        raise EvalError("nothing to do: pass --inference (answer and judge a slice) and/or --merge-results")
    if args.batch_size < 1:
        raise EvalError("--batch-size must be >= 1")
    ctx = _Context(args)
    report = EvalReport(args.dataset, ctx.model_name, ctx.run.path)
    if args.inference:
        run_inference(ctx, report)
    if args.merge_results and (_barrier_then_is_rank0() if args.inference else _is_rank0()):
        from .merge import merge_run

        result = merge_run(ctx.run, ctx.evalset, judges=args.judge_models, allow_partial=args.allow_partial,
                           scope=(args.data_from, args.data_to))
        report.merged, report.result_path = result.metrics, result.result_path
    return report


def run_rescore(args) -> EvalReport:
    """``--results-file F --merge-results``: score F again, judge its dialogues anew (:mod:`.rescore`)."""
    from .rescore import read_results_file, rescore
    from .runner import ShardStats, run_judging

    if args.inference or not args.merge_results:
        raise EvalError("--results-file re-scores a finished result file: pass --merge-results (and not --inference)")
    import_modules(args.imports, source="--imports")
    results = read_results_file(args.results_file, args.dataset, args.model_name)
    protocol = protocol_from_args(args)
    out_dir = Path(args.output_dir) if args.output_dir else results.path.parent
    report = EvalReport(results.dataset, results.model_name, out_dir)
    judges = []
    if args.judge_models:
        if results.dataset != "SparklesEval":
            raise EvalError("--judge_models applies to SparklesEval result files only")
        root = Path(args.sparkles_root) if args.sparkles_root else None
        judges = _judges(args, protocol, root, out_dir / "gpt_judge_cache.sqlite")
    stats = ShardStats()

    def judge_runner(shard, eids, chosen):
        run_judging(shard, eids, chosen, stats, concurrency=args.judge_concurrency, progress=not args.no_progress,
                    rejudge_failed=args.rejudge_failed)

    result = rescore(results, out_dir=out_dir, rule=protocol.extraction, judges=judges, judge_runner=judge_runner)
    report.merged, report.result_path, report.stats = result.metrics, result.result_path, stats.to_dict()
    if stats.api_errors:
        report.exit_code = EXIT_INCOMPLETE
        report.messages.append(f"{len(stats.api_errors)} judgement(s) could not be obtained because of API errors; "
                               "run the same command again to continue (finished work is kept)")
    return report


def main(argv: Optional[Sequence[str]] = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for noisy in ("httpx", "httpx2", "httpcore", "openai"):  # one line per HTTP request otherwise
        logging.getLogger(noisy).setLevel(logging.WARNING)
    from ..gpt.errors import MissingAPIKeyError
    from .endpoint import EndpointError
    from .generator import InputError
    from .merge import MergeError
    from .rescore import ResultsFileError

    expected = (EvalError, ConfigError, MissingPathError, MissingAPIKeyError, AnnotationError, InputError,
                DialogueFormatError, JudgeSetupError, MergeError, ManifestError, ProtocolFileError, ResultsFileError,
                EndpointError)
    try:
        report = run(argv)
    except expected as exc:
        log.error("%s", exc)
        return 1
    for msg in report.messages:
        log.error("%s", msg)
    return report.exit_code


if __name__ == "__main__":
    sys.exit(main())
