"""``crms``: LayerNorm -> CRMSNorm with the residual stream narrowed from d to d-1.

Structure: ``rewriter::CRMSNormalization`` (a model-local function of standard ops) or
``torch.ops.rewriter.crms_norm`` replaces every stream LN; the stream is d-1 wide
(checked by ONNX shape inference from scratch). Meaning: original vs rewritten outputs
(ORT with graph optimizations off, or the GraphModule), fp32 max rel err <= 1e-5.
"""

from __future__ import annotations

import onnx
import onnx_ir as ir
import pytest

import rewriter
from backends.ort.functions import CRMS_NAME, DOMAIN
from tests.passes.stream_models import onnx_model
from tests.passes.test_rms import onnx_ops, rewrite_fx, rewrite_onnx


def inferred_stream_widths(model: ir.Model) -> set[int]:
    """Last dims of every CRMSNormalization input, by ONNX shape inference from scratch."""
    proto = ir.serde.serialize_model(model)
    del proto.graph.value_info[:]
    inferred = onnx.shape_inference.infer_shapes(proto, strict_mode=True)
    shapes = {vi.name: [d.dim_value for d in vi.type.tensor_type.shape.dim]
              for vi in list(inferred.graph.value_info) + list(inferred.graph.input)}
    widths = set()
    for n in inferred.graph.node:
        if n.op_type == CRMS_NAME:
            widths.add(shapes[n.input[0]][-1])
    return widths


@pytest.mark.parametrize("name,d", [("zoo:prenorm-gpt", 32), ("zoo:prenorm-vit", 32), ("hf:gpt2", 32),
                                    ("hf:opt", 32), ("hf:bloom", 32), ("hf:vit", 32)])
def test_crms_onnx(name, d):
    """Every stream LN -> rewriter::CRMSNormalization; stream d-1 wide; output equal."""
    res, err = rewrite_onnx(name, "crms")
    ops = onnx_ops(res.model)
    assert ops.count(CRMS_NAME) == 5
    assert ops.count("LayerNormalization") == (1 if name == "hf:bloom" else 0)
    assert (DOMAIN, CRMS_NAME, "") in res.model.functions and res.model.opset_imports[DOMAIN] == 1
    assert inferred_stream_widths(res.model) == {d - 1}
    assert err <= 1e-5


def test_crms_onnx_chain_body_at_opset18():
    """Without the opset upgrade the function body is the ReduceSumSquare/ReduceSum chain."""
    res, err = rewrite_onnx("zoo:prenorm-gpt", "crms", upgrade_opset="false")
    fn = res.model.functions[(DOMAIN, CRMS_NAME, "")]
    body = [n.op_type for n in fn]
    assert "ReduceSumSquare" in body and "RMSNormalization" not in body
    assert res.model.opset_imports[""] == 18 and err <= 1e-5


def test_crms_onnx_opset23_export():
    """An opset-23 export: the function body uses the fused RMSNormalization."""
    res, err = rewrite_onnx("zoo:prenorm-gpt", "crms", opset=23)
    body = [n.op_type for n in res.model.functions[(DOMAIN, CRMS_NAME, "")]]
    assert "RMSNormalization" in body and "LayerNormalization" not in onnx_ops(res.model)
    assert err <= 1e-5


@pytest.mark.parametrize("name", ["zoo:prenorm-gpt", "zoo:prenorm-vit", "zoo:prenorm-gpt-parallel",
                                  "hf:gpt2", "hf:opt", "hf:bloom"])
def test_crms_fx(name):
    """torch.export graph: torch.ops.rewriter.crms_norm everywhere; d-1 wide tables; equal output."""
    res, err = rewrite_fx(name, "crms")
    nodes = list(res.model.graph.nodes)
    assert sum(str(n.target) == "rewriter.crms_norm.default" for n in nodes) == 5
    assert not any(str(n.target) == "aten.layer_norm.default" for n in nodes) or name == "hf:bloom"
    for n in nodes:
        if str(n.target) == "aten.embedding.default" and name != "hf:bloom":
            table = res.view.const_value(n.args[0])
            assert table.shape[1] == 31
    assert err <= 1e-5


def test_crms_modulated_norm_reexpands():
    """A modulated norm output: CRMSNorm, then the dropped coordinate re-expanded (concat)."""
    res, err = rewrite_fx("zoo:adaln-nogate-transformer", "crms")
    reasons = [s.reason for s in res.records[0].sites]
    assert sum("the dropped coordinate is re-expanded" in r for r in reasons) == 4
    assert sum(str(n.target) == "aten.cat.default" for n in res.model.graph.nodes) >= 4
    assert err <= 1e-5


def test_crms_declines_exported_hidden_state():
    """crms declines a model exporting a hidden state of the stream, with that reason."""
    res = rewriter.rewrite(onnx_model("zoo:prenorm-gpt-hidden"), ["crms"])
    rec = res.records[0]
    assert not rec.applied and all("is a graph output" in s.reason for s in rec.declined)
    assert CRMS_NAME not in onnx_ops(res.model)


@pytest.mark.parametrize("name,needle", [("zoo:postnorm-gpt", "post-LN:"),
                                         ("zoo:adaln-transformer", "data-dependent gate")])
def test_crms_declines_with_reason(name, needle):
    """Post-LN and adaLN-Zero models are declined by crms too, with the reason."""
    from tests.passes.stream_models import torch_model

    module, inputs = torch_model(name)
    res = rewriter.rewrite(module, ["crms"], example_inputs=inputs, ir_kind="torch")
    rec = res.records[0]
    assert not rec.applied and all(needle in s.reason for s in rec.declined)
