"""Tiny hand-built ONNX models for the report, bench and check tests (fast: no export)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper


def conv_bn(path: str | Path, *, channels: int = 8, with_bn: bool = True) -> Path:
    """x[1,3,8,8] -> Conv -> BatchNormalization (frozen, foldable) -> Relu -> y."""
    rng = np.random.default_rng(0)
    inits = {"W": rng.standard_normal((channels, 3, 3, 3)).astype(np.float32)}
    nodes = [helper.make_node("Conv", ["x", "W"], ["c"], name="conv", pads=[1, 1, 1, 1])]
    if with_bn:
        inits.update({"g": (rng.random(channels) + 0.5).astype(np.float32),
                      "b": rng.standard_normal(channels).astype(np.float32),
                      "m": rng.standard_normal(channels).astype(np.float32),
                      "v": (rng.random(channels) + 0.5).astype(np.float32)})
        nodes.append(helper.make_node("BatchNormalization", ["c", "g", "b", "m", "v"], ["n"], name="bn"))
    nodes.append(helper.make_node("Relu", ["n" if with_bn else "c"], ["y"], name="relu"))
    graph = helper.make_graph(
        nodes, "tiny", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, channels, 8, 8])],
        [numpy_helper.from_array(a, k) for k, a in inits.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 10
    onnx.save(onnx.shape_inference.infer_shapes(model), str(path))
    return Path(path)
