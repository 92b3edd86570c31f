"""ORT CPU latency of the ``rms`` / ``crms`` rewrites.

1. The norm alone on ``[4096, 768]`` fp32: LayerNormalization vs RMSNormalization (opset 23)
   vs the opset-18 RMS chain in the form ORT fuses, and every CRMSNorm formulation tried:
   the ``rewriter::CRMSNormalization`` function (``rms`` body: fused RMSNormalization +
   row-wise correction; ``chain`` body: ReduceSumSquare/ReduceSum chain), the rms body with
   the row sum as a MatMul, and RMSNorm of the re-expanded vector ``[x~, -sum x~]`` sliced.
2. End to end: the zoo GPT at 12 layers, d=768 (``prenorm-gpt-12x768``), batch 1, sequence
   128 and 1024: original vs ``rms`` (opset 23, and opset 18 without the upgrade) vs
   ``crms`` (ratios after/before), plus the time of the pass itself (match + apply, in
   memory, no verification; ``benchmarks/rewrite_speed.py`` times it on GPT-2 124M).

Runs are interleaved (A, B, C, A, B, C, ...) and summarized by medians of ``--runs`` (>= 30).
ORT graph optimizations are on (the deployed setting). Usage::

    python benchmarks/rms_bench.py [--runs 30] [--seqs 128,1024] [--skip-e2e]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx_ir as ir


def _session(model: ir.Model, threads: int | None):
    from backends.ort import make_session

    return make_session(ir.serde.serialize_model(model), optimize=True, threads=threads)


def interleaved(sessions: dict, feeds: dict, runs: int) -> dict[str, float]:
    """Median seconds per session, runs interleaved across sessions."""
    times = {k: [] for k in sessions}
    for s in sessions.values():  # warm-up
        s.run(None, feeds)
    for _ in range(runs):
        for k, s in sessions.items():
            t0 = time.perf_counter()
            s.run(None, feeds)
            times[k].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


def norm_models(d: int = 768, eps: float = 1e-5) -> dict[str, ir.Model]:
    """The norm alone, every formulation tried. Widths: d for LN/RMS, d - 1 for CRMSNorm."""
    from onnx import TensorProto as TP
    from onnx import helper as h
    from onnx import numpy_helper as nh

    from backends.ort import functions as F

    def model(op: str, width: int, variant: str | None = None) -> ir.Model:
        x = ir.Value(name="x", shape=ir.Shape([4096, width]), type=ir.TensorType(ir.DataType.FLOAT))
        inits = []
        if op == "LayerNormalization":
            g = ir.Value(name="g", const_value=ir.tensor(np.ones(width, np.float32), name="g"))
            b = ir.Value(name="b", const_value=ir.tensor(np.zeros(width, np.float32), name="b"))
            node = ir.Node("", op, [x, g, b], [ir.AttrFloat32("epsilon", eps)], name="n")
            inits = [g, b]
        elif op == "RMSNormalization":
            g = ir.Value(name="g", const_value=ir.tensor(np.ones(width, np.float32), name="g"))
            node = ir.Node("", op, [x, g], [ir.AttrFloat32("epsilon", eps)], name="n")
            inits = [g]
        else:
            node = F.crms_call(x, eps, width, "n")
        node.outputs[0].name = "y"
        node.outputs[0].shape = ir.Shape([4096, width])
        node.outputs[0].type = ir.TensorType(ir.DataType.FLOAT)
        graph = ir.Graph([x], [node.outputs[0]], nodes=[node], initializers=inits, opset_imports={"": 23})
        m = ir.Model(graph, ir_version=10)
        if variant:
            m.functions[(F.DOMAIN, F.CRMS_NAME, "")] = F.crms_function(variant)
            m.opset_imports[F.DOMAIN] = 1
        return m

    def plain(nodes, inits, width_in, width_out, opset=23) -> ir.Model:
        g = h.make_graph(nodes, "g", [h.make_tensor_value_info("x", TP.FLOAT, [4096, width_in])],
                         [h.make_tensor_value_info("y", TP.FLOAT, [4096, width_out])],
                         [nh.from_array(np.asarray(a), n) for n, a in inits.items()])
        mp = h.make_model(g, opset_imports=[h.make_opsetid("", opset)])
        mp.ir_version = 10
        return ir.from_proto(mp)

    f32 = np.float32
    k = d - 1
    ax = np.array([-1], np.int64)
    chain = [h.make_node("Pow", ["x", "two"], ["p"]), h.make_node("ReduceMean", ["p", "ax"], ["m"], keepdims=1),
             h.make_node("Add", ["m", "eps"], ["me"]), h.make_node("Sqrt", ["me"], ["r"]),
             h.make_node("Div", ["x", "r"], ["q"]), h.make_node("Mul", ["q", "g"], ["y"])]
    chain_inits = {"two": np.array(2, f32), "ax": ax, "eps": np.array([eps], f32), "g": np.ones(d, f32)}
    # CRMSNorm as RMSNorm of the re-expanded vector [x~, -sum x~] (mean zero), then sliced
    expand = [h.make_node("MatMul", ["x", "neg1"], ["s"]), h.make_node("Concat", ["x", "s"], ["xf"], axis=-1),
              h.make_node("RMSNormalization", ["xf", "g"], ["yf"], epsilon=eps),
              h.make_node("Slice", ["yf", "st", "en", "ax"], ["y"])]
    expand_inits = {"neg1": -np.ones((k, 1), f32), "g": np.ones(d, f32), "st": np.array([0], np.int64),
                    "en": np.array([k], np.int64), "ax": ax}
    # rms body with the row sum as a MatMul with ones instead of ReduceSum
    rms_mm = [h.make_node("RMSNormalization", ["x", "g"], ["y1"], epsilon=eps * d / k),
              h.make_node("MatMul", ["y1", "one"], ["s"]), h.make_node("Mul", ["s", "s"], ["s2"]),
              h.make_node("Add", ["s2", "dm1"], ["den"]), h.make_node("Div", ["dd", "den"], ["f"]),
              h.make_node("Sqrt", ["f"], ["fr"]), h.make_node("Mul", ["y1", "fr"], ["y"])]
    rms_mm_inits = {"g": np.ones(k, f32), "one": np.ones((k, 1), f32), "dm1": np.array(k, f32), "dd": np.array(d, f32)}
    return {
        "LayerNormalization": model("LayerNormalization", d),
        "RMSNormalization": model("RMSNormalization", d),
        "RMS chain, opset 18 (ORT fuses it)": plain(chain, chain_inits, d, d, opset=18),
        "CRMSNorm function (rms body)": model("crms", k, "rms"),
        "CRMSNorm function (chain body)": model("crms", k, "chain"),
        "CRMSNorm: rms body, MatMul sum": plain(rms_mm, rms_mm_inits, k, k),
        "CRMSNorm: expand, RMSNorm, slice": plain(expand, expand_inits, k, k),
    }


def bench_norms(runs: int, threads: int | None) -> None:
    models = norm_models()
    sessions = {k: _session(m, threads) for k, m in models.items()}
    rng = np.random.default_rng(0)
    x768 = rng.standard_normal((4096, 768)).astype(np.float32)
    x767 = np.ascontiguousarray(x768[:, :767])
    # feeds differ in width: run each group on its own input, still interleaved
    times = {k: [] for k in sessions}
    for _ in range(3):
        for k, s in sessions.items():
            s.run(None, {"x": x768 if "CRMS" not in k else x767})
    for _ in range(runs):
        for k, s in sessions.items():
            feed = {"x": x768 if "CRMS" not in k else x767}
            t0 = time.perf_counter()
            s.run(None, feed)
            times[k].append(time.perf_counter() - t0)
    base = statistics.median(times["LayerNormalization"])
    print(f"norm alone, [4096, 768] fp32, median of {runs} interleaved runs")
    for k, v in times.items():
        m = statistics.median(v)
        print(f"  {k:36s} {m * 1e3:8.3f} ms   {m / base:5.2f}x LayerNormalization")


def bench_e2e(seqs: list[int], runs: int, threads: int | None) -> None:
    import models_zoo
    import rewriter
    from rewriter.ir.onnx_view import OnnxView
    from rewriter.pass_api import get_pass
    from rewriter.torch_export import export_to_onnx

    module, _ = models_zoo.build("prenorm-gpt-12x768")
    tmp = Path(tempfile.mkdtemp(prefix="rms-bench-"))
    for seq in seqs:
        import torch

        ids = torch.randint(0, 256, (1, seq), generator=torch.Generator().manual_seed(0))
        path = tmp / f"gpt_{seq}.onnx"
        export_to_onnx(module, (ids,), path, opset=18)
        model = ir.load(path)
        variants = {"original": model}
        for p in ("rms", "crms"):
            view = OnnxView(model.clone())
            pas = get_pass(p)()
            t0 = time.perf_counter()
            sites = pas.match(view)
            pas.apply(view, [s for s in sites if s.accepted])
            view.finalize()
            dt = time.perf_counter() - t0
            res = rewriter.rewrite(model, [p])  # verified copy
            assert res.passed, res.verification
            print(f"  seq {seq}: {p} pass (match+apply+finalize, in memory) {dt:.2f} s; "
                  f"verified max rel err {res.verification['max_rel_error']:.2e}")
            variants[p] = res.model
        res = rewriter.rewrite(model, ["rms"], options={"rms": {"upgrade_opset": False}})
        assert res.passed and res.model.opset_imports[""] == 18, res.verification
        variants["rms, opset 18 chain"] = res.model
        variants["original (A/A)"] = model  # a second session of the original: the noise floor
        sessions = {k: _session(m, threads) for k, m in variants.items()}
        med = interleaved(sessions, {sessions["original"].get_inputs()[0].name: ids.numpy()}, runs)
        print(f"end to end, zoo GPT 12x768, batch 1, seq {seq}, median of {runs} interleaved runs")
        for k, m in med.items():
            print(f"  {k:20s} {m * 1e3:9.2f} ms   ratio {m / med['original']:.3f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=30)
    ap.add_argument("--seqs", default="128,1024")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--skip-e2e", action="store_true")
    args = ap.parse_args()
    bench_norms(args.runs, args.threads)
    if not args.skip_e2e:
        bench_e2e([int(s) for s in args.seqs.split(",")], args.runs, args.threads)


if __name__ == "__main__":
    main()
