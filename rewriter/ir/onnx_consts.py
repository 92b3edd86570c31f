"""Constant folding on an ONNX graph (layer 3, beside ``rewriter/ir/onnx_view.py``): a node
whose inputs are all constant (initializers, Constant ops, and only the static shape or the
dtype of a ``Shape`` / ``CastLike`` input) is evaluated once with onnx's reference
evaluator, within a size bound; ``OnnxView.const_value`` caches the result."""

from __future__ import annotations

import logging

import numpy as np
import onnx_ir as ir
from onnx.reference import ReferenceEvaluator

from rewriter.ir.onnx_reader import map_array

log = logging.getLogger(__name__)

# Ops cheap and safe to evaluate when all their inputs are constant.
_MAX_CONST_ELEMS = 1 << 24


def _np_dtype(dtype: ir.DataType) -> np.dtype:
    return dtype.numpy()


def _read_tensor(t: ir.TensorProtocol) -> np.ndarray:
    """The tensor as an array; an external one through ``onnx_reader.map_array`` (a private
    memory map that lives as long as the returned array)."""
    return map_array(t) if isinstance(t, ir.ExternalTensor) else t.numpy()


NONDETERMINISTIC = ("RandomNormal", "RandomUniform", "RandomNormalLike", "RandomUniformLike", "Multinomial",
                    "Bernoulli")


def foldable(node: ir.Node | None) -> bool:
    """Whether constant folding may evaluate ``node``: a standard-domain op, no subgraph
    attribute, not a random op."""
    return (node is not None and node.domain in ("", "ai.onnx") and node.op_type not in NONDETERMINISTIC
            and not any(a.type in (ir.AttributeType.GRAPH, ir.AttributeType.GRAPHS) for a in node.attributes.values()))


def read_inputs(node: ir.Node):
    """``(input, how)`` for each input of ``node`` in the order folding reads them: ``how`` is
    ``"shape"`` (only the static shape is read: ``Shape`` / ``Size``), ``"dtype"`` (only the
    dtype: ``CastLike``'s second input), ``"value"`` (the constant itself) or None (absent).
    ``_eval_const`` and ``OnnxView``'s ancestors-first walk both follow it."""
    for v in node.inputs:
        if v is None:
            yield v, None
        elif node.op_type in ("Shape", "Size") and v is node.inputs[0] and v.shape is not None and v.shape.is_static():
            yield v, "shape"
        elif node.op_type == "CastLike" and v is node.inputs[1] and v.dtype is not None:
            yield v, "dtype"
        else:
            yield v, "value"


def _eval_const(view, value: ir.Value) -> np.ndarray | None:
    if value.const_value is not None:
        if value.is_graph_input():
            return None  # an initializer overridable by a graph input
        return value.const_value.numpy()
    node = value.producer()
    if not foldable(node):
        return None
    if node.op_type == "Constant" and "value" in node.attributes:
        return node.attributes["value"].as_tensor().numpy()
    args = []
    for v, how in read_inputs(node):
        if how is None:
            args.append(None)
            continue
        if how == "shape":
            args.append(np.zeros([int(d) for d in v.shape], dtype=_np_dtype(v.dtype)))
            continue
        if how == "dtype":
            args.append(np.zeros((), dtype=_np_dtype(v.dtype)))
            continue
        c = view.const_value(v)
        if c is None or c.size > _MAX_CONST_ELEMS:
            return None
        args.append(c)
    try:
        proto = ir.serde.serialize_node(node)
        feeds = {}
        for i, (v, a) in enumerate(zip(node.inputs, args)):
            if v is not None:
                proto.input[i] = f"in{i}"
                feeds[f"in{i}"] = a
        for i in range(len(proto.output)):
            proto.output[i] = f"out{i}"
        opset = node.version or view.opset
        results = ReferenceEvaluator(proto, opsets={"": opset}).run(None, feeds)
        return np.asarray(results[value.index()])
    except Exception as err:  # noqa: BLE001 - constant folding is best effort
        log.debug("could not evaluate %s: %s", node.name, err)
        return None
