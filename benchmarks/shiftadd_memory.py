"""shiftadd run-time memory (not a test): peak resident memory and latency of ONNX Runtime
CPU sessions of an original and a shiftadd-rewritten model, each in its own process, and
the peak resident-memory growth of one call of the torch CPU op against a dense linear
(``--torch-op NxK``, each in a fresh process).

ORT sessions
    ``full``: ORT's default (all graph optimizations). Constant folding evaluates the
    ``rewriter::ShiftAddMatMul`` decode of constant planes at session load, so the session
    holds dense fp32 weights: the rewritten file is smaller, the resident memory is not.
    ``packed``: the same optimizations with ``ConstantFolding`` disabled
    (``InferenceSession(..., disabled_optimizers=["ConstantFolding"])``): the planes stay
    packed in memory and every call decodes them (standard ops only), which costs latency.

Each configuration runs in a fresh process (``ru_maxrss`` after loading and ``--runs``
calls on the ``--inputs`` feeds); latency is the median of interleaved calls within that
process.

    .venv/bin/python benchmarks/shiftadd_memory.py ORIG.onnx REWRITTEN.onnx --inputs eval.npz
    .venv/bin/python benchmarks/shiftadd_memory.py --torch-op 1536x384
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time


def _rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def child_ort(path: str, mode: str, inputs: str, runs: int) -> dict:
    import numpy as np
    import onnxruntime as ort

    base = _rss_mib()
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    kw = {"disabled_optimizers": ["ConstantFolding"]} if mode == "packed" else {}
    t0 = time.perf_counter()
    sess = ort.InferenceSession(path, so, providers=["CPUExecutionProvider"], **kw)
    load_s = time.perf_counter() - t0
    with np.load(inputs, allow_pickle=False) as d:
        feeds = {k: d[k] for k in d.files}
    names = {i.name for i in sess.get_inputs()}
    feeds = {k: v for k, v in feeds.items() if k in names}
    sess.run(None, feeds)
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        sess.run(None, feeds)
        times.append(time.perf_counter() - t0)
    return {"model": path, "mode": mode, "peak_rss_mib": _rss_mib(), "python_rss_mib": base,
            "load_s": load_s, "p50_ms": 1e3 * statistics.median(times)}


def child_torch(shape: str, tokens: int, which: str) -> dict:
    """Peak RSS growth of one call (``ru_maxrss`` after minus before), in a fresh process:
    ``dense`` F.linear on the fp32 weight vs the ``shiftadd_op`` (3 random bit planes,
    3-term scales, 128-row groups)."""
    import numpy as np
    import torch

    from backends.triton.shiftadd import shiftadd_linear_op

    torch.set_num_threads(1)
    n, k = (int(v) for v in shape.split("x"))
    rng = np.random.default_rng(0)
    x = torch.randn(tokens, k)
    kb, ng = -(-k // 8), -(-n // 128)
    planes = torch.from_numpy(rng.integers(0, 2**32, size=(3, -(-k // 32), n), dtype=np.uint32).view(np.int32))
    exps = torch.from_numpy(rng.integers(-8, -2, size=(3, 3, kb, ng)).astype(np.int8))
    signs = torch.from_numpy(rng.choice([-1, 1], size=(3, 3, kb, ng)).astype(np.int8))
    wd = torch.randn(n, k) if which == "dense" else None
    op = shiftadd_linear_op()
    fn = (lambda: torch.nn.functional.linear(x, wd)) if which == "dense" else (
        lambda: op(x, planes, exps, signs, None, 128, 0))
    before = _rss_mib()
    fn()
    peak = _rss_mib() - before
    t0 = time.perf_counter()
    fn()
    return {"op": which, "shape": [n, k], "tokens": tokens, "fp32_weight_mib": n * k * 4 / 2**20,
            "packed_mib": (planes.numel() * 4 + exps.numel() * 2) / 2**20, "peak_rss_growth_mib": peak,
            "ms": 1e3 * (time.perf_counter() - t0)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("models", nargs="*")
    ap.add_argument("--inputs")
    ap.add_argument("--runs", type=int, default=10)
    ap.add_argument("--torch-op", default=None, metavar="NxK")
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--child", nargs=2, metavar=("PATH", "MODE"), help=argparse.SUPPRESS)
    ap.add_argument("--torch-child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    if args.torch_child:
        print(json.dumps(child_torch(args.torch_op, args.tokens, args.torch_child)))
        return
    if args.child:
        print(json.dumps(child_ort(args.child[0], args.child[1], args.inputs, args.runs)))
        return
    rows = []
    if args.torch_op:
        for which in ("dense", "shiftadd_op"):
            out = subprocess.run([sys.executable, __file__, "--torch-op", args.torch_op, "--tokens", str(args.tokens),
                                  "--torch-child", which], capture_output=True, text=True, check=True)
            rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
            print(json.dumps(rows[-1]), flush=True)
    configs = [(m, "full") for m in args.models] + [(m, "packed") for m in args.models[1:]]
    for path, mode in configs:
        out = subprocess.run([sys.executable, __file__, "--child", path, mode, "--inputs", args.inputs,
                              "--runs", str(args.runs)], capture_output=True, text=True, check=True)
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
        r = rows[-1]
        print(f"{r['model']:40s} {r['mode']:7s} peak RSS {r['peak_rss_mib']:8.1f} MiB "
              f"(python+ort before load {r['python_rss_mib']:.0f})  load {r['load_s']:.2f} s  p50 {r['p50_ms']:.1f} ms",
              flush=True)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(rows, fh, indent=1)


if __name__ == "__main__":
    main()
