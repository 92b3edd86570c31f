"""The ONNX adapter: a GraphView over an onnx-ir model.

Edits are copy-on-write for parameters: a changed weight becomes a new initializer, so a
tensor shared by two nodes (a tied embedding, a reused constant) is never changed behind
the other reader's back. Input/output names, opset imports, metadata and doc strings are
left as they are.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnx_ir as ir

from rewriter.ir.view import (
    Affine,
    ConvParams,
    Declined,
    GraphView,
    LinearParams,
    Node,
    Value,
    broadcast_axis,
)

log = logging.getLogger(__name__)

_ELEMENTWISE = {"Mul": "mul", "Add": "add", "Sub": "sub", "Div": "div"}
_SIMPLE = {
    "Transpose": "transpose",
    "Conv": "conv",
    "BatchNormalization": "batch_norm",
    "LayerNormalization": "layer_norm",
    "RMSNormalization": "rms_norm",
    "Attention": "attention",
}
# Ops cheap and safe to evaluate when all their inputs are constant.
_MAX_CONST_ELEMS = 1 << 24

PROVENANCE_PASS = "rewriter.pass"
PROVENANCE_REPLACED = "rewriter.replaced"


def _np_dtype(dtype: ir.DataType) -> np.dtype:
    return dtype.numpy()


class OnnxView(GraphView):
    """A GraphView over ``onnx_ir.Model``."""

    ir = "onnx"

    def __init__(self, model: ir.Model, path: Path | None = None):
        super().__init__()
        self.model = model
        self.path = path
        self._const_cache: dict[int, np.ndarray | None] = {}
        self._names = itertools.count()

    @property
    def graph(self) -> ir.Graph:
        return self.model.graph

    @property
    def opset(self) -> int:
        return self.model.opset_imports.get("", 1)

    # -- structure ---------------------------------------------------------------------
    def invalidate(self) -> None:
        super().invalidate()
        self._const_cache.clear()

    def _build_nodes(self) -> list[Node]:
        nodes: list[Node] = []
        taken: set[int] = set()
        for raw in self.graph:
            if id(raw) in taken:
                continue
            node = self._classify(raw, taken)
            nodes.append(node)
        return nodes

    def _classify(self, raw: ir.Node, taken: set[int]) -> Node:
        name = raw.name or f"{raw.op_type}_{id(raw)}"
        out = raw.outputs[0] if raw.outputs else None
        op_type = raw.op_type if raw.domain in ("", "ai.onnx") else f"{raw.domain}::{raw.op_type}"
        if raw.domain in ("", "ai.onnx"):
            if raw.op_type == "MatMul" and self._const_2d(raw.inputs[1]):
                group = [raw]
                bias_add = self._bias_add(raw)
                if bias_add is not None:
                    group.append(bias_add)
                    taken.add(id(bias_add))
                    attrs = {"_internal": [out]}
                    return Node("linear", name, [raw.inputs[0]], bias_add.outputs[0], group, attrs)
                return Node("linear", name, [raw.inputs[0]], out, group)
            if raw.op_type == "Gemm" and self._gemm_is_linear(raw):
                return Node("linear", name, [raw.inputs[0]], out, [raw])
            if raw.op_type in _ELEMENTWISE:
                data = [v for v in raw.inputs if v is not None and self.const_value(v) is None]
                return Node(_ELEMENTWISE[raw.op_type], name, data, out, [raw])
            if raw.op_type == "Gather" and self.const_value(raw.inputs[0]) is not None:
                return Node("embedding", name, [raw.inputs[1]], out, [raw])
            if raw.op_type in _SIMPLE:
                return Node(_SIMPLE[raw.op_type], name, [raw.inputs[0]], out, [raw])
        data = [v for v in raw.inputs if v is not None and not v.is_initializer()]
        return Node(f"other:{op_type}", name, data, out, [raw])

    def _const_2d(self, v: ir.Value | None) -> bool:
        if v is None:
            return False
        c = self.const_value(v)
        return c is not None and c.ndim == 2

    def _bias_add(self, matmul: ir.Node) -> ir.Node | None:
        out = matmul.outputs[0]
        uses = list(out.uses())
        if len(uses) != 1 or out.is_graph_output():
            return None
        add = uses[0].node
        if add.op_type != "Add" or add.domain not in ("", "ai.onnx"):
            return None
        other = add.inputs[1 - uses[0].idx]
        c = self.const_value(other) if other is not None else None
        n_out = self.const_value(matmul.inputs[1]).shape[1]
        if c is None or c.size != n_out or (c.ndim > 0 and c.shape[-1] != n_out):
            return None
        return add

    def _gemm_is_linear(self, raw: ir.Node) -> bool:
        if raw.attributes.get_int("transA", 0) != 0:
            return False
        if self.const_value(raw.inputs[1]) is None:
            return False
        if len(raw.inputs) > 2 and raw.inputs[2] is not None:
            c = self.const_value(raw.inputs[2])
            if c is None or (c.ndim == 2 and c.shape[0] != 1):
                return False
        return True

    def _raw_users(self, value: Value) -> list[Any]:
        return [u.node for u in value.uses()]

    def _raw_producer(self, value: Value) -> Any | None:
        return value.producer()

    def is_graph_output(self, value: Value) -> bool:
        return value.is_graph_output()

    def rank(self, value: Value) -> int | None:
        return None if value.shape is None else len(value.shape)

    def shape(self, value: Value) -> tuple | None:
        if value.shape is None:
            return None
        return tuple(d if isinstance(d, int) else None for d in value.shape)

    def value_name(self, value: Value) -> str:
        return value.name or "?"

    # -- constants ---------------------------------------------------------------------
    def const_value(self, value: ir.Value | None) -> np.ndarray | None:
        """The value as a numpy array when it depends on constants only, else None."""
        if value is None:
            return None
        key = id(value)
        if key not in self._const_cache:
            self._const_cache[key] = None  # cycle guard
            self._const_cache[key] = self._eval_const(value)
        return self._const_cache[key]

    def _eval_const(self, value: ir.Value) -> np.ndarray | None:
        if value.const_value is not None:
            if value.is_graph_input():
                return None  # an initializer overridable by a graph input
            return value.const_value.numpy()
        node = value.producer()
        if node is None or node.domain not in ("", "ai.onnx") or any(a.type in (ir.AttributeType.GRAPH, ir.AttributeType.GRAPHS) for a in node.attributes.values()):
            return None
        if node.op_type == "Constant" and "value" in node.attributes:
            return node.attributes["value"].as_tensor().numpy()
        if node.op_type in ("RandomNormal", "RandomUniform", "RandomNormalLike", "RandomUniformLike", "Multinomial", "Bernoulli"):
            return None
        args = []
        for v in node.inputs:
            if v is None:
                args.append(None)
                continue
            if node.op_type in ("Shape", "Size") and v is node.inputs[0] and v.shape is not None and v.shape.is_static():
                args.append(np.zeros([int(d) for d in v.shape], dtype=_np_dtype(v.dtype)))
                continue  # only the (static) shape is read
            if node.op_type == "CastLike" and v is node.inputs[1] and v.dtype is not None:
                args.append(np.zeros((), dtype=_np_dtype(v.dtype)))
                continue  # only the dtype is read
            c = self.const_value(v)
            if c is None or c.size > _MAX_CONST_ELEMS:
                return None
            args.append(c)
        try:
            from onnx.reference import ReferenceEvaluator

            proto = ir.serde.serialize_node(node)
            feeds = {}
            for i, (v, a) in enumerate(zip(node.inputs, args)):
                if v is not None:
                    proto.input[i] = f"in{i}"
                    feeds[f"in{i}"] = a
            for i in range(len(proto.output)):
                proto.output[i] = f"out{i}"
            opset = node.version or self.opset
            results = ReferenceEvaluator(proto, opsets={"": opset}).run(None, feeds)
            return np.asarray(results[value.index()])
        except Exception as err:  # noqa: BLE001 - constant folding is best effort
            log.debug("could not evaluate %s: %s", node.name, err)
            return None

    def _new_initializer(self, base: str, array: np.ndarray) -> ir.Value:
        while True:
            name = f"{base}__rw{next(self._names)}"
            if name not in self.graph.initializers:
                break
        v = ir.Value(
            name=name,
            shape=ir.Shape(array.shape),
            type=ir.TensorType(ir.DataType.from_numpy(array.dtype)),
            const_value=ir.tensor(array, name=name),
        )
        self.graph.register_initializer(v)
        return v

    def _dtype_of(self, value: ir.Value) -> np.dtype:
        return _np_dtype(value.dtype) if value.dtype is not None else np.dtype(np.float32)

    # -- semantics ---------------------------------------------------------------------
    def linear(self, node: Node) -> LinearParams:
        raw = node.raw[0]
        if raw.op_type == "MatMul":
            w = self.const_value(raw.inputs[1]).astype(np.float64).T
            b = None
            if len(node.raw) > 1:
                add = node.raw[1]
                other = add.inputs[1] if add.inputs[0] is raw.outputs[0] else add.inputs[0]
                b = self.const_value(other).astype(np.float64).reshape(-1)
            return LinearParams(w, b)
        # Gemm: Y = alpha * A @ B' + beta * C, B' = B.T if transB
        alpha = raw.attributes.get_float("alpha", 1.0)
        beta = raw.attributes.get_float("beta", 1.0)
        bmat = self.const_value(raw.inputs[1]).astype(np.float64)
        w = alpha * (bmat if raw.attributes.get_int("transB", 0) else bmat.T)
        b = None
        if len(raw.inputs) > 2 and raw.inputs[2] is not None:
            c = self.const_value(raw.inputs[2]).astype(np.float64).reshape(-1)
            b = beta * np.broadcast_to(c, (w.shape[0],)).copy()
        return LinearParams(w, b)

    def set_linear(self, node: Node, params: LinearParams) -> None:
        raw = node.raw[0]
        wdt = self._dtype_of(raw.inputs[1])
        base = raw.inputs[1].name or node.name
        if raw.op_type == "MatMul":
            raw.replace_input_with(1, self._new_initializer(base, params.weight.T.astype(wdt)))
            if params.bias is None:
                return
            if len(node.raw) > 1:
                add = node.raw[1]
                idx = 1 if add.inputs[0] is raw.outputs[0] else 0
                bdt = self._dtype_of(add.inputs[idx])
                add.replace_input_with(idx, self._new_initializer(base + ".bias", params.bias.astype(bdt)))
            else:
                bias = self._new_initializer(base + ".bias", params.bias.astype(wdt))
                out = raw.outputs[0]
                add = ir.Node("", "Add", [out, bias], name=f"{node.name}_bias")
                self._replace_uses(out, add.outputs[0], exclude=add)
                self.graph.insert_after(raw, add)
                add.outputs[0].dtype = out.dtype
                add.outputs[0].shape = out.shape
                node.raw.append(add)
                node.output = add.outputs[0]
                node.attrs["_internal"] = [out]
                self.invalidate()
            return
        # Gemm: write the effective weight back with alpha = beta = 1
        trans_b = raw.attributes.get_int("transB", 0)
        w = params.weight if trans_b else params.weight.T
        raw.replace_input_with(1, self._new_initializer(base, np.ascontiguousarray(w).astype(wdt)))
        raw.attributes["alpha"] = ir.AttrFloat32("alpha", 1.0)
        raw.attributes["beta"] = ir.AttrFloat32("beta", 1.0)
        if params.bias is not None:
            bias = self._new_initializer(base + ".bias", params.bias.astype(wdt))
            if len(raw.inputs) < 3:
                raw.resize_inputs(3)
            raw.replace_input_with(2, bias)
        elif len(raw.inputs) > 2 and raw.inputs[2] is not None:
            raw.replace_input_with(2, None)

    def conv(self, node: Node) -> ConvParams:
        raw = node.raw[0]
        w = self.const_value(raw.inputs[1])
        if w is None:
            raise Declined(f"conv {node.name} has a non-constant weight")
        b = None
        if len(raw.inputs) > 2 and raw.inputs[2] is not None:
            bv = self.const_value(raw.inputs[2])
            if bv is None:
                raise Declined(f"conv {node.name} has a non-constant bias")
            b = bv.astype(np.float64)
        auto_pad = raw.attributes.get_string("auto_pad", "NOTSET")
        pads = raw.attributes.get_ints("pads", None) or []
        padded = any(p != 0 for p in pads) or auto_pad in ("SAME_UPPER", "SAME_LOWER")
        return ConvParams(w.astype(np.float64), b, raw.attributes.get_int("group", 1), padded)

    def set_conv(self, node: Node, params: ConvParams) -> None:
        raw = node.raw[0]
        wdt = self._dtype_of(raw.inputs[1])
        base = raw.inputs[1].name or node.name
        raw.replace_input_with(1, self._new_initializer(base, params.weight.astype(wdt)))
        if params.bias is not None:
            if len(raw.inputs) < 3:
                raw.resize_inputs(3)
            raw.replace_input_with(2, self._new_initializer(base + ".bias", params.bias.astype(wdt)))

    def affine(self, node: Node) -> Affine | None:
        raw = node.raw[0]
        rank = self.rank(node.inputs[0]) if node.inputs else None
        if node.op == "batch_norm":
            if raw.attributes.get_int("training_mode", 0):
                raise Declined(f"{node.name} is a norm in training mode (training_mode=1)")
            if any(o.uses() or o.is_graph_output() for o in raw.outputs[1:]):
                raise Declined(f"{node.name} is a norm in training mode (running statistics are read)")
            params = [self.const_value(v) for v in raw.inputs[1:5]]
            if any(p is None for p in params):
                raise Declined(f"{node.name} has non-constant statistics")
            if rank is None:
                raise Declined(f"{node.name}: the rank of its input is unknown")
            gamma, beta, mean, var = (p.astype(np.float64) for p in params)
            eps = raw.attributes.get_float("epsilon", 1e-5)
            k = gamma / np.sqrt(var + eps)
            axis = 1 - rank if rank > 1 else -1
            return Affine(axis, k, beta - mean * k)
        if node.op not in ("mul", "add", "sub", "div") or len(raw.inputs) != 2:
            return None
        a, b = raw.inputs
        ca, cb = self.const_value(a), self.const_value(b)
        if (ca is None) == (cb is None):
            return None
        data, const, const_first = (b, ca, True) if ca is not None else (a, cb, False)
        rank = self.rank(data)
        if rank is None or const.ndim > rank or not np.issubdtype(const.dtype, np.floating):
            return None
        axis = broadcast_axis(const.shape, rank)
        if axis == "bad":
            return None
        c = const.astype(np.float64).reshape(-1)
        if node.op == "mul":
            return Affine(axis, c, np.zeros_like(c))
        if node.op == "add":
            return Affine(axis, np.ones_like(c), c)
        if node.op == "sub":
            return Affine(axis, -np.ones_like(c), c) if const_first else Affine(axis, np.ones_like(c), -c)
        if const_first:  # c / x is not affine
            return None
        return Affine(axis, 1.0 / c, np.zeros_like(c))

    def perm(self, node: Node) -> list[int]:
        raw = node.raw[0]
        p = raw.attributes.get_ints("perm", None)
        if p is None:
            r = self.rank(node.inputs[0])
            if r is None:
                raise Declined(f"{node.name}: rank unknown")
            p = list(reversed(range(r)))
        return list(p)

    # -- edits -------------------------------------------------------------------------
    def _replace_uses(self, old: ir.Value, new: ir.Value, exclude: ir.Node | None = None) -> None:
        for use in list(old.uses()):
            if use.node is not exclude:
                use.node.replace_input_with(use.idx, new)
        if old.is_graph_output():
            outs = self.graph.outputs
            for i, v in enumerate(outs):
                if v is old:
                    name = old.name
                    old.name = f"{name}__pre"
                    new.name = name
                    outs[i] = new

    def bypass(self, node: Node) -> None:
        node = self.node_of(node.raw[0]) or node  # inputs may have been rewired since
        out, src = node.output, node.inputs[0]
        if out.is_graph_output() and (src.is_graph_input() or src.is_graph_output() or src.is_initializer()):
            raise Declined(f"{node.name}: its output is a graph output and its input cannot take its name")
        self._replace_uses(out, src)
        for raw in reversed(node.raw):
            self.graph.remove(raw, safe=True)
        self.invalidate()

    def tag(self, node: Node, pass_name: str, replaced: Iterable[str]) -> None:
        for raw in node.raw:
            raw.metadata_props[PROVENANCE_PASS] = pass_name
            raw.metadata_props[PROVENANCE_REPLACED] = ",".join(replaced)

    def finalize(self) -> None:
        """Drop constant-only nodes and initializers nothing reads any more."""
        changed = True
        while changed:
            changed = False
            for raw in reversed(list(self.graph)):
                outs = raw.outputs
                if any(o.uses() or o.is_graph_output() for o in outs):
                    continue
                if all(self.const_value(v) is not None for v in raw.inputs if v is not None):
                    self.graph.remove(raw, safe=True)
                    changed = True
        for name, v in list(self.graph.initializers.items()):
            if not v.uses() and not v.is_graph_output() and not v.is_graph_input():
                del self.graph.initializers[name]
        self.invalidate()

    # -- whole model -------------------------------------------------------------------
    def copy(self) -> OnnxView:
        return OnnxView(self.model.clone(), self.path)

    def raw_op_types(self) -> list[str]:
        return [
            n.op_type if n.domain in ("", "ai.onnx") else f"{n.domain}::{n.op_type}"
            for n in self.graph.all_nodes()
        ]

    def to_proto(self) -> onnx.ModelProto:
        return ir.serde.serialize_model(self.model)
