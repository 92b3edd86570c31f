"""Zero-copy loading of one-file models (``rewriter.ir.onnx_reader``): large weights become
references into the model file itself, read lazily; everything a user sees is the same
model, and the output is a self-contained one-file model."""

from __future__ import annotations

import hashlib
import os

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import helper

import rewriter
from rewriter.cli import main
from rewriter.ir import onnx_reader
from rewriter.ir.onnx_reader import is_mapped, load_mapped
from rewriter.ir.onnx_view import OnnxView
from tests.conftest import bn_inits, bn_node, init, make_model, max_rel, run_ort


def _model(rng) -> onnx.ModelProto:
    """Gemm (a 64 kB+ weight: mapped) -> BatchNorm (small params: inline) -> Relu -> Gemm
    (another mapped weight, which foldnorm leaves unchanged)."""
    return make_model(
        [helper.make_node("Gemm", ["x", "W", "b"], ["h"], name="fc", transB=1), bn_node("bn", "h", "z"),
         helper.make_node("Relu", ["z"], ["r"], name="relu"),
         helper.make_node("Gemm", ["r", "W2"], ["y"], name="fc2", transB=1)],
        [("x", [2, 128])], [("y", [2, 120])],
        [init("W", rng.standard_normal((160, 128)) * 0.1), init("b", rng.standard_normal(160)),
         init("W2", rng.standard_normal((120, 160)) * 0.1)] + bn_inits("bn", 160, rng))


def test_load_mapped_maps_large_weights_only(tmp_path, rng):
    onnx.save(_model(rng), tmp_path / "m.onnx")
    m, ref = load_mapped(tmp_path / "m.onnx"), ir.load(tmp_path / "m.onnx")
    assert m is not None
    mapped = {n for n, v in m.graph.initializers.items() if is_mapped(v.const_value)}
    assert mapped == {"W", "W2"}
    for name, v in m.graph.initializers.items():
        assert np.array_equal(v.const_value.numpy(), ref.graph.initializers[name].const_value.numpy()), name
    assert not OnnxView(m, tmp_path / "m.onnx").external_data  # mapped weights are not external data
    # the rest of the model is what onnx-ir loads
    a, b = ir.serde.serialize_model(m), ir.serde.serialize_model(ref)
    del a.graph.initializer[:]
    del b.graph.initializer[:]
    assert a == b


def test_load_mapped_declines_what_it_does_not_handle(tmp_path, rng):
    """No large weight, external data, or bytes that are not a model: None (the caller then
    uses onnx-ir's loader and its errors)."""
    small = make_model([helper.make_node("Relu", ["x"], ["y"])], [("x", [2])], [("y", [2])], [])
    onnx.save(small, tmp_path / "small.onnx")
    assert load_mapped(tmp_path / "small.onnx") is None
    onnx.save(_model(rng), tmp_path / "ext.onnx", save_as_external_data=True, all_tensors_to_one_file=True,
              location="ext.data", size_threshold=0)
    assert load_mapped(tmp_path / "ext.onnx") is None
    (tmp_path / "junk.onnx").write_bytes(os.urandom(4096))
    assert load_mapped(tmp_path / "junk.onnx") is None
    (tmp_path / "empty.onnx").write_bytes(b"")
    assert load_mapped(tmp_path / "empty.onnx") is None
    data = (tmp_path / "m.onnx")
    onnx.save(_model(rng), data)
    (tmp_path / "cut.onnx").write_bytes(data.read_bytes()[:-100])
    assert load_mapped(tmp_path / "cut.onnx") is None


def test_cli_rewrite_of_mapped_model_is_self_contained(tmp_path, monkeypatch, rng):
    """The CLI maps the input's weights, writes a one-file output (no .data), leaves the
    input untouched, and the output means the same in ORT."""
    proto = _model(rng)
    onnx.save(proto, tmp_path / "m.onnx")
    digest = hashlib.sha256((tmp_path / "m.onnx").read_bytes()).hexdigest()
    calls = []
    real = onnx_reader._mapped_proto
    monkeypatch.setattr("rewriter.ir.onnx_reader._mapped_proto", lambda p: calls.append(p) or real(p))
    monkeypatch.chdir(tmp_path)
    assert main(["m.onnx", "--passes", "foldnorm", "-o", "out.onnx", "-q"]) == 0
    assert calls and all(c is not None for c in map(real, calls)) and sorted(os.listdir(tmp_path)) == ["m.onnx", "out.onnx"]
    assert hashlib.sha256((tmp_path / "m.onnx").read_bytes()).hexdigest() == digest
    out = onnx.load(tmp_path / "out.onnx")
    assert all(t.data_location != onnx.TensorProto.EXTERNAL for t in out.graph.initializer)
    assert "BatchNormalization" not in [n.op_type for n in out.graph.node]
    w2 = [t for t in out.graph.initializer if t.name == "W2"]  # unchanged: streamed from the map
    assert len(w2) == 1 and np.array_equal(onnx.numpy_helper.to_array(w2[0]),
                                           onnx.numpy_helper.to_array(proto.graph.initializer[2]))
    x = {"x": rng.standard_normal((2, 128)).astype(np.float32)}
    assert max_rel(run_ort(proto, x)[0], run_ort(out, x)[0]) <= 1e-5


def test_api_result_model_is_self_contained(tmp_path, rng):
    """A rewrite of a path hands back a model that serializes with its weights inline."""
    proto = _model(rng)
    onnx.save(proto, tmp_path / "m.onnx")
    res = rewriter.rewrite(str(tmp_path / "m.onnx"), ["foldnorm"])
    assert res.passed
    model = res.model
    assert not any(isinstance(v.const_value, ir.ExternalTensor) for v in model.graph.initializers.values())
    x = {"x": rng.standard_normal((2, 128)).astype(np.float32)}
    assert max_rel(run_ort(proto, x)[0], run_ort(model, x)[0]) <= 1e-5


@pytest.fixture
def rng():
    return np.random.default_rng(0)


def test_diff_of_two_mapped_files_compares_content(tmp_path, rng):
    """`rewrite diff A B` on two one-file models: mapped weights are compared by content,
    not by where they live."""
    import json

    proto = _model(rng)
    onnx.save(proto, tmp_path / "a.onnx")
    onnx.save(proto, tmp_path / "b.onnx")
    proto.graph.initializer[2].raw_data = (onnx.numpy_helper.to_array(proto.graph.initializer[2]) + 1).tobytes()
    onnx.save(proto, tmp_path / "c.onnx")
    assert main(["diff", str(tmp_path / "a.onnx"), str(tmp_path / "b.onnx"), "--json", str(tmp_path / "ab.json")]) == 0
    assert main(["diff", str(tmp_path / "a.onnx"), str(tmp_path / "c.onnx"), "--json", str(tmp_path / "ac.json")]) == 0
    same = json.loads((tmp_path / "ab.json").read_text())["diff"]["nodes"]
    other = json.loads((tmp_path / "ac.json").read_text())["diff"]["nodes"]
    assert not same["changed"]
    assert [c["name"] for c in other["changed"]] == ["fc2"] and other["changed"][0]["what"] == ["parameters"]


def test_mapped_4bit_weight_is_written_inline(tmp_path, rng):
    """A large int4 initializer is mapped like any other; the writer, which cannot stream a
    packed type, reads it in: the output never points back at the input file."""
    import ml_dtypes

    from rewriter.ir.onnx_writer import save_single_file

    q = rng.integers(-8, 8, (300, 500)).astype(ml_dtypes.int4)  # 75 kB packed
    g = helper.make_graph([helper.make_node("Cast", ["Q"], ["y"], to=onnx.TensorProto.FLOAT, name="c")], "g", [],
                          [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [300, 500])],
                          [onnx.numpy_helper.from_array(q, "Q")])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 21)])
    m.ir_version = 10
    onnx.save(m, tmp_path / "q.onnx")
    model = load_mapped(tmp_path / "q.onnx")
    assert model is not None and is_mapped(model.graph.initializers["Q"].const_value)
    save_single_file(model, tmp_path / "out.onnx")
    out = onnx.load(tmp_path / "out.onnx")
    assert out.graph.initializer[0].data_location != onnx.TensorProto.EXTERNAL
    assert np.array_equal(onnx.numpy_helper.to_array(out.graph.initializer[0]).astype(np.int8), q.astype(np.int8))
    assert is_mapped(model.graph.initializers["Q"].const_value)  # the model is left as it was
    onnx_reader.materialize(model)  # Result.model's path: packed values read, not mapped as bytes
    got = model.graph.initializers["Q"].const_value
    assert not is_mapped(got) and np.array_equal(got.numpy().astype(np.int8), q.astype(np.int8))
