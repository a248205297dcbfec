"""``evaluate_I4.py``: the model's answers to I4 (DEMON core) datasets, resumable and shardable.

    python evaluate_I4.py --cfg-path eval_configs/sparkles_eval.yaml --i4-dir DEMON --dataset VIST --result-dir R
    python calculate_I4.py --result-dir R --i4-dir DEMON && python i4_score.py --result-dir R

The original's flags (``--cfg-path``, ``--gpu-id``, ``--batch-image``, ``--i4-dir``, ``--dataset``, ``--result-dir``,
``--sparkles_root``, ``--seed``, ``--num-beams``, ``--temperature``, ``--options``) plus ``--batch-size`` (greedy
answers generated together; ``--batch-image`` caps the images of one batch), ``--protocol`` / ``--protocol-file``
(decoding and system text, as ``evaluate.py``), ``--shard I/N`` and ``--max-new-tokens``.

Each sample becomes one user message (:func:`sparkles.eval.benchmarks.i4.build_sample`) answered in a fresh
conversation. Answers go to ``<result_dir>/<dataset>/pred_<from>to<to>.json`` as they finish (atomically), and
when every sample of the dataset has one, to ``<result_dir>/<dataset>/pred.json`` =
``[{"sample_id", "pred_response", "gt_response", "prompt", "model_input", ...}]`` in the dataset's order. A
re-run answers only what no part file holds yet. A sample whose context names more or fewer images than it
carries, or that does not fit the context, is recorded with its ``error`` (and an empty answer, which scores 0).
``<result_dir>/<dataset>/settings.json`` ties the folder to one model and protocol.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Optional, Sequence

from ..common.config import ConfigError, load_config, resolve_config_root, to_container
from ..common.io import atomic_write_json, read_json
from ..common.logging import progress_bar
from ..common.paths import MissingPathError
from ..conversation.protocol_file import ProtocolFileError, load_protocol_file
from .benchmarks import i4
from .cli import EvalError, build_generator, parse_shard_spec, processor_spec, resolve_device, shard_range
from .protocol import PROTOCOLS, comparability_warning, item_seed, make_protocol
from .store import ShardFile

log = logging.getLogger("sparkles.eval.i4")

PRED_FILE = "pred.json"
SETTINGS_FILE = "settings.json"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="evaluate_I4.py", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cfg-path", default=None, help="model config (eval_configs/*.yaml)")
    p.add_argument("--model-endpoint", default=None, metavar="URL",
                   help="answer with the model behind an OpenAI-compatible chat API instead of a config "
                        "(--model-name names it; key from $MODEL_ENDPOINT_API_KEY)")
    p.add_argument("--model-name", default=None, help="the served model's name (with --model-endpoint)")
    p.add_argument("--gpu-id", type=int, default=None, help="GPU to run on (default: GPU 0 if any, else the CPU)")
    p.add_argument("--i4-dir", required=True, help="the DEMON core split: <i4-dir>/<dataset>/core/core.json")
    p.add_argument("--dataset", nargs="+", required=True, help="one or more dataset names")
    p.add_argument("--result-dir", required=True, help="answers go to <result-dir>/<dataset>/")
    p.add_argument("--sparkles_root", "--sparkles-root", dest="sparkles_root", default=None,
                   help="root for the config's relative paths (default: $SPARKLES_ROOT, then run.sparkles_root)")
    p.add_argument("--seed", type=int, default=2023)
    p.add_argument("--num-beams", type=int, default=1)
    p.add_argument("--temperature", type=float, default=None, help="sampling temperature (upstream protocol)")
    p.add_argument("--options", nargs="+", default=None, help="config overrides key=value")
    p.add_argument("--batch-image", type=int, default=30, help="most images in one batch of answers")
    p.add_argument("--batch-size", type=int, default=1, help="greedy answers generated together")
    p.add_argument("--protocol", default="default", choices=PROTOCOLS,
                   help="default: greedy; upstream: the original's sampling and left truncation")
    p.add_argument("--protocol-file", default=None, metavar="F", help="protocol texts (its system_text is used)")
    p.add_argument("--max-new-tokens", type=int, default=None, help="default 1000")
    p.add_argument("--max-length", type=int, default=None, help="context + new tokens (default 2000)")
    p.add_argument("--shard", default=None, metavar="I/N", help="answer part I (0-based) of N equal parts")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--no-progress", action="store_true")
    return p


def _shard(value: Optional[str]) -> tuple[int, int]:
    return (0, 1) if value is None else parse_shard_spec(value)


def _batches(pending: list, batch_size: int, batch_image: int):
    """Greedy batches of samples with as many images each (less padding), at most ``batch_size`` samples and
    ``batch_image`` images (a sample with more images than that goes alone)."""
    batch: list = []
    images = 0
    for sample in sorted(pending, key=lambda s: len(s[1].images)):
        n = len(sample[1].images)
        if batch and (len(batch) >= batch_size or images + n > batch_image
                      or n != len(batch[-1][1].images)):
            yield batch
            batch, images = [], 0
        batch.append(sample)
        images += n
    if batch:
        yield batch


def _check_settings(folder: Path, settings: dict) -> None:
    path = folder / SETTINGS_FILE
    if path.is_file():
        old = read_json(path, what="I4 settings file")
        if old != settings:
            diff = sorted(k for k in set(old) | set(settings) if old.get(k) != settings.get(k))
            raise EvalError(f"{folder} holds answers produced with other settings ({', '.join(diff)}); use another "
                            "--result-dir, or move that folder away")
    else:
        atomic_write_json(path, settings)


def predict_dataset(dataset: str, args, generator_factory, protocol, settings: dict) -> dict:
    """Answer this process's part of one dataset; assemble ``pred.json`` once every sample has an answer."""
    metadata, records = i4.load_core(args.i4_dir, dataset)
    folder = Path(args.result_dir) / dataset
    folder.mkdir(parents=True, exist_ok=True)
    _check_settings(folder, settings)
    start, stop = shard_range(0, len(records), *_shard(args.shard))
    part = ShardFile(folder / f"pred_{start}to{stop}.json", key="sample_id")
    done = _finished(folder, part)
    samples, stats = [], {"dataset": dataset, "items": stop - start, "reused": 0, "answered": 0, "failed": 0}
    for index in range(start, stop):
        record = records[index]
        sample_id = str(record.get("sample_id"))
        if sample_id in part or sample_id in done:
            if sample_id not in part:
                part.put(done[sample_id], save=False)
            stats["reused"] += 1
            continue
        try:
            samples.append((index, i4.build_sample(args.i4_dir, dataset, metadata, record)))
        except i4.I4ItemError as exc:
            part.put(_failed(sample_id, record, str(exc)), save=False)
            stats["failed"] += 1
    part.save()
    if samples:
        _answer(samples, part, generator_factory(), protocol, args, stats)
    complete = _assemble(folder, records)
    stats["complete"] = complete
    print(f"[I4] {dataset} [{start}, {stop}): {stats['items']} samples, {stats['reused']} already answered, "
          f"{stats['answered']} answered now, {stats['failed']} could not be asked"
          + (f"; wrote {folder / PRED_FILE}" if complete else "; other parts still missing"))
    return stats


def _failed(sample_id: str, record: dict, error: str) -> dict:
    response = record.get("response")
    return {"sample_id": sample_id, "pred_response": "", "gt_response": response if isinstance(response, str)
            else str(response), "error": error}


def _finished(folder: Path, part: ShardFile) -> dict:
    """Answers other part files (or an earlier ``pred.json``) of this folder already hold, by sample id."""
    found: dict = {}
    for path in sorted(folder.glob("pred*.json")):
        if path == part.path:
            continue
        for item in read_json(path, what="I4 answers file"):
            found.setdefault(str(item.get("sample_id")), item)
    return found


def _answer(samples: list, part: ShardFile, generator, protocol, args, stats: dict) -> None:
    from .generator import Request

    bar = progress_bar(total=len(samples), desc=f"I4 {samples[0][1].dataset}", leave=False,
                       enabled=not args.no_progress)
    for batch in _batches(samples, generator.batch_size, max(1, args.batch_image)):
        requests = [Request(s.prompt, s.images, item_seed(args.seed, s.sample_id), f"I4 sample {s.sample_id}")
                    for _, s in batch]
        for (_, sample), answer in zip(batch, generator.generate(requests, protocol.generation())):
            item = {"sample_id": sample.sample_id, "pred_response": answer.text or "",
                    "gt_response": sample.gt_response, "prompt": sample.prompt, "model_input": answer.model_input}
            if answer.warnings:
                item["warnings"] = answer.warnings
            if answer.error:
                item["error"] = answer.error
                stats["failed"] += 1
            else:
                stats["answered"] += 1
            part.put(item)
            bar.update(1)
    bar.close()


def _assemble(folder: Path, records: list) -> bool:
    """Write ``pred.json`` (dataset order) when the part files answer every sample; True if written."""
    found: dict = {}
    for path in sorted(folder.glob("pred_*to*.json")):
        for item in read_json(path, what="I4 answers file"):
            found.setdefault(str(item.get("sample_id")), item)
    ids = [str(r.get("sample_id")) for r in records]
    if any(i not in found for i in ids):
        return False
    atomic_write_json(folder / PRED_FILE, [found[i] for i in ids])
    return True


def run(argv: Optional[Sequence[str]] = None) -> list:
    args = build_parser().parse_args(argv)
    if args.batch_size < 1:
        raise EvalError("--batch-size must be >= 1")
    texts = load_protocol_file(args.protocol_file)
    protocol = make_protocol(args.protocol, num_beams=args.num_beams, temperature=args.temperature,
                             max_new_tokens=args.max_new_tokens, max_length=args.max_length, texts=texts)
    warning = comparability_warning(protocol)
    if warning:
        log.warning("%s", warning)
    proto = protocol.to_dict()
    for key in ("judge_temperature", "judge_attempts", "max_retries"):
        proto.pop(key)
    cache: dict = {}
    if (args.cfg_path is None) == (args.model_endpoint is None):
        raise EvalError("pass either --cfg-path (a model config) or --model-endpoint (a served model)")
    if args.model_endpoint is not None:
        from .endpoint import EndpointGenerator

        cache["g"] = EndpointGenerator(args.model_endpoint, args.model_name, batch_size=args.batch_size)
        settings = {"protocol": proto, "seed": args.seed, "endpoint": args.model_endpoint, "model": cache["g"].model}
    else:
        import sparkles.models  # noqa: F401  (registers the sparkleschat model)

        cfg = load_config(args.cfg_path, args.options)
        if texts.system_text is not None:
            cfg.model.system_text = texts.system_text
        root = resolve_config_root(cfg, args.sparkles_root)
        settings = {"protocol": proto, "seed": args.seed, "model": to_container(cfg.model),
                    "eval_vis_processor": processor_spec(cfg)}

    def generator_factory():
        if "g" not in cache:
            from ..common.tensors import seed_everything

            seed_everything(args.seed)
            cache["g"] = build_generator(cfg, root, resolve_device(args.gpu_id, args.device), args.batch_size)
        return cache["g"]

    return [predict_dataset(d, args, generator_factory, protocol, settings) for d in dict.fromkeys(args.dataset)]


def main(argv: Optional[Sequence[str]] = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from .endpoint import EndpointError
    from .generator import InputError

    try:
        run(argv)
    except (EvalError, ConfigError, MissingPathError, ProtocolFileError, InputError, i4.I4FormatError,
            EndpointError) as exc:
        log.error("%s", exc)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
