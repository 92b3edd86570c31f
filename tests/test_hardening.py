"""Bad-input corpus and safety: each case gives its documented exit code, one line naming
the problem, no traceback, no output file, and leaves the input file untouched."""

from __future__ import annotations

import hashlib
import os

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import rewriter
from rewriter.cli import main
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
    assert res.verification["inputs"]["x"] == [5, 4] and not res.verification["notes"]


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
