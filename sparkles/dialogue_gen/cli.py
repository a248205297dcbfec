"""Command line for SparklesDialogue generation (``python dataset/generate_SparklesDialogue.py``).

Steps: ``all`` (default: call GPT for the missing cases, then parse, validate and export), ``generate``
(calls only), ``export`` (parse/validate/export from the raw logs; no API key needed), ``llava`` / ``svit``
(re-format LLaVA / SVIT data with the image-overlap filters). Re-running the same command resumes: finished
calls are neither repeated nor paid for again. The planned cost is printed before the first call; ``--max_usd``
stops sending calls before the spend would pass it. Existing files that generation did not write (the released
annotations) are not overwritten without ``--force``; two runs on one output directory cannot run at once.
``--batch-api`` sends the calls as OpenAI Batch API jobs (half price, answered within 24 hours); a run killed
while it waits re-attaches to its batch when the same command is run again.
"""

from __future__ import annotations

import argparse
import json
import sys

from sparkles.common.paths import MissingPathError

from .pipeline import GenerationOptions, run_job


def build_parser() -> argparse.ArgumentParser:
    d = GenerationOptions()
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--subset", choices=("CC", "VG"), default=d.subset)
    p.add_argument("--step", choices=("all", "generate", "export", "llava", "svit"), default=d.step)
    p.add_argument("--case_num", type=int, default=d.case_num,
                   help="GPT calls per configuration (CC: 3 dialogues per call; VG: 1 per call and per first-turn count)")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--sparkles_root", default=None, help="Sparkles root (default: $SPARKLES_ROOT)")
    p.add_argument("--vg_image_data_path", default=None,
                   help="Visual Genome image_data.json for the llava/svit overlap filters "
                        "(default: <root>/data/VisualGenome/image_data.json)")
    p.add_argument("--output_dir", default=None,
                   help="where raw logs, dialogues, splits, rejects, summary and cost go "
                        "(default: <root>/data/SparklesDialogue<subset>/generated)")
    p.add_argument("--cache_path", default=None, help="SQLite response cache (default: <output_dir>/gpt_cache.sqlite)")
    p.add_argument("--model", default=d.model)
    p.add_argument("--temperature", type=float, default=d.temperature)
    p.add_argument("--max_tokens", type=int, default=d.max_tokens)
    p.add_argument("--top_p", type=float, default=d.top_p)
    p.add_argument("--concurrency", type=int, default=d.concurrency, help="GPT calls in flight at once")
    p.add_argument("--max_retries", type=int, default=6, help="retries of a retryable failure (429, 5xx, timeout)")
    p.add_argument("--timeout", type=float, default=120.0, help="seconds per HTTP attempt")
    p.add_argument("--backoff_base", type=float, default=1.0, help="first backoff delay in seconds (doubles)")
    p.add_argument("--price_table", default=None, help="JSON file of USD prices per 1M tokens per model")
    p.add_argument("--max_usd", type=float, default=None,
                   help="spending cap in USD for this run's paid calls: a call is sent only if the spend so far, "
                        "the calls in flight and its own estimated cost (answer at --max_tokens) stay within it")
    p.add_argument("--batch-api", "--batch_api", dest="batch_api", action="store_true",
                   help="send the calls through the OpenAI Batch API: half price, answers within 24 hours, same "
                        "cache and outputs; a killed run started again re-attaches to its batch")
    p.add_argument("--batch_poll_interval", "--batch-poll-interval", dest="batch_poll_interval", type=float,
                   default=d.batch_poll_interval, help="seconds between two looks at a submitted batch")
    p.add_argument("--force", action="store_true",
                   help="overwrite existing output files that generation did not write (e.g. released annotations)")
    p.add_argument("--azure_deployment", default=None, help="Azure deployment name (Azure mode: OPENAI_API_BASE set)")
    p.add_argument("--azure_api_version", default=None)
    p.add_argument("--cc_candidates", type=int, default=d.cc_candidates)
    p.add_argument("--vg_candidates", type=int, default=d.vg_candidates)
    p.add_argument("--vg_first_turn_images", type=int, nargs="+", default=list(d.vg_first_turn_images))
    p.add_argument("--vg_reserved_max_id", type=int, default=d.vg_reserved_max_id,
                   help="VG ids up to this are kept out of the pool (reserved for evaluation)")
    p.add_argument("--min_answer_words", type=int, default=d.min_answer_words,
                   help="VG demos: both answers of the CC dialogue need at least this many words")
    p.add_argument("--demo_dir", default=None,
                   help="directory of SparklesDialogueCC_50demo_img{1,2,3}1.json (default: <root>/data/SparklesDialogueCC/annotations)")
    p.add_argument("--cc_dialogue_path", default=None, help="SparklesDialogueCC file whose dialogues serve as VG demos")
    p.add_argument("--include_demos", action="store_true", help="CC: append the seed dialogues to the exported data")
    p.add_argument("--strict_first_turn", action="store_true",
                   help="reject (not just count) dialogues whose first turn has another image count than asked")
    p.add_argument("--no_progress", action="store_true")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    opts = GenerationOptions(
        subset=args.subset, case_num=args.case_num, seed=args.seed, sparkles_root=args.sparkles_root,
        output_dir=args.output_dir, model=args.model, temperature=args.temperature, max_tokens=args.max_tokens,
        top_p=args.top_p, concurrency=args.concurrency, cc_candidates=args.cc_candidates,
        vg_candidates=args.vg_candidates, vg_first_turn_images=tuple(args.vg_first_turn_images),
        vg_reserved_max_id=args.vg_reserved_max_id, min_answer_words=args.min_answer_words, demo_dir=args.demo_dir,
        cc_dialogue_path=args.cc_dialogue_path, include_demos=args.include_demos,
        strict_first_turn=args.strict_first_turn, progress=not args.no_progress, step=args.step, force=args.force,
        batch_api=args.batch_api, batch_poll_interval=args.batch_poll_interval)
    if args.batch_poll_interval < 0:
        print(f"error: --batch_poll_interval must be >= 0, got {args.batch_poll_interval}", file=sys.stderr)
        return 2
    if args.max_usd is not None and not args.max_usd > 0:
        print(f"error: --max_usd must be a positive amount, got {args.max_usd}", file=sys.stderr)
        return 2
    try:
        if args.step in ("llava", "svit"):
            from .llava_svit import run_conversion

            summary = run_conversion(args.step, opts.layout(), vg_image_data_path=args.vg_image_data_path,
                                     seed=args.seed)
            print(json.dumps(summary, indent=2))
            return 0
        return _generate(args, opts)
    # RuntimeError: e.g. no spaCy model for VG demos, or another run holds the output directory;
    # FileExistsError: an output file that generation did not write
    except (MissingPathError, FileExistsError, ValueError, RuntimeError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


def _generate(args: argparse.Namespace, opts: GenerationOptions) -> int:
    from sparkles.gpt import GPTClient, GPTConfig, MissingAPIKeyError, PriceTable

    prices = PriceTable.from_file(args.price_table) if args.price_table else PriceTable()
    client = None
    if opts.step in ("all", "generate"):
        try:
            config = GPTConfig.from_env(
                model=opts.model, concurrency=opts.concurrency, max_retries=args.max_retries, timeout=args.timeout,
                backoff_base=args.backoff_base, azure_deployment=args.azure_deployment,
                azure_api_version=args.azure_api_version)
        except MissingAPIKeyError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        opts.out_dir().mkdir(parents=True, exist_ok=True)
        cache = args.cache_path or str(opts.out_dir() / "gpt_cache.sqlite")
        from sparkles.gpt.cost import SpendingCap, UsageLedger

        cap = SpendingCap(args.max_usd, prices) if args.max_usd is not None else None
        client = GPTClient(config, cache=cache, ledger=UsageLedger(prices), cap=cap)
    try:
        summary = run_job(opts, client, prices=prices)
    except KeyboardInterrupt:
        batch = " (the submitted batch runs on; the same command re-attaches to it)" if opts.batch_api else ""
        print(f"\ninterrupted: finished calls are saved{batch}; run the same command again to resume", file=sys.stderr)
        return 130
    finally:
        if client is not None:
            print(client.ledger.format())
            client.close()
    _print_summary(summary)
    failed = summary.get("calls", {}).get("failed", 0)
    not_made = summary.get("spending", {}).get("calls_not_made", 0)
    if not_made:
        print(f"spending cap ${args.max_usd:.2f} reached: {not_made} call(s) not made; run the same command with a "
              "higher --max_usd to make them — finished calls are not repeated", file=sys.stderr)
    if failed:
        print(f"{failed} call(s) failed (see failed_calls in the summary); run the same command again to retry "
              "them — finished calls are not repeated", file=sys.stderr)
    return 1 if failed or not_made else 0


def _print_summary(summary: dict) -> None:
    calls = summary.get("calls")
    if calls:
        print(f"calls: {calls['planned']} planned, {calls['already_done']} already done, {calls['new']} new, "
              f"{calls['failed']} failed")
    dl = summary.get("dialogues")
    if dl:
        print(f"dialogues: {dl['accepted']} accepted, {dl['rejected']} rejected "
              f"{dl['rejected_by_reason'] or ''}".rstrip())
        for f in summary.get("files", []):
            print(f"  wrote {f}")
    cost = summary.get("cost_usd", {})
    if cost.get("all_raw_calls") is not None:
        print(f"cost of all calls in the raw logs: ${cost['all_raw_calls']:.4f}")
    print(f"summary: {summary['output_dir']}")
