"""foldnorm benchmark (not a test): rewrite cost and ORT CPU latency on a realistic model.

Model: the zoo's BatchNorm transformer (BatchNorm1d through transposes) at d=512, 8 blocks,
128 tokens (> 20 M parameters), exported to ONNX with optimize=False.

Prints
* rewrite time (load + foldnorm + save, no verification) over ``onnx_ir`` load + save of
  the same file (goal <= 2x), and the verification's own cost;
* ORT CPU latency (full graph optimizations, what users run) of the folded model and of a
  hand-folded limit (norms folded by hand in torch, BN and its transposes deleted), each
  over the original; runs interleaved A/B/C in one process, medians.

    .venv/bin/python benchmarks/foldnorm_bench.py [--depth 8] [--dim 512] [--runs 30]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx_ir as ir
import torch

import rewriter
from backends.ort import make_session
from models_zoo.norm_transformers import NormTransformer, TransposedBatchNorm
from rewriter.loader import load_onnx, save
from rewriter.torch_export import export_to_onnx


def hand_folded(model: NormTransformer) -> NormTransformer:
    """The limit: every BN folded by hand into the linears reading it, then deleted."""
    import copy

    m = copy.deepcopy(model)

    def fold(norm: TransposedBatchNorm, readers):
        bn = norm.bn
        k = (bn.weight / torch.sqrt(bn.running_var + bn.eps)).double()
        c = bn.bias.double() - bn.running_mean.double() * k
        for lin in readers:
            w = lin.weight.double()
            lin.bias.data = (lin.bias.double() + w @ c).float()
            lin.weight.data = (w * k[None, :]).float()

    with torch.no_grad():
        for blk in m.blocks:
            fold(blk.norm1, [blk.q, blk.k, blk.v])
            fold(blk.norm2, [blk.fc1])
            blk.norm1 = blk.norm2 = torch.nn.Identity()
        fold(m.norm, [m.head])
        m.norm = torch.nn.Identity()
    return m


def median_ms(sessions, feeds, runs):
    times = {k: [] for k in sessions}
    for s in sessions.values():  # warm-up
        for _ in range(3):
            s.run(None, feeds)
    for _ in range(runs):
        for k, s in sessions.items():  # interleaved
            t = time.perf_counter()
            s.run(None, feeds)
            times[k].append((time.perf_counter() - t) * 1e3)
    return {k: statistics.median(v) for k, v in times.items()}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--depth", type=int, default=8)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--runs", type=int, default=30)
    args = ap.parse_args()
    torch.manual_seed(0)
    model = NormTransformer(TransposedBatchNorm, vocab=1000, dim=args.dim, depth=args.depth, seq=args.seq, heads=8).eval()
    n_params = sum(p.numel() for p in model.parameters())
    ids = torch.randint(0, 1000, (1, args.seq))
    tmp = Path(tempfile.mkdtemp(prefix="foldnorm-bench-"))
    orig_path = export_to_onnx(model, (ids,), tmp / "orig.onnx")
    hand_path = export_to_onnx(hand_folded(model), (ids,), tmp / "hand.onnx")
    print(f"model: {n_params / 1e6:.1f} M parameters, {orig_path.stat().st_size / 1e6:.0f} MB ONNX")

    io_t, rw_t = [], []
    for i in range(3):  # interleaved
        t = time.perf_counter()
        ir.save(ir.load(orig_path), tmp / f"io{i}.onnx")
        io_t.append(time.perf_counter() - t)
        t = time.perf_counter()
        res = rewriter.rewrite(load_onnx(orig_path), ["foldnorm"], verify=False)
        save(res.view, tmp / f"rw{i}.onnx")
        rw_t.append(time.perf_counter() - t)
    t = time.perf_counter()
    checked = rewriter.rewrite(str(orig_path), ["foldnorm"])
    verify_s = time.perf_counter() - t
    assert checked.passed, checked.verification
    print(f"sites folded: {checked.report['passes'][0]['applied']}, max rel err "
          f"{checked.verification['max_rel_error']:.2e}")
    print(f"rewrite / (load+save): {statistics.median(rw_t) / statistics.median(io_t):.2f}x "
          f"(median {statistics.median(rw_t):.2f}s vs {statistics.median(io_t):.2f}s); "
          f"with verification: {verify_s:.2f}s")

    feeds = {"ids": ids.numpy()}
    sessions = {
        "original": make_session(str(orig_path), optimize=True),
        "foldnorm": make_session(str(tmp / "rw0.onnx"), optimize=True),
        "hand-folded": make_session(str(hand_path), optimize=True),
    }
    med = median_ms(sessions, feeds, args.runs)
    print(f"ORT CPU p50: original {med['original']:.2f} ms, foldnorm {med['foldnorm']:.2f} ms, "
          f"hand-folded {med['hand-folded']:.2f} ms")
    print(f"foldnorm / original: {med['foldnorm'] / med['original']:.3f}x; "
          f"hand-folded / original: {med['hand-folded'] / med['original']:.3f}x; "
          f"foldnorm / hand-folded: {med['foldnorm'] / med['hand-folded']:.3f}x")


if __name__ == "__main__":
    main()
