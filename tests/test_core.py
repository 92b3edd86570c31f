"""Core: option parsing, the manager's bisection to a site, the view's recognisers."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from onnx import helper

import rewriter
from rewriter.errors import BadInput
from rewriter.ir.fx_view import FxView, capture
from rewriter.ir.onnx_view import OnnxView
from rewriter.pass_api import Kind, Pass, Site, make_options, parse_sets
from tests.conftest import bn_inits, bn_node, init, make_model


def test_parse_sets_and_typed_options():
    """--set values are parsed against the pass's typed options; bad ones are BadInput."""
    from passes.foldnorm import FoldNorm

    parsed = parse_sets(["foldnorm.direction=next"])
    assert make_options(FoldNorm, parsed["foldnorm"]).direction == "next"
    with pytest.raises(BadInput, match="expected one of"):
        make_options(FoldNorm, {"direction": "up"})
    with pytest.raises(BadInput, match="malformed --set"):
        parse_sets(["direction=next"])


class _BreakSecond(Pass):
    """Scales the weight of the second linear it sees by 2 (a deliberately wrong 'exact' pass)."""

    name = "break-second"
    kind = Kind.EXACT

    def match(self, view):
        return [Site(n.name, True, plan=n) for n in view.nodes() if n.op == "linear"]

    def apply(self, view, sites):
        for s in sites:
            if s.site == "g2":
                p = view.linear(s.plan)
                view.set_linear(s.plan, dataclasses.replace(p, weight=p.weight * 2))


def _three_gemms(rng):
    nodes = [helper.make_node("Gemm", ["x", "W1"], ["a"], transB=1, name="g1"),
             helper.make_node("Gemm", ["a", "W2"], ["b"], transB=1, name="g2"),
             helper.make_node("Gemm", ["b", "W3"], ["y"], transB=1, name="g3")]
    inits = [init(f"W{i}", rng.standard_normal((4, 4))) for i in (1, 2, 3)]
    return make_model(nodes, [("x", [2, 4])], [("y", [2, 4])], inits)


def test_manager_bisects_to_the_failing_site(rng):
    """A failing exact pass is named with the first site that breaks verification."""
    res = rewriter.rewrite(_three_gemms(rng), [_BreakSecond()])
    assert not res.passed
    assert res.verification["failed_pass"] == "break-second"
    assert res.verification["failing_site"] == "g2"
    with pytest.raises(rewriter.VerificationFailed):
        res.save("/tmp/never-written.onnx")


def test_onnx_recognises_linear_forms(rng):
    """MatMul+Add is one linear; Gemm's alpha/beta/transB are read into [out, in] form."""
    m = make_model(
        [helper.make_node("MatMul", ["x", "W"], ["m"], name="mm"),
         helper.make_node("Add", ["m", "b"], ["h"], name="add"),
         helper.make_node("Gemm", ["h", "G", "c"], ["y"], alpha=2.0, beta=3.0, name="gemm")],
        [("x", [2, 3])], [("y", [2, 5])],
        [init("W", rng.standard_normal((3, 4))), init("b", rng.standard_normal(4)),
         init("G", rng.standard_normal((4, 5))), init("c", rng.standard_normal(5))])
    import onnx_ir as ir

    view = OnnxView(ir.from_proto(m))
    lins = [n for n in view.nodes() if n.op == "linear"]
    assert [n.name for n in lins] == ["mm", "gemm"] and len(lins[0].raw) == 2
    g = view.linear(lins[1])
    gm = view.const_value(lins[1].raw[0].inputs[1])
    np.testing.assert_allclose(g.weight, 2.0 * gm.T.astype(np.float64))
    np.testing.assert_allclose(g.bias, 3.0 * view.const_value(lins[1].raw[0].inputs[2]).astype(np.float64))


def test_fx_recognises_ops():
    """torch.export graphs: linear, conv, batch_norm, layer_norm, embedding, attention."""

    class M(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = torch.nn.Embedding(10, 8)
            self.ln = torch.nn.LayerNorm(8)
            self.fc = torch.nn.Linear(8, 8)

        def forward(self, ids):
            h = self.fc(self.ln(self.emb(ids)))
            q = h.unsqueeze(1)
            return torch.nn.functional.scaled_dot_product_attention(q, q, q)

    ids = torch.randint(0, 10, (2, 5))
    view = FxView(capture(M().eval(), (ids,)), (ids,))
    ops = [n.op for n in view.nodes()]
    for op in ("embedding", "layer_norm", "linear", "attention"):
        assert op in ops, ops
    g = view.to_networkx()
    assert g.number_of_nodes() == len(view.nodes()) and g.number_of_edges() >= 3
