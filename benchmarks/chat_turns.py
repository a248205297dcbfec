"""Multi-turn chat latency: KV cache reused across turns vs re-prefilling the whole history (upstream way).

One dialogue of ``chat_turns`` user turns (two images at turn 1, one at turn 3, ✨ slots, ~30-word
questions) is answered with greedy decoding of a fixed ``chat_new_tokens`` tokens per answer (no stop string,
so both modes do the same work), through the real chat engine (:class:`sparkles.engine.chat.Chat`):

* ``reuse``: the engine's default — each turn runs only the positions its cache does not already hold;
* ``reprefill``: ``Chat(..., reuse_cache=False)`` — every turn re-runs system text, all earlier turns and all
  image tokens through the decoder, as upstream's ``Chat.answer`` does (upstream even computes logits for
  every prompt position; this baseline already keeps only the last one).

Images are encoded on upload in both modes (not part of the time to first token, TTFT). TTFT is measured
from ``answer`` to the first streamed token; decode speed from the first to the last token. Both modes must
produce identical answers (checked; float32 on CPU — in bfloat16 on a GPU the two prefill shapes round
differently, so there the agreement is reported instead of asserted).

    python -m benchmarks.chat_turns --size small [--out chat_turns.json]
"""

from __future__ import annotations

import time

import torch

from .common import (benchmark_main, Context, Words, chat_questions, median, print_table, print_targets, random_pixels, synchronize, target)

TTFT_TARGET = 0.15
MODES = ("reuse", "reprefill")


def run_dialogue(ctx: Context, *, reuse: bool, questions, images, new_tokens: int) -> list[dict]:
    from sparkles.engine.chat import Chat
    from sparkles.engine.decoding import GenerationConfig

    gen = GenerationConfig(max_new_tokens=new_tokens, stop_strings=(), stop_on_eos=False, max_length=4096)
    chat = Chat(ctx.model, tokenizer=ctx.tokenizer, generation=gen, reuse_cache=reuse)
    session = chat.session()
    pending = list(images)
    turns = []
    for question, n_img in questions:
        for _ in range(n_img):
            session.add_image(pending.pop(0))
        session.ask(question)
        before = dict(session.stats)
        synchronize(ctx.device)
        t0 = time.perf_counter()
        first = None
        count, text = 0, ""
        for text in session.stream():
            if first is None:
                first = time.perf_counter()
            count += 1
        synchronize(ctx.device)
        end = time.perf_counter()
        turns.append(dict(ttft_s=first - t0, decode_tokens_per_s=(count - 1) / (end - first) if count > 1 else None,
                          new_tokens=count, answer=text,
                          prefill_tokens=session.stats["prefill_tokens"] - before["prefill_tokens"],
                          reused_tokens=session.stats["reused_tokens"] - before["reused_tokens"]))
    return turns


def run(ctx: Context) -> dict:
    size = ctx.size
    questions = chat_questions(size, Words(size, ctx.seed + 2000))
    n_images = sum(n for _, n in questions)
    if ctx.dry_run:
        return dict(benchmark="chat_turns", dry_run=True, turns=size.chat_turns, images=n_images,
                    new_tokens=size.chat_new_tokens)
    images = list(random_pixels(n_images, size, seed=ctx.seed + 3, device=ctx.device))
    for mode in MODES:  # warm-up: every turn's shapes once per mode, short answers
        run_dialogue(ctx, reuse=mode == "reuse", questions=questions, images=images,
                     new_tokens=min(8, size.chat_new_tokens))
    runs: dict[str, list] = {m: [] for m in MODES}
    for r in range(size.chat_repeats):
        for mode in (MODES if r % 2 == 0 else MODES[::-1]):
            runs[mode].append(run_dialogue(ctx, reuse=mode == "reuse", questions=questions, images=images,
                                           new_tokens=size.chat_new_tokens))
    # Identical answers: between the two modes and across repeats.
    reference = [t["answer"] for t in runs["reuse"][0]]
    mismatches = []
    for mode in MODES:
        for r, dialogue in enumerate(runs[mode]):
            for i, t in enumerate(dialogue):
                if t["answer"] != reference[i]:
                    mismatches.append(dict(mode=mode, repeat=r, turn=i + 1))
    identical = not mismatches
    if not identical and ctx.dtype == torch.float32:
        raise AssertionError(f"answers differ between cache reuse and re-prefill: {mismatches[:5]}")
    per_turn = []
    for i in range(size.chat_turns):
        row = dict(turn=i + 1)
        for mode in MODES:
            ts = [d[i]["ttft_s"] for d in runs[mode]]
            tps = [d[i]["decode_tokens_per_s"] for d in runs[mode] if d[i]["decode_tokens_per_s"]]
            row[f"{mode}_ttft_s"] = median(ts)
            row[f"{mode}_ttft_rounds_ms"] = [round(t * 1e3, 1) for t in ts]
            row[f"{mode}_decode_tokens_per_s"] = median(tps) if tps else None
            row[f"{mode}_prefill_tokens"] = runs[mode][0][i]["prefill_tokens"]
            row[f"{mode}_reused_tokens"] = runs[mode][0][i]["reused_tokens"]
        ratios = [a[i]["ttft_s"] / b[i]["ttft_s"] for a, b in zip(runs["reuse"], runs["reprefill"])]
        row["ttft_ratio"] = median(ratios)
        per_turn.append(row)
    distinct = len(set(" ".join(reference).split()))
    last = per_turn[-1]
    result = dict(benchmark="chat_turns", size=size.name, turns=size.chat_turns, images=n_images,
                  new_tokens=size.chat_new_tokens, repeats=size.chat_repeats, identical_outputs=identical,
                  mismatches=mismatches, distinct_answer_words=distinct, per_turn=per_turn,
                  answers=[a[:120] for a in reference])
    result["targets"] = [target(f"turn-{last['turn']} TTFT reuse/reprefill", last["ttft_ratio"], "<=", TTFT_TARGET,
                                ctx.targets_apply)]
    if ctx.profile:
        result["profile_reuse_dialogue"] = profile_dialogue(ctx, questions, images)
    return result


def profile_dialogue(ctx: Context, questions, images, *, turns: int = 2, new_tokens: int = 8) -> dict:
    """Where a short reuse-mode dialogue spends its time: wall clock vs busy device time (a GPU decode loop that
    is launch- or host-bound shows a low busy share) and the top operators by host time."""
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if ctx.is_cuda else [])
    t0 = time.perf_counter()
    with profile(activities=acts) as prof:
        run_dialogue(ctx, reuse=True, questions=questions[:turns], images=images, new_tokens=new_tokens)
    wall = time.perf_counter() - t0
    events = prof.key_averages()
    device = sum(getattr(e, "self_device_time_total", 0) for e in events) / 1e6 if ctx.is_cuda else None
    top = sorted(events, key=lambda e: e.self_cpu_time_total, reverse=True)[:10]
    return dict(turns=turns, new_tokens=new_tokens, wall_s=wall, device_busy_s=device,
                top_host_ops=[dict(op=e.key, self_cpu_ms=round(e.self_cpu_time_total / 1000, 2), calls=e.count)
                              for e in top])


def report(result: dict) -> None:
    if result.get("dry_run"):
        print(f"\nchat_turns (dry run): {result['turns']} turns, {result['images']} images, "
              f"{result['new_tokens']} new tokens per answer")
        return
    rows = [[r["turn"], r["reuse_prefill_tokens"], r["reprefill_prefill_tokens"], r["reuse_ttft_s"] * 1e3,
             r["reprefill_ttft_s"] * 1e3, r["ttft_ratio"], r["reuse_decode_tokens_per_s"] or 0.0,
             r["reprefill_decode_tokens_per_s"] or 0.0] for r in result["per_turn"]]
    print_table(f"chat_turns ({result['size']}; {result['new_tokens']} new tokens/answer, identical outputs: "
                f"{result['identical_outputs']})",
                ["turn", "prefill(reuse)", "prefill(full)", "TTFT reuse ms", "TTFT full ms", "ratio",
                 "tok/s reuse", "tok/s full"], rows)
    prof = result.get("profile_reuse_dialogue")
    if prof:
        busy = f", device busy {prof['device_busy_s']:.3f} s" if prof["device_busy_s"] is not None else ""
        print(f"  profile of a {prof['turns']}-turn reuse dialogue: wall {prof['wall_s']:.3f} s{busy}; top host ops: "
              + ", ".join(f"{o['op']} {o['self_cpu_ms']:.0f} ms" for o in prof["top_host_ops"][:5]))
    print_targets(result)


def main(argv=None) -> int:
    return benchmark_main("benchmarks.chat_turns", __doc__, run, report, argv)


if __name__ == "__main__":
    raise SystemExit(main())
