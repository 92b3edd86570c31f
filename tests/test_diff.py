"""The graph diff (rewriter.diff) on tiny hand-built ONNX graphs."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from rewriter.diff import graph_diff, statuses
from rewriter.ir.onnx_view import PROVENANCE_PASS, PROVENANCE_REPLACED


def _model(nodes, inits, *, width: int = 4, out_width: int = 4, extra_inputs=(), outputs=None, infer=True):
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, width])
    ins = [x] + [helper.make_tensor_value_info(n, TensorProto.FLOAT, s) for n, s in extra_inputs]
    outs = outputs or [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, out_width])]
    g = helper.make_graph(nodes, "g", ins, outs, [numpy_helper.from_array(a, n) for n, a in inits.items()])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 18)])
    return onnx.shape_inference.infer_shapes(m) if infer else m


def _w(shape, seed=0):
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def _base():
    """x -> MatMul(W) -> Add(b) -> Relu -> Mul(s) -> y"""
    nodes = [helper.make_node("MatMul", ["x", "W"], ["h"], name="mm"),
             helper.make_node("Add", ["h", "b"], ["hb"], name="bias"),
             helper.make_node("Relu", ["hb"], ["r"], name="relu"),
             helper.make_node("Mul", ["r", "s"], ["y"], name="scale")]
    return nodes, {"W": _w((4, 4)), "b": _w((4,), 1), "s": _w((4,), 2)}


def _names(entries):
    return sorted(e["name"] for e in entries)


def test_identical_models_have_no_changes():
    """A model diffed against itself: nothing added, removed or changed; every node matched by name."""
    nodes, inits = _base()
    m = _model(nodes, inits)
    d = graph_diff(m, m)
    assert d["nodes"]["added"] == d["nodes"]["removed"] == d["nodes"]["changed"] == []
    assert d["nodes"]["unchanged"] == 4
    assert d["nodes"]["matched_by"] == {"provenance": 0, "name": 4, "topology": 0}
    assert d["widths"] == [] and d["io"]["inputs"] == {"added": [], "removed": [], "changed": []}
    assert d["params"] == {"before": 24, "after": 24} and d["bytes"] == {"before": 96, "after": 96}


def test_removed_and_rewired_node():
    """Dropping the Relu: it is removed, and its reader is 'changed' with what == ['inputs']."""
    nodes, inits = _base()
    a = _model(nodes, inits)
    nodes2 = [nodes[0], nodes[1], helper.make_node("Mul", ["hb", "s"], ["y"], name="scale")]
    d = graph_diff(a, _model(nodes2, inits))
    assert _names(d["nodes"]["removed"]) == ["relu"]
    assert d["nodes"]["added"] == []
    (ch,) = d["nodes"]["changed"]
    assert ch["name"] == "scale" and ch["what"] == ["inputs"]
    assert d["op_counts"]["before"]["Relu"] == 1 and "Relu" not in d["op_counts"]["after"]


def test_added_node_and_changed_weights():
    """A new Sigmoid is added; a MatMul whose weight changed is 'changed' with 'parameters'."""
    nodes, inits = _base()
    a = _model(nodes, inits)
    inits2 = dict(inits, W=_w((4, 4), 7))
    nodes2 = nodes[:3] + [helper.make_node("Sigmoid", ["r"], ["sg"], name="gate"),
                          helper.make_node("Mul", ["sg", "s"], ["y"], name="scale")]
    d = graph_diff(a, _model(nodes2, inits2))
    assert [(e["name"], e["op"]) for e in d["nodes"]["added"]] == [("gate", "Sigmoid")]
    changed = {e["name"]: e["what"] for e in d["nodes"]["changed"]}
    assert changed == {"mm": ["parameters"], "scale": ["inputs"]}
    assert d["params"] == {"before": 24, "after": 24}


def test_provenance_attributes_changes_to_the_pass():
    """A tagged node is matched by provenance; the nodes it replaced are removed *by that pass*."""
    nodes, inits = _base()
    a = _model(nodes, inits)
    fused = helper.make_node("Gemm", ["x", "W2", "b"], ["y"], name="fused")
    fused.metadata_props.add(key=PROVENANCE_PASS, value="fuse")
    fused.metadata_props.add(key=PROVENANCE_REPLACED, value="mm,bias,relu,scale")
    d = graph_diff(a, _model([fused], {"W2": _w((4, 4), 3), "b": inits["b"]}))
    (add,) = d["nodes"]["added"]
    assert add == {"name": "fused", "op": "Gemm", "pass": "fuse", "replaced": ["mm", "bias", "relu", "scale"]}
    assert {e["name"]: e.get("pass") for e in d["nodes"]["removed"]} == {
        "mm": "fuse", "bias": "fuse", "relu": "fuse", "scale": "fuse"}
    assert d["params"] == {"before": 24, "after": 20}


def test_in_place_tag_is_a_change_by_provenance():
    """A node a pass changed in place (same name, tagged) is 'changed' by provenance, with the pass."""
    nodes, inits = _base()
    a = _model(nodes, inits)
    mm = helper.make_node("MatMul", ["x", "W"], ["h"], name="mm")
    mm.metadata_props.add(key=PROVENANCE_PASS, value="p")
    d = graph_diff(a, _model([mm] + nodes[1:], inits))
    (ch,) = d["nodes"]["changed"]
    assert ch == {"name": "mm", "op": "MatMul", "what": ["tagged"], "matched_by": "provenance", "pass": "p"}


def test_renamed_nodes_match_by_topology():
    """Nodes renamed (no provenance) are matched by their position in the graph, not reported as churn."""
    nodes, inits = _base()
    a = _model(nodes, inits)
    renamed = [helper.make_node(n.op_type, list(n.input), list(n.output), name=f"other_{i}") for i, n in enumerate(nodes)]
    d = graph_diff(a, _model(renamed, inits))
    assert d["nodes"]["added"] == d["nodes"]["removed"] == d["nodes"]["changed"] == []
    assert d["nodes"]["matched_by"]["topology"] == 4


def test_width_change_and_io_signature():
    """Widening the hidden layer 4 -> 8 shows in 'widths' (params and activations) and the I/O diff."""
    def build(width):
        nodes = [helper.make_node("MatMul", ["x", "W1"], ["h"], name="up"),
                 helper.make_node("Relu", ["h"], ["r"], name="relu"),
                 helper.make_node("MatMul", ["r", "W2"], ["y"], name="down")]
        return _model(nodes, {"W1": _w((4, width)), "W2": _w((width, 4))})

    d = graph_diff(build(4), build(8))
    widths = {w["tensor"]: w for w in d["widths"]}
    assert widths["W1"]["before"] == [4, 4] and widths["W1"]["after"] == [4, 8] and widths["W1"]["kind"] == "param"
    assert widths["W1"]["axes"] == [1]
    assert widths["h"]["kind"] == "activation" and widths["h"]["after"] == [2, 8]
    assert widths["W2"]["axes"] == [0]
    changed = {e["name"]: e["what"] for e in d["nodes"]["changed"]}
    assert changed == {"up": ["parameters", "shape"], "relu": ["shape"], "down": ["parameters"]}
    assert d["params"] == {"before": 32, "after": 64}
    assert d["io"]["outputs"]["changed"] == []


def test_io_signature_changes():
    """An added graph input and a changed output shape are reported in 'io'."""
    nodes, inits = _base()
    a = _model(nodes, inits)
    out = [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, "n"])]
    b = _model(nodes, inits, extra_inputs=[("cache", [1, 4])], outputs=out, infer=False)
    d = graph_diff(a, b)
    assert [e["name"] for e in d["io"]["inputs"]["added"]] == ["cache"]
    (ch,) = d["io"]["outputs"]["changed"]
    assert ch["before"]["shape"] == [2, 4] and ch["after"]["shape"] == [2, "n"]


def test_statuses_for_pictures():
    """statuses() colours removed nodes in the before graph and added ones in the after graph."""
    nodes, inits = _base()
    a = _model(nodes, inits)
    nodes2 = nodes[:3] + [helper.make_node("Sigmoid", ["r"], ["sg"], name="gate"),
                          helper.make_node("Mul", ["sg", "s"], ["y"], name="scale")]
    before, after = statuses(graph_diff(a, _model(nodes2, inits)))
    assert after["gate"] == "added" and after["scale"] == "rewired" and "gate" not in before


def test_param_sameness_by_identity_or_content():
    """Without copy-on-write knowledge, parameters are compared by content; a rewrite's own
    diff compares in-memory tensors by identity (a new tensor means a written parameter) and
    never reads them."""
    import numpy as np
    import onnx_ir as ir

    from rewriter.diff import Param

    a = ir.tensor(np.arange(6, dtype=np.float32))
    b = ir.tensor(np.arange(6, dtype=np.float32))
    reads = []

    def param(t):
        def source():
            reads.append(t)
            return t.numpy()
        return Param((6,), "FLOAT", source, 6, 24, t)

    assert param(a).same(param(a), copy_on_write=True) and not reads
    assert not param(a).same(param(b), copy_on_write=True) and not reads
    assert param(a).same(param(b)) and len(reads) == 2
    c = ir.tensor(np.arange(1, 7, dtype=np.float32))
    assert not param(a).same(param(c))
    assert not Param((3,), "FLOAT", "x", 3, 12).same(Param((6,), "FLOAT", "x", 6, 24))
