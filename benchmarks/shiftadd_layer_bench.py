"""shiftadd one layer on CPU (not a test): time and memory of a ``N x K`` linear at batch
1, 8 and 128 tokens, packed (3 bit planes, one scale per row and 64 input columns) against
fp32 references.

Configurations
    ``torch_fp32``: ``F.linear`` on the fp32 weight.
    ``torch_packed``: ``backends/shiftadd_cpu.compiled_linear`` (Inductor-compiled masked-sum
    kernel at 1 token, chunked decode + matmul above).
    ``torch_lut``: ``backends/shiftadd_lut.lut_linear``, the lookup-table kernel in C with
    AVX-512, at every batch size (``packed_linear`` uses it up to ``MAX_TOKENS``).
    ``ort_fp32``: an ONNX Runtime session of one ``MatMul``.
    ``ort_nbits``: the ``shiftadd`` lowering ``lowering=nbits``: one 2-bit ``MatMulNBits``
    over the 3 stacked planes (block 64, ``accuracy_level`` 4), ``Reshape``, ``ReduceSum``.
    ``ort_nbits8``: ``lowering=nbits8``: one 8-bit ``MatMulNBits`` (block 64, accuracy 4).
    ``ort_q4``: ORT's own 4-bit ``MatMulNBits`` (block 128, accuracy level 4), for scale.

Time: one process per (shape, threads); all configurations interleaved call by call,
median of ``--runs``; the 1-minute load average before and after is printed. Memory: each
configuration in a fresh process at batch 1: RSS growth over the setup (weights built and
the session created or the kernel compiled: ``setup peak``), after the calls (``steady``),
and the peak growth of a later call (``call peak``; ``VmHWM`` reset by
``/proc/self/clear_refs``). Each child first runs its configuration on a 64 x 64 layer,
so library loading and the compiler's own memory are not counted.

    python benchmarks/shiftadd_layer_bench.py --threads 1,2
    python benchmarks/shiftadd_layer_bench.py --configs torch_fp32,torch_packed,torch_lut
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time

import numpy as np
import torch

CONFIGS = ["torch_fp32", "torch_packed", "torch_lut", "ort_fp32", "ort_nbits", "ort_nbits8", "ort_q4"]
BLOCK, Q = 64, 3


def _status(key: str) -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) / 1024.0 for line in f if line.startswith(key + ":"))


def _rss() -> float:
    return _status("VmRSS")


def _peak() -> float:
    """The peak RSS since the last ``_reset_peak`` (``VmHWM``)."""
    return _status("VmHWM")


def _reset_peak() -> None:
    with open("/proc/self/clear_refs", "w") as f:  # "5" resets the peak RSS (VmHWM)
        f.write("5")


def _ort_session(nodes, inits, m, k, n, threads):
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("X", TensorProto.FLOAT, [m, k])],
                          [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [m, n])],
                          [numpy_helper.from_array(a, name) for name, a in inits.items()])
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)])
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    blob = model.SerializeToString()
    del model, g, inits
    return ort.InferenceSession(blob, so, providers=["CPUExecutionProvider"])


def build(which: str, m: int, n: int, k: int, threads: int):
    """A zero-argument callable running the configuration on a fixed ``[m, k]`` input."""
    from onnx import helper

    rng = np.random.default_rng(0)
    torch.set_num_threads(threads)
    x = torch.randn(m, k)
    xn = x.numpy()
    if which == "torch_fp32":
        w = torch.randn(n, k)
        return lambda: torch.nn.functional.linear(x, w)
    if which in ("torch_packed", "torch_lut"):
        from backends.shiftadd_cpu import compiled_linear
        from backends.shiftadd_lut import lut_linear

        planes = torch.from_numpy(rng.integers(0, 2**32, size=(Q, k // 32, n), dtype=np.uint32).view(np.int32))
        alpha = torch.rand(Q, k // BLOCK, n) * 0.01
        fn = compiled_linear if which == "torch_packed" else lut_linear
        return lambda: fn(x, planes, alpha, BLOCK, 1)
    if which == "ort_fp32":
        s = _ort_session([helper.make_node("MatMul", ["X", "W"], ["Y"])],
                         {"W": rng.standard_normal((k, n), dtype=np.float32)}, m, k, n, threads)
        return lambda: s.run(None, {"X": xn})
    if which in ("ort_nbits", "ort_nbits8", "ort_q4"):
        bits, q, block = {"ort_nbits": (2, Q, BLOCK), "ort_nbits8": (8, 1, BLOCK), "ort_q4": (4, 1, 128)}[which]
        inits = {"B": rng.integers(0, 256, size=(q * n, k // block, block * bits // 8), dtype=np.uint8),
                 "S": (rng.random((q * n, k // block)) * 0.01).astype(np.float32)}
        out = "Y" if q == 1 else "YQ"
        nodes = [helper.make_node("MatMulNBits", ["X", "B", "S"], [out], domain="com.microsoft", K=k, N=q * n,
                                  bits=bits, block_size=block, accuracy_level=4)]
        if q > 1:  # the lowering's tail: [M, q N] -> [M, q, N] -> sum over the planes
            inits["shape"] = np.array([m, q, n], dtype=np.int64)
            inits["axis"] = np.array([1], dtype=np.int64)
            nodes += [helper.make_node("Reshape", ["YQ", "shape"], ["Y3"]),
                      helper.make_node("ReduceSum", ["Y3", "axis"], ["Y"], keepdims=0)]
        s = _ort_session(nodes, inits, m, k, n, threads)
        return lambda: s.run(None, {"X": xn})
    raise ValueError(which)


def child_memory(which: str, n: int, k: int, threads: int) -> dict:
    build(which, 1, 64, 64, threads)()  # libraries loaded, the kernel compiled once: not the layer's memory
    base = _rss()
    _reset_peak()
    fn = build(which, 1, n, k, threads)
    fn()  # the first call (compiles the torch kernel for this shape)
    setup_peak = _peak()
    before_call = _rss()
    _reset_peak()
    fn()
    call_peak = _peak() - before_call
    for _ in range(5):
        fn()
    return {"config": which, "setup_peak_mib": setup_peak - base, "steady_mib": _rss() - base,
            "call_peak_mib": call_peak}


def time_shape(n: int, k: int, m: int, threads: int, runs: int, configs=CONFIGS) -> dict:
    fns = {c: build(c, m, n, k, threads) for c in configs}
    for f in fns.values():
        f()
        f()
    t = {c: [] for c in fns}
    for _ in range(runs):
        for c, f in fns.items():
            t0 = time.perf_counter()
            f()
            t[c].append(time.perf_counter() - t0)
    return {c: 1e3 * statistics.median(v) for c, v in t.items()}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shapes", default="4096x4096,11008x4096", help="NxK (out x in)")
    ap.add_argument("--tokens", default="1,8,128")
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--runs", type=int, default=20)
    ap.add_argument("--configs", default=",".join(CONFIGS), help="comma-separated subset of " + ", ".join(CONFIGS))
    ap.add_argument("--no-memory", action="store_true")
    ap.add_argument("--json", default=None)
    ap.add_argument("--child", nargs=4, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        which, n, k, th = args.child
        print(json.dumps(child_memory(which, int(n), int(k), int(th))))
        return
    configs = args.configs.split(",")
    unknown = sorted(set(configs) - set(CONFIGS))
    if unknown:
        ap.error(f"unknown configuration(s): {', '.join(unknown)}")
    out = {"time_ms": [], "memory": []}
    for shape in args.shapes.split(","):
        n, k = (int(v) for v in shape.split("x"))
        for th in (int(v) for v in args.threads.split(",")):
            for m in (int(v) for v in args.tokens.split(",")):
                la = open("/proc/loadavg").read().split()[0]
                r = time_shape(n, k, m, th, args.runs, configs)
                la2 = open("/proc/loadavg").read().split()[0]
                row = {"shape": shape, "threads": th, "tokens": m, **r, "loadavg": f"{la}->{la2}"}
                out["time_ms"].append(row)
                print(json.dumps(row), flush=True)
        if not args.no_memory:
            for c in configs:
                res = subprocess.run([sys.executable, __file__, "--child", c, str(n), str(k), "1"],
                                     capture_output=True, text=True, check=True)
                row = {"shape": shape, **json.loads(res.stdout.strip().splitlines()[-1])}
                out["memory"].append(row)
                print(json.dumps(row), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
