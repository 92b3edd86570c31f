"""Re-ttention sparse step on FlexAttention against dense SDPA (not a test).

One attention layer, ``B=1, H=16, Dh=64``, ``N`` tokens, the paper's band at density
3.125 %, fp32. Timed interleaved in one process (rotating order), ``reps`` samples each;
the figure is the median over the samples of the paired ratio dense / sparse (each pair
taken back to back, so load bursts cancel). Rows:

* ``sdpa``: ``F.scaled_dot_product_attention`` (dense, eager: the CPU flash kernel);
* ``flex``: the sparse step ``(rho + coef) * flex(q, k, v, block_mask) + R``
  (``backends.flex_rettention.sparse``, flex compiled by Inductor);
* ``blocks``: the project's CPU block kernel (``backends.triton.rettention.cpu_sparse``);
* ``refresh`` (``--refresh``): the refresh step (dense + masked LSE), for reference.

``work`` is the block layout's work ratio ``N / visited keys per query``: the ceiling of a
block-sparse kernel against a dense one that does the same work per key.

    nice -n 10 python benchmarks/flex_rettention_bench.py --tokens 1024 4096 16384 --reps 5 [--json F]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from backends import flex_rettention as flex  # noqa: E402
from backends.rettention_spec import BlockLayout, MaskSpec, auto_block  # noqa: E402
from backends.triton import rettention as kern  # noqa: E402


def _time(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def run(tokens: int, reps: int, heads: int = 16, head_dim: int = 64, density: float = 0.03125,
        block: int = 0, refresh: bool = False, blocks: bool = True) -> dict:
    torch.manual_seed(0)
    spec = MaskSpec.band(tokens, density)
    layout = BlockLayout(spec, block or auto_block(spec))
    q, k, v = (torch.randn(1, heads, tokens, head_dim) for _ in range(3))
    scale = head_dim ** -0.5
    t0 = time.perf_counter()
    flex.block_mask(layout, "cpu")
    mask_s = time.perf_counter() - t0
    rho, res = torch.rand(1, heads, tokens) + 0.5, torch.randn(1, heads, tokens, head_dim)
    fns = {"sdpa": lambda: F.scaled_dot_product_attention(q, k, v, scale=scale),
           "flex": lambda: flex.sparse(q, k, v, rho, res, 0.04, scale, layout)}
    if blocks:
        fns["blocks"] = lambda: kern.cpu_sparse(q, k, v, rho, res, 0.04, scale, layout)
    if refresh:
        fns["refresh"] = lambda: flex.refresh(q, k, v, scale, layout)
    t0 = time.perf_counter()
    with torch.inference_mode():
        fns["flex"]()  # compiles
    compile_s = time.perf_counter() - t0
    # correctness of what is timed: flex against the block kernel on this input
    with torch.inference_mode():
        a, b = fns["flex"](), kern.cpu_sparse(q, k, v, rho, res, 0.04, scale, layout)
    err = float((a - b).abs().max() / b.abs().max())
    samples = {name: [] for name in fns}
    load0 = os.getloadavg()[0]
    names = list(fns)
    with torch.inference_mode():
        for name in names:  # warm-up
            fns[name]()
        for r in range(reps):
            order = names[r % len(names):] + names[:r % len(names)]
            for name in order:
                samples[name].append(_time(fns[name]))
    load1 = os.getloadavg()[0]
    out = {"tokens": tokens, "heads": heads, "head_dim": head_dim, "density": density, "mask": spec.describe(),
           "block": layout.block, "work_ratio": tokens / flex.visited_keys(layout), "reps": reps,
           "mask_build_s": mask_s, "flex_compile_s": compile_s, "flex_vs_blocks_max_rel": err,
           "threads": torch.get_num_threads(), "loadavg_1m": [load0, load1], "ms": {}, "vs_sdpa": {}}
    for name in names:
        out["ms"][name] = statistics.median(samples[name]) * 1e3
        out["vs_sdpa"][name] = statistics.median(d / s for d, s in zip(samples["sdpa"], samples[name]))
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tokens", type=int, nargs="+", default=[1024, 4096, 16384])
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--block", type=int, default=0)
    ap.add_argument("--refresh", action="store_true")
    ap.add_argument("--no-blocks", action="store_true", help="skip the block kernel row")
    ap.add_argument("--json")
    args = ap.parse_args(argv)
    rows = []
    for n in args.tokens:
        row = run(n, args.reps, block=args.block, refresh=args.refresh, blocks=not args.no_blocks)
        rows.append(row)
        cells = "  ".join(f"{k} {row['ms'][k]:.1f} ms ({row['vs_sdpa'][k]:.2f}x)" for k in row["ms"])
        print(f"N={n:6d} block {row['block']:3d} work {row['work_ratio']:.1f}x | {cells} | "
              f"load {row['loadavg_1m'][0]:.1f}->{row['loadavg_1m'][1]:.1f} on {os.cpu_count()} cores, "
              f"{row['threads']} threads | flex compile {row['flex_compile_s']:.1f} s", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps({"torch": torch.__version__, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
