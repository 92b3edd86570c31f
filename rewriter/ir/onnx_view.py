"""The ONNX adapter: a GraphView over an onnx-ir model.

Edits are copy-on-write for parameters: a changed weight becomes a new initializer, so a
tensor shared by two nodes (a tied embedding, a reused constant) is never changed behind
the other reader's back. Input/output names, opset imports, metadata and doc strings are
left as they are.

Norms spelled as chains of standard ops (the TorchScript exporter's LayerNorm, HF
LlamaRMSNorm, ...) are recognised by ``rewriter.canon`` and grouped into one
``layer_norm`` / ``rms_norm`` node over the chain's ops (``Node.attrs["canon"]`` holds
the match), without changing the graph; ONNX Runtime's SkipLayerNormalization /
SkipSimplifiedLayerNormalization are a join node and a norm node over the one op.
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

from rewriter.ir.onnx_reader import inline_proto, is_mapped, map_array
from rewriter.ir.view import (
    Affine,
    ConvParams,
    Declined,
    Dim,
    GraphView,
    Layout,
    LinearParams,
    Node,
    NormParams,
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
# ONNX Runtime's own norms (contrib ops; SimplifiedLayerNormalization also in the default
# domain): the same inputs and attributes as LayerNormalization / RMSNormalization
_ORT_NORMS = {
    ("com.microsoft", "LayerNormalization"): "layer_norm",
    ("com.microsoft", "SimplifiedLayerNormalization"): "rms_norm",
    ("", "SimplifiedLayerNormalization"): "rms_norm",
}
# ONNX Runtime norms that fuse the residual add into the norm (see ``norm``)
_ORT_SKIP_NORMS = ("SkipLayerNormalization", "SkipSimplifiedLayerNormalization")
# Ops cheap and safe to evaluate when all their inputs are constant.
_MAX_CONST_ELEMS = 1 << 24

_IDENTITY_OPS = {"Identity"}
_RESHAPE_OPS = {"Reshape", "Flatten", "Squeeze", "Unsqueeze"}
# ops a constant operand may be computed through from its parameter (edit_const)
_CONST_CHAIN_OPS = {"Identity", "Cast", "Reshape", "Expand", "Unsqueeze", "Squeeze", "Gather", "Slice"}

# ops of shape arithmetic whose output entries are entries of their first input (rank <= 1)
_SHAPE_PASS_OPS = {"Identity", "Cast", "Squeeze", "Unsqueeze", "Reshape", "Gather", "Slice", "Concat"}
_SHAPE_READERS = {"Shape", "Size"}

PROVENANCE_PASS = "rewriter.pass"
PROVENANCE_REPLACED = "rewriter.replaced"


_CACHE_BYTES = 1 << 20  # initializers above this size are read on demand, not cached


def _np_dtype(dtype: ir.DataType) -> np.dtype:
    return dtype.numpy()


def _read_tensor(t: ir.TensorProtocol) -> np.ndarray:
    """The tensor as an array; an external one through ``onnx_reader.map_array`` (a private
    memory map that lives as long as the returned array)."""
    return map_array(t) if isinstance(t, ir.ExternalTensor) else t.numpy()


def _entry_op(op: str, e: list):
    """One entry of Mul / Equal / Where over shape entries (Equal gives 0 / 1); None when
    it depends on a run-time value in a way not followed."""
    if op == "Mul":
        a, b = e
        return a * b if type(a) is int and type(b) is int else None
    if op == "Equal":
        a, b = e
        if type(a) is int and type(b) is int:
            return int(a == b)
        if isinstance(a, Dim) and type(b) is int and b < 0 or isinstance(b, Dim) and type(a) is int and a < 0:
            return 0  # a size read at run time is never negative
        return None
    c, a, b = e
    return None if type(c) is not int else (a if c else b)


class OnnxView(GraphView):
    """A GraphView over ``onnx_ir.Model``."""

    ir = "onnx"

    def __init__(self, model: ir.Model, path: Path | None = None):
        super().__init__()
        self.model = model
        self.path = path
        # whether the source kept its weights as external data: the output does too
        # (weights mapped from a one-file model by onnx_reader.load_mapped do not count)
        self.external_data = any(isinstance(v.const_value, ir.ExternalTensor) and not is_mapped(v.const_value)
                                 for v in model.graph.initializers.values())
        # keyed by the value itself (not id(): ids of removed values get reused); edits
        # never change what an existing value computes, so the cache survives them
        self._const_cache: dict[ir.Value, np.ndarray | None] = {}
        self._names = itertools.count()
        self._retargeted: dict[tuple, ir.Value] = {}  # narrow_target: rebuilt shape values
        self.canon_near_misses: list[tuple[str, str]] = []  # norm-like chains not recognised, why
        self._skip_joins: dict[ir.Value, Node] = {}  # input_skip_bias_sum of a Skip*Norm -> its join
        # value name -> concrete dims assumed for the analysis where the file's are symbolic
        # (``rewriter.shapes.specialise``, from --shape / --inputs); the model is not changed
        self.shape_hints: dict[str, tuple] = {}

    @property
    def graph(self) -> ir.Graph:
        return self.model.graph

    @property
    def opset(self) -> int:
        return self.model.opset_imports.get("", 1)

    # -- structure ---------------------------------------------------------------------
    def _build_nodes(self) -> list[Node]:
        nodes: list[Node] = []
        taken: set[int] = set()
        chains = self._norm_chains()
        self._skip_joins = {}
        for raw in self.graph:
            chain = chains.get(id(raw))
            if chain is not None:
                if chain is not True:  # the chain's last node: the norm takes its place
                    nodes.append(chain)
                continue
            if id(raw) in taken:
                continue
            if raw.domain == "com.microsoft" and raw.op_type in _ORT_SKIP_NORMS:
                nodes.extend(self._skip_nodes(raw))
                continue
            node = self._classify(raw, taken)
            nodes.append(node)
        return nodes

    def _skip_nodes(self, raw: ir.Node) -> list[Node]:
        """``SkipLayerNormalization`` / ``SkipSimplifiedLayerNormalization`` (com.microsoft) as
        what they compute: a residual join ``s = input + skip (+ bias)`` and a norm of ``s``,
        two semantic nodes over the one IR node. ``s`` is the op's optional fourth output
        (``input_skip_bias_sum``); when the file leaves it out, the output is declared (named,
        unread: the op computes it anyway), so that the join has a value to write."""
        name = raw.name or f"{raw.op_type}_{id(raw)}"
        if len(raw.outputs) < 4:
            raw.resize_outputs(4)
            for o in raw.outputs[1:3]:
                if o.name is None:
                    o.name = ""  # left out, as in the file
        s = raw.outputs[3]
        if not s.name:
            s.name = self._free_name(f"{name}_input_skip_bias_sum")
        if s.dtype is None:
            s.dtype = raw.inputs[0].dtype or raw.inputs[2].dtype
        if s.shape is None:
            s.shape = raw.inputs[0].shape
        join = Node("add", f"{name}__add", [raw.inputs[0], raw.inputs[1]], s, [raw], {"skip": raw})
        kind = "layer_norm" if raw.op_type == "SkipLayerNormalization" else "rms_norm"
        norm = Node(kind, name, [s], raw.outputs[0], [raw], {"skip": raw, "join": join})
        self._skip_joins[s] = join
        return [join, norm]

    def _skip_bias(self, raw: ir.Node) -> ir.Value | None:
        idx = 4 if raw.op_type == "SkipLayerNormalization" else 3
        return raw.inputs[idx] if len(raw.inputs) > idx else None

    def producer(self, value: Value) -> Node | None:
        self.nodes()
        join = self._skip_joins.get(value)
        return join if join is not None else super().producer(value)

    def users(self, value: Value) -> list[Node]:
        out = super().users(value)
        # a Skip norm's IR node reads input / skip / bias as its join, not as its norm
        return [n.attrs["join"] if "join" in n.attrs and value is not n.inputs[0] else n for n in out]

    def _norm_chains(self) -> dict[int, Node | bool]:
        """Norms spelled as chains of standard ops (``rewriter.canon``), as semantic nodes
        over the chain's IR nodes; the graph itself is not changed. Maps the id of each
        chain's last IR node to its Node and the other members to True."""
        from rewriter.canon.norms import find_norms
        from rewriter.canon.onnx_adapter import OnnxNormAdapter

        search = find_norms(OnnxNormAdapter(self))
        self.canon_near_misses = [(r.name or r.op_type, why) for r, why in search.near_misses]
        if not search.matches:
            return {}
        pos = {id(r): i for i, r in enumerate(self.graph)}
        out: dict[int, Node | bool] = {}
        for m in search.matches:
            raws = sorted(m.nodes, key=lambda r: pos[id(r)])
            m.nodes = raws
            anchor = m.core.producer()
            name = anchor.name or f"{anchor.op_type}_{id(anchor)}"
            node = Node(m.kind, name, [m.x], m.out, raws, {"canon": m, "rule": m.rule})
            for r in raws:
                out[id(r)] = True
            out[id(raws[-1])] = node
        return out

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
                data = [v for v in raw.inputs if v is not None and not self._is_const(v)]
                return Node(_ELEMENTWISE[raw.op_type], name, data, out, [raw])
            if raw.op_type == "Gather" and self._is_const(raw.inputs[0]):
                return Node("embedding", name, [raw.inputs[1]], out, [raw])
            if raw.op_type in _SIMPLE:
                return Node(_SIMPLE[raw.op_type], name, [raw.inputs[0]], out, [raw])
        if (raw.domain, raw.op_type) in _ORT_NORMS:
            return Node(_ORT_NORMS[(raw.domain, raw.op_type)], name, [raw.inputs[0]], out, [raw])
        data = [v for v in raw.inputs if v is not None and not v.is_initializer()]
        return Node(f"other:{op_type}", name, data, out, [raw])

    def _is_const(self, v: ir.Value | None) -> bool:
        """``const_value(v) is not None``, from the metadata alone for an initializer."""
        if v is not None and v.const_value is not None:
            return not v.is_graph_input()
        return self.const_value(v) is not None

    def _const_2d(self, v: ir.Value | None) -> bool:
        if v is None:
            return False
        if v.const_value is not None and not v.is_graph_input():
            return len(v.const_value.shape) == 2
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
        w = matmul.inputs[1]
        n_out = int(w.const_value.shape[1]) if w.const_value is not None else self.const_value(w).shape[1]
        if c is None or c.size != n_out or (c.ndim > 0 and c.shape[-1] != n_out):
            return None
        return add

    def _gemm_is_linear(self, raw: ir.Node) -> bool:
        if raw.attributes.get_int("transA", 0) != 0:
            return False
        if not self._is_const(raw.inputs[1]):
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
        if value.shape is None:
            hint = self.shape_hints.get(value.name) if self.shape_hints and value.name else None
            return None if hint is None else len(hint)
        return len(value.shape)

    def shape(self, value: Value) -> tuple | None:
        hint = self.shape_hints.get(value.name) if self.shape_hints and value.name else None
        if value.shape is None:
            return hint
        dims = tuple(d if isinstance(d, int) else None for d in value.shape)
        if hint is not None and None in dims and len(hint) == len(dims):
            dims = tuple(h if d is None else d for d, h in zip(dims, hint))  # a dim assumed from --shape
        return dims

    def value_name(self, value: Value) -> str:
        return value.name or "?"

    # -- constants ---------------------------------------------------------------------
    def const_value(self, value: ir.Value | None) -> np.ndarray | None:
        """The value as a numpy array when it depends on constants only, else None."""
        if value is None:
            return None
        t = value.const_value
        if t is not None and t.nbytes > _CACHE_BYTES:
            # a large parameter is not cached: an in-memory one costs nothing to read again,
            # an external one is read from its file each time into an array the caller owns,
            # so that no copy (nor mapped page) of the weights outlives its use
            return None if value.is_graph_input() else _read_tensor(t)
        key = value
        if key not in self._const_cache:
            self._const_ancestors_first(value)
            self._const_cache[key] = None  # cycle guard
            self._const_cache[key] = self._eval_const(value)
        return self._const_cache[key]

    _NONDETERMINISTIC = ("RandomNormal", "RandomUniform", "RandomNormalLike", "RandomUniformLike", "Multinomial",
                         "Bernoulli")

    def _const_ancestors_first(self, value: ir.Value) -> None:
        """Evaluate (and cache) the node outputs ``_eval_const`` would recurse into, ancestors
        first, with an explicit stack: its recursion is then one level deep whatever the
        length of the chain (a 10,000-long Identity chain)."""
        order: list[ir.Value] = []
        seen = {value}
        stack = [(value, False)]
        while stack:
            v, done = stack.pop()
            if done:
                order.append(v)
                continue
            stack.append((v, True))
            node = v.producer()
            if (v.const_value is not None or node is None or node.domain not in ("", "ai.onnx")
                    or node.op_type in ("Constant", *self._NONDETERMINISTIC)
                    or any(a.type in (ir.AttributeType.GRAPH, ir.AttributeType.GRAPHS) for a in node.attributes.values())):
                continue
            for i in node.inputs:
                if i is not None and i not in seen and i not in self._const_cache and i.const_value is None:
                    seen.add(i)
                    stack.append((i, False))
        for v in order[:-1]:
            if v not in self._const_cache:
                self._const_cache[v] = None
                self._const_cache[v] = self._eval_const(v)

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
        # C order: a transposed (Fortran-order) array, e.g. a MatMul weight written back from
        # the [out, in] layout, is written to disk element by element, ~10x slower
        array = np.ascontiguousarray(array)
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
        if value.dtype is not None:
            return _np_dtype(value.dtype)
        c = self.const_value(value)  # e.g. a Transpose of an initializer without value_info
        return c.dtype if c is not None else np.dtype(np.float32)

    # -- semantics ---------------------------------------------------------------------
    def linear(self, node: Node, *, dtype: Any = np.float64) -> LinearParams:
        def cast(a: np.ndarray) -> np.ndarray:
            return a if dtype is None else a.astype(dtype)

        raw = node.raw[0]
        if raw.op_type == "MatMul":
            w = cast(self.const_value(raw.inputs[1])).T
            b = None
            if len(node.raw) > 1:
                add = node.raw[1]
                other = add.inputs[1] if add.inputs[0] is raw.outputs[0] else add.inputs[0]
                b = cast(self.const_value(other)).reshape(-1)
            return LinearParams(w, b)
        # Gemm: Y = alpha * A @ B' + beta * C, B' = B.T if transB
        alpha = raw.attributes.get_float("alpha", 1.0)
        beta = raw.attributes.get_float("beta", 1.0)
        if dtype is None and (alpha != 1.0 or beta != 1.0):
            dtype = np.float64
        bmat = cast(self.const_value(raw.inputs[1]))
        w = bmat if raw.attributes.get_int("transB", 0) else bmat.T
        if alpha != 1.0:
            w = alpha * w
        b = None
        if len(raw.inputs) > 2 and raw.inputs[2] is not None:
            c = cast(self.const_value(raw.inputs[2])).reshape(-1)
            b = np.broadcast_to(c, (w.shape[0],))
            b = beta * b if beta != 1.0 else (b if dtype is None else b.copy())
        return LinearParams(w, b)

    def set_linear(self, node: Node, params: LinearParams) -> None:
        raw = node.raw[0]
        wdt = self._dtype_of(raw.inputs[1])
        base = raw.inputs[1].name or node.name
        out_width = params.weight.shape[0]
        for r in node.raw:
            if r.outputs and r.outputs[0].shape is not None and len(r.outputs[0].shape):
                if r.outputs[0].shape[-1] != out_width:
                    self.set_dim(r.outputs[0], -1, out_width)
        if raw.op_type == "MatMul":
            raw.replace_input_with(1, self._new_initializer(base, params.weight.T.astype(wdt, copy=False)))
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
                add.outputs[0].dtype = out.dtype if out.dtype is not None else ir.DataType.from_numpy(wdt)
                add.outputs[0].shape = out.shape
                node.raw.append(add)
                node.output = add.outputs[0]
                node.attrs["_internal"] = [out]
                if self._nodes is not None:
                    self._by_raw[id(add)] = node
            return
        # Gemm: write the effective weight back with alpha = beta = 1
        trans_b = raw.attributes.get_int("transB", 0)
        w = params.weight if trans_b else params.weight.T
        raw.replace_input_with(1, self._new_initializer(base, np.ascontiguousarray(w).astype(wdt, copy=False)))
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
        out = raw.outputs[0]
        if out.shape is not None and len(out.shape) > 1 and out.shape[1] != params.weight.shape[0]:
            self.set_dim(out, 1, params.weight.shape[0])
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


    # -- residual-stream queries -------------------------------------------------------
    def norm(self, node: Node) -> NormParams:
        m = node.attrs.get("canon")
        if m is not None:
            return self._chain_norm(node, m)
        raw = node.raw[0]
        x = node.inputs[0]
        if "skip" in node.attrs:
            return self._skip_norm(node, raw)
        rank = self.rank(x)
        axis = raw.attributes.get_int("axis", -1)
        if rank is None:
            raise Declined(f"{node.name}: the rank of its input is unknown")
        if axis % rank != rank - 1:
            raise Declined(f"{node.name} normalizes over axes {axis}.. (not only the last axis)")
        if any(o.uses() or o.is_graph_output() for o in raw.outputs[1:]):
            raise Declined(f"{node.name}: its mean / inverse std outputs are read")
        if raw.op_type == "LayerNormalization" and raw.attributes.get_int("stash_type", 1) != 1:
            raise Declined(f"{node.name}: stash_type != 1 (statistics not in float32)")
        width = self.shape(x)[-1] if self.shape(x) else None
        params = []
        for i in (1, 2):
            v = raw.inputs[i] if len(raw.inputs) > i else None
            if v is None:
                params.append(None)
                continue
            c = self.const_value(v)
            if c is None:
                raise Declined(f"{node.name} has a non-constant scale or bias")
            params.append(np.broadcast_to(c.astype(np.float64).reshape(-1), (width or c.size,)).copy())
        if width is None:
            if params[0] is None:
                raise Declined(f"{node.name}: the width of its input is unknown")
            width = params[0].size
        return NormParams(int(width), raw.attributes.get_float("epsilon", 1e-5), params[0], params[1])

    def _skip_norm(self, node: Node, raw: ir.Node) -> NormParams:
        if any(o.uses() or o.is_graph_output() for o in raw.outputs[1:3]):
            raise Declined(f"{node.name}: its mean / inverse std outputs are read")
        shape = self.shape(raw.inputs[0])
        params = []
        idxs = (2, 3) if raw.op_type == "SkipLayerNormalization" else (2,)
        for i in idxs:
            v = raw.inputs[i] if len(raw.inputs) > i else None
            c = None if v is None else self.const_value(v)
            if v is not None and c is None:
                raise Declined(f"{node.name} ({raw.op_type}) has a non-constant gamma or beta")
            params.append(None if c is None else c.astype(np.float64).reshape(-1))
        width = shape[-1] if shape and shape[-1] is not None else (params[0].size if params[0] is not None else None)
        if width is None:
            raise Declined(f"{node.name}: the width of its input is unknown")
        gamma = None if params[0] is None else np.broadcast_to(params[0], (width,)).copy()
        beta = None if len(params) < 2 or params[1] is None else np.broadcast_to(params[1], (width,)).copy()
        return NormParams(int(width), raw.attributes.get_float("epsilon", 1e-12), gamma, beta)

    def _chain_norm(self, node: Node, m) -> NormParams:
        shape = self.shape(m.x)
        width = shape[-1] if shape else None
        params = []
        for v in (m.weight, m.bias):
            c = None if v is None else self.const_value(v)
            if v is not None and c is None:
                raise Declined(f"{node.name} has a non-constant scale or bias")
            params.append(None if c is None else c.astype(np.float64).reshape(-1))
        if width is None:
            sizes = [p.size for p in params if p is not None and p.size > 1]
            if not sizes:
                raise Declined(f"{node.name}: the width of its input is unknown")
            width = sizes[0]
        params = [None if p is None else np.broadcast_to(p, (width,)).copy() for p in params]
        return NormParams(int(width), m.eps, params[0], params[1])

    def operands(self, node: Node) -> list[Value]:
        if "canon" in node.attrs:
            return list(node.inputs)
        if "skip" in node.attrs:
            if node.op == "add":  # input + skip (+ bias)
                b = self._skip_bias(node.raw[0])
                return list(node.inputs) + ([b] if b is not None else [])
            return list(node.inputs)
        return [v for v in node.raw[0].inputs if v is not None]

    def embedding(self, node: Node, *, dtype: Any = np.float64) -> np.ndarray:
        raw = node.raw[0]
        if raw.attributes.get_int("axis", 0) != 0:
            raise Declined(f"{node.name} gathers along axis {raw.attributes.get_int('axis', 0)}, not rows")
        table = self.const_value(raw.inputs[0])
        if table is None or table.ndim != 2:
            raise Declined(f"{node.name}: its table is not a constant matrix")
        return table if dtype is None else table.astype(dtype)

    def set_embedding(self, node: Node, table: np.ndarray) -> None:
        raw = node.raw[0]
        dt = self._dtype_of(raw.inputs[0])
        raw.replace_input_with(0, self._new_initializer(raw.inputs[0].name or node.name, table.astype(dt, copy=False)))
        self.set_dim(raw.outputs[0], -1, table.shape[1])
        self._const_cache.clear()

    def layout(self, node: Node) -> Layout | None:
        if "canon" in node.attrs:
            return None
        raw = node.raw[0]
        if raw.domain not in ("", "ai.onnx") or not raw.inputs or raw.inputs[0] is None:
            return None
        op = raw.op_type
        rank = self.rank(raw.inputs[0])
        if op in _IDENTITY_OPS:
            return Layout("identity")
        if op == "Dropout":
            training = raw.inputs[2] if len(raw.inputs) > 2 else None
            t = self.const_value(training) if training is not None else np.array(False)
            if t is None or bool(t) or any(o.uses() or o.is_graph_output() for o in raw.outputs[1:]):
                return None
            return Layout("identity")
        if op == "Cast":
            src, dst = raw.inputs[0].dtype, raw.outputs[0].dtype
            if src is not None and dst is not None and src.is_floating_point() and dst.is_floating_point():
                return Layout("identity")
            return None
        if op in _RESHAPE_OPS:
            target = None
            if op == "Reshape":
                c = self.const_value(raw.inputs[1])
                target = None if c is None else [int(t) for t in c.reshape(-1)]
            return Layout("reshape", [], target)
        if op == "Expand":
            c = self.const_value(raw.inputs[1])
            return Layout("expand", [], None if c is None else [int(t) for t in c.reshape(-1)])
        if rank is None:
            return None
        if op == "ReduceMean":
            axes = None
            if len(raw.inputs) > 1 and raw.inputs[1] is not None:
                c = self.const_value(raw.inputs[1])
                if c is None:
                    return None
                axes = [int(a) % rank for a in c.reshape(-1)]
            else:
                a = raw.attributes.get_ints("axes", None)
                axes = None if a is None else [int(x) % rank for x in a]
            if axes is None:
                return None  # reduce over every axis
            return Layout("reduce", sorted(axes))
        if op == "Gather":
            if self.const_value(raw.inputs[1]) is None:
                return None
            return Layout("select", [raw.attributes.get_int("axis", 0) % rank])
        if op == "Slice":
            if any(self.const_value(v) is None for v in raw.inputs[1:] if v is not None):
                return None
            if len(raw.inputs) > 3 and raw.inputs[3] is not None:
                axes = [int(a) % rank for a in self.const_value(raw.inputs[3]).reshape(-1)]
            else:
                axes = list(range(self.const_value(raw.inputs[1]).size))
            return Layout("select", axes)
        if op == "Concat":
            return Layout("concat", [raw.attributes.get_int("axis", 0) % rank])
        return None

    def set_layout_target(self, node: Node, target) -> None:
        raw = node.raw[0]
        arr = np.asarray(list(target), dtype=np.int64)
        raw.replace_input_with(1, self._new_initializer(f"{node.name}_shape", arr))
        self._const_cache.clear()

    def edit_const(self, value: Value, fn, *, width: int, new_width: int | None = None,
                   reader: Node | None = None) -> str:
        chain: list[ir.Node] = []
        v = value
        while True:
            if v.const_value is not None and not v.is_graph_input():
                break
            p = v.producer()
            if p is None:
                raise Declined(f"{self.value_name(value)} is not computed from a parameter")
            if p.op_type == "Constant" and "value" in p.attributes:
                break
            if p.op_type not in _CONST_CHAIN_OPS or p.domain not in ("", "ai.onnx"):
                raise Declined(f"constant {self.value_name(value)} is computed by {p.op_type} "
                               f"({p.name}): its parameter cannot be edited")
            if len(list(v.uses())) > 1 and chain:
                raise Declined(f"constant {self.value_name(v)} is shared: cannot edit it for one reader")
            rank = self.rank(p.inputs[0])
            if p.op_type in ("Gather", "Slice") and rank is not None:
                lay = self.layout(self.node_of(p) or Node("other", p.name or "?", [p.inputs[0]], v, [p]))
                if lay is None or rank - 1 in lay.axes:
                    raise Declined(f"constant {self.value_name(value)} is selected along its channel axis")
            chain.append(p)
            v = p.inputs[0]
        source = self.const_value(v) if v.const_value is None else _read_tensor(v.const_value)
        if source.ndim == 0 or source.shape[-1] not in (width, 1):
            raise Declined(f"parameter {self.value_name(v)} has shape {list(source.shape)}, not [..., {width}]")
        new = np.asarray(fn(source.astype(np.float64)))
        consumer = chain[-1] if chain else None
        init = self._new_initializer(v.name or "const", new.astype(source.dtype))
        if consumer is None:
            # the value itself is the parameter: replace it in its readers
            users = [(u.node, u.idx) for u in value.uses()]
            if reader is not None:
                users = [(n, i) for n, i in users if any(n is r for r in reader.raw)]
            for n, i in users:
                n.replace_input_with(i, init)
        else:
            consumer.replace_input_with(0, init)
        if new_width is not None:
            for p in chain:
                if p.op_type in ("Reshape", "Expand"):
                    c = self.const_value(p.inputs[1])
                    if c is not None and c.size and int(c.reshape(-1)[-1]) == width:
                        t = c.reshape(-1).astype(np.int64).copy()
                        t[-1] = new_width
                        p.replace_input_with(1, self._new_initializer(f"{p.name}_shape", t))
                self.set_dim(p.outputs[0], -1, new_width)
        self.invalidate()
        return v.name or "?"

    # -- shape arithmetic ---------------------------------------------------------------
    def is_shape_reader(self, node: Node) -> bool:
        raw = node.raw[0]
        return raw.domain in ("", "ai.onnx") and raw.op_type in _SHAPE_READERS

    def shape_entries(self, value: ir.Value | None, depth: int = 0) -> list | None:
        """An integer tensor of rank <= 1 (a shape being computed) as entries: ints, ``Dim``
        (``Shape`` reads) and None (not followed); None when its length is unknown."""
        if value is None or depth > 64:
            return None
        c = self.const_value(value)
        if c is not None:
            if c.ndim > 1 or not np.issubdtype(c.dtype, np.integer):
                return None
            return [int(x) for x in c.reshape(-1)]
        p = value.producer()
        fallback = None
        if value.shape is not None and len(value.shape) <= 1 and all(isinstance(d, int) for d in value.shape):
            fallback = [None] * (int(value.shape[0]) if len(value.shape) else 1)
        if p is None or p.domain not in ("", "ai.onnx"):
            return fallback
        op = p.op_type
        if op == "Shape":
            r = self.rank(p.inputs[0])
            if r is None:
                # the length of a shape vector being computed (TorchScript's expand idiom:
                # ConstantOfShape(Shape(target)))
                inner = self.shape_entries(p.inputs[0], depth + 1)
                plain = p.attributes.get_int("start", 0) == 0 and "end" not in p.attributes
                return [len(inner)] if inner is not None and plain else fallback
            start = p.attributes.get_int("start", 0)
            end = p.attributes.get_int("end", r)
            start, end = (min(max(a + r if a < 0 else a, 0), r) for a in (start, end))
            return [Dim(p.inputs[0], a - r) for a in range(start, end)]
        if op in ("Identity", "Cast", "Squeeze", "Unsqueeze", "Reshape"):
            inner = self.shape_entries(p.inputs[0], depth + 1)
            return inner if inner is not None else fallback
        if op == "Gather" and p.attributes.get_int("axis", 0) == 0:
            inner = self.shape_entries(p.inputs[0], depth + 1)
            idx = self.const_value(p.inputs[1])
            if inner is None or idx is None or idx.ndim > 1:
                return fallback
            try:
                return [inner[int(i)] for i in idx.reshape(-1)]
            except IndexError:
                return fallback
        if op == "Slice":
            inner = self.shape_entries(p.inputs[0], depth + 1)
            if inner is None:
                return fallback
            if len(p.inputs) > 1:
                args = [self.const_value(v) if v is not None else None for v in p.inputs[1:5]]
                if any(a is None for a in args[:2]) or any(a is None and v is not None
                                                           for a, v in zip(args[2:], p.inputs[3:5])):
                    return fallback
                starts, ends = args[0], args[1]
                axes = args[2] if len(args) > 2 and args[2] is not None else np.zeros(1, np.int64)
                steps = args[3] if len(args) > 3 and args[3] is not None else np.ones(1, np.int64)
            else:
                starts = np.asarray(p.attributes.get_ints("starts", [0]))
                ends = np.asarray(p.attributes.get_ints("ends", [len(inner)]))
                axes = np.asarray(p.attributes.get_ints("axes", [0]))
                steps = np.ones(1, np.int64)
            if starts.size != 1 or int(axes.reshape(-1)[0]) not in (0, -1):
                return fallback
            n = len(inner)
            s0, e0, st = int(starts.reshape(-1)[0]), int(ends.reshape(-1)[0]), int(steps.reshape(-1)[0])
            e0 = max(min(e0, n), -n - 1) if st > 0 else e0
            return inner[slice(s0, e0, st)] if st != 0 else fallback
        if op == "ConstantOfShape":
            n = self.shape_entries(p.inputs[0], depth + 1)
            t = p.attributes.get("value")
            fill = 0 if t is None else np.asarray(t.as_tensor().numpy()).reshape(-1)
            if n is None or len(n) != 1 or type(n[0]) is not int or (t is not None and fill.size != 1):
                return fallback
            if t is not None and not np.issubdtype(fill.dtype, np.integer) and not np.issubdtype(fill.dtype, np.bool_):
                return fallback
            return [int(fill if t is None else fill[0])] * n[0]
        if op in ("Mul", "Equal", "Where"):
            # entry-wise arithmetic of the TorchScript expand idiom
            # Where(Equal(s, ConstantOfShape(Shape(s)) * -1), ones, s): -1 entries become 1
            parts = [self.shape_entries(v, depth + 1) for v in p.inputs]
            if any(x is None for x in parts):
                return fallback
            n = max(len(x) for x in parts)
            if any(len(x) not in (1, n) for x in parts):
                return fallback
            out = []
            for i in range(n):
                e = [x[i] if len(x) == n else x[0] for x in parts]
                out.append(_entry_op(op, e))
            return out
        if op == "Concat" and p.attributes.get_int("axis", 0) in (0, -1):
            out: list = []
            for v in p.inputs:
                part = self.shape_entries(v, depth + 1)
                if part is None:
                    return fallback
                out += part
            return out
        return fallback

    def resize_keeps(self, node: Node, axis: int) -> bool:
        raw = node.raw[0]
        if raw.domain not in ("", "ai.onnx") or raw.op_type != "Resize" or not raw.inputs:
            return False
        x = raw.inputs[0]
        r = self.rank(x)
        if r is None or not -r <= axis < 0 or raw.attributes.get_ints("axes", None) is not None:
            return False
        sizes = raw.inputs[3] if len(raw.inputs) > 3 else None
        scales = raw.inputs[2] if len(raw.inputs) > 2 else None
        if sizes is not None:
            e = self.shape_entries(sizes)
            if e is None or len(e) != r:
                return False
            k = e[r + axis]
            si = self.shape(x)
            return (isinstance(k, Dim) and k.value is x and k.axis == axis) or (
                type(k) is int and si is not None and si[axis] == k)
        if scales is not None:
            c = self.const_value(scales)
            return c is not None and c.size == r and float(c.reshape(-1)[r + axis]) == 1.0
        return False

    def shape_target(self, node: Node) -> list | None:
        raw = node.raw[0]
        if raw.domain not in ("", "ai.onnx") or raw.op_type not in ("Reshape", "Expand") or len(raw.inputs) < 2:
            return None
        return self.shape_entries(raw.inputs[1])

    def _retarget(self, value: ir.Value, index: int, size: int, before: ir.Node | None) -> ir.Value:
        """``value`` (a shape being computed) with its constant entry ``index`` set to
        ``size``: a new initializer, or copies of the Concat / Unsqueeze / ... nodes that
        build it, each inserted after its original (``before`` None: check only)."""
        key = (value, index, size)
        if key in self._retargeted:
            return self._retargeted[key]
        c = self.const_value(value)
        if c is not None:
            if c.ndim > 1 or index >= c.size:
                raise Declined(f"{self.value_name(value)} is not a shape vector")
            if before is None:
                return value
            arr = c.reshape(-1).copy()
            arr[index] = size
            new = self._new_initializer(f"{self.value_name(value)}_narrow", arr.reshape(c.shape))
            self._retargeted[key] = new
            return new
        p = value.producer()
        if p is None or p.domain not in ("", "ai.onnx"):
            raise Declined(f"{self.value_name(value)} is computed at run time")
        inputs = list(p.inputs)
        if p.op_type == "Concat":
            off = 0
            for k, v in enumerate(inputs):
                part = self.shape_entries(v)
                if part is None:
                    raise Declined(f"{p.op_type} ({p.name}) has a part of unknown length")
                if off <= index < off + len(part):
                    inputs[k] = self._retarget(v, index - off, size, before)
                    break
                off += len(part)
            else:
                raise Declined(f"{p.op_type} ({p.name}) has no entry {index}")
        elif p.op_type in ("Identity", "Cast", "Squeeze", "Unsqueeze", "Reshape"):
            inputs[0] = self._retarget(inputs[0], index, size, before)
        else:
            raise Declined(f"entry {index} of {self.value_name(value)} is computed by {p.op_type} ({p.name})")
        if before is None:
            return value
        clone = ir.Node(p.domain, p.op_type, inputs, [ir.Attr(a.name, a.type, a.value) for a in p.attributes.values()],
                        name=f"{p.name}_narrow__rw{next(self._names)}")
        clone.outputs[0].dtype, clone.outputs[0].shape = p.outputs[0].dtype, p.outputs[0].shape
        clone.outputs[0].name = self._free_name(f"{self.value_name(value)}_narrow")
        self.graph.insert_after(p, clone)  # beside the original: every later reader may share it
        if self._nodes is not None:  # keep the semantic-node cache in graph order
            orig = self._by_raw.get(id(p))
            fresh = self._classify(clone, set())
            at = self._nodes.index(orig) + 1 if orig is not None else len(self._nodes)
            self._nodes.insert(at, fresh)
            self._by_raw[id(clone)] = fresh
        self._retargeted[key] = clone.outputs[0]
        return clone.outputs[0]

    def can_narrow_target(self, node: Node, index: int) -> str:
        raw = node.raw[0]
        try:
            self._retarget(raw.inputs[1], index, 0, None)
        except Declined as why:
            return f"{raw.op_type} ({node.name}): {why}"
        return ""

    def narrow_target(self, node: Node, index: int, size: int) -> None:
        raw = node.raw[0]
        raw.replace_input_with(1, self._retarget(raw.inputs[1], index, size, raw))
        # no regrouping: only new shape nodes (copies, beside their originals) joined the graph

    def shape_read_problems(self, node: Node, narrowed, changes=None) -> list[str]:
        raw = node.raw[0]
        x = raw.inputs[0]

        changes = changes or narrowed

        def tainted(e) -> bool:
            return e is None or (isinstance(e, Dim) and changes(e.value) == e.axis)

        out = raw.outputs[0]
        if raw.op_type == "Shape":
            entries = self.shape_entries(out)
            if entries is not None and not any(tainted(e) for e in entries):
                return []
        problems: list[str] = []
        todo, seen = [out], set()
        while todo:
            t = todo.pop()
            if t in seen:
                continue
            seen.add(t)
            if t.is_graph_output():
                problems.append(f"the shape {self.value_name(t)} of {self.value_name(x)} (read by {node.name}) "
                                "is a graph output")
            for use in t.uses():
                u = use.node
                op = u.op_type if u.domain in ("", "ai.onnx") else f"{u.domain}::{u.op_type}"
                if op in ("Reshape", "Expand", "ConstantOfShape") and use.idx == (0 if op == "ConstantOfShape" else 1):
                    entries = self.shape_entries(t)
                    where = [i for i, e in enumerate(entries or [None]) if tainted(e)]
                    axis = narrowed(u.outputs[0])
                    if entries is not None and axis is not None and where == [len(entries) + axis]:
                        continue  # the width of a value that narrows, as the channel axis of one that narrows too
                    problems.append(f"{op} ({u.name}) builds its shape from the width of "
                                    f"{self.value_name(x)} (read by {node.name}), but not as the channel axis "
                                    "of a tensor that narrows with it")
                    continue
                if op == "Resize" and use.idx == 3:
                    entries = self.shape_entries(t)
                    where = self._tainted_parts(t, entries, seen, tainted)
                    axis = narrowed(u.outputs[0])
                    if entries is not None and axis is not None and where == [len(entries) + axis] \
                            and narrowed(u.inputs[0]) == axis:
                        continue  # the resampled tensor keeps its (narrowing) channel axis as it is
                    problems.append(f"{op} ({u.name}) sizes its output from the width of {self.value_name(x)} "
                                    f"(read by {node.name}), but not as the channel axis of a tensor that "
                                    "narrows with it")
                    continue
                if op in _SHAPE_PASS_OPS and (use.idx == 0 or op == "Concat"):
                    entries = self.shape_entries(u.outputs[0])
                    if entries is not None and not any(tainted(e) for e in entries):
                        continue  # e.g. Gather(shape, 0): the batch size only
                    todo.append(u.outputs[0])
                    continue
                problems.append(f"{op} ({u.name}) computes from the width of {self.value_name(x)} "
                                f"(read by {node.name}): narrowing would change its result")
        return list(dict.fromkeys(problems))

    def _tainted_parts(self, t: ir.Value, entries: list | None, reached: set, tainted) -> list[int]:
        """The entries of ``t`` (a shape being computed) that may follow a narrowing width:
        a read of a narrowing axis, or (strictly) any entry not followed in a part of a
        ``Concat`` reached from the shape read; the parts not reached can carry it only as
        a read (a width that went through an op not followed is flagged there)."""
        if entries is None:
            return [-1]
        p = t.producer()
        if p is None or p.op_type != "Concat" or p.domain not in ("", "ai.onnx"):
            return [i for i, e in enumerate(entries) if tainted(e)]
        out, off = [], 0
        for part in p.inputs:
            pe = self.shape_entries(part)
            if pe is None:
                return [-1]
            strict = part in reached
            out += [off + i for i, e in enumerate(pe)
                    if (tainted(e) if strict else isinstance(e, Dim) and tainted(e))]
            off += len(pe)
        return out

    def set_dim(self, value: Value, axis: int, size: int) -> None:
        if value.shape is None:
            return
        dims = list(value.shape)
        if not dims:
            return
        dims[axis] = size
        value.shape = ir.Shape(dims)

    def _new_node(self, op: str, inputs, attrs=(), name: str = "", domain: str = "") -> ir.Node:
        return ir.Node(domain, op, inputs, list(attrs), name=f"{name}__rw{next(self._names)}")

    def _int64_const(self, base: str, values) -> ir.Value:
        return self._new_initializer(base, np.asarray(values, dtype=np.int64))

    def _scalar_like(self, base: str, value: float, like: ir.Value) -> ir.Value:
        return self._new_initializer(base, np.asarray([value], dtype=self._dtype_of(like)))

    def _splice(self, anchor: ir.Node, old: ir.Value, new_nodes: list[ir.Node], new_out: ir.Value,
                *, shape_last: int | None = None) -> None:
        """Insert ``new_nodes`` after ``anchor`` and make ``old``'s readers read ``new_out``."""
        self.graph.insert_after(anchor, new_nodes)
        dtype = old.dtype if old.dtype is not None else ir.DataType.from_numpy(self._dtype_of(old))
        for n in new_nodes:
            for o in n.outputs:
                o.dtype = dtype
        new_out.shape = old.shape
        if shape_last is not None:
            self.set_dim(new_out, -1, shape_last)
        self._replace_uses(old, new_out, exclude=None)
        # the new nodes must keep reading ``old``
        first_inputs = {id(n): n for n in new_nodes}
        for n in new_nodes:
            for i, v in enumerate(n.inputs):
                if v is new_out and id(n) in first_inputs:
                    n.replace_input_with(i, old)

    def insert(self, value: Value, op: str, *, n: int | None = None, weight: np.ndarray | None = None,
               bias: np.ndarray | None = None) -> Value:
        anchor = value.producer()
        if anchor is None:
            raise Declined(f"cannot insert after graph input {self.value_name(value)}")
        name = self.value_name(value)
        axes = self._int64_const(f"{name}_axes", [-1])
        shape_last = None
        if op == "center":
            m = self._new_node("ReduceMean", [value, axes], [ir.AttrInt64("keepdims", 1)], f"{name}_center_mean")
            if self.opset < 18:
                m = self._new_node("ReduceMean", [value], [ir.AttrInt64s("axes", [-1]), ir.AttrInt64("keepdims", 1)],
                                   f"{name}_center_mean")
            sub = self._new_node("Sub", [value, m.outputs[0]], (), f"{name}_center")
            nodes, out = [m, sub], sub.outputs[0]
        elif op == "keep":
            sl = self._new_node("Slice", [value, self._int64_const(f"{name}_start", [0]),
                                          self._int64_const(f"{name}_end", [n]), axes], (), f"{name}_keep")
            nodes, out, shape_last = [sl], sl.outputs[0], n
        elif op == "scale_shift":
            nodes, out = [], value
            dt = self._dtype_of(value)
            if weight is not None:
                nodes.append(self._new_node("Mul", [out, self._new_initializer(f"{name}.weight", weight.astype(dt))],
                                            (), f"{name}_weight"))
                out = nodes[-1].outputs[0]
            if bias is not None:
                nodes.append(self._new_node("Add", [out, self._new_initializer(f"{name}.bias", bias.astype(dt))],
                                            (), f"{name}_bias"))
                out = nodes[-1].outputs[0]
            if not nodes:
                return value
        elif op == "uncompress":
            s = self._new_node("ReduceSum", [value, axes], [ir.AttrInt64("keepdims", 1)], f"{name}_sum")
            neg = self._new_node("Neg", [s.outputs[0]], (), f"{name}_neg")
            cat = self._new_node("Concat", [value, neg.outputs[0]], [ir.AttrInt64("axis", -1)], f"{name}_uncompress")
            nodes, out = [s, neg, cat], cat.outputs[0]
            w = self.shape(value)
            shape_last = None if not w or w[-1] is None else w[-1] + 1
        else:
            raise ValueError(f"unknown insert op {op!r}")
        old_shape = value.shape
        self._splice(anchor, value, nodes, out, shape_last=shape_last)
        if op in ("center", "uncompress"):
            for nd in nodes[:-1]:
                nd.outputs[0].shape = None
        if old_shape is not None and shape_last is None:
            out.shape = old_shape
        self.invalidate()
        return out

    def upgrade_opset(self, version: int, ignore: Iterable[ir.Node] = ()) -> str | None:
        """Bump the default-domain opset to ``version`` when no op in the model changed
        meaning on the way; returns None on success, else the reason it was not done.
        ``ignore``: nodes the caller is about to remove (the norm chains it replaces)."""
        from backends.ort.functions import OPSET18_CHANGED, OPSET_UPGRADE_BLOCKERS, OPSET_UPGRADE_MIN

        if self.opset >= version:
            return None
        if self.opset < OPSET_UPGRADE_MIN:
            return f"opset {self.opset} < {OPSET_UPGRADE_MIN}: too many ops changed meaning since"
        changed = OPSET_UPGRADE_BLOCKERS | (OPSET18_CHANGED if self.opset < 18 else frozenset())
        skip = {id(n) for n in ignore}
        blockers = sorted({n.op_type for n in self.graph.all_nodes()
                           if n.domain in ("", "ai.onnx") and n.op_type in changed and id(n) not in skip})
        if blockers:
            return f"the model uses {', '.join(blockers)}, whose meaning changed after opset {self.opset}"
        if any(n.version is not None for n in self.graph.all_nodes()):
            return "nodes carry their own opset versions"
        self.model.opset_imports[""] = version
        return None

    def replace_norm(self, node: Node, kind: str, *, eps: float, weight: np.ndarray | None = None,
                     bias: np.ndarray | None = None) -> Node:
        from backends.ort import functions as F

        raw = node.raw[0]
        # read from the IR, not the Node: an edit since it was grouped may have rewired it
        # (a chain's first op reads x first; its last op writes the output)
        x, out = raw.inputs[0], node.raw[-1].outputs[0]
        if "skip" in node.attrs:
            x = raw.outputs[3]
        shape = self.shape(x)
        width = shape[-1] if shape else None
        dt = self._dtype_of(x)
        name = node.name
        nodes: list[ir.Node] = []
        if "skip" in node.attrs:  # the join comes out of the fused op: s = input + skip (+ bias)
            add = ir.Node("", "Add", [raw.inputs[0], raw.inputs[1]], name=f"{name}_add")
            nodes.append(add)
            skip_bias = self._skip_bias(raw)
            if skip_bias is not None:
                nodes.append(ir.Node("", "Add", [add.outputs[0], skip_bias], name=f"{name}_add_bias"))
            s_new = nodes[-1].outputs[0]
            for n in nodes:
                n.outputs[0].dtype, n.outputs[0].shape = x.dtype, raw.inputs[0].shape
                n.outputs[0].name = self._free_name(f"{n.name}_out")
            self._replace_uses(x, s_new)
            x = s_new
            shape = self.shape(raw.inputs[0])
            width = shape[-1] if shape else None
            if width is None:
                g = self.const_value(raw.inputs[2])
                width = None if g is None else int(g.size)
            dt = self._dtype_of(x)
        if kind == "rms_norm":
            if width is None and weight is None:
                raise Declined(f"{name}: the width of its input is unknown")
            xin, cdt = x, dt
            if self.opset < 23 and dt.itemsize < 4:
                # the standard-op chain runs in float32, as the exporters' fp16/bf16 chains do
                # (RMSNormalization computes in float32 itself: stash_type=1)
                cast_in = ir.Node("", "Cast", [x], [ir.AttrInt64("to", ir.DataType.FLOAT)], name=f"{name}_to_f32")
                nodes.append(cast_in)
                xin, cdt = cast_in.outputs[0], np.dtype(np.float32)
            keep_weight = xin is not x
            scale = weight if weight is not None and not keep_weight else np.ones(width or weight.size)
            scale_v = self._new_initializer(f"{name}.scale", scale.astype(cdt))
            consts = {} if self.opset >= 23 else {
                "axes": self._int64_const(f"{name}_axes", [-1]),
                "eps": self._new_initializer(f"{name}_eps", np.asarray([eps], dtype=cdt)),
                "two": self._new_initializer(f"{name}_two", np.asarray(2, dtype=cdt))}
            nodes += F.rms_nodes(xin, scale_v, eps, self.opset, f"{name}_rms", consts)
            if keep_weight:
                for n in nodes:
                    n.outputs[0].dtype = ir.DataType.FLOAT
                nodes.append(ir.Node("", "Cast", [nodes[-1].outputs[0]], [ir.AttrInt64("to", out.dtype)],
                                     name=f"{name}_from_f32"))
            else:
                weight = None
        elif kind == "crms_norm":
            if width is None:
                raise Declined(f"{name}: the width of its input is unknown")
            F.ensure_crms_function(self.model, "rms" if self.opset >= 23 else "chain")
            dtype = (x.dtype or ir.DataType.FLOAT) if F.needs_dtype(self.opset) else None
            nodes.append(F.crms_call(x, eps, width, f"{name}_crms", dtype))
        else:
            raise ValueError(f"unknown norm kind {kind!r}")
        norm_node = nodes[-1]
        last = norm_node.outputs[0]
        if weight is not None:
            nodes.append(ir.Node("", "Mul", [last, self._new_initializer(f"{name}.weight", weight.astype(dt))],
                                 name=f"{name}_weight"))
            last = nodes[-1].outputs[0]
        if bias is not None:
            nodes.append(ir.Node("", "Add", [last, self._new_initializer(f"{name}.bias", bias.astype(dt))],
                                 name=f"{name}_bias"))
            last = nodes[-1].outputs[0]
        full = {id(norm_node), id(nodes[-1])} | {id(n) for n in nodes if n.op_type in ("Cast", "Pow")} | \
            {id(n) for n in nodes if n.name.endswith(("_add", "_add_bias"))}
        out_dtype = out.dtype if out.dtype is not None else ir.DataType.from_numpy(dt)
        for n in nodes:
            for o in n.outputs:
                if o.dtype is None:
                    o.dtype = out_dtype
                # the chain's reduced values ([..., 1]) keep no annotation: ORT trusts them
                o.shape = x.shape if id(n) in full or n is norm_node or n.op_type in ("Mul", "Add") and \
                    n.name.endswith(("_weight", "_bias")) else None
        self.graph.insert_before(raw, nodes)
        self._replace_uses(out, last)
        self.graph.remove(list(reversed(node.raw)), safe=True)
        if "skip" in node.attrs:
            self.invalidate()  # the join went with the fused op
        else:
            self._splice_cache(raw, nodes)
        return self.node_of(norm_node)

    # -- edits -------------------------------------------------------------------------
    def _splice_cache(self, old_raw: ir.Node, new_raws: list[ir.Node]) -> None:
        """Update the semantic-node cache for one IR node replaced by ``new_raws`` (in
        graph order) without regrouping the whole graph."""
        if self._nodes is None:
            return
        old = self._by_raw.get(id(old_raw))
        idx = self._nodes.index(old) if old is not None else len(self._nodes)
        if old is not None:
            self._drop(old)
        taken: set[int] = set()
        fresh = [self._classify(r, taken) for r in new_raws if id(r) not in taken]
        self._nodes[idx:idx] = fresh
        for n in fresh:
            for r in n.raw:
                self._by_raw[id(r)] = n

    def _replace_uses(self, old: ir.Value, new: ir.Value, exclude: ir.Node | None = None) -> None:
        self._rewire(old, new)
        for use in list(old.uses()):
            if use.node is not exclude:
                use.node.replace_input_with(use.idx, new)
        if old.is_graph_output():
            outs = self.graph.outputs
            for i, v in enumerate(outs):
                if v is old:
                    name = old.name
                    old.name = self._free_name(f"{name}__pre")  # a second edit here must not reuse it
                    new.name = name
                    outs[i] = new

    def _free_name(self, base: str) -> str:
        """``base``, or ``base`` with a number appended, that no value in the graph has."""
        taken = ({v.name for v in self.graph.inputs} | set(self.graph.initializers)
                 | {o.name for n in self.graph.all_nodes() for o in n.outputs})
        name, k = base, 1
        while name in taken:
            name, k = f"{base}{k}", k + 1
        return name

    def bypass(self, node: Node) -> None:
        node = self.node_of(node.raw[0]) or node  # inputs may have been rewired since
        out, src = node.output, node.inputs[0]
        if out.is_graph_output() and (src.is_graph_input() or src.is_graph_output() or src.is_initializer()):
            raise Declined(f"{node.name}: its output is a graph output and its input cannot take its name")
        self._replace_uses(out, src)
        for raw in reversed(node.raw):
            self.graph.remove(raw, safe=True)
        self._drop(node)

    def tag(self, node: Node, pass_name: str, replaced: Iterable[str]) -> None:
        for raw in node.raw:
            raw.metadata_props[PROVENANCE_PASS] = pass_name
            raw.metadata_props[PROVENANCE_REPLACED] = ",".join(replaced)

    def finalize(self) -> None:
        """Drop dead nodes (standard, deterministic ops whose outputs nothing reads) and
        initializers nothing reads any more."""
        changed = True
        while changed:
            changed = False
            for raw in reversed(list(self.graph)):
                outs = raw.outputs
                if any(o.uses() or o.is_graph_output() for o in outs):
                    continue
                if raw.domain in ("", "ai.onnx") and not raw.op_type.startswith(("Random", "Bernoulli", "Multinomial")):
                    self.graph.remove(raw, safe=True)  # dead (e.g. a bias chain left behind)
                    changed = True
        for name, v in list(self.graph.initializers.items()):
            if not v.uses() and not v.is_graph_output() and not v.is_graph_input():
                del self.graph.initializers[name]
        self._retargeted.clear()
        self.invalidate()

    def capture(self, values, feeds) -> list[np.ndarray]:
        from backends.ort import run_onnx

        model = self.model.clone()
        by_name = {v.name: v for v in model.graph.inputs}
        by_name.update({o.name: o for n in model.graph.all_nodes() for o in n.outputs})
        names = []
        for v in values:
            cv = by_name[v.name]
            names.append(cv.name)
            if cv.is_graph_input() or cv.is_graph_output():
                continue
            if cv.dtype is None:
                cv.dtype = ir.DataType.FLOAT
            model.graph.outputs.append(cv)
        from rewriter.verify import Runner

        # external data (a dynamo export's .onnx.data) or > 2 GB: the session reads a copy on disk
        sess = Runner(self)._onnx_session(model)
        specs = {i.name: i.shape for i in sess.get_inputs()}
        feeds = {k: np.asarray(v) for k, v in feeds.items() if k in specs}
        # a static batch dim smaller than the data's: run in chunks of it
        static = {specs[k][0] for k in feeds if specs[k] and isinstance(specs[k][0], int)}
        total = {len(v) for v in feeds.values() if v.ndim}
        step = min(static) if static and total and min(static) < min(total) else None
        if step is None:
            chunks = [run_onnx(sess, feeds)]
        else:
            n = min(total) // step * step
            chunks = [run_onnx(sess, {k: v[i : i + step] for k, v in feeds.items()}) for i in range(0, n, step)]
        return [np.asarray(feeds[n]) if n in specs else np.concatenate([c[n] for c in chunks]) for n in names]

    def set_norm(self, node: Node, *, weight: np.ndarray | None = None, bias: np.ndarray | None = None) -> None:
        if "canon" in node.attrs:
            self._set_chain_norm(node, node.attrs["canon"], weight, bias)
            return
        raw = node.raw[0]
        x = raw.inputs[0]
        skip = "skip" in node.attrs
        if skip and bias is not None and raw.op_type != "SkipLayerNormalization":
            raise Declined(f"{node.name}: {raw.op_type} has no beta input")
        for idx, arr, suffix in ((2, weight, "scale"), (3, bias, "bias")) if skip else \
                ((1, weight, "scale"), (2, bias, "bias")):
            if arr is None:
                continue
            if not skip and idx == 2 and raw.op_type != "LayerNormalization":
                raise Declined(f"{node.name}: {raw.op_type} has no bias input")
            old = raw.inputs[idx] if len(raw.inputs) > idx else None
            dt = self._dtype_of(old) if old is not None else self._dtype_of(x)
            base = old.name if old is not None and old.name else f"{node.name}.{suffix}"
            if len(raw.inputs) <= idx:
                raw.resize_inputs(idx + 1)
            raw.replace_input_with(idx, self._new_initializer(base, np.asarray(arr).reshape(-1).astype(dt)))
        self.invalidate()

    def _set_chain_norm(self, node: Node, m, weight: np.ndarray | None, bias: np.ndarray | None) -> None:
        """A recognised chain gets new affine constants in its scale / shift ops; a missing
        one is added (``* gamma`` before the shift, ``+ beta`` at the end): the chain stays
        the user's ops, only parameters change."""
        for arr, const, op_node, op in ((weight, m.weight, m.weight_node, "Mul"), (bias, m.bias, m.bias_node, "Add")):
            if arr is None:
                continue
            if op_node is not None:
                idx = 0 if op_node.inputs[0] is const else 1
                dt = self._dtype_of(const)
                base = const.name if const.name else f"{node.name}.{op.lower()}"
                op_node.replace_input_with(idx, self._new_initializer(base, np.asarray(arr).reshape(-1).astype(dt)))
                continue
            if op == "Mul" and m.bias_node is not None:  # y * gamma goes before + beta
                after, reads = m.bias_node.inputs[0].producer(), m.bias_node.inputs[0]
            else:
                after, reads = m.out.producer(), m.out
            dt = self._dtype_of(reads)
            const_v = self._new_initializer(f"{node.name}.{'scale' if op == 'Mul' else 'bias'}",
                                            np.asarray(arr).reshape(-1).astype(dt))
            new = self._new_node(op, [reads, const_v], (), f"{node.name}_{'scale' if op == 'Mul' else 'shift'}")
            new.outputs[0].dtype, new.outputs[0].shape = reads.dtype, reads.shape
            self._splice(after, reads, [new], new.outputs[0])
            if op == "Mul":
                m.weight, m.weight_node = const_v, new
                if m.out is reads:
                    m.out = new.outputs[0]
            else:
                m.bias, m.bias_node, m.out = const_v, new, new.outputs[0]
        self.invalidate()

    def insert_scale(self, value: Value, factor: float, name: str) -> Value:
        anchor = value.producer()
        if anchor is None:
            raise Declined(f"cannot insert after graph input {self.value_name(value)}")
        const = self._new_initializer(f"{name}.factor", np.asarray(factor, dtype=self._dtype_of(value)))
        mul = self._new_node("Mul", [value, const], (), name)
        mul.outputs[0].name = f"{mul.name}_out"
        old_shape = value.shape
        self._splice(anchor, value, [mul], mul.outputs[0])
        mul.outputs[0].shape = old_shape
        self.invalidate()
        return mul.outputs[0]

    def replace_linear(self, node: Node, op, bias: np.ndarray | None) -> Node:
        fn = op.onnx_function(self.opset)
        key = fn.identifier()
        if key not in self.model.functions:
            self.model.functions[key] = fn
        self.model.opset_imports.setdefault(fn.domain, 1)
        raw, x, out = node.raw[0], node.inputs[0], node.output
        inits = [self._new_initializer(f"{node.name}.{k}", np.ascontiguousarray(a)) for k, a in op.consts.items()]
        attrs = {**op.attrs, **getattr(op, "onnx_attrs", {})}
        call = ir.Node(fn.domain, fn.name, [x, *inits], [ir.AttrInt64(k, int(v)) for k, v in attrs.items()],
                       name=f"{node.name}_{fn.name}__rw{next(self._names)}")
        nodes, last = [call], call.outputs[0]
        if bias is not None:
            b = self._new_initializer(f"{node.name}.bias", bias.astype(self._dtype_of(x)))
            nodes.append(ir.Node("", "Add", [last, b], name=f"{node.name}_bias__rw{next(self._names)}"))
            last = nodes[-1].outputs[0]
        for n in nodes:
            n.outputs[0].dtype, n.outputs[0].shape = out.dtype, out.shape
        self.graph.insert_before(raw, nodes)
        self._replace_uses(out, last)
        for r in reversed(node.raw):
            self.graph.remove(r, safe=True)
        self.invalidate()
        self.nodes()
        return self.node_of(call)

    # -- whole model -------------------------------------------------------------------
    def copy(self) -> OnnxView:
        view = OnnxView(self.model.clone(), self.path)
        view.external_data = self.external_data
        view.shape_hints = self.shape_hints
        return view

    def raw_op_types(self) -> list[str]:
        return [
            n.op_type if n.domain in ("", "ai.onnx") else f"{n.domain}::{n.op_type}"
            for n in self.graph.all_nodes()
        ]

    def to_proto(self) -> onnx.ModelProto:
        return inline_proto(self.model)
