"""foldnorm: structure (norms gone), meaning (ORT outputs equal, opt off) and every decline."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from onnx import helper
from torch import nn

import models_zoo
import rewriter
from rewriter.ir.fx_view import FxView, capture
from tests.conftest import bn_inits, bn_node, init, make_model, max_rel, op_types, run_ort

TOL = 1e-5


def fold_onnx(model, **kw):
    res = rewriter.rewrite(model, ["foldnorm"], **kw)
    assert res.passed, res.verification
    return res


def check_onnx_equal(original, rewritten, feeds):
    a = run_ort(original, feeds)
    b = run_ort(rewritten, feeds)
    for x, y in zip(a, b):
        assert max_rel(x, y) <= TOL


# -- ONNX: the cases that broke other tools ------------------------------------------------

def test_gemm_transb_alpha_beta(rng):
    """BN after a Gemm with transB=1, alpha != 1, beta != 1 folds exactly into the Gemm."""
    w = rng.standard_normal((6, 5))  # transB=1: B is [out, in]
    m = make_model(
        [helper.make_node("Gemm", ["x", "W", "b"], ["h"], transB=1, alpha=0.7, beta=1.9, name="gemm"),
         bn_node("bn", "h", "y")],
        [("x", [3, 5])], [("y", [3, 6])],
        [init("W", w), init("b", rng.standard_normal(6))] + bn_inits("bn", 6, rng))
    res = fold_onnx(m)
    assert "BatchNormalization" not in op_types(res.model)
    assert op_types(res.model) == ["Gemm"]
    check_onnx_equal(m, res.model, {"x": rng.standard_normal((3, 5)).astype(np.float32)})


def test_gemm_transb0_no_bias_reader(rng):
    """A BN read by a Gemm (transB=0, no C) folds into the reader, creating its bias."""
    m = make_model(
        [bn_node("bn", "x", "h"),
         helper.make_node("Gemm", ["h", "W"], ["y"], alpha=1.3, name="gemm")],
        [("x", [4, 5])], [("y", [4, 3])],
        [init("W", rng.standard_normal((5, 3)))] + bn_inits("bn", 5, rng))
    res = fold_onnx(m)
    assert op_types(res.model) == ["Gemm"]
    check_onnx_equal(m, res.model, {"x": rng.standard_normal((4, 5)).astype(np.float32)})


@pytest.mark.parametrize("groups,bias", [(1, False), (2, True), (8, True), (8, False)])
def test_conv_groups_and_bias(rng, groups, bias):
    """BN after plain, grouped and depthwise convs, with and without bias."""
    cin, cout = 8, 8
    inputs = ["x", "W"] + (["B"] if bias else [])
    inits = [init("W", rng.standard_normal((cout, cin // groups, 3, 3)))] + bn_inits("bn", cout, rng)
    if bias:
        inits.append(init("B", rng.standard_normal(cout)))
    m = make_model(
        [helper.make_node("Conv", inputs, ["h"], pads=[1, 1, 1, 1], group=groups, name="conv"),
         bn_node("bn", "h", "y")],
        [("x", [2, cin, 6, 6])], [("y", [2, cout, 6, 6])], inits)
    res = fold_onnx(m)
    assert op_types(res.model) == ["Conv"]
    check_onnx_equal(m, res.model, {"x": rng.standard_normal((2, cin, 6, 6)).astype(np.float32)})


def test_bn_into_following_grouped_conv_without_padding(rng):
    """BN read by an unpadded grouped conv folds into the conv's input channels."""
    m = make_model(
        [bn_node("bn", "x", "h"),
         helper.make_node("Conv", ["h", "W"], ["y"], group=2, name="conv")],
        [("x", [2, 4, 5, 5])], [("y", [2, 6, 3, 3])],
        [init("W", rng.standard_normal((6, 2, 3, 3)))] + bn_inits("bn", 4, rng))
    res = fold_onnx(m)
    assert op_types(res.model) == ["Conv"]
    check_onnx_equal(m, res.model, {"x": rng.standard_normal((2, 4, 5, 5)).astype(np.float32)})


def test_norm_read_by_two_linears(rng):
    """A norm whose output feeds two MatMul+Add linears folds into both."""
    m = make_model(
        [bn_node("bn", "xt", "h"),
         helper.make_node("MatMul", ["h", "W1"], ["m1"], name="mm1"),
         helper.make_node("Add", ["m1", "b1"], ["y1"], name="add1"),
         helper.make_node("MatMul", ["h", "W2"], ["y2"], name="mm2")],
        [("xt", [3, 5])], [("y1", [3, 4]), ("y2", [3, 2])],
        [init("W1", rng.standard_normal((5, 4))), init("b1", rng.standard_normal(4)),
         init("W2", rng.standard_normal((5, 2)))] + bn_inits("bn", 5, rng))
    res = fold_onnx(m)
    ops = op_types(res.model)
    assert "BatchNormalization" not in ops and ops.count("MatMul") == 2
    check_onnx_equal(m, res.model, {"xt": rng.standard_normal((3, 5)).astype(np.float32)})


def test_bn1d_through_transposes(rng):
    """Linear -> Transpose -> BN1d -> Transpose -> Linear on 3-D input: BN folds and the
    transposes that only served it cancel."""
    m = make_model(
        [helper.make_node("MatMul", ["x", "W1"], ["a"], name="mm1"),
         helper.make_node("Transpose", ["a"], ["at"], perm=[0, 2, 1], name="t1"),
         bn_node("bn", "at", "bt"),
         helper.make_node("Transpose", ["bt"], ["b"], perm=[0, 2, 1], name="t2"),
         helper.make_node("MatMul", ["b", "W2"], ["y"], name="mm2")],
        [("x", [2, 7, 5])], [("y", [2, 7, 3])],
        [init("W1", rng.standard_normal((5, 6))), init("W2", rng.standard_normal((6, 3)))] + bn_inits("bn", 6, rng))
    res = fold_onnx(m)
    ops = op_types(res.model)
    assert "BatchNormalization" not in ops and "Transpose" not in ops
    check_onnx_equal(m, res.model, {"x": rng.standard_normal((2, 7, 5)).astype(np.float32)})


def test_direction_option_next(rng):
    """--set foldnorm.direction=next folds into the reader even when a producer exists."""
    m = make_model(
        [helper.make_node("Gemm", ["x", "W1"], ["h"], transB=1, name="g1"), bn_node("bn", "h", "n"),
         helper.make_node("Gemm", ["n", "W2"], ["y"], transB=1, name="g2")],
        [("x", [2, 4])], [("y", [2, 3])],
        [init("W1", rng.standard_normal((5, 4))), init("W2", rng.standard_normal((3, 5)))] + bn_inits("bn", 5, rng))
    res = fold_onnx(m, options={"foldnorm": {"direction": "next"}})
    site = res.records[0].applied[0]
    assert site.reason == "folded into the readers"
    g1 = [n for n in res.model.graph if n.name == "g1"][0]
    g2 = [n for n in res.model.graph if n.name == "g2"][0]
    assert "rewriter.pass" not in g1.metadata_props
    assert g2.metadata_props["rewriter.pass"] == "foldnorm"
    assert g2.metadata_props["rewriter.replaced"] == "bn"
    check_onnx_equal(m, res.model, {"x": rng.standard_normal((2, 4)).astype(np.float32)})


def test_input_model_untouched_and_names_kept(rng, tmp_path):
    """The ONNX file is not modified; input/output names and metadata are kept."""
    import hashlib

    import onnx

    m = make_model([helper.make_node("Gemm", ["x", "W"], ["h"], transB=1, name="g"), bn_node("bn", "h", "y")],
                   [("x", [2, 4])], [("y", [2, 3])], [init("W", rng.standard_normal((3, 4)))] + bn_inits("bn", 3, rng))
    m.doc_string = "kept"
    helper.set_model_props(m, {"owner": "me"})
    src = tmp_path / "m.onnx"
    onnx.save(m, src)
    digest = hashlib.sha256(src.read_bytes()).hexdigest()
    res = rewriter.rewrite(str(src), ["foldnorm"])
    out = res.save(tmp_path / "out.onnx")
    assert hashlib.sha256(src.read_bytes()).hexdigest() == digest
    saved = onnx.load(out)
    assert [i.name for i in saved.graph.input] == ["x"] and [o.name for o in saved.graph.output] == ["y"]
    assert saved.doc_string == "kept" and {p.key: p.value for p in saved.metadata_props}["owner"] == "me"


# -- declines: each reason --------------------------------------------------------------

def _declined(res_or_model, **kw):
    res = rewriter.rewrite(res_or_model, ["foldnorm"], **kw) if not isinstance(res_or_model, rewriter.Result) else res_or_model
    return res, [s.reason for s in res.records[0].declined]


def test_decline_residual(rng):
    """A norm on a graph input whose output also feeds a residual add is declined."""
    m = make_model(
        [bn_node("bn", "x", "h"), helper.make_node("MatMul", ["h", "W"], ["m"], name="mm"),
         helper.make_node("Add", ["m", "h"], ["y"], name="res")],
        [("x", [2, 4])], [("y", [2, 4])], [init("W", rng.standard_normal((4, 4)))] + bn_inits("bn", 4, rng))
    res, reasons = _declined(m)
    assert res.records[0].applied == []
    assert any("also feeds a residual add (res)" in r for r in reasons), reasons
    assert "BatchNormalization" in op_types(res.model)


def test_decline_graph_output(rng):
    """A norm whose output is also a graph output is declined."""
    m = make_model(
        [bn_node("bn", "x", "h"), helper.make_node("MatMul", ["h", "W"], ["y"], name="mm")],
        [("x", [2, 4])], [("y", [2, 4]), ("h", [2, 4])], [init("W", rng.standard_normal((4, 4)))] + bn_inits("bn", 4, rng))
    _, reasons = _declined(m)
    assert any("the normalized tensor is a graph output" in r for r in reasons), reasons


def test_decline_padded_conv_with_shift(rng):
    """A BN read by a zero-padded conv is declined: folding its shift is not exact."""
    m = make_model(
        [bn_node("bn", "x", "h"), helper.make_node("Conv", ["h", "W"], ["y"], pads=[1, 1, 1, 1], name="conv")],
        [("x", [1, 3, 5, 5])], [("y", [1, 2, 5, 5])], [init("W", rng.standard_normal((2, 3, 3, 3)))] + bn_inits("bn", 3, rng))
    _, reasons = _declined(m)
    assert any("conv with zero padding" in r and "not exact" in r for r in reasons), reasons


def test_decline_training_mode(rng):
    """A BatchNormalization in training mode is declined."""
    m = make_model(
        [bn_node("bn", "x", "y", training_mode=1)],
        [("x", [2, 4])], [("y", [2, 4])], bn_inits("bn", 4, rng), opset=15)
    res = rewriter.rewrite(m, ["foldnorm"], verify=False)
    reasons = [s.reason for s in res.records[0].declined]
    assert reasons and "training mode" in reasons[0]


def test_decline_channel_axis_mismatch(rng):
    """BN1d (channel axis 1) after a linear on 3-D input (feature axis -1) is declined,
    not folded into the wrong axis."""
    m = make_model(
        [helper.make_node("MatMul", ["x", "W"], ["h"], name="mm"), bn_node("bn", "h", "y")],
        [("x", [2, 4, 4])], [("y", [2, 4, 4])], [init("W", rng.standard_normal((4, 4)))] + bn_inits("bn", 4, rng))
    _, reasons = _declined(m)
    assert any("channel axis is not" in r for r in reasons), reasons


# -- zoo models, both IRs --------------------------------------------------------------

ZOO = ["bn-cnn", "un-transformer", "powernorm-transformer", "bn-transformer"]
NORM_OPS = {"BatchNormalization", "aten.batch_norm.default"}


@pytest.mark.parametrize("name", ZOO)
def test_zoo_onnx(name, tmp_path):
    """foldnorm on each zoo model exported to ONNX: no frozen norm left, outputs equal."""
    path = models_zoo.export_onnx(name, tmp_path / f"{name}.onnx")
    res = rewriter.rewrite(str(path), ["foldnorm"])
    assert res.passed and res.verification["max_rel_error"] <= TOL
    rec = res.records[0]
    assert rec.applied and not rec.declined
    ops = op_types(res.model)
    assert "BatchNormalization" not in ops
    # UN / PowerNorm: no division by the running statistic remains (PowerNorm keeps its
    # group scaling: one Div per norm, by the data-dependent RMS)
    n_norms = len(rec.applied)
    if name == "powernorm-transformer":
        assert ops.count("Div") == n_norms + 4  # group scaling + the 4 per-block attention ones
    # meaning, independently of the manager: ORT opt off on fresh inputs
    import onnx

    orig = onnx.load(path)
    ids = np.random.default_rng(1).integers(0, 97, (2, 16)).astype(np.int64)
    feeds = {"x": np.random.default_rng(1).standard_normal((2, 3, 16, 16)).astype(np.float32)} if name == "bn-cnn" else {"ids": ids}
    check_onnx_equal(orig, res.model, feeds)


@pytest.mark.parametrize("name", ZOO)
def test_zoo_torch(name):
    """foldnorm on each zoo model through torch.export: norms gone, outputs equal, and the
    GraphModule still trains (gradients reach the folded weights)."""
    module, inputs = models_zoo.build(name)
    res = rewriter.rewrite(module, ["foldnorm"], example_inputs=inputs)
    assert res.passed and res.records[0].applied
    gm = res.model
    targets = {str(n.target) for n in gm.graph.nodes}
    assert not targets & NORM_OPS
    if name in ("un-transformer", "powernorm-transformer"):
        assert not any("running" in n.target for n in gm.graph.nodes if n.op == "get_attr")
    with torch.no_grad():
        ref = module(*inputs)
        out = gm(*inputs)
    assert max_rel(ref.numpy(), out.numpy()) <= TOL
    tagged = [n for n in gm.graph.nodes if n.meta.get("rewriter", {}).get("pass") == "foldnorm"]
    assert tagged
    loss = gm(*inputs).float().pow(2).mean()
    loss.backward()
    rw = [p for name, p in gm.named_parameters() if name.startswith("_rw_")]
    assert rw and all(p.grad is not None for p in rw)


def test_symbolic_trace_fallback():
    """A module torch.export cannot capture goes through symbolic_trace; leaf modules are
    canonicalised and the BN still folds."""

    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 6)
            self.bn = nn.BatchNorm1d(6)

        def forward(self, x):
            return self.bn(self.fc(x))

    m = M().eval()
    with torch.no_grad():
        m.bn.running_mean.uniform_(-1, 1)
        m.bn.running_var.uniform_(0.5, 2)
    gm = torch.fx.symbolic_trace(m)
    from rewriter.ir.fx_view import canonicalize

    x = torch.randn(3, 4)
    from torch.fx.passes.shape_prop import ShapeProp

    gm = canonicalize(gm)
    ShapeProp(gm).propagate(x)
    res = rewriter.rewrite(gm, ["foldnorm"], example_inputs=(x,))
    assert res.records[0].applied
    assert not any(n.op == "call_module" for n in res.model.graph.nodes)
    assert max_rel(m(x).detach().numpy(), res.model(x).detach().numpy()) <= TOL


def test_torch_training_mode_declined():
    """A BatchNorm captured in training mode is declined with the reason."""
    m = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4)).train()
    view = FxView(capture(m, (torch.randn(8, 4),)), (torch.randn(8, 4),))
    from passes.foldnorm import FoldNorm

    sites = FoldNorm().match(view)
    assert sites and not sites[0].accepted and "training mode" in sites[0].reason


def test_decline_non_linear_reader(rng):
    """A norm on a graph input read by a non-linear op (Relu) is declined, naming it."""
    m = make_model(
        [bn_node("bn", "x", "h"), helper.make_node("Relu", ["h"], ["r"], name="relu"),
         helper.make_node("MatMul", ["r", "W"], ["y"], name="mm")],
        [("x", [2, 4])], [("y", [2, 4])], [init("W", rng.standard_normal((4, 4)))] + bn_inits("bn", 4, rng))
    _, reasons = _declined(m)
    assert any("not into the producer: the norm reads a graph input" in r for r in reasons), reasons
    assert any("is also read by other:Relu (relu)" in r for r in reasons), reasons


def test_external_data_kept(rng, tmp_path):
    """A model with external data is rewritten and saved with external data beside it."""
    import onnx

    m = make_model([helper.make_node("Gemm", ["x", "W"], ["h"], transB=1, name="g"), bn_node("bn", "h", "y")],
                   [("x", [2, 64])], [("y", [2, 64])], [init("W", rng.standard_normal((64, 64)))] + bn_inits("bn", 64, rng))
    src = tmp_path / "ext.onnx"
    orig = onnx.ModelProto()
    orig.CopyFrom(m)  # onnx.save with external data rewrites m in place
    onnx.save(m, src, save_as_external_data=True, all_tensors_to_one_file=True, location="ext.onnx.data",
              size_threshold=0)
    res = rewriter.rewrite(str(src), ["foldnorm"])
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    out = res.save(out_dir / "folded.onnx")
    assert (out_dir / "folded.onnx.data").exists()
    saved = onnx.load(out, load_external_data=False)
    assert any(t.data_location == onnx.TensorProto.EXTERNAL for t in saved.graph.initializer)
    feeds = {"x": rng.standard_normal((2, 64)).astype(np.float32)}
    check_onnx_equal(orig, onnx.load(out), feeds)
