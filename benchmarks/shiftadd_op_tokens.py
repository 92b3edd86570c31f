"""The custom op ``rewriter::shiftadd_linear`` on CPU (not a test): where its lookup-table
kernel stops paying off against the plain-torch kernel it otherwise runs.

The op has two CPU kernels (``backends/triton/shiftadd.py``): ``shiftadd_lut.lut_linear``
(reads the bits; its work grows with the tokens) and ``reference`` (decodes the weight in
chunks on every call, then a matmul; the decode costs the same at any batch). The op runs
the first up to ``OP_MAX_TOKENS`` tokens. This script times both, interleaved call by call
(median of ``--runs``), with the op's default layout (3 planes, 8-column x 128-row scales)
on random packed weights, for encoder-sized and LLM-sized layers.

    python benchmarks/shiftadd_op_tokens.py [--threads 1 2] [--tokens 8 16 ...] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from backends import shiftadd_lut
from backends.triton.shiftadd import BLOCK_COLS, reference


def layer(n: int, k: int, q: int = 3, group: int = 128, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    planes = torch.randint(-2**31, 2**31 - 1, (q, -(-k // 32), n), dtype=torch.int32, generator=g)
    kb, ng = -(-k // BLOCK_COLS), -(-n // group)
    exps = torch.randint(-9, -1, (3, q, kb, ng), dtype=torch.int8, generator=g)
    signs = torch.randint(-1, 2, (3, q, kb, ng), dtype=torch.int8, generator=g)
    return planes, exps, signs, group


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shapes", nargs="+", default=["384x384", "1536x384", "4096x4096"])
    ap.add_argument("--tokens", nargs="+", type=int, default=[8, 16, 32, 64, 128, 256, 512])
    ap.add_argument("--threads", nargs="+", type=int, default=[1, 2])
    ap.add_argument("--runs", type=int, default=7)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    if not shiftadd_lut.available():
        raise SystemExit("the LUT kernel is not available on this machine (AVX-512 and gcc needed)")
    rows = []
    for shape in args.shapes:
        n, k = map(int, shape.split("x"))
        planes, exps, signs, group = layer(n, k)
        for threads in args.threads:
            torch.set_num_threads(threads)
            for m in args.tokens:
                x = torch.randn(m, k)
                fns = {"lut": lambda: shiftadd_lut.lut_linear(x, planes, shiftadd_lut.scales(exps, signs),
                                                              BLOCK_COLS, group),
                       "reference": lambda: reference(x, planes, exps, signs, None, group, 0)}
                times = {key: [] for key in fns}
                with torch.no_grad():
                    for fn in fns.values():
                        fn()
                    for _ in range(args.runs):
                        for key, fn in fns.items():
                            t0 = time.perf_counter()
                            fn()
                            times[key].append(1e3 * (time.perf_counter() - t0))
                p50 = {key: statistics.median(v) for key, v in times.items()}
                row = {"shape": shape, "threads": threads, "tokens": m, **{f"{key}_ms": v for key, v in p50.items()},
                       "reference_over_lut": p50["reference"] / p50["lut"],
                       "loadavg": float(open("/proc/loadavg").read().split()[0])}
                rows.append(row)
                print(f"{shape:>10} threads {threads} tokens {m:4d}: LUT {p50['lut']:9.2f} ms, reference "
                      f"{p50['reference']:9.2f} ms, reference/LUT {row['reference_over_lut']:6.2f}x, "
                      f"load {row['loadavg']:.2f}", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
