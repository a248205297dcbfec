"""Serving throughput with continuous batching: 1 client against 8 concurrent clients.

Clients are threads that send requests one after another, each waiting for its answer, to one
:class:`sparkles.engine.scheduler.Scheduler` (``max_batch`` 8) — the model side of the API server, without
HTTP. A request is an evaluation-style prompt with two images (encoded when it is admitted) and a greedy
answer of fixed length (no stop string; 1/2, 3/4, 1 or 5/4 of ``eval_new_tokens``, so sequences finish at
different steps and others join the running batch). One client sends every prompt once; then 8 clients send
``2 × 8`` requests together. Reported per run: aggregate generated tokens/s (all tokens over the wall time,
image encoding and prefill included) and time to first token (submit → first token, so under load it
includes waiting for a batch row and the joining request's own encoding and prefill). The answers of the
8-client run must equal the 1-client ones (greedy; checked in float32).

    python -m benchmarks.serve_batching --size small [--out serve_batching.json]
"""

from __future__ import annotations

import threading
import time

import torch

from .common import (Context, Words, benchmark_main, eval_prompts, median, print_table, print_targets, random_pixels,
                     target)

CLIENTS = 8
REQUESTS_PER_CLIENT = 2
RATIO_TARGET = 3.0
MAX_BATCH = 8


def _percentile(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q * (len(xs) - 1))))]


def run(ctx: Context) -> dict:
    from sparkles.conversation.render import Message
    from sparkles.engine.chat import Chat
    from sparkles.engine.decoding import GenerationConfig
    from sparkles.engine.scheduler import Scheduler

    size = ctx.size
    prompts = eval_prompts(size, Words(size, ctx.seed + 5000))
    lengths = [max(1, size.eval_new_tokens * (2 + i % 4) // 4) for i in range(len(prompts))]
    if ctx.dry_run:
        return dict(benchmark="serve_batching", dry_run=True, prompts=len(prompts), clients=CLIENTS,
                    answer_tokens=lengths)
    pixels = random_pixels(2 * len(prompts), size, seed=ctx.seed + 6, device=ctx.device)
    gen = GenerationConfig(max_new_tokens=max(lengths), stop_strings=(), stop_on_eos=False)
    chat = Chat(ctx.model, tokenizer=ctx.tokenizer, generation=gen)
    scheduler = Scheduler(chat, max_batch=MAX_BATCH)

    def ask(i: int) -> dict:
        t0 = time.perf_counter()
        handle = scheduler.submit([Message("user", prompts[i])], [pixels[2 * i], pixels[2 * i + 1]],
                                  max_new_tokens=lengths[i])
        first, last = None, None
        for event in handle.events():
            if event.kind == "text" and first is None:
                first = time.perf_counter() - t0
            if event.kind == "error":
                raise event.error
            last = event
        return dict(prompt=i, ttft_s=first, seconds=time.perf_counter() - t0, tokens=last.tokens, text=last.text)

    def clients(schedule: list[list[int]]) -> dict:
        results: list[dict] = []
        lock = threading.Lock()
        failures: list[BaseException] = []

        def client(items: list[int]) -> None:
            try:
                for i in items:
                    r = ask(i)
                    with lock:
                        results.append(r)
            except BaseException as exc:  # reported after the join
                failures.append(exc)

        threads = [threading.Thread(target=client, args=(items,)) for items in schedule]
        t0 = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        wall = time.perf_counter() - t0
        if failures:
            raise failures[0]
        tokens = sum(r["tokens"] for r in results)
        ttft = [r["ttft_s"] for r in results]
        return dict(clients=len(schedule), requests=len(results), tokens=tokens, wall_s=wall,
                    tokens_per_s=tokens / wall, ttft_p50_s=median(ttft), ttft_p90_s=_percentile(ttft, 0.9),
                    request_p50_s=median([r["seconds"] for r in results]),
                    answers={r["prompt"]: r["text"] for r in results})

    try:
        ask(0)  # warm-up: first calls allocate and pick kernels
        single = clients([list(range(len(prompts)))])
        rows_before = scheduler.stats["max_rows"]
        many = clients([[(c + k) % len(prompts) for k in range(REQUESTS_PER_CLIENT)] for c in range(CLIENTS)])
        max_rows = scheduler.stats["max_rows"]
    finally:
        scheduler.close()
    mismatched = sorted(i for i, a in many["answers"].items() if a != single["answers"][i])
    identical = not mismatched
    if not identical and ctx.dtype == torch.float32:
        raise AssertionError(f"answers under load differ from those of one client: prompts {mismatched}")
    ratio = many["tokens_per_s"] / single["tokens_per_s"]
    runs = {}
    for r in (single, many):
        r = dict(r)
        answers = r.pop("answers")
        r["answers"] = [answers[i][:60] for i in sorted(answers)]
        runs[str(r["clients"])] = r
    result = dict(benchmark="serve_batching", size=size.name, max_batch=MAX_BATCH, prompts=len(prompts),
                  images_per_request=2, answer_tokens=lengths, requests_per_client=REQUESTS_PER_CLIENT,
                  identical_outputs=identical, mismatched_prompts=mismatched, max_rows_single=rows_before,
                  max_rows=max_rows, runs=runs, tokens_per_s_ratio=ratio, ttft_p50_s_under_load=many["ttft_p50_s"])
    result["targets"] = [target(f"{CLIENTS} clients / 1 client tokens/s", ratio, ">=", RATIO_TARGET,
                                ctx.targets_apply)]
    return result


def report(result: dict) -> None:
    if result.get("dry_run"):
        print(f"\nserve_batching (dry run): {result['prompts']} prompts, {result['clients']} clients, answers of "
              f"{result['answer_tokens']} tokens")
        return
    rows = [[c, r["requests"], r["tokens"], r["wall_s"], r["tokens_per_s"], r["ttft_p50_s"], r["ttft_p90_s"],
             r["request_p50_s"]] for c, r in result["runs"].items()]
    print_table(f"serve_batching ({result['size']}; max_batch {result['max_batch']}, 2 images per request, "
                f"identical outputs: {result['identical_outputs']}, ratio {result['tokens_per_s_ratio']:.2f})",
                ["clients", "requests", "tokens", "wall s", "tok/s", "TTFT p50 s", "TTFT p90 s", "request p50 s"],
                rows)
    print_targets(result)


def main(argv=None) -> int:
    return benchmark_main("benchmarks.serve_batching", __doc__, run, report, argv)


if __name__ == "__main__":
    raise SystemExit(main())
