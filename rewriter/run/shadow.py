"""The float32 shadow of a bfloat16 ONNX model, for verification only.

ONNX Runtime's CPU provider has no bfloat16 kernel for most ops (``Add``, ``MatMul``,
``Gemm``, ``LayerNormalization``, ...), so a bfloat16 model cannot be run to verify a
rewrite. Its *shadow* is a copy in which every bfloat16 tensor becomes float32:
initializers and constant attributes (``Constant``, ``ConstantOfShape``), the element
type of every value (graph inputs, outputs, intermediates, subgraphs, model-local
functions) and the dtype attributes that name bfloat16 (``Cast.to``, ``EyeLike.dtype``,
``Random*.dtype``). bfloat16 -> float32 is exact, so the shadow holds *the same* parameter
values, the bfloat16-rounded ones that a rewrite wrote; only the activations are computed
in float32 instead of being rounded to bfloat16 after each op (the same for both models).

``verify.Runner`` runs every model that holds bfloat16 through its shadow, the original
and each rewritten model alike (a like-for-like comparison), after checking that ONNX
Runtime loads the real model (types resolve; a missing bfloat16 kernel is the expected
error). Feeds are rounded to bfloat16 first and outputs are returned as bfloat16, so the
comparison uses the bfloat16 tolerance. A shadow is never saved: the output stays bfloat16.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping

import numpy as np
import onnx_ir as ir

BF16 = ir.DataType.BFLOAT16
F32 = ir.DataType.FLOAT
_BF16_NP = BF16.numpy()  # ml_dtypes.bfloat16
NOTE = ("bfloat16 model: verified through a float32 shadow of the original and of the rewritten "
        "model (ONNX Runtime on CPU has no bfloat16 kernels for most ops): the bfloat16 parameters "
        "and inputs exactly, activations in float32, outputs rounded to bfloat16; the written "
        "model stays bfloat16")

_DTYPE_ATTRS = {"Cast": "to", "EyeLike": "dtype", "RandomNormal": "dtype", "RandomUniform": "dtype",
                "RandomNormalLike": "dtype", "RandomUniformLike": "dtype", "Bernoulli": "dtype"}


class ShadowOutputs(dict):
    """Outputs of a shadow run (a plain dict of name -> array, marked for the report)."""

    shadow = "float32"


def _graphs(graph: ir.Graph) -> Iterator[ir.Graph]:
    """``graph`` and every subgraph in it, recursively."""
    yield graph
    for node in graph:
        for attr in node.attributes.values():
            if attr.is_ref():
                continue
            if attr.type == ir.AttributeType.GRAPH:
                yield from _graphs(attr.value)
            elif attr.type == ir.AttributeType.GRAPHS:
                for g in attr.value:
                    yield from _graphs(g)


def _all_graphs(model: ir.Model) -> Iterator[ir.Graph]:
    yield from _graphs(model.graph)
    for fn in model.functions.values():
        yield from _graphs(fn.graph)


def _values(graph: ir.Graph) -> Iterator[ir.Value]:
    yield from graph.inputs
    yield from graph.outputs
    yield from graph.initializers.values()
    for node in graph:
        yield from (v for v in node.inputs if v is not None)
        yield from node.outputs


def _is_bf16_type(t: ir.TypeProtocol | None) -> bool:
    while t is not None:
        if isinstance(t, ir.TensorType):
            return t.dtype == BF16
        t = getattr(t, "elem_type", None)
    return False


def _retyped(t: ir.TypeProtocol) -> ir.TypeProtocol:
    if isinstance(t, ir.TensorType):
        return ir.TensorType(F32) if t.dtype == BF16 else t
    if isinstance(t, ir.SequenceType):
        return ir.SequenceType(_retyped(t.elem_type))
    if isinstance(t, ir.OptionalType):
        return ir.OptionalType(_retyped(t.elem_type))
    return t


def _bf16_attr(node: ir.Node, attr: ir.Attr) -> bool:
    if attr.is_ref():
        return False
    if attr.type == ir.AttributeType.TENSOR:
        return attr.value.dtype == BF16
    if attr.type == ir.AttributeType.TENSORS:
        return any(t.dtype == BF16 for t in attr.value)
    return (node.domain in ("", "ai.onnx") and _DTYPE_ATTRS.get(node.op_type) == attr.name
            and attr.type == ir.AttributeType.INT and attr.value == BF16)


def holds_bfloat16(model: ir.Model) -> bool:
    """Whether any value, initializer, constant or dtype attribute of ``model`` is bfloat16."""
    for graph in _all_graphs(model):
        for v in _values(graph):
            if _is_bf16_type(v.type) or (v.const_value is not None and v.const_value.dtype == BF16):
                return True
        for node in graph:
            if any(_bf16_attr(node, a) for a in node.attributes.values()):
                return True
    return False


def _f32_tensor(t: ir.TensorProtocol) -> ir.Tensor:
    return ir.Tensor(np.asarray(t.numpy()).astype(np.float32), name=t.name)


def float32_shadow(model: ir.Model) -> ir.Model:
    """A copy of ``model`` with every bfloat16 tensor, type and dtype attribute made float32
    (values kept exactly). ``model`` itself is not modified."""
    shadow = model.clone()
    for graph in _all_graphs(shadow):
        for v in _values(graph):
            if v.const_value is not None and v.const_value.dtype == BF16:
                v.const_value = _f32_tensor(v.const_value)
            if v.type is not None and _is_bf16_type(v.type):
                v.type = _retyped(v.type)
        for node in graph:
            for name, attr in list(node.attributes.items()):
                if attr.is_ref():
                    continue
                if not _bf16_attr(node, attr):
                    continue
                if attr.type == ir.AttributeType.TENSOR:
                    node.attributes[name] = ir.AttrTensor(name, _f32_tensor(attr.value))
                elif attr.type == ir.AttributeType.TENSORS:
                    node.attributes[name] = ir.AttrTensors(
                        name, [_f32_tensor(t) if t.dtype == BF16 else t for t in attr.value])
                else:
                    node.attributes[name] = ir.AttrInt64(name, F32)
    return shadow


def shadow_feeds(model: ir.Model, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Feeds for the shadow: bfloat16 inputs rounded to bfloat16 (as the real model would
    read them), then widened to float32 (exact)."""
    bf16 = {v.name for v in model.graph.inputs if _is_bf16_type(v.type)}
    return {k: np.asarray(a).astype(_BF16_NP).astype(np.float32) if k in bf16 else a
            for k, a in feeds.items()}


def real_outputs(model: ir.Model, outs: Mapping[str, np.ndarray]) -> ShadowOutputs:
    """Shadow outputs in the real model's output dtypes (bfloat16 outputs rounded back)."""
    bf16 = {v.name for v in model.graph.outputs if _is_bf16_type(v.type)}
    return ShadowOutputs({k: np.asarray(a).astype(_BF16_NP) if k in bf16 else a
                          for k, a in outs.items()})
