"""Evaluation throughput: batched greedy generation (left padding) at batch 1, 4 and 8.

``eval_items`` independent BISON/NLVR2-style prompts (two images, a question of varying length, "Let's think
step by step.") are answered with :func:`sparkles.engine.batch.generate_batch` — all images of a batch
encoded in one vision pass, one left-padded prefill, one decode loop — with a fixed ``eval_new_tokens``
answer length (no stop string, so every batch size does the same work). Upstream evaluates one item at a
time, i.e. batch 1. Items/s is end to end: image encoding, prefill and decoding. The answers must be
identical at every batch size (checked in float32; reported in bfloat16, where padding changes rounding).
Decode steps compute the LM head column-wise on the CPU (:func:`sparkles.engine.decoding.lm_head_logits`;
its docstring says why a batched step needs that).

    python -m benchmarks.eval_throughput --size small [--out eval_throughput.json]
"""

from __future__ import annotations


import torch

from .common import (benchmark_main, Context, Words, eval_prompts, median, paired_rounds, print_table, print_targets, random_pixels, target, timed)

SPEEDUP_TARGET = 4.0


def run(ctx: Context) -> dict:
    from sparkles.engine.batch import generate_batch
    from sparkles.engine.chat import Chat
    from sparkles.engine.decoding import GenerationConfig

    size = ctx.size
    prompts = eval_prompts(size, Words(size, ctx.seed + 3000))
    if ctx.dry_run:
        return dict(benchmark="eval_throughput", dry_run=True, items=len(prompts), batches=list(size.eval_batches),
                    new_tokens=size.eval_new_tokens)
    pixels = random_pixels(2 * len(prompts), size, seed=ctx.seed + 4, device=ctx.device)
    items = [(p, [pixels[2 * i], pixels[2 * i + 1]]) for i, p in enumerate(prompts)]
    gen = GenerationConfig(max_new_tokens=size.eval_new_tokens, stop_strings=(), stop_on_eos=False)
    chat = Chat(ctx.model, tokenizer=ctx.tokenizer, generation=gen)
    answers: dict[int, list] = {}

    def evaluate(bs: int):
        def fn():
            out = []
            for i in range(0, len(items), bs):
                out += generate_batch(chat, items[i:i + bs])
            answers.setdefault(bs, out)
            return out
        return fn

    def encode_only(bs: int):
        def fn():
            for i in range(0, len(items), bs):
                chat.encode_images([img for _, imgs in items[i:i + bs] for img in imgs])
        return fn

    top = max(size.eval_batches)
    fns = {f"batch_{bs}": evaluate(bs) for bs in size.eval_batches}
    times = paired_rounds(fns, repeats=size.eval_repeats, warmup=1, device=ctx.device)
    vision_s = {bs: timed(encode_only(bs), ctx.device)[0] for bs in size.eval_batches}  # the part batching can't speed up
    ref = answers[size.eval_batches[0]]
    mismatched = {bs: [i for i, (a, b) in enumerate(zip(ans, ref)) if a != b] for bs, ans in answers.items()}
    mismatched = {bs: m for bs, m in mismatched.items() if m}
    identical = not mismatched
    if not identical and ctx.dtype == torch.float32:
        raise AssertionError(f"batched answers differ from batch-{size.eval_batches[0]} answers: {mismatched}")
    base = size.eval_batches[0]
    rows = {}
    for bs in size.eval_batches:
        t = times[f"batch_{bs}"]
        speedups = [b / x for b, x in zip(times[f"batch_{base}"], t)]
        rows[bs] = dict(seconds=median(t), items_per_s=len(items) / median(t),
                        new_tokens_per_s=len(items) * size.eval_new_tokens / median(t),
                        speedup_vs_batch_1=median(speedups), speedup_rounds=[round(s, 3) for s in speedups],
                        vision_s=vision_s[bs], times_s=t)
    distinct = len(set(" ".join(ref).split()))
    result = dict(benchmark="eval_throughput", size=size.name, items=len(items), images_per_item=2,
                  new_tokens=size.eval_new_tokens, identical_outputs=identical, mismatched_items=mismatched,
                  distinct_answer_words=distinct, batches={str(k): v for k, v in rows.items()},
                  answers=[a[:80] for a in ref])
    result["targets"] = [target(f"batch-{top} / batch-1 items/s", rows[top]["speedup_vs_batch_1"], ">=",
                                SPEEDUP_TARGET, ctx.targets_apply)]
    return result


def report(result: dict) -> None:
    if result.get("dry_run"):
        print(f"\neval_throughput (dry run): {result['items']} items, batches {result['batches']}, "
              f"{result['new_tokens']} new tokens")
        return
    rows = [[bs, r["seconds"], r["items_per_s"], r["new_tokens_per_s"], r["speedup_vs_batch_1"], r["vision_s"]]
            for bs, r in result["batches"].items()]
    print_table(f"eval_throughput ({result['size']}; {result['items']} items x 2 images, {result['new_tokens']} new "
                f"tokens, identical outputs: {result['identical_outputs']})",
                ["batch", "seconds", "items/s", "new tok/s", "speedup", "vision s"], rows)
    print_targets(result)


def main(argv=None) -> int:
    return benchmark_main("benchmarks.eval_throughput", __doc__, run, report, argv)


if __name__ == "__main__":
    raise SystemExit(main())
