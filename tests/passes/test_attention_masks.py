"""Masked and causal attention as the TorchScript / dynamo exporters write it (``Mul(Q, sqrt s)``,
``Mul(K^T, sqrt s)``, MatMul, a mask added to the scores, Softmax, the ``Where(IsNaN(p), 0, p)``
guard, MatMul with V): found as an attention site and declined with a reason that names the
mask; the same chain without a mask (the guard kept) is still rewritten, exactly."""

from __future__ import annotations

import math

import numpy as np
import onnx
import onnx_ir as ir
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

import rewriter
from rewriter.canon.attention import find_attention
from rewriter.ir.onnx_view import OnnxView
from tests.conftest import init, max_rel, op_types, run_ort

B, N, H, DH = 2, 16, 2, 8
D = H * DH


def _i64(name, values):
    return numpy_helper.from_array(np.asarray(values, dtype=np.int64), name)


def _model(mask: str, guard: bool = True, const_v: bool = False) -> onnx.ModelProto:
    """x [B, N, D] -> self-attention in the exporters' decomposition; ``mask``: "" (none),
    "causal" (``Range`` positions compared at run time), "padding" (from an ``attention_mask``
    input), "all-true" / "one-false" (a constant boolean mask expanded to the batch). ``const_v``: the probabilities meet a constant (not attention)."""
    rng = np.random.default_rng(0)
    s = 1.0 / math.sqrt(DH)
    inits = [init(f"W{n}", rng.standard_normal((D, D)) * 0.3) for n in "qkvo"]
    inits += [init("sq", math.sqrt(s)), init("zero", 0.0), init("ninf", -np.inf),
              _i64("heads", [B, N, H, DH]), _i64("flat", [B, N, D]), _i64("one", 1), _i64("zero_i", 0),
              _i64("ax0", [0]), _i64("ax1", [1]), _i64("ax12", [1, 2])]
    nodes = [helper.make_node("MatMul", ["x", f"W{n}"], [f"{n}p"]) for n in "qkv"]
    for n in "qkv":
        nodes.append(helper.make_node("Reshape", [f"{n}p", "heads"], [f"{n}h"]))
    nodes += [
        helper.make_node("Transpose", ["qh"], ["qt"], perm=[0, 2, 1, 3]),
        helper.make_node("Transpose", ["kh"], ["kt"], perm=[0, 2, 3, 1]),  # K^T
        helper.make_node("Transpose", ["vh"], ["vt"], perm=[0, 2, 1, 3]),
        helper.make_node("Mul", ["qt", "sq"], ["qs"]),
        helper.make_node("Mul", ["kt", "sq"], ["ks"]),
        helper.make_node("MatMul", ["qs", "ks"], ["scores"]),
    ]
    logits = "scores"
    extra_inputs = []
    if mask == "causal":  # key j visible from query i iff j <= i; positions from Shape(x)
        nodes += [
            helper.make_node("Shape", ["x"], ["xs"]),
            helper.make_node("Gather", ["xs", "one"], ["n"], axis=0),
            helper.make_node("Range", ["zero_i", "n", "one"], ["pos"]),
            helper.make_node("Unsqueeze", ["pos", "ax1"], ["pi"]),  # [N, 1]
            helper.make_node("Unsqueeze", ["pos", "ax0"], ["pj"]),  # [1, N]
            helper.make_node("LessOrEqual", ["pj", "pi"], ["vis"]),
            helper.make_node("Where", ["vis", "zero", "ninf"], ["add_mask"]),
        ]
    elif mask == "padding":  # attention_mask [B, N] of 0/1 -> additive [B, 1, 1, N]
        extra_inputs = [helper.make_tensor_value_info("attention_mask", TensorProto.INT64, [B, N])]
        nodes += [
            helper.make_node("Cast", ["attention_mask"], ["am_b"], to=TensorProto.BOOL),
            helper.make_node("Unsqueeze", ["am_b", "ax12"], ["am4"]),
            helper.make_node("Where", ["am4", "zero", "ninf"], ["add_mask"]),
        ]
    elif mask in ("all-true", "one-false"):  # the dynamo export of transformers 5's bidirectional mask
        keep = np.ones((1, 1, 1, N), dtype=bool)
        if mask == "one-false":
            keep[..., 3] = False
        inits += [numpy_helper.from_array(keep, "keep"), _i64("nn1", [1, N, N]), init("big", -3.4e38)]
        nodes += [
            helper.make_node("Shape", ["x"], ["bsz"], start=0, end=1),
            helper.make_node("Concat", ["bsz", "nn1"], ["mshape"], axis=0),
            helper.make_node("Expand", ["keep", "mshape"], ["keep_b"]),
            helper.make_node("Where", ["keep_b", "zero", "big"], ["add_mask"]),
        ]
    if mask:
        nodes.append(helper.make_node("Add", ["scores", "add_mask"], ["masked"]))
        logits = "masked"
    nodes.append(helper.make_node("Softmax", [logits], ["p"], axis=-1))
    probs = "p"
    if guard:
        nodes += [helper.make_node("IsNaN", ["p"], ["nan"]),
                  helper.make_node("Where", ["nan", "zero", "p"], ["pg"])]
        probs = "pg"
    if const_v:
        inits.append(init("Vc", rng.standard_normal((N, DH))))
    nodes += [
        helper.make_node("MatMul", [probs, "Vc" if const_v else "vt"], ["o"]),
        helper.make_node("Transpose", ["o"], ["ot"], perm=[0, 2, 1, 3]),
        helper.make_node("Reshape", ["ot", "flat"], ["of"]),
        helper.make_node("MatMul", ["of", "Wo"], ["y"]),
    ]
    graph = helper.make_graph(nodes, "attn", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [B, N, D]),
                                              *extra_inputs],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [B, N, D])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 10
    return onnx.shape_inference.infer_shapes(model)


def _sites(model: onnx.ModelProto):
    return find_attention(OnnxView(ir.serde.deserialize_model(model)))


@pytest.mark.parametrize("mask,reason", [("causal", "causal attention (a causal mask"),
                                         ("padding", "has an attention mask (a padding mask")])
def test_masked_chain_found_and_declined(mask, reason):
    """The exporters' masked chain (Add of a mask, NaN guard) is one site, declined naming the mask."""
    sites = _sites(_model(mask))
    assert len(sites) == 1 and not sites[0].ok, sites
    assert reason in sites[0].reason and "Add" in sites[0].reason
    if mask == "padding":
        assert "causal" not in sites[0].reason


def test_masked_chain_declined_end_to_end(tmp_path):
    """Through the rewriter: nothing is rewritten, the decline carries the reason."""
    path = tmp_path / "causal.onnx"
    onnx.save(_model("causal"), path)
    res = rewriter.rewrite(str(path), ["rettention"])
    rec = res.records[0]
    assert not rec.applied and any("causal attention" in d.reason for d in rec.declined)
    assert "Softmax" in op_types(res.model) and "Rettention" not in op_types(res.model)


def test_unmasked_chain_with_nan_guard_is_rewritten(tmp_path):
    """Positive control: without a mask the guarded chain is rewritten (guard removed with the
    chain) and the default (dense) step equals the original in ORT, fp32 <= 1e-5."""
    path = tmp_path / "plain.onnx"
    onnx.save(_model(""), path)
    sites = _sites(_model(""))
    assert len(sites) == 1 and sites[0].ok and sites[0].tokens == N and sites[0].heads == H
    assert abs(sites[0].scale - 1.0 / math.sqrt(DH)) <= 1e-6
    res = rewriter.rewrite(str(path), ["rettention"], options={"rettention": {"density": 0.25}})
    assert res.passed and res.records[0].applied
    ops = op_types(res.model)
    assert "Softmax" not in ops and "IsNaN" not in ops and ops.count("Rettention") == 1
    x = np.random.default_rng(3).standard_normal((B, N, D)).astype(np.float32)
    assert max_rel(run_ort(onnx.load(path), {"x": x})[0], run_ort(res.model, {"x": x})[0]) <= 1e-5


def test_all_true_mask_is_no_mask(tmp_path):
    """transformers 5's all-true bidirectional mask (Expand of a constant, Where(m, 0, -big), Add)
    keeps every key: the site is rewritten, exactly; one masked key makes it a decline."""
    sites = _sites(_model("one-false"))
    assert len(sites) == 1 and "has an attention mask" in sites[0].reason
    path = tmp_path / "allkeys.onnx"
    onnx.save(_model("all-true"), path)
    res = rewriter.rewrite(str(path), ["rettention"], options={"rettention": {"density": 0.25}})
    assert res.passed and res.records[0].applied, res.records[0].declined
    ops = op_types(res.model)
    assert "Softmax" not in ops and ops.count("Rettention") == 1
    x = np.random.default_rng(4).standard_normal((B, N, D)).astype(np.float32)
    assert max_rel(run_ort(onnx.load(path), {"x": x})[0], run_ort(res.model, {"x": x})[0]) <= 1e-5


def test_probabilities_times_constant_is_not_attention():
    """Negative control: a guarded, masked Softmax whose product is with a constant is no site."""
    assert _sites(_model("causal", const_v=True)) == []


def test_fx_softmax_cast_view_bmm_declined_with_mask():
    """FX (BLOOM's baddbmm form): mask added, softmax(dtype) -> to -> view -> bmm: declined."""
    from rewriter.api import as_view

    class Baddbmm(torch.nn.Module):
        def forward(self, q, k, v, bias):
            s = torch.baddbmm(bias, q, k.transpose(1, 2), alpha=0.35).view(B, H, N, N)
            causal = torch.full((N, N), float("-inf")).triu(1)
            p = torch.softmax(s + causal, dim=-1, dtype=torch.float32).to(torch.float32)
            return torch.bmm(p.view(B * H, N, N), v)

    ex = tuple(torch.randn(B * H, N, DH) for _ in range(3)) + (torch.randn(B * H, 1, N),)
    sites = find_attention(as_view(Baddbmm(), example_inputs=ex))
    assert len(sites) == 1 and "has an attention mask" in sites[0].reason, sites


class _ArangeMask(torch.nn.Module):
    """SDPA with a mask built from an arange (``start``=0: every key kept, as transformers 5's
    ``create_bidirectional_mask`` writes it; 1: the first key masked)."""

    def __init__(self, start: int):
        super().__init__()
        torch.manual_seed(0)
        self.qkv, self.start = torch.nn.Linear(D, 3 * D), start

    def forward(self, x):
        q, k, v = (t.view(B, N, H, DH).transpose(1, 2) for t in self.qkv(x).chunk(3, -1))
        keep = (torch.arange(N) >= self.start)[None, None, None, :].expand(B, -1, N, N)
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=keep).transpose(1, 2).reshape(B, N, D)


def test_fx_all_true_arange_mask_is_no_mask():
    """FX: an SDPA mask computed from aranges only that keeps every key is no mask (rewritten,
    verified); one that drops a key is declined as a mask."""
    from rewriter.api import as_view

    ex = (torch.randn(B, N, D),)
    masked = find_attention(as_view(_ArangeMask(1), example_inputs=ex))
    assert len(masked) == 1 and "has an attention mask" in masked[0].reason
    res = rewriter.rewrite(_ArangeMask(0), ["rettention"], example_inputs=ex, options={"rettention": {"density": 0.25}})
    assert res.records[0].applied and res.passed and res.verification["max_rel_error"] <= 1e-5
    assert "aten.scaled_dot_product_attention.default" not in res.view.raw_op_types()
