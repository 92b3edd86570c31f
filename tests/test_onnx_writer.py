"""The streaming single-file writer: the same model as ``onnx_ir.save`` writes."""

from __future__ import annotations

import ml_dtypes
import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper, numpy_helper

from rewriter.ir import onnx_writer
from rewriter.ir.onnx_writer import save_single_file


def _model(rng) -> ir.Model:
    big = rng.standard_normal((64, 300)).astype(np.float32)  # 76.8 kB: streamed
    g = helper.make_graph(
        [helper.make_node("MatMul", ["x", "W"], ["h"], name="mm"),
         helper.make_node("Add", ["h", "b"], ["y"], name="add", doc_string="bias")],
        "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 64])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 300])],
        [numpy_helper.from_array(big, "W"), numpy_helper.from_array(rng.standard_normal(300).astype(np.float32), "b")],
        doc_string="a graph")
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 18)], producer_name="test")
    m.ir_version = 10
    helper.set_model_props(m, {"k": "v"})
    model = ir.from_proto(m)
    # in-memory (numpy-backed) tensors, as a rewrite leaves them; one with metadata, and
    # float16, bfloat16 and int8 ones
    for v in list(model.graph.initializers.values()):
        v.const_value = ir.tensor(v.const_value.numpy().copy(), name=v.name)
    model.graph.initializers["W"].const_value.metadata_props["origin"] = "rewriter"
    extra = {"w16": rng.standard_normal((300, 300)).astype(np.float16),
             "bf": rng.standard_normal((300, 300)).astype(ml_dtypes.bfloat16), "i8": rng.integers(-9, 9, (300, 300)).astype(np.int8)}
    for name, a in extra.items():
        v = ir.Value(name=name, shape=ir.Shape(a.shape), type=ir.TensorType(ir.DataType.from_numpy(a.dtype)),
                     const_value=ir.tensor(a, name=name))
        model.graph.register_initializer(v)
    return model


def test_streamed_file_is_the_same_model(tmp_path, rng):
    model = _model(rng)
    save_single_file(model, tmp_path / "s.onnx")
    ir.save(model, tmp_path / "r.onnx")
    onnx.checker.check_model(str(tmp_path / "s.onnx"))
    a, b = onnx.load(tmp_path / "s.onnx"), onnx.load(tmp_path / "r.onnx")
    ia = {t.name: t for t in a.graph.initializer}
    ib = {t.name: t for t in b.graph.initializer}
    assert ia.keys() == ib.keys() == {"W", "b", "w16", "bf", "i8"}
    for k in ia:
        assert ia[k] == ib[k], k
        want = model.graph.initializers[k].const_value.numpy()
        assert np.array_equal(numpy_helper.to_array(ia[k]).view(np.uint8), want.view(np.uint8)), k
    assert dict((p.key, p.value) for p in ia["W"].metadata_props) == {"origin": "rewriter"}
    del a.graph.initializer[:]
    del b.graph.initializer[:]
    assert a == b  # nodes, I/O, doc strings, opsets, metadata
    # and the model object is as it was (no placeholder left behind)
    assert all(isinstance(v.const_value, ir.Tensor) for v in model.graph.initializers.values())


def test_streaming_is_used_for_large_tensors_only(monkeypatch, tmp_path, rng):
    model = _model(rng)
    seen = []
    real = onnx_writer._stream_array

    def spy(t):
        a = real(t)
        seen.append((t.name, a is not None))
        return a

    monkeypatch.setattr(onnx_writer, "_stream_array", spy)
    save_single_file(model, tmp_path / "s.onnx")
    assert dict(seen) == {"W": True, "b": False, "w16": True, "bf": True, "i8": True}


@pytest.fixture
def rng():
    return np.random.default_rng(0)
