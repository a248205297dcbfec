"""Batch-1 greedy decoding speed of the decode modes ("plain", "static", "compiled"), and their agreement.

One prompt of ``PROMPT`` random tokens is prefilled and ``NEW`` tokens are decoded greedily (no stop string, so
every mode does the same work) through :func:`sparkles.engine.decoding.decode_tokens` with each
``GenerationConfig.decode_mode``, at the evaluation protocol's ``max_length`` (what the pre-allocated cache and
the compiled step's fixed-shape attention span). Decode speed is timed from the first token to the last; the
modes run in alternating order and every ratio is the median of per-round ratios. The compiled step's first
call (tracing and compiling it) is reported apart as ``compile_s``. Where "compiled" does not compile (the CPU,
:data:`sparkles.engine.decoding.COMPILE_ON_CPU`), the compiled step is also timed, forced, as ``compiled_step``:
the measurement behind that choice.

Agreement: the plain path's one-token step is run along the compiled step's tokens (teacher forcing) and each
position's plain top-1 is compared with the compiled token. In float32 they must all agree; in bfloat16 the
modes round differently, so only positions whose plain top-2 logit gap exceeds ``--margin`` must agree.

On a GPU the batch-1 speed is set against the memory-bandwidth bound: every token reads the decoder's weights
(and its KV cache) once, so tokens/s ≤ bandwidth / bytes read per token, with the card's bandwidth from
:data:`HBM_BANDWIDTH` by its ``nvidia-smi`` name.

    python -m benchmarks.decode_path --size small [--out decode_path.json]
"""

from __future__ import annotations

import time
from typing import Optional

import torch

from .common import Context, benchmark_main, median, print_table, print_targets, synchronize, target

MODES = ("plain", "static", "compiled")
PROMPT = {"toy": 24, "small": 256, "full": 512}
NEW = {"toy": 8, "small": 128, "full": 64}
MAX_LENGTH = {"toy": 64, "small": 2000, "full": 2000}  # the evaluation protocol's context + answer
REPEATS = {"toy": 1, "small": 5, "full": 2}
MARGIN = {"float32": 0.0, "bfloat16": 0.5}  # top-2 logit gap above which the modes must agree
# HBM bandwidth in bytes/s by a substring of the `nvidia-smi` name (first match wins; SXM unless said).
HBM_BANDWIDTH = (("H200", 4.8e12), ("H100 NVL", 3.9e12), ("H100 PCIe", 2.0e12), ("H100", 3.35e12),
                 ("A100-SXM4-80GB", 2.0e12), ("A100 80GB", 2.0e12), ("A100-PCIE-80GB", 1.94e12),
                 ("A100", 1.56e12))
# The compiled mode on the CPU must not be slower than the plain one (within one run, bench-small).
COMPILED_VS_PLAIN_TARGET = 1.0


def bandwidth_of(gpu_name: Optional[str]) -> Optional[float]:
    if not gpu_name:
        return None
    for key, bw in HBM_BANDWIDTH:
        if key.lower() in gpu_name.lower():
            return bw
    return None


def bytes_per_token(llm, context: int) -> dict:
    """Bytes a batch-1 decode step reads: every weight but the input embedding table (one row of it), plus the
    KV cache of ``context`` positions."""
    embed = llm.get_input_embeddings().weight
    weights = sum(p.numel() * p.element_size() for p in llm.parameters() if p is not embed)
    cfg = llm.config
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    kv_heads = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
    kv = 2 * cfg.num_hidden_layers * kv_heads * head_dim * context * embed.element_size()
    return dict(weights=weights, kv_cache=kv, total=weights + kv)


def _prompt(ctx: Context, length: int) -> torch.Tensor:
    llm = ctx.model.llama_model
    g = torch.Generator().manual_seed(ctx.seed + 4000)
    ids = torch.randint(10, llm.config.vocab_size, (1, length), generator=g).to(ctx.device)
    with torch.no_grad():
        return llm.get_input_embeddings()(ids)


def decode_once(ctx: Context, embeds: torch.Tensor, mode: str, new_tokens: int, max_length: int) -> dict:
    from sparkles.engine import decoding

    # "compiled_step": the compiled step where "compiled" would not compile (the CPU), to measure that choice
    forced = mode == "compiled_step"
    gen = decoding.GenerationConfig(max_new_tokens=new_tokens, max_length=max_length, stop_strings=(),
                                    stop_on_eos=False, decode_mode="compiled" if forced else mode)
    mask = torch.ones(embeds.shape[:2], dtype=torch.long, device=embeds.device)
    default = decoding.COMPILE_ON_CPU
    decoding.COMPILE_ON_CPU = default or forced
    synchronize(ctx.device)
    t0 = time.perf_counter()
    first, tokens = None, []
    try:
        for step in decoding.decode_tokens(ctx.model.llama_model, inputs_embeds=embeds, attention_mask=mask,
                                           gen=gen):
            tokens.append(int(step[0]))
            if first is None:
                first = time.perf_counter()
        synchronize(ctx.device)
    finally:
        decoding.COMPILE_ON_CPU = default
    end = time.perf_counter()
    return dict(ttft_s=first - t0, decode_s=end - first, tokens=tokens,
                decode_tokens_per_s=(len(tokens) - 1) / (end - first))


@torch.no_grad()
def margin_agreement(ctx: Context, embeds: torch.Tensor, tokens: list[int], margin: float) -> dict:
    """The plain step along ``tokens``: at how many positions its top-1 differs, and how many of those have a
    top-2 gap above ``margin`` (those must be none)."""
    from sparkles.engine.decoding import forward_last
    from sparkles.engine.kv_cache import new_kv_cache

    llm = ctx.model.llama_model
    cache = new_kv_cache()
    length = embeds.shape[1]
    mask = torch.ones(1, length, dtype=torch.long, device=ctx.device)
    pos = torch.arange(length, device=ctx.device)[None]
    logits = forward_last(llm, inputs_embeds=embeds, attention_mask=mask, position_ids=pos, cache=cache)
    gaps, tops = [], []
    embed = llm.get_input_embeddings()
    for i, t in enumerate(tokens):
        top2 = logits[0].topk(2)
        gaps.append(float(top2.values[0] - top2.values[1]))
        tops.append(int(top2.indices[0]))
        if i == len(tokens) - 1:
            break
        nxt = torch.tensor([[t]], device=ctx.device)
        mask = torch.cat([mask, mask.new_ones(1, 1)], dim=1)
        logits = forward_last(llm, inputs_embeds=embed(nxt), attention_mask=mask,
                               position_ids=torch.tensor([[length + i]], device=ctx.device), cache=cache)
    differ = [i for i, (a, b) in enumerate(zip(tops, tokens)) if a != b]
    violations = [i for i in differ if gaps[i] > margin]
    return dict(positions=len(tokens), margin=margin, differing_positions=differ, violations=violations,
                min_gap=min(gaps), median_gap=median(gaps), agree=not violations)


def run(ctx: Context) -> dict:
    from sparkles.engine import decoding

    size = ctx.size.name
    prompt, new, max_length = PROMPT[size], NEW[size], MAX_LENGTH[size]
    if ctx.dry_run:
        return dict(benchmark="decode_path", dry_run=True, prompt_tokens=prompt, new_tokens=new)
    embeds = _prompt(ctx, prompt)
    compiled_on = ctx.device.type != "cpu" or decoding.COMPILE_ON_CPU
    modes_run = MODES if compiled_on else MODES + ("compiled_step",)
    t0 = time.perf_counter()
    first = decode_once(ctx, embeds, "compiled_step", new, max_length)  # traces and compiles the step
    compile_s = time.perf_counter() - t0
    for mode in modes_run:  # warm-up
        decode_once(ctx, embeds, mode, new, max_length)
    repeats = REPEATS[size]
    runs: dict[str, list] = {m: [] for m in modes_run}
    for r in range(repeats):
        for mode in (modes_run if r % 2 == 0 else modes_run[::-1]):
            runs[mode].append(decode_once(ctx, embeds, mode, new, max_length))
    reference = runs["plain"][0]["tokens"]
    identical = all(run["tokens"] == reference for m in modes_run for run in runs[m]) \
        and first["tokens"] == reference
    dtype = str(ctx.dtype).removeprefix("torch.")
    if not identical and ctx.dtype == torch.float32:
        raise AssertionError("greedy tokens differ between decode modes in float32")
    modes = {}
    for m in modes_run:
        tps = [x["decode_tokens_per_s"] for x in runs[m]]
        modes[m] = dict(decode_tokens_per_s=median(tps), rounds_tokens_per_s=[round(x, 1) for x in tps],
                        ttft_s=median([x["ttft_s"] for x in runs[m]]))
    for m in modes_run:
        modes[m]["speed_vs_plain"] = median([a["decode_tokens_per_s"] / b["decode_tokens_per_s"]
                                             for a, b in zip(runs[m], runs["plain"])])
    agreement = margin_agreement(ctx, embeds, first["tokens"], MARGIN.get(dtype, 0.5))
    llm = ctx.model.llama_model
    read = bytes_per_token(llm, prompt + new // 2)
    gpu = torch.cuda.get_device_name(ctx.device) if ctx.is_cuda else None
    bw = bandwidth_of(gpu)
    bound = None if bw is None else bw / read["total"]
    best = max(modes[m]["decode_tokens_per_s"] for m in modes_run)
    result = dict(benchmark="decode_path", size=size, batch=1, prompt_tokens=prompt, new_tokens=new,
                  max_length=max_length, repeats=repeats, dtype=dtype, modes=modes, compile_s=compile_s,
                  compiled_runs_compiled_step=compiled_on, identical_outputs=identical, agreement=agreement,
                  bytes_per_token=read, gpu=gpu, hbm_bandwidth_bytes_per_s=bw, bandwidth_bound_tokens_per_s=bound,
                  best_mode=max(modes_run, key=lambda m: modes[m]["decode_tokens_per_s"]),
                  fraction_of_bound=None if bound is None else best / bound)
    result["targets"] = [target("batch-1 decode tok/s compiled/plain", modes["compiled"]["speed_vs_plain"], ">=",
                                COMPILED_VS_PLAIN_TARGET, ctx.targets_apply)]
    return result


def report(result: dict) -> None:
    if result.get("dry_run"):
        print(f"\ndecode_path (dry run): prompt {result['prompt_tokens']}, {result['new_tokens']} new tokens")
        return
    rows = [[m, r["decode_tokens_per_s"], r["speed_vs_plain"], r["ttft_s"] * 1e3] for m, r in result["modes"].items()]
    note = "" if result["compiled_runs_compiled_step"] else \
        " (on this CPU 'compiled' runs the static path; compiled_step: the compiled step forced)"
    print_table(f"decode_path ({result['size']}, batch 1, {result['dtype']}; prompt {result['prompt_tokens']}, "
                f"{result['new_tokens']} new tokens, max_length {result['max_length']}; compile "
                f"{result['compile_s']:.1f} s{note}; identical tokens: {result['identical_outputs']})",
                ["mode", "decode tok/s", "× plain", "TTFT ms"], rows)
    a = result["agreement"]
    print(f"  agreement plain vs compiled: {len(a['differing_positions'])} of {a['positions']} positions differ, "
          f"{len(a['violations'])} with a top-2 gap > {a['margin']} (min gap {a['min_gap']:.3g})")
    if result["bandwidth_bound_tokens_per_s"]:
        print(f"  bandwidth bound: {result['bytes_per_token']['total'] / 1e9:.2f} GB/token at "
              f"{result['hbm_bandwidth_bytes_per_s'] / 1e12:.2f} TB/s -> "
              f"{result['bandwidth_bound_tokens_per_s']:.1f} tok/s; best mode {result['best_mode']} reaches "
              f"{result['fraction_of_bound'] * 100:.0f} %")
    print_targets(result)


def main(argv=None) -> int:
    return benchmark_main("benchmarks.decode_path", __doc__, run, report, argv)


if __name__ == "__main__":
    raise SystemExit(main())
