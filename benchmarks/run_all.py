"""Run every benchmark in one process (one model build) and regenerate ``benchmarks/RESULTS.md``.

    python -m benchmarks.run_all [--size small|full|toy] [--out benchmarks/results_<machine>.json]
    python -m benchmarks.run_all --size full --dry-run      # shapes on the meta device + FLOPs, no timing
    python -m benchmarks.run_all --render-only              # rebuild RESULTS.md from benchmarks/results_*.json

The JSON is rewritten after every benchmark, so a run that is cut short keeps what it finished. A benchmark
that fails is recorded with its error and the others still run; the exit status is then 1.
``RESULTS.md`` is generated from every ``benchmarks/results_*.json`` present; text below the line
``<!-- notes: kept by run_all -->`` in the existing file (the analysis) is preserved.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import re
import sys
from pathlib import Path
from typing import Optional

from sparkles.common.io import read_json

from . import chat_turns, eval_throughput, train_step, vision_cache
from .common import add_common_args, context_from_args, machine_info, run_benchmark, write_json

HERE = Path(__file__).resolve().parent
RESULTS_MD = HERE / "RESULTS.md"
NOTES_MARK = "<!-- notes: kept by run_all -->"
# Variants that older results measured beside the real path and that have since become it (label-window
# loss in SparklesChat.forward, column-wise LM head in decoding); their recorded targets are not rendered.
FORMER_PROPOSALS = ("label-window", "column LM head")
BENCHMARKS = {"train_step": train_step, "vision_cache": vision_cache, "chat_turns": chat_turns,
              "eval_throughput": eval_throughput}


def machine_tag(info: dict) -> str:
    name = info.get("gpu") or info.get("cpu") or "machine"
    tag = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")
    tag = re.sub(r"^(nvidia-|amd-|intel-r-)", "", tag)[:24].strip("-")
    if "gpu" not in info:
        tag += f"-{info.get('cpu_cores')}c"
    return tag


def single_command(name: str, args: argparse.Namespace) -> str:
    extra = f" --threads {args.threads}" if args.size != "full" else ""
    return f"python -m benchmarks.{name} --size {args.size}{extra}"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_common_args(parser)
    parser.add_argument("--only", default=",".join(BENCHMARKS), help="comma-separated subset of the benchmarks")
    parser.add_argument("--render-only", action="store_true", help="only regenerate RESULTS.md")
    parser.add_argument("--results-md", default=str(RESULTS_MD), help="where to write the Markdown summary")
    parser.add_argument("--no-profile", action="store_true", help="skip the profiler table of the train step")
    args = parser.parse_args(argv)
    if args.render_only:
        render_results(Path(args.results_md))
        return 0
    names = [n.strip() for n in args.only.split(",") if n.strip()]
    unknown = set(names) - set(BENCHMARKS)
    if unknown:
        parser.error(f"unknown benchmark(s): {', '.join(sorted(unknown))}; known: {', '.join(BENCHMARKS)}")
    ctx = context_from_args(args)
    ctx.profile = not args.no_profile and not args.dry_run
    info = machine_info(ctx)
    out = args.out
    if out is None and args.size in ("small", "full") and not args.dry_run:
        out = str(HERE / f"results_{machine_tag(info)}_{args.size}.json")
    doc = dict(machine=info, size=args.size, dry_run=args.dry_run, started=_dt.datetime.now().isoformat(timespec="seconds"),
               command="python -m benchmarks.run_all " + " ".join(argv if argv is not None else sys.argv[1:]),
               benchmarks={})
    failed = False
    for name in names:
        result = run_benchmark(name, BENCHMARKS[name], ctx)
        failed = failed or "error" in result
        result["command"] = single_command(name, args)
        doc["benchmarks"][name] = result
        doc["machine"]["loadavg_1min_end"] = machine_info(ctx).get("loadavg_1min")
        write_json(out, doc)
    summary = summary_rows(doc)
    print("\nsummary")
    for row in summary:
        print(f"  {row['benchmark']:<16} {row['metric']:<48} {row['value']:>10}  {row['target']:<10} {row['status']}")
    if out:
        print(f"\nwrote {out}")
        if Path(out).resolve().parent == HERE and not args.dry_run:
            render_results(Path(args.results_md))
            print(f"wrote {args.results_md}")
    return 1 if failed else 0


# ----------------------------------------------------------------------------------------------- summary
def summary_rows(doc: dict) -> list[dict]:
    rows = []
    for name, r in doc["benchmarks"].items():
        if "error" in r:
            rows.append(dict(benchmark=name, metric="error", value="-", target="-", status="FAILED",
                             command=r.get("command", "")))
            continue
        if r.get("dry_run"):
            continue
        for t in r.get("targets", []):
            if any(m in t["name"] for m in FORMER_PROPOSALS):
                continue
            rows.append(dict(benchmark=name, metric=t["name"], value=f"{t['value']:.3g}",
                             target=f"{t['op']} {t['threshold']:g}", status=t["status"],
                             command=r.get("command", "")))
        if "identical_outputs" in r:
            # Asserted in float32; in bfloat16 the compared shapes round differently, so it is informative.
            exact = doc["machine"].get("dtype") == "float32"
            status = "PASS" if r["identical_outputs"] else ("MISS" if exact else "differs (bf16 rounding)")
            rows.append(dict(benchmark=name, metric="identical outputs between compared modes",
                             value=str(r["identical_outputs"]), target="True", status=status,
                             command=r.get("command", "")))
    return rows


def _fmt(x, digits: int = 3) -> str:
    if x is None:
        return "-"
    if isinstance(x, float):
        return f"{x:.{digits}g}"
    return str(x)


def _model_path(result: dict, old_key: str) -> dict:
    """The figures of the model's own loss path. Results recorded while the label-window loss was a separate
    proposal keep them under ``result[old_key]["model"]`` (their other rows are not rendered); newer ones at
    the top level."""
    return result.get(old_key, {}).get("model", result)


def render_file(path: Path) -> list[str]:
    doc = read_json(path, what="benchmark results")
    m = doc["machine"]
    b = doc["benchmarks"]
    where = m.get("gpu") or m["cpu"]
    lines = [f"## {doc['size']} on {where} (`{path.name}`)", ""]
    lines.append(f"- machine: CPU {m['cpu']}, {m['cpu_cores']} cores, torch threads {m['torch_threads']}"
                 + (f", GPU {m['gpu']}" if m.get("gpu") else "")
                 + f"; torch {m['torch']}, transformers {m['transformers']}, Python {m['python']}; "
                 f"allocator {m.get('allocator', 'system')}")
    lines.append(f"- dtype: decoder {m['dtype']}, vision tower {m['vision_dtype']}; run started {doc['started']}; "
                 f"1-min load average {_fmt(m.get('loadavg_1min'))} at start, {_fmt(m.get('loadavg_1min_end'))} at end")
    lines.append(f"- command: `{doc['command']}`")
    lines += ["", "| benchmark | figure | value | target | status | command |", "|---|---|---|---|---|---|"]
    for row in summary_rows(doc):
        lines.append(f"| {row['benchmark']} | {row['metric']} | {row['value']} | {row['target']} | {row['status']} "
                     f"| `{row['command']}` |")
    if "train_step" in b and "step_s" in _model_path(b["train_step"], "variants"):
        t = b["train_step"]
        st = t["batch"]
        v = _model_path(t, "variants")
        head = f", LM head on the last {t['logits_positions']} positions" if "logits_positions" in t else ""
        lines += ["", f"**train_step** — batch {st['batch']} × {st['images'] // st['batch']} images, padded length "
                  f"{st['seq_len']} ({st['text_tokens_per_sample']} text tokens/sample, {st['target_tokens']} target "
                  f"tokens{head}); matmul peak {t['peak_tflops'] * 1e3:.1f} GFLOP/s ({t['gemm']['dtype']} GEMM "
                  f"{t['gemm']['n']}³, median of the rounds)", "",
                  "| step s | samples/s | GFLOP/step | achieved GFLOP/s | MFU |", "|---|---|---|---|---|",
                  f"| {v['step_s']:.3f} | {v['samples_per_s']:.2f} | {v['flops']['total'] / 1e9:.1f} "
                  f"| {v['achieved_tflops'] * 1e3:.1f} | {v['mfu'] * 100:.1f} % |"]
        if t.get("profile_model_path"):
            lines += ["", "Top operators of the `model` step (self time share): " + ", ".join(
                f"{p['op']} {p['share'] * 100:.0f} %" for p in t["profile_model_path"][:8])]
    if "vision_cache" in b and "uncached_s" in _model_path(b["vision_cache"], "paths"):
        v = b["vision_cache"]
        r = _model_path(v, "paths")
        lines += ["", f"**vision_cache** — {v['images']} images cached in {v['build_s']:.2f} s "
                  f"({v['build_s_per_image'] * 1e3:.1f} ms/image, {v['cache_file_bytes'] / 1e6:.1f} MB safetensors); "
                  f"break-even after {_fmt(v['epochs_to_break_even'])} epoch(s)", "",
                  "| uncached step s | in-memory s | ratio | on-disk s | ratio |", "|---|---|---|---|---|",
                  f"| {r['uncached_s']:.3f} | {r['memory_s']:.3f} | {r['memory_ratio']:.3f} | {r['disk_s']:.3f} "
                  f"| {r['disk_ratio']:.3f} |"]
    if "chat_turns" in b and "per_turn" in b["chat_turns"]:
        c = b["chat_turns"]
        lines += ["", f"**chat_turns** — {c['images']} images, {c['new_tokens']} new tokens per answer, median of "
                  f"{c['repeats']} dialogue(s) per mode; identical answers: {c['identical_outputs']}", "",
                  "| turn | prefilled (reuse) | prefilled (re-prefill) | TTFT reuse ms | TTFT re-prefill ms | ratio "
                  "| decode tok/s reuse | decode tok/s re-prefill |", "|---|---|---|---|---|---|---|---|"]
        for r in c["per_turn"]:
            lines.append(f"| {r['turn']} | {r['reuse_prefill_tokens']} | {r['reprefill_prefill_tokens']} | "
                         f"{r['reuse_ttft_s'] * 1e3:.1f} | {r['reprefill_ttft_s'] * 1e3:.1f} | {r['ttft_ratio']:.3f} | "
                         f"{_fmt(r['reuse_decode_tokens_per_s'])} | {_fmt(r['reprefill_decode_tokens_per_s'])} |")
        prof = c.get("profile_reuse_dialogue")
        if prof:
            busy = (f", device busy {prof['device_busy_s']:.3f} s ({prof['device_busy_s'] / prof['wall_s'] * 100:.0f} %)"
                    if prof.get("device_busy_s") is not None else "")
            lines += ["", f"Profile of a {prof['turns']}-turn reuse dialogue ({prof['new_tokens']} tokens/answer): wall "
                      f"{prof['wall_s']:.3f} s{busy}; top host ops: " + ", ".join(
                          f"{o['op']} {o['self_cpu_ms']:.0f} ms" for o in prof["top_host_ops"][:6])]
    if "eval_throughput" in b and "batches" in b["eval_throughput"]:
        e = b["eval_throughput"]
        lines += ["", f"**eval_throughput** — {e['items']} items × 2 images, {e['new_tokens']} new tokens each; "
                  f"identical answers at every batch size: {e['identical_outputs']}", "",
                  "| batch | seconds | items/s | new tokens/s | speed-up vs batch 1 | of which image encoding s |",
                  "|---|---|---|---|---|---|"]
        for bs, r in e["batches"].items():
            lines.append(f"| {bs} | {r['seconds']:.3f} | {r['items_per_s']:.2f} | {r['new_tokens_per_s']:.1f} | "
                         f"{r['speedup_vs_batch_1']:.2f}× | {r['vision_s']:.3f} |")
    for name, r in b.items():
        if "error" in r:
            lines += ["", f"**{name}** failed: `{r['error']}`"]
    return lines + [""]


def render_results(md_path: Path, results_dir: Optional[Path] = None) -> None:
    results_dir = results_dir or HERE
    notes = ""
    if md_path.is_file():
        text = md_path.read_text()
        if NOTES_MARK in text:
            notes = text.split(NOTES_MARK, 1)[1]
    lines = ["# Benchmark results", "",
             "Generated by `python -m benchmarks.run_all` from the `benchmarks/results_*.json` files beside this one;",
             "do not edit above the notes mark. Targets (bench-small on the CPU, ratios measured within one run): "
             "train-step MFU ≥ 60 % of the measured matmul peak; cached-feature step ≤ 0.65× uncached; turn-6 TTFT "
             "with cache reuse ≤ 0.15× re-prefill; batch-8 greedy evaluation ≥ 4× batch-1 items/s. Other sizes "
             "show `n/a`: their figures are informative.", ""]
    for path in sorted(results_dir.glob("results_*.json")):
        try:
            lines += render_file(path)
        except (KeyError, ValueError, TypeError) as exc:
            lines += [f"## `{path.name}`", "", f"(could not be rendered: {type(exc).__name__}: {exc})", ""]
    text = "\n".join(lines).rstrip() + "\n\n" + NOTES_MARK + (notes if notes else "\n")
    md_path.write_text(text)


if __name__ == "__main__":
    raise SystemExit(main())
