"""rettention on the files exporters write (issue 13, points 3 and 5): diffusers DiT and
PixArt (tiny configs, random weights) through the TorchScript exporter at opset 17, with a
fixed input shape and with dynamic axes; and onnxruntime's contrib attention ops."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

import rewriter
from passes.rettention import check_steps
from tests.conftest import max_rel, op_types, run_ort

OPTS = {"density": "0.25", "warmup": "1", "period": "2", "lam": "0.05"}  # band |i-j| <= 2 over N = 16
SAMPLE = [2, 4, 8, 8]  # 8x8 latents, patch 2: N = 16 tokens, 2 heads of 16


def _export(kind: str, path, dynamic: bool) -> None:
    import torch
    from diffusers import DiTTransformer2DModel, PixArtTransformer2DModel

    torch.manual_seed(0)
    common = dict(num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=4, num_layers=2,
                  sample_size=8, patch_size=2, norm_num_groups=1)
    if kind == "dit":
        model = DiTTransformer2DModel(num_embeds_ada_norm=10, **common).eval()
        extra_name, extra = "class_labels", torch.tensor([1, 2])

        def call(x, t, y):
            return model(x, timestep=t, class_labels=y, return_dict=False)[0]
    else:
        model = PixArtTransformer2DModel(cross_attention_dim=32, caption_channels=24, use_additional_conditions=False,
                                         **common).eval()
        extra_name, extra = "encoder_hidden_states", torch.randn(2, 6, 24)

        def call(x, t, e):
            return model(x, encoder_hidden_states=e, timestep=t, return_dict=False)[0]

    class Wrap(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.m = model

        def forward(self, x, t, e):
            return call(x, t, e)

    axes = None
    if dynamic:
        axes = {"sample": {0: "batch", 2: "height", 3: "width"}, "timestep": {0: "batch"}, extra_name: {0: "batch"},
                "out": {0: "batch", 2: "height", 3: "width"}}
    with torch.no_grad():
        torch.onnx.export(Wrap(), (torch.randn(*SAMPLE), torch.tensor([3, 5]), extra), str(path), dynamo=False,
                          opset_version=17, input_names=["sample", "timestep", extra_name], output_names=["out"],
                          dynamic_axes=axes)


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    """The three files, exported once for this module."""
    d = tmp_path_factory.mktemp("diffusers")
    out = {}
    for kind, dynamic in (("dit", False), ("dit", True), ("pixart", False)):
        path = d / f"{kind}{'_dyn' if dynamic else ''}.onnx"
        _export(kind, path, dynamic)
        out[path.stem] = path
    return out


def _feeds(kind: str, rng) -> dict[str, np.ndarray]:
    f = {"sample": rng.standard_normal(SAMPLE).astype(np.float32), "timestep": np.array([3, 5], np.int64)}
    if kind == "dit":
        f["class_labels"] = np.array([1, 2], np.int64)
    else:
        f["encoder_hidden_states"] = rng.standard_normal((2, 6, 24)).astype(np.float32)
    return f


def _check_rewrite(path, res, kind, rng, n_sites):
    """Structure (Rettention calls in, the attention Softmaxes out), the default (dense) step
    against the original in ORT with optimizations off, and every sparse / refresh step
    against the float64 formula."""
    assert res.passed and len(res.records[0].applied) == n_sites
    ops = op_types(res.model)
    assert sum(o.startswith("Rettention") for o in ops) == n_sites  # one function per (scale, N, ...) config
    assert ops.count("Softmax") == op_types(onnx.load(path)).count("Softmax") - n_sites
    feeds = _feeds(kind, rng)
    want = run_ort(onnx.load(path), feeds)[0]
    got = run_ort(res.model, feeds)[0]
    # the dense step computes the same attention in another op order: fp32 rounding over
    # 16 keys and 2 layers of 64-wide linears, far inside rettention's 1e-4 budget
    assert max_rel(want, got) <= 1e-4
    recs = check_steps(res.view, feeds, 5)
    assert [r["phase"] for r in recs] == ["dense", "refresh", "sparse", "refresh", "sparse"]
    assert max(r["max_rel_error"] for r in recs) <= 1e-4


def test_dit_fixed_shape_export(exports, rng):
    """A fixed-shape DiT export: H, N, Dh follow from the static inputs (no --shape needed); both self-attentions rewritten."""
    res = rewriter.rewrite(str(exports["dit"]), ["rettention"], options={"rettention": OPTS})
    _check_rewrite(exports["dit"], res, "dit", rng, 2)
    for site in res.records[0].applied:
        assert "H=2, N=16, Dh=16" in site.reason and "assumed" not in site.reason
    assert "assumed_shapes" not in res.report


def test_dit_dynamic_axes_need_shape(exports, rng):
    """Dynamic axes: declined without --shape (inference left the shapes open, --shape suggested); with it, applied, the dims reported as assumed, signature kept."""
    path = exports["dit_dyn"]
    res = rewriter.rewrite(str(path), ["rettention"], options={"rettention": OPTS})
    assert not res.records[0].applied
    assert all("shape inference left the heads, tokens or head width unknown" in s.reason and "--shape" in s.reason
               for s in res.records[0].declined)
    res = rewriter.rewrite(str(path), ["rettention"], options={"rettention": OPTS}, shapes={"sample": SAMPLE})
    _check_rewrite(path, res, "dit", rng, 2)
    assert res.report["assumed_shapes"]["inputs"] == {"sample": SAMPLE, "timestep": [2], "class_labels": [2]}
    assert res.report["assumed_shapes"]["symbols"] == {"batch": 2, "height": 8, "width": 8}
    for site in res.records[0].applied:
        assert "H=2, N=16, Dh=16 assumed from the given input shapes" in site.reason
    assert any("the output keeps the file's dynamic signature" in n for n in res.verification["notes"])
    sample = next(v for v in res.model.graph.inputs if v.name == "sample")
    assert [str(d) for d in sample.shape] == ["batch", "4", "height", "width"]
    out = next(v for v in res.model.graph.outputs if v.name == "out")
    assert not out.shape.is_static()


def test_dit_dynamic_axes_shape_from_inputs_file(exports, tmp_path, rng):
    """The arrays of --inputs specialise the dims like --shape does."""
    np.savez(tmp_path / "in.npz", **_feeds("dit", rng))
    res = rewriter.rewrite(str(exports["dit_dyn"]), ["rettention"], options={"rettention": OPTS},
                           inputs=str(tmp_path / "in.npz"))
    assert res.passed and len(res.records[0].applied) == 2
    assert res.report["assumed_shapes"]["inputs"]["sample"] == SAMPLE


def test_pixart_self_applied_cross_declined(exports, rng):
    """PixArt: the two self-attentions are rewritten, the two cross-attentions (6 text tokens) declined with the reason."""
    res = rewriter.rewrite(str(exports["pixart"]), ["rettention"], options={"rettention": OPTS})
    _check_rewrite(exports["pixart"], res, "pixart", rng, 2)
    assert all("attn1" in s.site for s in res.records[0].applied)
    declined = res.records[0].declined
    assert len(declined) == 2 and all("attn2" in s.site for s in declined)
    assert all("cross-attention (6 keys for 16 queries)" in s.reason for s in declined)


def _contrib_model(rng, op: str):
    """x [1, 16, 32] -> com.microsoft ``op`` (2 heads) -> y, beside a plain self-attention chain on x."""
    d, n, h = 32, 16, 2

    def w(name, shape):
        return helper.make_tensor(name, TensorProto.FLOAT, shape, (rng.standard_normal(shape) * 0.2).ravel().tolist())

    inits = [w("Wq", [d, d]), w("Wk", [d, d]), w("Wv", [d, d]), w("Wqkv", [d, 3 * d]), w("bqkv", [3 * d]),
             helper.make_tensor("hs", TensorProto.INT64, [4], [1, n, h, d // h]),
             helper.make_tensor("back", TensorProto.INT64, [3], [1, n, d]),
             helper.make_tensor("scale", TensorProto.FLOAT, [], [0.25])]
    nodes = [helper.make_node("MatMul", ["x", "Wq"], ["q0"], name="q"), helper.make_node("MatMul", ["x", "Wk"], ["k0"], name="k"),
             helper.make_node("MatMul", ["x", "Wv"], ["v0"], name="v")]
    for t in "qkv":
        nodes += [helper.make_node("Reshape", [f"{t}0", "hs"], [f"{t}1"], name=f"{t}_heads"),
                  helper.make_node("Transpose", [f"{t}1"], [f"{t}2"], perm=[0, 2, 1, 3] if t != "k" else [0, 2, 3, 1],
                                   name=f"{t}_t")]
    nodes += [helper.make_node("MatMul", ["q2", "k2"], ["s0"], name="qk"), helper.make_node("Mul", ["s0", "scale"], ["s1"], name="sc"),
              helper.make_node("Softmax", ["s1"], ["p"], axis=-1, name="softmax"),
              helper.make_node("MatMul", ["p", "v2"], ["o0"], name="pv"),
              helper.make_node("Transpose", ["o0"], ["o1"], perm=[0, 2, 1, 3], name="o_t"),
              helper.make_node("Reshape", ["o1", "back"], ["y0"], name="o_merge")]
    if op == "Attention":
        nodes.append(helper.make_node("Attention", ["x", "Wqkv", "bqkv"], ["y1"], domain="com.microsoft", num_heads=h,
                                      name="fused"))
    else:
        nodes.append(helper.make_node("MultiHeadAttention", ["q0", "k0", "v0"], ["y1"], domain="com.microsoft",
                                      num_heads=h, name="fused"))
    nodes.append(helper.make_node("Add", ["y0", "y1"], ["y"], name="join"))
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, n, d])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, n, d])], inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid("com.microsoft", 1)])
    m.ir_version = 10
    return onnx.shape_inference.infer_shapes(m)


@pytest.mark.parametrize("op", ["Attention", "MultiHeadAttention"])
def test_contrib_attention_declined_by_name(op, rng):
    """A com.microsoft attention op is a declined site naming the op; the plain chain beside it is still rewritten."""
    m = _contrib_model(rng, op)
    res = rewriter.rewrite(m, ["rettention"], options={"rettention": OPTS})
    assert res.passed and [s.site for s in res.records[0].applied] == ["softmax"]
    declined = {s.site: s.reason for s in res.records[0].declined}
    assert f"com.microsoft {op} (an onnxruntime contrib op" in declined["fused"]
    ops = op_types(res.model)
    assert op in ops and "Rettention" in ops and "Softmax" not in ops
    x = rng.standard_normal((1, 16, 32)).astype(np.float32)
    assert max_rel(run_ort(m, {"x": x})[0], run_ort(res.model, {"x": x})[0]) <= 1e-4


def test_group_query_attention_declined_by_name(rng):
    """GroupQueryAttention (not run here: its cache inputs) is declined by name by the matcher."""
    from rewriter.canon.attention import find_attention
    from rewriter.ir.onnx_view import OnnxView
    import onnx_ir as ir

    m = _contrib_model(rng, "MultiHeadAttention")
    fused = next(n for n in m.graph.node if n.name == "fused")
    fused.op_type = "GroupQueryAttention"
    sites = find_attention(OnnxView(ir.from_proto(m)))
    reasons = {s.name: s.reason for s in sites}
    assert reasons["softmax"] == ""
    assert "com.microsoft GroupQueryAttention" in reasons["fused"]
