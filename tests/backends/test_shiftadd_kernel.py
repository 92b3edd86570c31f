"""ShiftAddLinear kernels against the dense ``sum_k alpha_k B_k`` reference (float64):
the CPU custom op, the ONNX function body (ORT, optimizations off) and the Triton kernel
(Triton interpreter, in a subprocess), on random packed tensors with K not divisible by 32,
zero scale terms and tiny (2^-112) scales."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import onnx_ir as ir
import pytest
import torch

from backends.ort.shiftadd import DOMAIN, denseshift_function, shiftadd_function
from backends.triton.shiftadd import MODES, as_tensors, dequantize, shiftadd_linear
from passes.shiftadd_quant import Packed, pack_bits
from tests.conftest import max_rel, run_ort
from tests.fp_bounds import dot_rel_bound

ROOT = Path(__file__).resolve().parents[2]


def random_packed(rng, n, k, q=3, terms=3, group_rows=8, mode="bcq", tiny=False) -> Packed:
    """Random bits and scale terms; some terms zero (sign 0); ``tiny``: exponents near -112."""
    bits = rng.integers(0, 2, size=(q, k, n)).astype(np.uint8)
    if mode == "bcq":
        shape = (terms, q, -(-k // 8), -(-n // group_rows))
    else:
        shape, group_rows = (terms, 1, 1, n), 1
    base = -112 if tiny else 0
    exps = (base - rng.integers(0, 6, size=shape) - 3 * np.arange(terms)[:, None, None, None]).astype(np.int8)
    signs = rng.choice(np.array([-1, 0, 1], dtype=np.int8), size=shape)
    signs[0] = 1
    signs[:, :, 0, 0] = 0  # a whole zero scale
    return Packed(mode, n, k, pack_bits(bits), exps, signs, group_rows)


CASES = [(5, 33, 2, 4, "bcq"), (24, 70, 3, 16, "bcq"), (16, 64, 4, 3, "bcq"), (9, 1, 1, 8, "bcq"),
         (12, 37, 3, 1, "denseshift"), (7, 96, 2, 1, "denseshift")]


@pytest.mark.parametrize("n,k,q,g,mode", CASES)
@pytest.mark.parametrize("tiny", [False, True])
def test_cpu_op_matches_dense_reference(n, k, q, g, mode, tiny):
    """torch.ops.rewriter.shiftadd_linear == x @ dense(sum_k alpha_k B_k)^T + b (fp32 vs float64)."""
    rng = np.random.default_rng(n * k + q)
    p = random_packed(rng, n, k, q, group_rows=g, mode=mode, tiny=tiny)
    planes, exps, signs = as_tensors(p)
    x = torch.from_numpy(rng.standard_normal((2, 3, k)).astype(np.float32))
    bias = torch.from_numpy((rng.standard_normal(n) * (1e-36 if tiny else 1)).astype(np.float32))
    want = x.double().numpy() @ p.dense().T + bias.double().numpy()
    got = shiftadd_linear(x, planes, exps, signs, bias, p.group_rows, MODES[mode])
    assert got.shape == (2, 3, n) and got.dtype == torch.float32
    # float32 dot of length k + the bias add (the decoded weight is exact, asserted below)
    tol = dot_rel_bound(x.numpy(), p.dense().T, want, bias=bias.numpy(), extra_terms=1)
    assert tol < 1e-4 and max_rel(want, got.numpy()) <= tol
    # the decoded weight itself is exact
    assert np.array_equal(dequantize(planes, exps, signs, k, p.group_rows, MODES[mode]).double().numpy(),
                          p.dense().T.astype(np.float32).astype(np.float64))


def test_zero_scales_give_zero_output():
    """All sign terms 0 (alpha = 0, no -inf exponent): the layer outputs exactly its bias."""
    rng = np.random.default_rng(0)
    p = random_packed(rng, 6, 40)
    p.signs[:] = 0
    planes, exps, signs = as_tensors(p)
    y = shiftadd_linear(torch.randn(4, 40), planes, exps, signs, torch.ones(6), p.group_rows, 0)
    assert torch.equal(y, torch.ones(4, 6))


def _function_model(fn: ir.Function, p: Packed) -> ir.Model:
    x = ir.Value(name="x", type=ir.TensorType(ir.DataType.FLOAT), shape=ir.Shape([2, p.n_in]))
    inits = []
    for name, arr in (("planes", p.planes), ("exps", p.exps), ("signs", p.signs)):
        inits.append(ir.Value(name=name, type=ir.TensorType(ir.DataType.from_numpy(arr.dtype)),
                              shape=ir.Shape(arr.shape), const_value=ir.tensor(arr, name=name)))
    call = ir.Node(DOMAIN, fn.name, [x, *inits], [ir.AttrInt64("group_rows", p.group_rows)], name="call")
    call.outputs[0].name = "y"
    call.outputs[0].dtype = ir.DataType.FLOAT
    graph = ir.Graph([x], [call.outputs[0]], nodes=[call], initializers=inits, opset_imports={"": 18, DOMAIN: 1})
    return ir.Model(graph, ir_version=10, functions=[fn])


@pytest.mark.parametrize("n,k,q,g,mode", CASES)
def test_onnx_function_matches_dense_reference(n, k, q, g, mode):
    """The rewriter::ShiftAddMatMul / DenseShiftMatMul bodies (standard ops, ORT) == dense reference."""
    rng = np.random.default_rng(7 * n + k)
    p = random_packed(rng, n, k, q, group_rows=g, mode=mode, tiny=(k % 2 == 1))
    fn = shiftadd_function(18) if mode == "bcq" else denseshift_function(18)
    body = {node.op_type for node in fn}
    assert {"BitShift", "BitwiseAnd", "MatMul"} <= body and "Pow" not in body
    x = rng.standard_normal((2, k)).astype(np.float32)
    (got,) = run_ort(_function_model(fn, p), {"x": x})
    want = x.astype(np.float64) @ p.dense().T
    # float32 dot of length k; the body may build each weight by q float32 additions (+q)
    tol = dot_rel_bound(x, p.dense().T, want, extra_terms=q)
    assert tol < 1e-4 and max_rel(want, got) <= tol


_SCRIPT = textwrap.dedent('''
    import json, os, sys, numpy as np, torch
    assert os.environ["TRITON_INTERPRET"] == "1"
    sys.path.insert(0, os.getcwd())
    from backends.triton.shiftadd import MODES, as_tensors, reference, triton_shiftadd_linear
    from tests.backends.test_shiftadd_kernel import random_packed
    from tests.fp_bounds import dot_rel_bound
    out = {}
    rng = np.random.default_rng(0)
    for (n, k, q, g, mode, tiny) in ((20, 70, 3, 8, "bcq", False), (9, 33, 2, 16, "bcq", True),
                                     (12, 37, 3, 1, "denseshift", False)):
        p = random_packed(rng, n, k, q, group_rows=g, mode=mode, tiny=tiny)
        planes, exps, signs = as_tensors(p)
        bias = torch.randn(n) * (1e-36 if tiny else 1)
        for m in (1, 20):  # decode path (broadcast multiply-add) and tl.dot path
            x = torch.randn(m, k)
            want = x.double().numpy() @ p.dense().T + bias.double().numpy()
            y = triton_shiftadd_linear(x, planes, exps, signs, bias, p.group_rows, MODES[mode])
            cpu = reference(x, planes, exps, signs, bias, p.group_rows, MODES[mode])
            scale = float(np.abs(want).max())
            # the kernel builds the exact weight, then a float32 dot of length k + the bias add;
            # against the CPU op (same bound) the difference is at most twice that
            tol = dot_rel_bound(x.numpy(), p.dense().T, want, bias=bias.numpy(), extra_terms=1)
            out[f"{mode}-{n}x{k}-m{m}"] = [float(np.abs(y.double().numpy() - want).max() / scale),
                                          float((y - cpu).abs().max()) / scale, tol]
    print(json.dumps(out))
''')


def test_triton_kernel_matches_reference_under_interpreter():
    """Triton ShiftAddLinear (batch-1 and tl.dot paths, both modes) == dense reference and CPU op."""
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=str(ROOT))
    proc = subprocess.run([sys.executable, "-c", _SCRIPT], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads(proc.stdout.strip().splitlines()[-1])
    assert len(results) == 6
    bad = {key: v for key, v in results.items() if not (v[0] <= v[2] and v[1] <= 2 * v[2] and v[2] < 1e-4)}
    assert not bad, bad
