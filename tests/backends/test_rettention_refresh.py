"""The refresh step read in one pass over the full scores (ORT function body and the torch
CPU kernels) against the float64 formulas, at tolerances from tests/fp_bounds.py."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import onnxruntime as ort
import pytest
import torch

from backends.ort import rettention as ort_rt
from backends.rettention_spec import BlockLayout, MaskSpec, Schedule, auto_block
from backends.triton import rettention as kern
from tests.fp_bounds import rel_tol, window_refresh_bounds

SPECS = [MaskSpec.band(100, 0.1), MaskSpec.band(256, 0.03125), MaskSpec.window2d(64, 0.15),
         MaskSpec.window2d(48, 0.2, grid=(6, 8))]
SCHEDULE = Schedule(2, 3, 0.05)


def rel(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / np.abs(a).max())


def _qkv(spec, heads=3, d=8, seed=0, spread=1.0):
    rng = np.random.default_rng(seed)
    return [(spread * rng.standard_normal((2, heads, spec.n, d))).astype(np.float32) for _ in range(3)]


def function_session(spec: MaskSpec, heads: int, d: int) -> ort.InferenceSession:
    """A model holding one ``rewriter::Rettention`` call, graph optimizations off."""
    cfg = ort_rt.FunctionConfig(BlockLayout(spec, auto_block(spec)), d, d ** -0.5, SCHEDULE)
    shapes = {"Q": [2, heads, spec.n, d], "K": [2, heads, spec.n, d], "V": [2, heads, spec.n, d], "step": [],
              "rho": [2, heads, spec.n], "res": [2, heads, spec.n, d]}
    ins = [ir.Value(name=n, type=ir.TensorType(ir.DataType.INT64 if n == "step" else ir.DataType.FLOAT),
                    shape=ir.Shape(s)) for n, s in shapes.items()]
    node = ir.Node("rewriter", "Rettention", ins, num_outputs=3)
    for o, n in zip(node.outputs, ("O", "rho_out", "res_out")):
        o.name = n
    model = ir.Model(ir.Graph(ins, list(node.outputs), nodes=[node], opset_imports={"": 18, "rewriter": 1}),
                     ir_version=10)
    ort_rt.ensure_function(model, cfg)
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(ir.to_proto(model).SerializeToString(), opts, providers=["CPUExecutionProvider"])


def _tols(q, k, v, spec):
    b = window_refresh_bounds(q, k, v, 8 ** -0.5, spec.dense())
    tol = {"o": rel_tol(b["d_full"], b["o_full"]), "rho": rel_tol(b["d_rho"], b["rho"]), "r": rel_tol(b["d_r"], b["r"])}
    assert max(tol.values()) < 1e-3, tol  # far below what a wrong mask or a dropped term does
    return b, tol


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.describe())
def test_ort_refresh_matches_float64(spec):
    """ORT refresh step (step = warmup): O_full, rho = Z_M / Z and R = O_full - rho O_M
    within the derived bounds; the sparse step from that state is (rho + lam k) O_M + R."""
    q, k, v = _qkv(spec)
    b, tol = _tols(q, k, v, spec)
    sess = function_session(spec, 3, 8)
    zero = {"rho": np.zeros((2, 3, spec.n), np.float32), "res": np.zeros((2, 3, spec.n, 8), np.float32)}
    o, rho, r = sess.run(None, {"Q": q, "K": k, "V": v, "step": np.asarray(SCHEDULE.warmup, np.int64), **zero})
    assert rel(b["o_full"], o) <= tol["o"]
    assert rel(b["rho"], rho) <= tol["rho"]
    assert rel(b["r"], r) <= tol["r"]
    assert b["rho"].max() < 1 and rel(b["r"], 0 * r) == 1.0  # rho < 1: R is not zero, the check can fail


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.describe())
def test_torch_cpu_refresh_matches_float64(spec):
    """The CPU block kernel and the flash + window path give the same O_full, rho, R as the
    float64 formulas within the derived bounds."""
    from backends import flex_rettention as flex

    q, k, v = _qkv(spec, seed=1)
    b, tol = _tols(q, k, v, spec)
    layout = BlockLayout(spec, auto_block(spec))
    tq, tk, tv = map(torch.from_numpy, (q, k, v))
    for o, rho, r in (kern.cpu_refresh(tq, tk, tv, 8 ** -0.5, layout), flex.refresh(tq, tk, tv, 8 ** -0.5, layout)):
        assert rel(b["o_full"], o) <= tol["o"]
        assert rel(b["rho"], rho) <= tol["rho"]
        assert rel(b["r"], r) <= tol["r"]


def test_refresh_bounds_catch_a_wrong_mask():
    """A refresh whose window reads one key too many per row (band h+1) misses the bounds by far."""
    spec = SPECS[0]
    wide = MaskSpec("band", spec.n, half=spec.half + 1)
    q, k, v = _qkv(spec)
    b, tol = _tols(q, k, v, spec)
    bw = window_refresh_bounds(q, k, v, 8 ** -0.5, wide.dense())
    assert rel(b["rho"], bw["rho"]) > 10 * tol["rho"] and rel(b["r"], bw["r"]) > 10 * tol["r"]


def test_ort_refresh_reads_the_full_scores_once():
    """The refresh branch holds one Softmax over the full scores and no reduction over them:
    its only full-size MatMuls are the dense step's two (scores, P V)."""
    spec = MaskSpec.band(64, 0.125)
    cfg = ort_rt.FunctionConfig(BlockLayout(spec, auto_block(spec)), 8, 8 ** -0.5, SCHEDULE)
    fn = ort_rt.rettention_function(cfg, "Rettention", 18)
    outer = next(n for n in fn if n.op_type == "If")
    inner = next(n for n in outer.attributes["else_branch"].value if n.op_type == "If")
    refresh = [n.op_type for n in inner.attributes["then_branch"].value]
    assert refresh.count("Softmax") == 1 and "ReduceMax" not in refresh and "Log" not in refresh
    assert refresh.count("ArgMax") == 1 and refresh.count("GatherElements") == 2
