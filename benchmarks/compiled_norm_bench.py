"""The project's norm ops under torch.compile against ``aten.layer_norm`` (not a test).

``[rows, width]`` fp32 (default ``[4096, 768]``), with a weight. Rows, each timed
interleaved (rotating order) ``reps`` times; the figure is the median over the samples of
the paired ratio ``row / layer_norm`` (< 1: faster than LayerNorm):

* ``layer_norm``: ``F.layer_norm`` eager (ATen's fused CPU kernel);
* ``layer_norm_compiled``: the same under ``torch.compile``;
* ``crms_norm``, ``rms_norm``: ``torch.ops.rewriter.{crms,rms}_norm`` under ``torch.compile``
  (the op's body traces the plain-torch kernel off CUDA; Inductor fuses it).

``kernels``: the number of C++ kernels in the generated code of each compiled row (one:
a single fused kernel).

    nice -n 10 python benchmarks/compiled_norm_bench.py [--rows 4096 --width 768 --reps 50]
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from backends.triton import crms_norm as cn  # noqa: E402
from rewriter.compile import compile_module  # noqa: E402, F401 - registers the ops


def count_kernels(fn, *args) -> int:
    from torch._inductor.utils import run_and_get_code

    _, codes = run_and_get_code(fn, *args)
    return sum(len(re.findall(r'extern "C"\s+void\s+kernel', c)) for c in codes)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rows", type=int, default=4096)
    ap.add_argument("--width", type=int, default=768)
    ap.add_argument("--reps", type=int, default=50)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    x = torch.randn(args.rows, args.width)
    w, b = torch.randn(args.width), torch.randn(args.width)
    fns = {
        "layer_norm": lambda x: F.layer_norm(x, (args.width,), w, b, 1e-5),
        "layer_norm_compiled": torch.compile(lambda x: F.layer_norm(x, (args.width,), w, b, 1e-5), dynamic=False),
        "crms_norm": torch.compile(lambda x: cn.crms_norm(x, w, 1e-5), dynamic=False),
        "rms_norm": torch.compile(lambda x: cn.rms_norm(x, w, 1e-5), dynamic=False),
    }
    kernels = {}
    with torch.inference_mode():
        for name in ("layer_norm_compiled", "crms_norm", "rms_norm"):
            kernels[name] = count_kernels(fns[name], x)  # the first call compiles: its code is captured
        ref = cn.reference(x, w, 1e-5, compressed=True)[0]
        err = float((fns["crms_norm"](x) - ref).abs().max() / ref.abs().max())
        names = list(fns)
        samples = {n: [] for n in names}
        load0 = os.getloadavg()[0]
        for n in names:
            for _ in range(3):
                fns[n](x)
        for r in range(args.reps):
            for n in names[r % len(names):] + names[:r % len(names)]:
                t0 = time.perf_counter()
                fns[n](x)
                samples[n].append(time.perf_counter() - t0)
        load1 = os.getloadavg()[0]
    print(f"[{args.rows}, {args.width}] fp32, {args.reps} interleaved reps, {torch.get_num_threads()} threads, "
          f"load {load0:.1f}->{load1:.1f} on {os.cpu_count()} cores; compiled crms_norm vs reference: {err:.2e}")
    for n in names:
        ratio = statistics.median(a / b for a, b in zip(samples[n], samples["layer_norm"]))
        k = kernels.get(n, "-")
        print(f"  {n:20s} {statistics.median(samples[n]) * 1e3:8.3f} ms   {ratio:5.2f}x layer_norm   kernels {k}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
