"""shiftadd end to end in ONNX Runtime (not a test): session load peak RSS, steady RSS, p50
latency at batch 1 and the mean-pooled embedding cosine of an encoder export against the
original, beside ORT's own weight-only quantization (``MatMulNBits`` from
``onnxruntime.quantization.matmul_nbits_quantizer``).

Every model runs in a fresh process with ORT's default graph optimizations (all on) and one
intra-op thread: ``load peak`` is the peak RSS (``VmHWM``, reset through
``/proc/self/clear_refs`` just before) right after ``InferenceSession`` returns,
``steady`` the resident set (``VmRSS``) after the timed calls, both with the process's
baseline (python, numpy, onnxruntime imported) subtracted; ``p50`` is the median of
``--runs`` calls on one evaluation sentence (batch 1); the cosine is over all evaluation
sentences (``eval.npz``, padded batch). Processes are interleaved: ``--rounds`` rounds over
all models; medians over rounds are reported, with the load average.

    python benchmarks/shiftadd_real.py --model minilm --export DIR
    rewrite DIR/model.onnx -p shiftadd --calib DIR/calib.npz --set shiftadd.lowering=nbits8 -o DIR/nbits8.onnx
    python benchmarks/shiftadd_e2e.py --ort-quant DIR/model.onnx          # DIR/ort4_g128.onnx, ...
    python benchmarks/shiftadd_e2e.py DIR/model.onnx DIR/nbits8.onnx DIR/ort4_g128.onnx --data DIR/eval.npz
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path


def _status(key: str) -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) / 1024.0 for line in f if line.startswith(key + ":"))


def _rss_mib() -> float:
    return _status("VmRSS")


def _peak_mib() -> float:
    """The peak RSS (``VmHWM``) since the last reset."""
    return _status("VmHWM")


def _reset_peak() -> None:
    with open("/proc/self/clear_refs", "w") as f:  # "5" resets VmHWM
        f.write("5")


def child(path: str, data: str, runs: int) -> dict:
    import numpy as np
    import onnxruntime as ort

    with np.load(data, allow_pickle=False) as d:
        feeds = {k: d[k] for k in d.files}
    base = _rss_mib()
    _reset_peak()
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    t0 = time.perf_counter()
    sess = ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])
    load_s = time.perf_counter() - t0
    load_peak = _peak_mib()
    names = {i.name for i in sess.get_inputs()}
    feeds = {k: v for k, v in feeds.items() if k in names}
    n_tok = int(feeds["attention_mask"][0].sum())
    one = {k: v[:1, :n_tok] for k, v in feeds.items()}
    h = sess.run(["last_hidden_state"], feeds)[0].astype(np.float64)
    m = feeds["attention_mask"][..., None].astype(np.float64)
    pooled = (h * m).sum(1) / m.sum(1)
    for _ in range(3):
        sess.run(None, one)
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        sess.run(None, one)
        times.append(time.perf_counter() - t0)
    return {"model": path, "file_mb": os.path.getsize(path) / 1e6, "load_s": load_s,
            "load_peak_mib": load_peak - base, "steady_mib": _rss_mib() - base, "base_mib": base,
            "p50_ms": 1e3 * statistics.median(times), "tokens": n_tok, "pooled": pooled.tolist()}


def ort_quant(path: str) -> list[str]:
    """ORT's own 4-bit weight-only quantization of every constant-weight MatMul (RTN,
    asymmetric, blocks of 128 and 32 along K; accuracy level 4, its fast int8 path)."""
    import onnx
    from onnxruntime.quantization.matmul_nbits_quantizer import DefaultWeightOnlyQuantConfig, MatMulNBitsQuantizer

    out = []
    for block in (128, 32):
        cfg = DefaultWeightOnlyQuantConfig(block_size=block, is_symmetric=False, accuracy_level=4)
        q = MatMulNBitsQuantizer(onnx.load(path), algo_config=cfg)
        q.process()
        dst = str(Path(path).with_name(f"ort4_g{block}.onnx"))
        q.model.save_model_to_file(dst)
        out.append(dst)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("models", nargs="*", help="the original first")
    ap.add_argument("--data")
    ap.add_argument("--runs", type=int, default=50)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--ort-quant", default=None, metavar="MODEL")
    ap.add_argument("--json", default=None)
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.data, args.runs)))
        return
    if args.ort_quant:
        print("\n".join(ort_quant(args.ort_quant)))
        return
    import numpy as np

    res: dict[str, list[dict]] = {m: [] for m in args.models}
    loads = [open("/proc/loadavg").read().split()[0]]
    for _ in range(args.rounds):
        for m in args.models:
            out = subprocess.run([sys.executable, __file__, "--child", m, "--data", args.data, "--runs",
                                  str(args.runs)], capture_output=True, text=True, check=True)
            res[m].append(json.loads(out.stdout.strip().splitlines()[-1]))
        loads.append(open("/proc/loadavg").read().split()[0])
    ref = np.array(res[args.models[0]][0]["pooled"])
    rows = []
    for m, rs in res.items():
        p = np.array(rs[0]["pooled"])
        cos = (p * ref).sum(-1) / (np.linalg.norm(p, axis=-1) * np.linalg.norm(ref, axis=-1))
        row = {"model": Path(m).name, "file_mb": rs[0]["file_mb"],
               **{k: statistics.median(r[k] for r in rs) for k in ("load_peak_mib", "steady_mib", "p50_ms", "load_s")},
               "cosine": float(cos.mean()), "min_cosine": float(cos.min()), "tokens": rs[0]["tokens"]}
        rows.append(row)
    print(f"load average (1 min) over the run: {' '.join(loads)}")
    print(f"{'model':24s} {'file MB':>8s} {'load peak MiB':>14s} {'steady MiB':>11s} {'p50 ms':>8s} {'cosine':>8s}")
    for r in rows:
        print(f"{r['model']:24s} {r['file_mb']:8.1f} {r['load_peak_mib']:14.1f} {r['steady_mib']:11.1f} "
              f"{r['p50_ms']:8.2f} {r['cosine']:8.4f} (min {r['min_cosine']:.4f})")
    if args.json:
        Path(args.json).write_text(json.dumps({"loadavg": loads, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
