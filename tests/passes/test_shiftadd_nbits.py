"""``shiftadd`` with ``lowering=nbits``: each +-alpha bit plane of a BCQ layer runs as an ONNX
Runtime 2-bit ``com.microsoft::MatMulNBits`` (one float scale per row and ``nbits_block``
input columns), ``q`` planes summed by ``q - 1`` adds: the weights stay packed in the
session.

Structure: the ``rewriter::ShiftAddNBits<q>`` call with ``q`` (codes, scales) pairs whose
decode equals the quantizer's reference ``sum_k alpha_k B_k``. Meaning: ORT (optimizations
off) equals ``x @ W^T`` with ``W`` decoded from the stored tensors, to float32 rounding at
``accuracy_level=0`` and within the int8 activation-quantization bound at level 4.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest

import rewriter
from backends.ort.shiftadd import DOMAIN, NBITS8_NAME, NBITS_NAME, nbits8_tensors, nbits_tensors
from passes import shiftadd_quant as sq
from onnx import helper

from tests.conftest import init, make_model, run_ort
from tests.passes.test_shiftadd import FAST, calls, declined, mlp_onnx

EPS32 = float(np.finfo(np.float32).eps)


def decode(codes: np.ndarray, scales: np.ndarray, n_in: int) -> np.ndarray:
    """``W`` ``[N, K]`` (float64) of 2-bit ``MatMulNBits`` tensors with the default zero point 2."""
    n, kb, blob = codes.shape
    c = np.stack([(codes >> (2 * j)) & 3 for j in range(4)], axis=-1).reshape(n, kb, blob * 4).astype(np.float64)
    return ((c - 2.0) * scales.astype(np.float64)[:, :, None]).reshape(n, -1)[:, :n_in]


def call_weight(call: ir.Node) -> np.ndarray:
    codes, scales = (v.const_value.numpy() for v in call.inputs[1:3])
    k, n = call.attributes.get_int("K"), call.attributes.get_int("N")
    return decode(codes, scales, k).reshape(-1, n, k).sum(0)  # the planes' weights, summed


def mlp128():
    """x[2,4,128] -> MatMul(128x48)+b -> Relu -> MatMul(48x8): K a multiple of the 64-column block."""
    rng = np.random.default_rng(2)
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["h0"], name="fc1"),
             helper.make_node("Add", ["h0", "b1"], ["h1"], name="fc1_bias"),
             helper.make_node("Relu", ["h1"], ["h2"], name="relu"),
             helper.make_node("MatMul", ["h2", "w2"], ["y"], name="head")]
    inits = [init("w1", rng.standard_normal((128, 48)) * 0.1), init("b1", rng.standard_normal(48) * 0.1),
             init("w2", rng.standard_normal((48, 8)) * 0.2)]
    return make_model(nodes, [("x", [2, 4, 128])], [("y", [2, 4, 8])], inits)


def _rewrite(extra: dict, model=None):
    return rewriter.rewrite(mlp_onnx() if model is None else model, ["shiftadd"],
                            options={"shiftadd": {**FAST, "lowering": "nbits", "nbits_block": "16", **extra}})


@pytest.mark.parametrize("row_scale", [False, True])
def test_nbits_tensors_decode_to_the_reference(row_scale):
    """The MatMulNBits codes and scales of a packed BCQ weight decode exactly to ``Packed.dense()``."""
    w = np.random.default_rng(0).standard_normal((24, 72))
    p = sq.quantize(w, None, bits=3, rounds=2, group_rows=1, block_cols=32, row_scale=row_scale)
    t = nbits_tensors(p.planes, p.alpha(), p.n_in, 32, p.row_scale)
    assert sorted(t) == ["B", "S"] and t["B"].shape == (72, 3, 8) and t["S"].shape == (72, 3)
    got = decode(t["B"], t["S"], 72).reshape(3, 24, 72).sum(0)
    np.testing.assert_array_equal(got, p.dense())


def test_onnx_nbits_lowering_exact_at_fp32_accuracy():
    """lowering=nbits, accuracy 0: one MatMulNBits over 3 stacked planes + ReduceSum; ORT == x @ W^T to K x eps."""
    res = _rewrite({"nbits_accuracy": "0"})
    assert res.passed, res.verification
    assert [n.op_type for n in res.model.graph] == [NBITS_NAME, "Add", "Relu", "MatMul"]
    assert "w1" not in res.model.graph.initializers
    fn = res.model.functions[(DOMAIN, NBITS_NAME, "")]
    assert [n.op_type for n in fn if n.op_type in ("MatMulNBits", "ReduceSum")] == ["MatMulNBits", "ReduceSum"]
    (call,) = calls(res.model)
    assert call.inputs[1].dtype == ir.DataType.UINT8 and call.inputs[1].shape == ir.Shape([210, 3, 4])
    w = call_weight(call)
    x = np.random.default_rng(3).standard_normal((2, 4, 40)).astype(np.float32)
    h = run_ort(_hidden(res.model), {"x": x})[0].astype(np.float64)
    ref = x.astype(np.float64) @ w.T
    bound = 40 * EPS32 * (np.abs(x).astype(np.float64) @ np.abs(w).T)  # float32 accumulation of K products
    assert np.all(np.abs(h - ref) <= bound + 1e-30), float(np.abs(h - ref).max())


def test_onnx_nbits_lowering_int8_activations_within_bound():
    """accuracy 4 (ORT's int8 path, K = 128, block 64): ORT == x @ W^T within the block int8 rounding of x."""
    res = _rewrite({"nbits_block": "64"}, mlp128())
    assert res.passed, res.verification
    (call,) = calls(res.model)
    assert call.attributes.get_int("accuracy_level") == 4
    w = call_weight(call)
    x = np.random.default_rng(4).standard_normal((2, 4, 128)).astype(np.float32)
    h = run_ort(_hidden(res.model), {"x": x})[0].astype(np.float64)
    xd = x.astype(np.float64)
    step = np.repeat(np.abs(xd).reshape(2, 4, 2, 64).max(-1) / 127.0, 64, axis=-1)  # int8 step per 64-block
    bound = (step / 2) @ np.abs(w).T + 128 * EPS32 * (np.abs(xd) + step) @ np.abs(w).T
    err = np.abs(h - xd @ w.T)
    assert np.all(err <= bound), float((err / bound).max())
    assert err.max() > 128 * EPS32 * np.abs(xd @ w.T).max()  # the activations were quantized (not the fp32 path)


def test_nbits_declines_fx_and_bad_block():
    """lowering=nbits on a torch graph declines each linear (ONNX only); a block of 24 is a one-line BadInput."""
    import torch

    from rewriter.errors import BadInput

    m = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 8))
    res = rewriter.rewrite(m, ["shiftadd"], options={"shiftadd": {"lowering": "nbits", "include": "head"}},
                           example_inputs=(torch.randn(2, 16),))
    assert res.report["passes"][0]["applied"] == 0
    assert all("ONNX only" in r for r in declined(res).values())
    with pytest.raises(BadInput, match="nbits_block=24"):
        _rewrite({"nbits_block": "24"})


def _hidden(model: ir.Model) -> ir.Model:
    """The model cut after the quantized linear's call (before its bias Add)."""
    model = model.clone()
    (call,) = calls(model)
    model.graph.outputs.clear()
    model.graph.outputs.append(call.outputs[0])
    for n in reversed(list(model.graph)):
        if n is not call and all(not o.uses() for o in n.outputs) and not any(o in model.graph.outputs for o in n.outputs):
            model.graph.remove(n, safe=True)
    return model


def decode8(codes: np.ndarray, steps: np.ndarray, n_in: int) -> np.ndarray:
    """``W`` ``[N, K]`` of 8-bit ``MatMulNBits`` tensors (default zero point 128)."""
    n, kb, block = codes.shape
    return ((codes.astype(np.float64) - 128.0) * steps.astype(np.float64)[:, :, None]).reshape(n, -1)[:, :n_in]


def test_nbits8_tensors_within_half_a_step_of_the_reference():
    """The 8-bit grid moves each weight of the BCQ decode by at most half its block's step."""
    w = np.random.default_rng(5).standard_normal((24, 72))
    p = sq.quantize(w, None, bits=3, rounds=2, group_rows=1, block_cols=32)
    t = nbits8_tensors(p.dense(), 32)
    assert t["B"].shape == (24, 3, 32) and t["S"].shape == (24, 3) and t["B"].dtype == np.uint8
    err = np.abs(decode8(t["B"], t["S"], 72) - p.dense())
    assert np.all(err <= np.repeat(t["S"].astype(np.float64), 32, axis=1)[:, :72] / 2 * (1 + 1e-6))


def test_onnx_nbits8_lowering_exact_at_fp32_accuracy():
    """lowering=nbits8, accuracy 0: one 8-bit MatMulNBits; ORT == x @ W8^T (W8 decoded from the stored codes) to K x eps."""
    res = _rewrite({"lowering": "nbits8", "nbits_accuracy": "0"})
    assert res.passed, res.verification
    assert [n.op_type for n in res.model.graph] == [NBITS8_NAME, "Add", "Relu", "MatMul"]
    fn = res.model.functions[(DOMAIN, NBITS8_NAME, "")]
    assert [n.op_type for n in fn] == ["MatMulNBits", "Identity"]
    (call,) = calls(res.model)
    codes, steps = (v.const_value.numpy() for v in call.inputs[1:3])
    w = decode8(codes, steps, 40)
    x = np.random.default_rng(6).standard_normal((2, 4, 40)).astype(np.float32)
    h = run_ort(_hidden(res.model), {"x": x})[0].astype(np.float64)
    bound = 40 * EPS32 * (np.abs(x).astype(np.float64) @ np.abs(w).T)
    assert np.all(np.abs(h - x.astype(np.float64) @ w.T) <= bound + 1e-30)
