"""Shared test helpers: build ONNX graphs by hand, run them in ORT with optimizations off."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper, numpy_helper


def run_ort(model, feeds):
    """Run an ONNX model (ModelProto or onnx_ir.Model) with ORT graph optimizations off."""
    import onnxruntime as ort

    if isinstance(model, ir.Model):
        model = ir.serde.serialize_model(model)
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    sess = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    return sess.run(None, feeds)


def max_rel(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / max(np.abs(a).max(), 1e-30))


def op_types(model) -> list[str]:
    if isinstance(model, ir.Model):
        return [n.op_type for n in model.graph.all_nodes()]
    return [n.op_type for n in model.graph.node]


def init(name, array):
    return numpy_helper.from_array(np.asarray(array, dtype=np.float32), name)


def make_model(nodes, inputs, outputs, inits, opset=18):
    """A ModelProto from nodes; inputs/outputs are (name, shape) pairs of float32."""
    graph = helper.make_graph(
        nodes, "g",
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, s) for n, s in inputs],
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, s) for n, s in outputs],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 10
    return onnx.shape_inference.infer_shapes(model)


def bn_inits(prefix, c, rng):
    return [
        init(f"{prefix}.scale", rng.standard_normal(c) * 0.5 + 1),
        init(f"{prefix}.bias", rng.standard_normal(c) * 0.3),
        init(f"{prefix}.mean", rng.standard_normal(c) * 0.5),
        init(f"{prefix}.var", rng.random(c) * 2 + 0.2),
    ]


def bn_node(prefix, x, y, **attrs):
    return helper.make_node("BatchNormalization", [x, f"{prefix}.scale", f"{prefix}.bias", f"{prefix}.mean", f"{prefix}.var"],
                            [y], name=prefix, epsilon=1e-3, **attrs)


@pytest.fixture
def rng():
    return np.random.default_rng(0)
