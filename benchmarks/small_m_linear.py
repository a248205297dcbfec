"""Cost of the decoder's linear layers at 1 and 8 rows (one decode step at batch 1 / 8) on the CPU.

Batched evaluation is bounded by how much more an 8-row product costs than a 1-row one (both read the same
weights). This measures it for the bench-small decoder's shapes with ``F.linear`` and, where torch has MKL, with
weights pre-packed once by MKL (``torch.ops.mkl._mkl_reorder_linear_weight``, what inductor's freezing uses for
float32): if re-packing the weight on every call were the cost, pre-packing would remove it.

    python -m benchmarks.small_m_linear [--threads 2] [--out small_m_linear.json]
"""

from __future__ import annotations

import argparse
import json
import time
from typing import Optional, Sequence

# (in, out) of the bench-small decoder's linears: attention projections, MLP up/gate, MLP down, LM head.
SHAPES = ((512, 512), (512, 1376), (1376, 512), (512, 32000))
ROWS = (1, 8)


def _time_us(fn, repeats: int) -> float:
    for _ in range(max(10, repeats // 20)):
        fn()
    best = float("inf")
    for _ in range(3):  # best of three rounds: the least disturbed by other load
        start = time.perf_counter()
        for _ in range(repeats):
            fn()
        best = min(best, (time.perf_counter() - start) / repeats * 1e6)
    return best


def measure(repeats: int = 300) -> list[dict]:
    import torch
    import torch.nn.functional as F

    packed_available = hasattr(torch.ops, "mkl") and hasattr(torch.ops.mkl, "_mkl_linear") and \
        torch.backends.mkl.is_available()
    rows_out = []
    gen = torch.Generator().manual_seed(0)
    for k, n in SHAPES:
        weight = torch.randn(n, k, generator=gen) * 0.02
        for m in ROWS:
            x = torch.randn(m, k, generator=gen)
            row = dict(in_features=k, out_features=n, rows=m,
                       linear_us=_time_us(lambda: F.linear(x, weight), repeats))
            if packed_available:
                packed = torch.ops.mkl._mkl_reorder_linear_weight(weight, m)
                torch.testing.assert_close(torch.ops.mkl._mkl_linear(x, packed, weight, None, m), F.linear(x, weight),
                                           rtol=1e-4, atol=1e-4)
                row["mkl_packed_us"] = _time_us(lambda: torch.ops.mkl._mkl_linear(x, packed, weight, None, m), repeats)
            row["gflops"] = 2 * m * k * n / row["linear_us"] / 1e3
            rows_out.append(row)
    return rows_out


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=300)
    p.add_argument("--out")
    args = p.parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    rows = measure(args.repeats)
    by_shape: dict = {}
    for r in rows:
        by_shape.setdefault((r["in_features"], r["out_features"]), {})[r["rows"]] = r
    print(f"small-M linears, float32, {args.threads} threads (best of 3 rounds of {args.repeats} calls)")
    print(f"{'in x out':>12} {'1 row us':>9} {'8 rows us':>10} {'8/1':>5} {'8 rows GFLOP/s':>15} {'8 rows packed us':>17}")
    for (k, n), r in by_shape.items():
        one, eight = r[1], r[8]
        packed = f"{eight['mkl_packed_us']:.1f}" if "mkl_packed_us" in eight else "n/a"
        print(f"{f'{k} x {n}':>12} {one['linear_us']:>9.1f} {eight['linear_us']:>10.1f} "
              f"{eight['linear_us'] / one['linear_us']:>5.2f} {eight['gflops']:>15.1f} {packed:>17}")
    if args.out:
        with open(args.out, "w", encoding="utf-8") as f:
            json.dump(dict(benchmark="small_m_linear", threads=args.threads, torch=torch.__version__, rows=rows), f,
                      indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
