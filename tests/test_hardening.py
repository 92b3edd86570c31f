"""Bad-input corpus and safety: each case gives its documented exit code, one line naming
the problem, no traceback, no output file, and leaves the input file untouched."""

from __future__ import annotations

import hashlib
import json
import os

import jsonschema
import ml_dtypes
import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper, numpy_helper

import rewriter
from rewriter.run import shadow
from rewriter.cli import main
from rewriter.ir.onnx_view import OnnxView
from rewriter.report_schema import REPORT_SCHEMA
from rewriter.run.verify import InputSpec, Runner, load_inputs
from tests.conftest import bn_inits, bn_node, init, make_model, max_rel, run_ort


def _gemm_bn(rng, x_shape=(2, 4), extra_inputs=(), opset=18):
    return make_model([helper.make_node("Gemm", ["x", "W"], ["h"], transB=1, name="g"), bn_node("bn", "h", "y")],
                      [("x", list(x_shape)), *extra_inputs], [("y", [x_shape[0], 3])],
                      [init("W", rng.standard_normal((3, 4)))] + bn_inits("bn", 3, rng), opset=opset)


def _unknown_domain(rng):
    g = helper.make_graph([helper.make_node("Foo", ["x"], ["y"], domain="com.acme", name="foo")], "g",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 4])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 4])])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid("com.acme", 1)])
    m.ir_version = 10
    return m


def _duplicate_names(rng):
    m = _gemm_bn(rng)
    m.graph.node[1].name = "g"
    return m


def _external(rng, tmp_path, location):
    m = _gemm_bn(rng)
    onnx.save(m, tmp_path / "m.onnx", save_as_external_data=True, location="m.onnx.data", size_threshold=0)
    m = onnx.load(tmp_path / "m.onnx", load_external_data=False)
    for t in m.graph.initializer:
        for e in t.external_data:
            if e.key == "location":
                e.value = location
    return m


def _bf16(m):
    """A copy of ``m`` with every float32 initializer, input, output and value made bfloat16."""
    m = onnx.ModelProto.FromString(m.SerializeToString())
    for t in m.graph.initializer:
        if t.data_type == TensorProto.FLOAT:
            t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(t).astype(ml_dtypes.bfloat16), t.name))
    for v in list(m.graph.input) + list(m.graph.output) + list(m.graph.value_info):
        if v.type.tensor_type.elem_type == TensorProto.FLOAT:
            v.type.tensor_type.elem_type = TensorProto.BFLOAT16
    return m


def _prenorm(rng, d=8, vocab=16, t=4, b=2, hidden=16):
    """A one-block pre-LN transformer: ids -> tok + pos -> x + MLP(LN(x)) -> LN -> head."""
    def ln(p, x, y):
        return helper.make_node("LayerNormalization", [x, f"{p}.g", f"{p}.b"], [y], name=p, axis=-1, epsilon=1e-5)

    nodes = [helper.make_node("Gather", ["tok", "ids"], ["e"], name="emb"),
             helper.make_node("Add", ["e", "pos"], ["x0"], name="addpos"), ln("ln1", "x0", "h"),
             helper.make_node("MatMul", ["h", "W1"], ["a0"], name="fc1"),
             helper.make_node("Add", ["a0", "c1"], ["a"], name="fc1b"), helper.make_node("Relu", ["a"], ["r"], name="act"),
             helper.make_node("MatMul", ["r", "W2"], ["o0"], name="fc2"),
             helper.make_node("Add", ["o0", "c2"], ["o"], name="fc2b"), helper.make_node("Add", ["x0", "o"], ["x1"], name="res"),
             ln("lnf", "x1", "hf"), helper.make_node("MatMul", ["hf", "Wh"], ["y"], name="head")]
    inits = [init("tok", rng.standard_normal((vocab, d))), init("pos", 0.5 * rng.standard_normal((t, d))),
             init("ln1.g", 1 + 0.3 * rng.standard_normal(d)), init("ln1.b", 0.2 * rng.standard_normal(d)),
             init("W1", rng.standard_normal((d, hidden)) / d**0.5), init("c1", 0.1 * rng.standard_normal(hidden)),
             init("W2", rng.standard_normal((hidden, d)) / hidden**0.5), init("c2", 0.1 * rng.standard_normal(d)),
             init("lnf.g", 1 + 0.3 * rng.standard_normal(d)), init("lnf.b", 0.2 * rng.standard_normal(d)),
             init("Wh", rng.standard_normal((d, vocab)) / d**0.5)]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("ids", TensorProto.INT64, [b, t])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [b, t, vocab])], inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 18)])
    m.ir_version = 10
    return onnx.shape_inference.infer_shapes(m)


def _write(tmp_path, case, rng):
    """Write the model file of ``case`` and return its name."""
    path = tmp_path / "m.onnx"
    if case == "valid protobuf, not a model":
        onnx.save_tensor(numpy_helper.from_array(np.zeros(3, np.float32)), path)
    elif case == "unknown domain":
        onnx.save(_unknown_domain(rng), path)
    elif case == "old opset":
        onnx.save(make_model([helper.make_node("Relu", ["x"], ["y"])], [("x", [2, 4])], [("y", [2, 4])], [], opset=6), path)
    elif case == "duplicate node names":
        onnx.save(_duplicate_names(rng), path)
    elif case == "missing external data":
        m = _external(rng, tmp_path, "m.onnx.data")
        onnx.save(m, path)
        (tmp_path / "m.onnx.data").unlink()
    elif case == "external data escapes":
        m = _external(rng, tmp_path, "../escape.data")
        onnx.save(m, path)
    elif case == "bfloat16 model with a float32 weight":
        m = _bf16(_gemm_bn(rng))
        m.graph.initializer[0].CopyFrom(init("W", rng.standard_normal((3, 4))))
        onnx.save(m, path)
    else:
        onnx.save(_gemm_bn(rng), path)
    return "m.onnx"


CASES = [
    ("valid protobuf, not a model", [], 2, "holds no ONNX graph"),
    ("unknown domain", [], 2, "unknown operator domain 'com.acme'"),
    ("old opset", [], 2, "opset 6 is older than the oldest supported"),
    ("duplicate node names", [], 2, "duplicate node name(s) 'g'"),
    ("missing external data", [], 2, "external data file 'm.onnx.data'"),
    ("external data escapes", [], 2, "lies outside the model's directory"),
    ("bfloat16 model with a float32 weight", [], 2, "Gemm) bound to different types (tensor(bfloat16) and tensor(float)"),
    ("inputs wrong shape", ["--inputs", "shape.npz"], 2, "has shape [3, 4], the model expects [2, 4]"),
    ("inputs wrong dtype", ["--inputs", "dtype.npz"], 2, "has dtype float64, the model expects float32"),
    ("output not writable", ["-o", "afile/out.onnx"], 2, "is not writable"),
    ("calibration file too small", ["--calib", "small.npz"], 2, "calibration file too small or ragged"),
    ("calibration wrong dtype", ["--calib", "dtype.npz"], 2, "--calib dtype.npz: x has dtype float64"),
    ("unknown option", ["--set", "foldnorm.speed=3"], 2, "has no option 'speed'"),
    ("option for a pass not requested", ["--set", "other.x=1"], 2, "unknown pass 'other'"),
]


@pytest.mark.parametrize("case,extra,code,needle", CASES, ids=[c[0] for c in CASES])
def test_bad_input_corpus(case, extra, code, needle, tmp_path, monkeypatch, capsys, rng):
    """Each bad input: its exit code, one line naming the problem, no output, input intact."""
    name = _write(tmp_path, case, rng)
    np.savez(tmp_path / "shape.npz", x=np.zeros((3, 4), np.float32))
    np.savez(tmp_path / "dtype.npz", x=np.zeros((2, 4), np.float64))
    np.savez(tmp_path / "small.npz", x=np.zeros((1, 4), np.float32))
    (tmp_path / "afile").write_text("not a directory")
    digest = hashlib.sha256((tmp_path / name).read_bytes()).hexdigest()
    before = set(os.listdir(tmp_path))
    monkeypatch.chdir(tmp_path)
    rc = main([name, "--passes", "foldnorm", *extra])
    err = capsys.readouterr().err
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    assert rc == code, err
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err, err
    assert needle in lines[0], lines[0]
    assert set(os.listdir(tmp_path)) == before
    assert hashlib.sha256((tmp_path / name).read_bytes()).hexdigest() == digest


def test_dynamic_dims_default_and_note(rng):
    """Dynamic dims without --shape default to 2 and the report says so (documented: exit 0)."""
    res = rewriter.rewrite(_gemm_bn(rng, x_shape=("batch", 4)), ["foldnorm"])
    assert res.passed and res.verification["inputs"]["x"] == [2, 4]
    assert any("dynamic dim batch set to 2" in n for n in res.verification["notes"])
    res = rewriter.rewrite(_gemm_bn(rng, x_shape=("batch", 4)), ["foldnorm"], shapes={"x": [5, 4]})
    assert res.verification["inputs"]["x"] == [5, 4] and not any("set to" in n for n in res.verification["notes"])
    assert res.report["assumed_shapes"]["inputs"] == {"x": [5, 4]}  # the analysis saw batch = 5 too


def test_graph_input_shadowing_initializer_is_not_folded(rng):
    """An initializer overridable by a graph input is not a constant: the norm is declined."""
    m = _gemm_bn(rng, extra_inputs=[("bn.scale", [3])])
    res = rewriter.rewrite(m, ["foldnorm"])
    assert not res.records[0].applied
    assert "non-constant statistics" in res.records[0].declined[0].reason


def test_fp16_model(rng):
    """An fp16 model folds (in float64, cast back once) within the fp16 tolerance."""
    m = _gemm_bn(rng)
    for t in m.graph.initializer:
        t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(t).astype(np.float16), t.name))
    for v in list(m.graph.input) + list(m.graph.output) + list(m.graph.value_info):
        v.type.tensor_type.elem_type = TensorProto.FLOAT16
    res = rewriter.rewrite(m, ["foldnorm"])
    assert res.passed and res.records[0].applied
    assert res.verification["outputs"][0]["tolerance"] == 1e-2
    x = rng.standard_normal((2, 4)).astype(np.float16)
    assert max_rel(run_ort(m, {"x": x})[0], run_ort(res.model, {"x": x})[0]) <= 1e-2


BF16_CASES = [("foldnorm", "BatchNormalization", "Gemm"), ("rms", "LayerNormalization", "RMSNormalization"),
              ("crms", "LayerNormalization", "CRMSNormalization")]


@pytest.mark.parametrize("pass_name,gone,kept", BF16_CASES, ids=[c[0] for c in BF16_CASES])
def test_bf16_model_verified_through_float32_shadow(pass_name, gone, kept, tmp_path, monkeypatch, capsys, rng):
    """A bf16 model (ORT on CPU has no bf16 Gemm/MatMul/Add): exit 0, verified through a
    float32 shadow and said so; the output stays bf16 and means the same within 2e-2 when
    evaluated in bf16 (onnx reference evaluator); the input file is untouched."""
    from onnx.reference import ReferenceEvaluator

    m = _bf16(_gemm_bn(rng) if pass_name == "foldnorm" else _prenorm(rng))
    onnx.save(m, tmp_path / "m.onnx")
    digest = hashlib.sha256((tmp_path / "m.onnx").read_bytes()).hexdigest()
    monkeypatch.chdir(tmp_path)
    rc = main(["m.onnx", "--passes", pass_name, "-o", "out.onnx", "--json", "r.json"])
    out = capsys.readouterr()
    assert rc == 0, out.err
    assert "verified through a float32 shadow" in " ".join(out.out.split())
    report = json.loads((tmp_path / "r.json").read_text())
    jsonschema.validate(report, REPORT_SCHEMA)
    v = report["verification"]
    assert v["passed"] and v["shadow"] == "float32" and report["passes"][0]["verification"]["shadow"] == "float32"
    assert any("float32 shadow" in n for n in v["notes"])
    assert [o["tolerance"] for o in v["outputs"]] == [2e-2] and 0 < v["max_rel_error"] <= 2e-2
    assert hashlib.sha256((tmp_path / "m.onnx").read_bytes()).hexdigest() == digest
    res = onnx.load(tmp_path / "out.onnx")
    floats = {TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.DOUBLE, TensorProto.BFLOAT16}
    assert {t.data_type for t in res.graph.initializer if t.data_type in floats} == {TensorProto.BFLOAT16}
    assert res.graph.output[0].type.tensor_type.elem_type == TensorProto.BFLOAT16
    ops = [n.op_type for n in res.graph.node]
    assert gone not in ops and kept in ops and report["passes"][0]["applied"] > 0
    feeds = ({"x": rng.standard_normal((2, 4)).astype(ml_dtypes.bfloat16)} if pass_name == "foldnorm" else
             {"ids": rng.integers(0, 16, (2, 4)).astype(np.int64)})
    want, got = ReferenceEvaluator(m).run(None, feeds)[0], ReferenceEvaluator(res).run(None, feeds)[0]
    assert want.dtype == got.dtype == ml_dtypes.bfloat16
    assert max_rel(want, got) <= 2e-2


def test_float32_shadow_keeps_bf16_values_exactly(rng):
    """The shadow: every bf16 initializer, constant, Cast target and type made float32 with the
    same values; the model itself untouched; Runner returns bf16 outputs through it."""
    from onnx.reference import ReferenceEvaluator

    w = rng.standard_normal((2, 4)).astype(ml_dtypes.bfloat16)
    c = numpy_helper.from_array(rng.standard_normal(4).astype(ml_dtypes.bfloat16))
    g = helper.make_graph(
        [helper.make_node("Cast", ["x"], ["xb"], to=TensorProto.BFLOAT16, name="cast"),
         helper.make_node("Constant", [], ["c"], value=c, name="const"),
         helper.make_node("Add", ["xb", "c"], ["s"], name="add"), helper.make_node("Mul", ["s", "W"], ["y"], name="mul")],
        "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 4])],
        [helper.make_tensor_value_info("y", TensorProto.BFLOAT16, [2, 4])], [numpy_helper.from_array(w, "W")])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 18)])
    m.ir_version = 10
    model = ir.from_proto(m)
    sh = shadow.float32_shadow(model)
    assert shadow.holds_bfloat16(model) and not shadow.holds_bfloat16(sh)
    assert sh.graph.initializers["W"].const_value.dtype == ir.DataType.FLOAT
    assert np.array_equal(sh.graph.initializers["W"].const_value.numpy(), w.astype(np.float32))
    nodes = {n.name: n for n in sh.graph}
    assert nodes["cast"].attributes["to"].value == ir.DataType.FLOAT
    assert np.array_equal(nodes["const"].attributes["value"].value.numpy(), numpy_helper.to_array(c).astype(np.float32))
    assert {n.name: n for n in model.graph}["cast"].attributes["to"].value == ir.DataType.BFLOAT16
    x = rng.standard_normal((2, 4)).astype(np.float32)
    got = Runner(OnnxView(model))({"x": x})
    assert got.shadow == "float32" and got["y"].dtype == ml_dtypes.bfloat16
    assert max_rel(ReferenceEvaluator(m).run(None, {"x": x})[0], got["y"]) <= 1e-2


def test_bf16_inputs_file(tmp_path):
    """--inputs for a bf16 input: float32 (rounded) or np.savez's raw bf16 records; else exit-2 message."""
    spec = [InputSpec("x", [2, 4], np.dtype(ml_dtypes.bfloat16))]
    x = np.arange(8, dtype=np.float32).reshape(2, 4) / 3
    np.savez(tmp_path / "f32.npz", x=x)
    np.savez(tmp_path / "raw.npz", x=x.astype(ml_dtypes.bfloat16))
    np.savez(tmp_path / "f64.npz", x=x.astype(np.float64))
    for name in ("f32.npz", "raw.npz"):
        got = load_inputs(str(tmp_path / name), spec)["x"]
        assert got.dtype == ml_dtypes.bfloat16 and np.array_equal(got, x.astype(ml_dtypes.bfloat16))
    with pytest.raises(rewriter.BadInput, match=r"has dtype float64, the model expects bfloat16 \(or float32\)"):
        load_inputs(str(tmp_path / "f64.npz"), spec)


def test_control_flow_declined_with_reason(rng):
    """An If node is reported as a declined site; a norm before it still folds correctly,
    its readers inside the subgraphs included."""
    then_g = helper.make_graph([helper.make_node("Relu", ["x"], ["t"])], "then", [],
                               [helper.make_tensor_value_info("t", TensorProto.FLOAT, [2, 3])])
    else_g = helper.make_graph([helper.make_node("Neg", ["x"], ["e"])], "else", [],
                               [helper.make_tensor_value_info("e", TensorProto.FLOAT, [2, 3])])
    g = helper.make_graph(
        [helper.make_node("Gemm", ["x0", "W"], ["h"], transB=1, name="g"), bn_node("bn", "h", "x"),
         helper.make_node("If", ["c"], ["y"], then_branch=then_g, else_branch=else_g, name="if")],
        "g", [helper.make_tensor_value_info("x0", TensorProto.FLOAT, [2, 4]),
              helper.make_tensor_value_info("c", TensorProto.BOOL, [])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3])],
        [init("W", rng.standard_normal((3, 4)))] + bn_inits("bn", 3, rng))
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 18)])
    m.ir_version = 10
    res = rewriter.rewrite(m, ["foldnorm"])
    declined = {s.site: s.reason for s in res.records[0].declined}
    assert declined["if"] == "control flow (If): its subgraphs are not rewritten"
    assert res.records[0].applied and res.passed
    x0 = rng.standard_normal((2, 4)).astype(np.float32)
    for c in (True, False):
        feeds = {"x0": x0, "c": np.array(c)}
        assert max_rel(run_ort(m, feeds)[0], run_ort(res.model, feeds)[0]) <= 1e-5


def test_reader_inside_subgraph_blocks_folding_into_readers(rng):
    """A norm read inside an If subgraph is never folded into its top-level readers only."""
    then_g = helper.make_graph([helper.make_node("Relu", ["h"], ["t"])], "then", [],
                               [helper.make_tensor_value_info("t", TensorProto.FLOAT, [2, 4])])
    else_g = helper.make_graph([helper.make_node("Neg", ["h"], ["e"])], "else", [],
                               [helper.make_tensor_value_info("e", TensorProto.FLOAT, [2, 4])])
    g = helper.make_graph(
        [bn_node("bn", "x", "h"), helper.make_node("MatMul", ["h", "W"], ["y"], name="mm"),
         helper.make_node("If", ["c"], ["z"], then_branch=then_g, else_branch=else_g, name="if")],
        "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 4]),
              helper.make_tensor_value_info("c", TensorProto.BOOL, [])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 4]),
         helper.make_tensor_value_info("z", TensorProto.FLOAT, [2, 4])],
        [init("W", rng.standard_normal((4, 4)))] + bn_inits("bn", 4, rng))
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 18)])
    m.ir_version = 10
    res = rewriter.rewrite(m, ["foldnorm"])
    bn = [s for s in res.records[0].declined if s.site == "bn"]
    assert bn and "also read by other:subgraph:" in bn[0].reason


def test_bf16_bench_is_a_one_line_error(tmp_path, monkeypatch, capsys, rng):
    """--bench on a bf16 model (no bf16 Gemm kernel in ORT on CPU): exit 2, one line naming
    the missing kernel, no output file, input untouched."""
    onnx.save(_bf16(_gemm_bn(rng)), tmp_path / "m.onnx")
    digest = hashlib.sha256((tmp_path / "m.onnx").read_bytes()).hexdigest()
    before = set(os.listdir(tmp_path))
    monkeypatch.chdir(tmp_path)
    rc = main(["m.onnx", "--passes", "foldnorm", "-o", "out.onnx", "--bench"])
    err = capsys.readouterr().err
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    assert rc == 2, err
    assert len(lines) == 1 and "Traceback" not in err and "no kernel for Gemm" in lines[0], err
    assert set(os.listdir(tmp_path)) == before
    assert hashlib.sha256((tmp_path / "m.onnx").read_bytes()).hexdigest() == digest


@pytest.mark.parametrize("name,pass_name,gone", [("bn-cnn", "foldnorm", "batch_norm"), ("prenorm-gpt", "rms", "layer_norm")])
def test_bf16_torch_model(name, pass_name, gone):
    """A bf16 torch module: parameters folded in float64 and written back as bf16, verified at
    the bfloat16 tolerance (not float32's), and the rewritten module means the same in bf16."""
    import torch

    import models_zoo

    module, example = models_zoo.build(name)
    module = module.to(torch.bfloat16)
    example = tuple(e.to(torch.bfloat16) if e.is_floating_point() else e for e in example)
    res = rewriter.rewrite(module, [pass_name], example_inputs=example)
    assert res.passed and res.records[0].applied
    assert [o["tolerance"] for o in res.verification["outputs"]] == [2e-2]
    gm = res.model
    targets = " ".join(str(n.target) for n in gm.graph.nodes if n.op == "call_function")
    assert gone not in targets
    assert {p.dtype for p in gm.parameters()} | {b.dtype for b in gm.buffers() if b.is_floating_point()} == {torch.bfloat16}
    with torch.no_grad():
        want, got = module(*example).float().numpy(), gm(*example).float().numpy()
    assert max_rel(want, got) <= 2e-2
