"""Evaluation throughput: batched greedy generation (left padding) at batch 1, 4 and 8.

``eval_items`` independent BISON/NLVR2-style prompts (two images, a question of varying length, "Let's think
step by step.") are answered with :func:`sparkles.conversation.chat.generate_batch` — all images of a batch
encoded in one vision pass, one left-padded prefill, one decode loop — with a fixed ``eval_new_tokens``
answer length (no stop string, so every batch size does the same work). Upstream evaluates one item at a
time, i.e. batch 1. Items/s is end to end: image encoding, prefill and decoding. The answers must be
identical at every batch size (checked in float32; reported in bfloat16, where padding changes rounding).

    python -m benchmarks.eval_throughput --size small [--out eval_throughput.json]
"""

from __future__ import annotations


import torch

from .common import (benchmark_main, Context, Words, eval_prompts, median, paired_rounds, print_table, print_targets, random_pixels, target, timed)

SPEEDUP_TARGET = 4.0


class ColumnLMHead(torch.nn.Module):
    """The decoder's LM head computed as ``W·hᵀ`` for a few rows (decode steps), ``h·Wᵀ`` otherwise.

    A proposal measured alongside the real path: for a handful of rows against the 32,000 × 512 vocabulary
    matrix, MKL's ``h·Wᵀ`` packs the whole 65 MB matrix on every call, which makes a batch-8 decode step's
    LM head cost ~1.7× a batch-1 one; ``W·hᵀ`` streams it once. Same weights, same logits up to rounding.
    """

    def __init__(self, head: torch.nn.Linear, max_rows: int = 64) -> None:
        super().__init__()
        self.head = head
        self.max_rows = max_rows

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        rows = h.reshape(-1, h.shape[-1])
        if rows.shape[0] > self.max_rows or self.head.bias is not None:
            return self.head(h)
        return torch.mm(self.head.weight, rows.t()).t().reshape(*h.shape[:-1], -1)


def run(ctx: Context) -> dict:
    from sparkles.conversation.chat import Chat, generate_batch
    from sparkles.models.generation import GenerationConfig

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
        def fn():  # bs < 0: the proposal's run at batch -bs (answers kept apart)
            out = []
            for i in range(0, len(items), abs(bs)):
                out += generate_batch(chat, items[i:i + abs(bs)])
            answers.setdefault(bs, out)
            return out
        return fn

    def encode_only(bs: int):
        def fn():
            for i in range(0, len(items), bs):
                chat.encode_images([img for _, imgs in items[i:i + bs] for img in imgs])
        return fn

    def proposed(bs: int):  # the same evaluation with the column LM head swapped in for its duration
        inner = evaluate(-bs)

        def fn():
            llm = ctx.model.llama_model
            head = llm.lm_head
            llm.lm_head = ColumnLMHead(head)
            try:
                return inner()
            finally:
                llm.lm_head = head
        return fn

    top = max(size.eval_batches)
    fns = {f"batch_{bs}": evaluate(bs) for bs in size.eval_batches}
    fns[f"batch_{top}_column_lm_head"] = proposed(top)
    times = paired_rounds(fns, repeats=size.eval_repeats, warmup=1, device=ctx.device)
    vision_s = {bs: timed(encode_only(bs), ctx.device)[0] for bs in size.eval_batches}  # the part batching can't speed up
    ref = answers[size.eval_batches[0]]
    mismatched = {bs: [i for i, (a, b) in enumerate(zip(ans, ref)) if a != b] for bs, ans in answers.items()}
    proposal_identical = not mismatched.pop(-top, [])
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
    t = times[f"batch_{top}_column_lm_head"]
    speedups = [b / x for b, x in zip(times[f"batch_{base}"], t)]
    proposal = dict(batch=top, seconds=median(t), items_per_s=len(items) / median(t),
                    new_tokens_per_s=len(items) * size.eval_new_tokens / median(t),
                    speedup_vs_batch_1=median(speedups), speedup_rounds=[round(s, 3) for s in speedups],
                    identical_to_batch_1=proposal_identical, times_s=t)
    distinct = len(set(" ".join(ref).split()))
    result = dict(benchmark="eval_throughput", size=size.name, items=len(items), images_per_item=2,
                  new_tokens=size.eval_new_tokens, identical_outputs=identical, mismatched_items=mismatched,
                  distinct_answer_words=distinct, batches={str(k): v for k, v in rows.items()},
                  proposal_column_lm_head=proposal, answers=[a[:80] for a in ref])
    result["targets"] = [
        target(f"batch-{top} / batch-1 items/s", rows[top]["speedup_vs_batch_1"], ">=", SPEEDUP_TARGET,
               ctx.targets_apply),
        target(f"batch-{top} / batch-1 items/s (column LM head, proposed)", proposal["speedup_vs_batch_1"], ">=",
               SPEEDUP_TARGET, ctx.targets_apply),
    ]
    return result


def report(result: dict) -> None:
    if result.get("dry_run"):
        print(f"\neval_throughput (dry run): {result['items']} items, batches {result['batches']}, "
              f"{result['new_tokens']} new tokens")
        return
    rows = [[bs, r["seconds"], r["items_per_s"], r["new_tokens_per_s"], r["speedup_vs_batch_1"], r["vision_s"]]
            for bs, r in result["batches"].items()]
    p = result["proposal_column_lm_head"]
    rows.append([f"{p['batch']} (column LM head)", p["seconds"], p["items_per_s"], p["new_tokens_per_s"],
                 p["speedup_vs_batch_1"], "-"])
    print_table(f"eval_throughput ({result['size']}; {result['items']} items x 2 images, {result['new_tokens']} new "
                f"tokens, identical outputs: {result['identical_outputs']})",
                ["batch", "seconds", "items/s", "new tok/s", "speedup", "vision s"], rows)
    print_targets(result)


def main(argv=None) -> int:
    return benchmark_main("benchmarks.eval_throughput", __doc__, run, report, argv)


if __name__ == "__main__":
    raise SystemExit(main())
