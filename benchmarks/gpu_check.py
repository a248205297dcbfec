"""The figures a GPU run must record, in one process (one model build), as one JSON file and one Markdown table.

    python -m benchmarks.gpu_check --out DIR            # on a GPU: the paper's shapes in bfloat16
    python -m benchmarks.gpu_check --dry-run --out DIR  # the same steps on the CPU at the toy size (~1 min)

Steps, each recorded even when another fails (the JSON is rewritten after every step):

1. ``decode_path`` — batch-1 greedy decode tokens/s of the 7B-shaped decoder in each decode mode, against the
   memory-bandwidth bound of the card (weight + KV bytes per token over the HBM bandwidth of its
   ``nvidia-smi`` name), and the greedy-margin agreement of the plain and compiled paths (positions whose
   top-2 logit gap exceeds the margin must give the same token);
2. ``chat_turns`` — turn-6 time to first token with the KV cache reused vs re-prefilling the history;
3. ``eval_throughput`` — batch-8 vs batch-1 greedy evaluation items/s;
4. ``train_step`` — training-step MFU at the paper's shapes against the measured matmul peak;
5. ``vision_cache`` — the cached-feature step (last: a run cut short loses only this one).

Files: ``gpu_check.json`` (``benchmarks.run_all``'s layout plus a ``checks`` list; copied into ``benchmarks/``
as ``results_<card>_full.json`` it is rendered into RESULTS.md) and ``gpu_check.md``. Exit status 0 when every
step ran, the agreement holds and, in float32, every compared mode gave identical outputs.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import os
import sys
import time
from pathlib import Path

import torch

from . import chat_turns, decode_path, eval_throughput, train_step, vision_cache
from .common import SIZES, Context, machine_info, run_benchmark, write_json

STEPS = {"decode_path": decode_path, "chat_turns": chat_turns, "eval_throughput": eval_throughput,
         "train_step": train_step, "vision_cache": vision_cache}


def _fmt(x, spec: str = ".3g") -> str:
    return "-" if x is None else format(x, spec)


def checks(doc: dict) -> list[dict]:
    """One row per figure the GPU run is for: value, what it is compared with, and a status where one applies."""
    b = doc["benchmarks"]
    rows = []

    def add(step, figure, value, reference="", status="recorded"):
        rows.append(dict(step=step, figure=figure, value=value, reference=reference, status=status))

    for name, r in b.items():
        if "error" in r:
            add(name, "error", r["error"], "", "FAILED")
    d = b.get("decode_path", {})
    if "modes" in d:
        for m, r in d["modes"].items():
            add("decode_path", f"batch-1 greedy decode tok/s, {m}", _fmt(r["decode_tokens_per_s"], ".1f"),
                f"{r['speed_vs_plain']:.2f}× plain")
        bound = d.get("bandwidth_bound_tokens_per_s")
        add("decode_path", "HBM-bandwidth bound tok/s (weights + KV per token)", _fmt(bound, ".1f"),
            f"{d['bytes_per_token']['total'] / 1e9:.3g} GB/token at "
            + (f"{d['hbm_bandwidth_bytes_per_s'] / 1e12:.2f} TB/s" if d.get("hbm_bandwidth_bytes_per_s")
               else "no bandwidth (CPU or card not in the table)"))
        if d.get("fraction_of_bound") is not None:
            add("decode_path", f"best mode ({d['best_mode']}) / bound", f"{d['fraction_of_bound'] * 100:.0f} %")
        a = d["agreement"]
        add("decode_path", f"greedy-margin agreement plain vs compiled ({d['dtype']})",
            f"{len(a['violations'])} violations, {len(a['differing_positions'])}/{a['positions']} differ",
            f"top-2 gap > {a['margin']} must agree", "PASS" if a["agree"] else "FAIL")
        add("decode_path", "compile time of the decode step s", _fmt(d["compile_s"], ".1f"))
    c = b.get("chat_turns", {})
    if "per_turn" in c:
        last = c["per_turn"][-1]
        add("chat_turns", f"turn-{last['turn']} TTFT reuse / re-prefill",
            f"{last['ttft_ratio']:.3f}",
            f"{last['reuse_ttft_s'] * 1e3:.1f} ms vs {last['reprefill_ttft_s'] * 1e3:.1f} ms")
    e = b.get("eval_throughput", {})
    if "batches" in e:
        biggest = max(e["batches"], key=int)
        r = e["batches"][biggest]
        add("eval_throughput", f"batch-{biggest} vs batch-1 evaluation items/s", f"{r['speedup_vs_batch_1']:.2f}×",
            f"{r['items_per_s']:.2f} vs {e['batches']['1']['items_per_s']:.2f} items/s")
    t = b.get("train_step", {})
    if "mfu" in t:
        add("train_step", "training-step MFU", f"{t['mfu'] * 100:.1f} %",
            f"{t['achieved_tflops']:.1f} of {t['peak_tflops']:.1f} TFLOP/s (measured matmul peak)")
    v = b.get("vision_cache", {})
    if "memory_ratio" in v:
        add("vision_cache", "cached-feature step / uncached", f"{v['memory_ratio']:.3f}")
    exact = doc["machine"].get("dtype") == "float32"
    for name, r in b.items():
        if "identical_outputs" in r:
            add(name, "identical outputs between compared modes", str(r["identical_outputs"]),
                "asserted in float32" if exact else "informative in bfloat16",
                ("PASS" if r["identical_outputs"] else "FAIL") if exact else "recorded")
    return rows


def markdown(doc: dict) -> str:
    m = doc["machine"]
    dry = ", dry run" if doc["dry_run"] else ""
    lines = [f"# GPU check — {m.get('gpu') or m['cpu']} ({doc['size']}, {m['dtype']}{dry})",
             "", f"torch {m['torch']}, transformers {m['transformers']}; started {doc['started']}; "
             f"command `{doc['command']}`", "",
             "| step | figure | value | reference | status |", "|---|---|---|---|---|"]
    for r in doc["checks"]:
        lines.append(f"| {r['step']} | {r['figure']} | {r['value']} | {r['reference']} | {r['status']} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dry-run", action="store_true", help="the same steps on the CPU at the toy size")
    parser.add_argument("--out", default=os.environ.get("OUT", "/tmp/sparkles_gpu_check"), help="output folder")
    parser.add_argument("--only", default=",".join(STEPS), help="comma-separated subset of the steps")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default 2; dry run 1)")
    args = parser.parse_args(argv)
    names = [n.strip() for n in args.only.split(",") if n.strip()]
    unknown = set(names) - set(STEPS)
    if unknown:
        parser.error(f"unknown step(s): {', '.join(sorted(unknown))}; known: {', '.join(STEPS)}")
    if args.dry_run:
        size, device = SIZES["toy"], torch.device("cpu")
    else:
        if not torch.cuda.is_available():
            print("no CUDA device: use --dry-run for the CPU rehearsal", file=sys.stderr)
            return 2
        size, device = SIZES["full"], torch.device("cuda")
    threads = args.threads or (1 if args.dry_run else 2)
    torch.set_num_threads(threads)
    ctx = Context(size=size, device=device, threads=threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    json_path, md_path = out / "gpu_check.json", out / "gpu_check.md"
    doc = dict(machine=machine_info(ctx), size=size.name, dry_run=args.dry_run,
               started=_dt.datetime.now().isoformat(timespec="seconds"),
               command="python -m benchmarks.gpu_check " + " ".join(sys.argv[1:] if argv is None else argv),
               benchmarks={}, checks=[])
    t_build = time.perf_counter()
    ctx.model  # build once, before the first timed step
    doc["machine"]["model_build_s"] = round(time.perf_counter() - t_build, 1)
    for name in names:
        result = run_benchmark(name, STEPS[name], ctx)
        result["command"] = f"python -m benchmarks.{name} --size {size.name}"
        doc["benchmarks"][name] = result
        doc["checks"] = checks(doc)
        write_json(str(json_path), doc)
        md_path.write_text(markdown(doc))
    print("\n" + markdown(doc))
    print(f"wrote {json_path} and {md_path}")
    failed = [r for r in doc["checks"] if r["status"] in ("FAILED", "FAIL")]
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
