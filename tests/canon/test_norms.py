"""``rewriter.canon``: norm chains from real exporters recognised as ``layer_norm`` /
``rms_norm``, and the stream passes applied through them.

Each file is built once per session from a real library class (transformers, small
configs, random weights) and a real exporter. Each case asserts the number of norms
recognised and the rule that matched, then runs a pass through ``rewriter.rewrite`` and
checks, independently of the library's own verification, the original against the
rewritten model in ONNX Runtime with its graph optimizations off: fp32 max rel err <= 1e-5
(fp16: 1e-2); and what is gone from the graph. Near misses (a mean over another axis, an
exponent of 3, a non-constant eps, an inner value read outside) must not be recognised.
"""

from __future__ import annotations

import collections

import numpy as np
import onnx
import onnx.version_converter
import onnx_ir as ir
import pytest
import torch
from onnx import TensorProto, helper

import rewriter
from rewriter.ir.onnx_view import OnnxView
from rewriter.loader import infer_shapes
from tests.canon import exports as E
from tests.conftest import init, make_model, max_rel, run_ort

FP32 = 1e-5


@pytest.fixture(scope="session")
def files(tmp_path_factory):
    """Exports built on first use, kept for the session."""
    root = tmp_path_factory.mktemp("canon")
    cache: dict[str, object] = {}

    def get(key: str):
        if key not in cache:
            build, kw = {
                "gpt2-ts14": (E.gpt2, dict(dynamo=False, opset=14)),
                "gpt2-ts17-dyn": (E.gpt2, dict(dynamo=False, opset=17, dynamic=True)),
                "vit-ts14": (E.vit, dict(dynamo=False, opset=14)),
                "llama-ts14": (E.llama, dict(dynamo=False, opset=14)),
                "llama-dynamo18": (E.llama, dict(dynamo=True, opset=18)),
                "llama-fp16-ts14": (lambda: E.llama(torch.float16), dict(dynamo=False, opset=14)),
                "gemma-dynamo18": (E.gemma, dict(dynamo=True, opset=18)),
            }[key]
            cache[key] = E.export(build, root / f"{key}.onnx", **kw)
        return cache[key]

    return get


def view_of(path) -> OnnxView:
    v = OnnxView(ir.load(str(path)))
    infer_shapes(v)
    return v


def norms(view) -> list:
    return [n for n in view.nodes() if n.op in ("layer_norm", "rms_norm")]


def feeds(path, seed: int = 1) -> dict:
    """Fresh inputs: token ids over the vocabulary, an all-ones mask, N(0, 1) pixels."""
    rng = np.random.default_rng(seed)
    names = [i.name for i in onnx.load(str(path), load_external_data=False).graph.input]
    if "pixels" in names:
        return {"pixels": rng.standard_normal((2, 3, 16, 16)).astype(np.float32)}
    return {"ids": rng.integers(0, 64, (2, 8)).astype(np.int64), "mask": np.ones((2, 8), np.int64)}


def ops(model) -> collections.Counter:
    if isinstance(model, ir.Model):
        return collections.Counter(n.op_type for n in model.graph.all_nodes())
    return collections.Counter(n.op_type for n in model.graph.node)


def rewrite_checked(path, pass_name: str, tol: float = FP32, **options):
    """Rewrite, then compare in ORT (optimizations off) on fresh inputs: the error."""
    res = rewriter.rewrite(str(path), [pass_name], options={pass_name: options} if options else None)
    rep = res.report["passes"][0]
    assert rep["applied"] > 0, rep["declined"]
    assert res.passed, res.verification
    f = feeds(path)
    want = run_ort(onnx.load(str(path)), f)
    got = run_ort(res.model, f)
    err = max(max_rel(a, b) for a, b in zip(want, got))
    assert err <= tol, err
    return res, rep


# -- recognition ------------------------------------------------------------------------
def test_gpt2_torchscript_opset14_layernorm_chains(files):
    """GPT-2 (2 layers) at opset 14: 5 LayerNorm chains (ReduceMean, Sub, Pow, ReduceMean,
    Add, Sqrt, Div, Mul, Add) recognised; loading does not change the graph."""
    path = files("gpt2-ts14")
    v = view_of(path)
    found = norms(v)
    assert len(found) == 5 and {n.op for n in found} == {"layer_norm"}
    assert {n.attrs["rule"] for n in found} == {"center+pow2+div+scale+shift"}
    assert ops(v.model) == ops(onnx.load(str(path)))  # nothing rewritten at load
    p = v.norm(found[0])
    assert p.width == 32 and p.eps == pytest.approx(1e-5) and p.weight is not None and p.bias is not None


def test_vit_torchscript_opset14(files):
    """ViT (2 layers) at opset 14: 2 x 2 pre-norms + the final norm recognised."""
    assert len(norms(view_of(files("vit-ts14")))) == 5


def test_gpt2_torchscript_opset17_dynamic_axes(files):
    """Opset 17 with dynamic axes writes LayerNormalization: 5 norms, no chain."""
    found = norms(view_of(files("gpt2-ts17-dyn")))
    assert len(found) == 5 and not any("canon" in n.attrs for n in found)


def test_llama_torchscript_rms_chain(files):
    """HF LlamaRMSNorm at opset 14 (Cast, Pow, ReduceMean, Add, Sqrt, Div(1, .), Mul, Cast,
    Mul): 5 RMSNorms, the gain read from the chain."""
    v = view_of(files("llama-ts14"))
    found = norms(v)
    assert len(found) == 5 and {n.op for n in found} == {"rms_norm"}
    assert all("pow2+div_one+cast+scale" in n.attrs["rule"] for n in found)
    p = v.norm(found[0])
    assert p.eps == pytest.approx(1e-6) and p.bias is None and not np.allclose(p.weight, 1)


def test_llama_dynamo_opset18_rms_chain(files):
    """The dynamo exporter's opset-18 RMS chain (Pow, ReduceMean, Add, Sqrt, Reciprocal,
    Mul, Mul): 5 RMSNorms."""
    found = norms(view_of(files("llama-dynamo18")))
    assert len(found) == 5 and {n.attrs["rule"] for n in found} == {"pow2+reciprocal+scale"}


def test_llama_fp16_casts(files):
    """fp16 Llama: the Cast to float32 and back belong to the chain; the norm's input and
    output are the fp16 stream values."""
    v = view_of(files("llama-fp16-ts14"))
    found = norms(v)
    assert len(found) == 5
    for n in found:
        assert n.inputs[0].dtype == ir.DataType.FLOAT16 and n.output.dtype == ir.DataType.FLOAT16
        assert n.attrs["rule"].endswith("cast+scale")


def test_gemma_one_plus_w(files):
    """Gemma's (1 + w) gain: the scale is Add(1, w) of a constant, read as 1 + w."""
    v = view_of(files("gemma-dynamo18"))
    found = norms(v)
    assert len(found) == 5 and {n.op for n in found} == {"rms_norm"}
    p = v.norm(found[0])
    # the exported gain folded from Add(1, w): w was drawn around 0, so 1 + w is around 1
    assert abs(float(p.weight.mean()) - 1) < 0.2 and not np.allclose(p.weight, 1)


# -- passes through recognised chains ------------------------------------------------------
def test_rms_on_gpt2_opset14(files):
    """rms through the chains: applied and exact; the model moves to opset 23 (no op left
    that changed meaning) and every chain is gone, replaced by RMSNormalization."""
    res, rep = rewrite_checked(files("gpt2-ts14"), "rms")
    after = ops(res.model)
    assert after["RMSNormalization"] == 5 and after["ReduceMean"] == 0 and after["Sqrt"] == 0
    assert after["Pow"] == 2  # the two GELU cubes stay
    assert res.model.opset_imports[""] == 23


def test_rms_on_gpt2_opset14_without_upgrade(files):
    """upgrade_opset=false keeps opset 14: the RMS chain is written with ReduceMean's axes
    as an attribute (the opset-14 form), exact."""
    res, _ = rewrite_checked(files("gpt2-ts14"), "rms", upgrade_opset="false")
    assert res.model.opset_imports[""] == 14
    assert ops(res.model)["Sub"] == 0  # no centring left: every norm is an RMSNorm chain
    onnx.checker.check_model(ir.serde.serialize_model(res.model))


@pytest.mark.parametrize("key", ["gpt2-ts14", "vit-ts14"])
def test_crms_on_torchscript_opset14(files, key):
    """crms through the chains: every LayerNorm chain becomes CRMSNormalization, the
    stream one channel narrower, exact."""
    res, _ = rewrite_checked(files(key), "crms")
    after = ops(res.model)
    assert after["CRMSNormalization"] == 5 and after["Sqrt"] == 0


@pytest.mark.parametrize("key,opset", [("gpt2-ts14", 14), ("gpt2-ts17-dyn", 17)])
def test_crms_function_spelled_for_the_model_opset(files, key, opset):
    """crms kept below opset 18 (no upgrade): the CRMSNormalization function imports the
    model's own opset and uses only ops and signatures of that opset (no CastLike / Shape
    start before 15, reduce axes as attributes before 18); the model is valid and exact."""
    res, _ = rewrite_checked(files(key), "crms", upgrade_opset="false")
    assert res.model.opset_imports[""] == opset
    fn = res.model.functions[("rewriter", "CRMSNormalization", "")]
    assert fn.opset_imports[""] == opset
    body = {n.op_type: n for n in fn}
    assert ("CastLike" in body) == (opset >= 15) and ("Cast" in body) == (opset < 15)
    assert "axes" in body["ReduceSumSquare"].attributes and len(body["ReduceSumSquare"].inputs) == 1
    assert ops(res.model)["CRMSNormalization"] == 5
    onnx.checker.check_model(ir.serde.serialize_model(res.model), full_check=True)


def test_rms_on_vit_opset14(files):
    """rms on the TorchScript ViT: exact, every LayerNorm chain replaced (one centring
    ReduceMean is inserted after the patch embedding, which its parameters cannot re-centre)."""
    res, _ = rewrite_checked(files("vit-ts14"), "rms")
    after = ops(res.model)
    assert after["RMSNormalization"] == 5 and after["Sqrt"] == 0 and after["ReduceMean"] == 1


def test_osplus_on_gpt2_opset14(files):
    """osplus migrates into the chains' own scale/shift constants: exact, op counts unchanged."""
    path = files("gpt2-ts14")
    res, rep = rewrite_checked(path, "osplus")
    assert rep["applied"] == 4
    assert ops(res.model) == ops(onnx.load(str(path)))


@pytest.mark.parametrize("key", ["llama-ts14", "llama-dynamo18"])
def test_llama_stream_passes(files, key):
    """Llama (both exporters): osplus applies to the 4 pre-norms (exact), lns to the 4
    pre-norms (its intended-change check passes), rms declines: the norms are RMSNorms."""
    path = files(key)
    _, rep = rewrite_checked(path, "osplus")
    assert rep["applied"] == 4
    res = rewriter.rewrite(str(path), ["lns"])
    assert res.passed and res.report["passes"][0]["applied"] == 4
    res = rewriter.rewrite(str(path), ["rms"])
    rep = res.report["passes"][0]
    assert rep["applied"] == 0 and "is an RMSNorm on the stream" in rep["declined"][0]["reason"]


def test_osplus_on_llama_fp16(files):
    """fp16 Llama: osplus through the cast chains, exact at the fp16 tolerance."""
    _, rep = rewrite_checked(files("llama-fp16-ts14"), "osplus", tol=1e-2)
    assert rep["applied"] == 4


def test_osplus_on_gemma(files):
    """Gemma (1 + w) norms: osplus exact; the new gain replaces 1 + w."""
    _, rep = rewrite_checked(files("gemma-dynamo18"), "osplus")
    assert rep["applied"] == 4


def test_lns_fold_adds_a_missing_gain():
    """An affine-free LayerNorm chain (opset 14, no Mul): lns fold adds the gain op to the
    chain; each norm output equals the original's x 1/sqrt(l)."""
    model = _prenorm_chain_model(affine=False)
    res = rewriter.rewrite(model, ["lns"])
    rep = res.report["passes"][0]
    assert res.passed and rep["applied"] == 2, rep
    assert ops(res.model)["Mul"] == ops(model)["Mul"] + 2


# -- FX -----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def llama_fx():
    module, args = E.llama()
    from rewriter.ir.fx_view import capture

    return module, args, capture(module, args)


def test_fx_llama_rms_chain_to_aten(llama_fx):
    """torch.export of HF Llama: the aten.pow/mean/add/rsqrt/mul chains (with the .to casts)
    become 5 aten.rms_norm calls, output equal within 1e-5."""
    module, args, gm = llama_fx
    targets = collections.Counter(str(n.target) for n in gm.graph.nodes if n.op == "call_function")
    assert targets["aten.rms_norm.default"] == 5
    assert targets["aten.rsqrt.default"] == 0 and targets["aten.pow.Tensor_Scalar"] == 0
    with torch.no_grad():
        assert max_rel(module(*args).numpy(), gm(*args).numpy()) <= FP32


def test_fx_llama_osplus_and_lns(llama_fx):
    """FX Llama: osplus exact on the 4 pre-norms, lns applied to them."""
    module, args, _ = llama_fx
    res = rewriter.rewrite(module, ["osplus"], example_inputs=args, ir_kind="torch")
    assert res.passed and res.report["passes"][0]["applied"] == 4
    with torch.no_grad():
        assert max_rel(module(*args).numpy(), res.model(*args).numpy()) <= FP32
    res = rewriter.rewrite(module, ["lns"], example_inputs=args, ir_kind="torch")
    assert res.passed and res.report["passes"][0]["applied"] == 4


def test_fx_gemma_one_plus_w():
    """torch.export of Gemma: the (1 + w) norms become aten.rms_norm with the 1 + w gain."""
    module, args = E.gemma()
    from rewriter.ir.fx_view import capture

    gm = capture(module, args)
    targets = collections.Counter(str(n.target) for n in gm.graph.nodes if n.op == "call_function")
    assert targets["aten.rms_norm.default"] == 5
    with torch.no_grad():
        assert max_rel(module(*args).numpy(), gm(*args).numpy()) <= FP32


# -- ONNX Runtime's fused norms --------------------------------------------------------------
def test_ort_optimized_gpt2_skip_layernorm_as_join_and_norm(files, tmp_path):
    """After onnxruntime's transformer optimizer (LayerNormalization + 4 com.microsoft
    SkipLayerNormalization, one with the fused c_proj bias): each Skip op is a residual
    join plus a norm, so 5 norms are found; rms splits the Skip ops into Add + RMSNorm and
    is exact; osplus (exact) and lns apply to the 4 pre-norms."""
    from onnxruntime.transformers.optimizer import optimize_model

    out = tmp_path / "opt.onnx"
    optimize_model(str(files("gpt2-ts14")), model_type="gpt2", num_heads=4, hidden_size=32).save_model_to_file(str(out))
    assert ops(onnx.load(str(out)))["SkipLayerNormalization"] == 4
    v = view_of(out)
    assert len(norms(v)) == 5
    assert sum(1 for n in v.nodes() if n.op == "add" and "skip" in n.attrs) == 4
    res, _ = rewrite_checked(out, "rms")
    after = ops(res.model)
    assert after["SkipLayerNormalization"] == 0 and after["RMSNormalization"] == 5
    _, rep = rewrite_checked(out, "osplus")
    assert rep["applied"] == 4
    res = rewriter.rewrite(str(out), ["lns"])
    assert res.passed and res.report["passes"][0]["applied"] == 4
    res, _ = rewrite_checked(out, "crms")
    assert ops(res.model)["CRMSNormalization"] == 5


def test_ort_optimized_llama_skip_simplified(files, tmp_path):
    """onnxruntime's optimizer on the dynamo Llama writes 4 com.microsoft
    SkipSimplifiedLayerNormalization and one default-domain SimplifiedLayerNormalization:
    5 RMSNorms; osplus exact and lns applied on the 4 pre-norms."""
    from onnxruntime.transformers.optimizer import optimize_model

    out = tmp_path / "opt.onnx"
    optimize_model(str(files("llama-dynamo18")), model_type="gpt2", num_heads=4,
                   hidden_size=32).save_model_to_file(str(out))
    counts = ops(onnx.load(str(out)))
    assert counts["SkipSimplifiedLayerNormalization"] == 4 and counts["SimplifiedLayerNormalization"] == 1
    found = norms(view_of(out))
    assert len(found) == 5 and {n.op for n in found} == {"rms_norm"}
    _, rep = rewrite_checked(out, "osplus")
    assert rep["applied"] == 4
    res = rewriter.rewrite(str(out), ["lns"])
    assert res.passed and res.report["passes"][0]["applied"] == 4


def test_ort_contrib_norms_recognised():
    """com.microsoft LayerNormalization / SimplifiedLayerNormalization and the default-domain
    SimplifiedLayerNormalization are norms with their epsilon and gain."""
    d = 8
    rng = np.random.default_rng(0)
    nodes = [helper.make_node("LayerNormalization", ["x", "g", "b"], ["y1"], domain="com.microsoft", epsilon=1e-3),
             helper.make_node("SimplifiedLayerNormalization", ["y1", "g"], ["y2"], domain="com.microsoft", epsilon=1e-4),
             helper.make_node("SimplifiedLayerNormalization", ["y2", "g"], ["y"], epsilon=1e-6)]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, d])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, d])],
                              [init("g", rng.random(d) + 0.5), init("b", rng.random(d))],
                              value_info=[helper.make_tensor_value_info(n, TensorProto.FLOAT, [2, d]) for n in ("y1", "y2")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)])
    v = OnnxView(ir.from_proto(model))
    found = norms(v)
    assert [n.op for n in found] == ["layer_norm", "rms_norm", "rms_norm"]
    assert [v.norm(n).eps for n in found] == pytest.approx([1e-3, 1e-4, 1e-6])


# -- near misses ----------------------------------------------------------------------------
def _ln_chain(axes=(-1,), var_axes=(-1,), exponent=2.0, eps_input=False, leak=False, opset=14, square="pow"):
    """x [2, 4, 8] -> the TorchScript LayerNorm chain, with one condition optionally broken."""
    d = 8
    nodes = [helper.make_node("ReduceMean", ["x"], ["mu"], axes=list(axes)),
             helper.make_node("Sub", ["x", "mu"], ["dx"]),
             helper.make_node("Pow", ["dx", "two"], ["sq"]) if square == "pow" else
             helper.make_node("Mul", ["dx", "dx"], ["sq"]),
             helper.make_node("ReduceMean", ["sq"], ["var"], axes=list(var_axes)),
             helper.make_node("Add", ["var", "eps"], ["ve"]),
             helper.make_node("Sqrt", ["ve"], ["sd"]),
             helper.make_node("Div", ["dx", "sd"], ["y"])]
    inits = [init("two", exponent)]
    inputs = [("x", [2, 4, 8])]
    outputs = [("y", [2, 4, 8])]
    if eps_input:
        inputs.append(("eps", []))
    else:
        inits.append(init("eps", 1e-5))
    if leak:
        outputs.append(("sq", [2, 4, 8]))
    return make_model(nodes, inputs, outputs, inits, opset=opset), d


@pytest.mark.parametrize("kw, why", [
    ({}, None),
    ({"var_axes": (1,)}, "not the last axis only"),
    ({"exponent": 3.0}, "exponent is 3, not 2"),
    ({"eps_input": True}, None),
    ({"leak": True}, "graph output"),
])
def test_near_misses_not_recognised(kw, why):
    """The plain chain is a LayerNorm; a variance over axis 1, an exponent of 3, an eps
    that is a graph input, or an inner value that is also a graph output is not a norm
    (with the reason where the op types fit)."""
    model, _ = _ln_chain(**kw)
    v = view_of_proto(model)
    found = norms(v)
    if not kw:
        assert len(found) == 1 and found[0].op == "layer_norm"
        return
    assert found == []
    if why is not None:
        assert any(why in r for _, r in v.canon_near_misses), v.canon_near_misses


def test_mul_self_square_and_opset18_axes_input():
    """d * d for the square, and (opset 18) ReduceMean axes as an input: still a LayerNorm."""
    model, _ = _ln_chain(square="mul")
    found = norms(view_of_proto(model))
    assert len(found) == 1 and found[0].attrs["rule"] == "center+mul_self+div"
    model = onnx.version_converter.convert_version(_ln_chain()[0], 18)
    assert any(len(n.input) == 2 for n in model.graph.node if n.op_type == "ReduceMean")
    found = norms(view_of_proto(model))
    assert len(found) == 1 and found[0].op == "layer_norm"


def test_centring_over_another_axis_is_not_a_layernorm():
    """x - mean(x, axis 1) is no centring over the channels: the chain is at most an
    RMSNorm of that difference, never a LayerNorm of x."""
    model, _ = _ln_chain(axes=(1,))
    found = norms(view_of_proto(model))
    assert [n.op for n in found] == ["rms_norm"] and found[0].inputs[0].name == "dx"


def view_of_proto(model) -> OnnxView:
    v = OnnxView(ir.from_proto(model))
    infer_shapes(v)
    return v


def _prenorm_chain_model(affine: bool = True):
    """A 2-block pre-LN stack at opset 14 with chain LayerNorms (affine-free unless
    ``affine``) and linear branches: x -> [x + W2 relu(W1 LN(x))] x 2 -> LN -> head."""
    rng = np.random.default_rng(0)
    d, nodes, inits = 8, [], [init("two", 2.0), init("eps", 1e-5)]

    def ln(x, p):
        nodes.extend([helper.make_node("ReduceMean", [x], [f"{p}_mu"], axes=[-1]),
                      helper.make_node("Sub", [x, f"{p}_mu"], [f"{p}_d"]),
                      helper.make_node("Pow", [f"{p}_d", "two"], [f"{p}_sq"]),
                      helper.make_node("ReduceMean", [f"{p}_sq"], [f"{p}_var"], axes=[-1]),
                      helper.make_node("Add", [f"{p}_var", "eps"], [f"{p}_ve"]),
                      helper.make_node("Sqrt", [f"{p}_ve"], [f"{p}_sd"]),
                      helper.make_node("Div", [f"{p}_d", f"{p}_sd"], [f"{p}_n"])])
        out = f"{p}_n"
        if affine:
            inits.extend([init(f"{p}_g", rng.random(d) + 0.5), init(f"{p}_b", rng.random(d))])
            nodes.extend([helper.make_node("Mul", [out, f"{p}_g"], [f"{p}_m"]),
                          helper.make_node("Add", [f"{p}_m", f"{p}_b"], [f"{p}_y"])])
            out = f"{p}_y"
        return out

    x = "x"
    for i in range(2):
        h = ln(x, f"ln{i}")
        inits += [init(f"w{i}a", rng.standard_normal((d, 16)) * 0.3), init(f"w{i}b", rng.standard_normal((16, d)) * 0.3)]
        nodes += [helper.make_node("MatMul", [h, f"w{i}a"], [f"h{i}a"]), helper.make_node("Relu", [f"h{i}a"], [f"h{i}r"]),
                  helper.make_node("MatMul", [f"h{i}r", f"w{i}b"], [f"h{i}b"]),
                  helper.make_node("Add", [x, f"h{i}b"], [f"x{i + 1}"])]
        x = f"x{i + 1}"
    h = ln(x, "lnf")
    inits.append(init("head", rng.standard_normal((d, 5))))
    nodes.append(helper.make_node("MatMul", [h, "head"], ["y"]))
    return make_model(nodes, [("x", [2, 4, d])], [("y", [2, 4, 5])], inits, opset=14)


def test_near_miss_named_in_the_decline():
    """rms on a model whose only norm-like chain has Pow(x, 3): declined, and the reason
    names the chain and the broken condition."""
    model, _ = _ln_chain(exponent=3.0)
    res = rewriter.rewrite(model, ["rms"])
    reason = res.report["passes"][0]["declined"][0]["reason"]
    assert res.report["passes"][0]["applied"] == 0
    assert "not recognised as norms" in reason and "exponent is 3, not 2" in reason, reason


class _HandLN(torch.nn.Module):
    """A LayerNorm written out (as in ConvNeXt's channels-first LayerNorm, over ``dim``)."""

    def __init__(self, d: int, dim: int = -1):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.w = torch.nn.Parameter(1 + 0.2 * torch.randn(d, generator=g))
        self.b = torch.nn.Parameter(0.2 * torch.randn(d, generator=g))
        self.dim = dim

    def forward(self, x):
        mu = x.mean(self.dim, keepdim=True)
        d = x - mu
        var = d.pow(2).mean(self.dim, keepdim=True)
        y = d / torch.sqrt(var + 1e-5)
        return y * self.w + self.b if self.dim == -1 else y


@pytest.mark.parametrize("dim, expect", [(-1, 1), (1, 0)])
def test_fx_decomposed_layernorm(dim, expect):
    """torch.export of a written-out LayerNorm over the last axis becomes aten.layer_norm
    (output equal within 1e-5); the same over axis 1 (channels-first) stays as it is."""
    from rewriter.ir.fx_view import capture

    module = _HandLN(8, dim).eval()
    x = torch.randn(2, 8, 8, generator=torch.Generator().manual_seed(1))
    gm = capture(module, (x,))
    targets = collections.Counter(str(n.target) for n in gm.graph.nodes if n.op == "call_function")
    assert targets["aten.layer_norm.default"] == expect
    assert targets["aten.sqrt.default"] == 1 - expect
    with torch.no_grad():
        assert max_rel(module(x).numpy(), gm(x).numpy()) <= FP32
