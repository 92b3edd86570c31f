"""The torch adapter: a GraphView over a torch.fx GraphModule.

Capture goes through ``torch.export`` (``ExportedProgram.module()``: ATen ops, parameters as
``get_attr``), falling back to ``torch.fx.symbolic_trace`` for plain modules that export
cannot take; ``canonicalize`` then rewrites the common leaf modules (Linear, Conv, norms)
into the same ATen calls, so one recogniser serves both. The result is still a trainable
GraphModule: changed weights become new ``nn.Parameter`` attributes (copy-on-write), so
gradients flow to them, and parameters no longer read are dropped.
"""

from __future__ import annotations

import copy
import itertools
import logging
import operator
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
import torch
import torch.fx as fx

from rewriter.canon.fx_nodes import canonicalize as canon_fx
from rewriter.canon.fx_nodes import classify
from rewriter.canon.fx_nodes import target_name as _target_name
from rewriter.ir.dtypes import to_numpy, to_torch
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
aten = torch.ops.aten

_IDENTITY = {aten.clone.default, aten.alias.default, aten.detach.default, aten.contiguous.default,
             aten.lift_fresh_copy.default}
_TO = {aten.to.dtype, aten.to.dtype_layout, aten._to_copy.default, aten.to.device}
_RESHAPE = {aten.view.default, aten.reshape.default, aten._unsafe_view.default}
_RESHAPE_NOTARGET = {aten.flatten.using_ints, aten.unflatten.int, aten.squeeze.dim, aten.squeeze.dims,
                     aten.squeeze.default, aten.unsqueeze.default}
_HARMLESS = {aten._assert_tensor_metadata.default}
_SYM_SIZE = {aten.sym_size.int}
_SHAPE_READERS = {aten.sym_size.int, aten.sym_size.default, aten.sym_numel.default, aten.sym_stride.int,
                  aten.sym_stride.default, aten.sym_storage_offset.default}
_IMPURE_NAMES = ("rand", "normal", "bernoulli", "dropout", "uniform", "empty", "copy_", "_guards")


class ConstantScale(torch.nn.Module):
    """``y = x * scale``, ``scale`` a 0-d buffer (not trained): the explicit, inspectable
    scaling op rewrites such as ``lns`` insert into a GraphModule (``FxView.insert_scale``)."""

    def __init__(self, factor: float, dtype: torch.dtype = torch.float32):
        super().__init__()
        self.register_buffer("scale", torch.tensor(float(factor), dtype=dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.scale


def canonicalize(gm: fx.GraphModule) -> fx.GraphModule:
    """``rewriter.canon.fx_nodes.canonicalize`` over this IR's view."""
    return canon_fx(gm, FxView)


def capture(module: torch.nn.Module, example_inputs: Sequence[Any]) -> fx.GraphModule:
    """torch.export first (real models); symbolic_trace for what export cannot take."""
    try:
        ep = torch.export.export(module, tuple(example_inputs))
        gm = ep.module()
    except Exception as err:  # noqa: BLE001 - fall back, and say so
        log.info("torch.export failed (%s); falling back to symbolic_trace", err)
        gm = fx.symbolic_trace(module)
        try:
            from torch.fx.passes.shape_prop import ShapeProp

            ShapeProp(gm).propagate(*example_inputs)
        except Exception as perr:  # noqa: BLE001
            log.info("shape propagation failed: %s", perr)
    return canonicalize(gm)


class FxView(GraphView):
    """A GraphView over a ``torch.fx.GraphModule``."""

    ir = "torch"

    def __init__(self, gm: fx.GraphModule, example_inputs: Sequence[Any] = ()):
        super().__init__()
        self.gm = gm
        self.example_inputs = tuple(example_inputs)
        self._const_cache: dict[fx.Node, np.ndarray | None] = {}
        self._names = itertools.count()

    @property
    def graph(self) -> fx.Graph:
        return self.gm.graph

    def invalidate(self) -> None:
        super().invalidate()
        self._const_cache.clear()

    # -- structure ---------------------------------------------------------------------
    def _build_nodes(self) -> list[Node]:
        nodes: list[Node] = []
        taken: set[int] = set()
        for raw in self.graph.nodes:
            if raw.op in ("placeholder", "get_attr", "output") or id(raw) in taken:
                continue
            if self.const_value(raw) is not None:
                continue  # folded constants are values, not ops
            nodes.append(self._classify(raw, taken))
        return nodes

    def _classify(self, raw: fx.Node, taken: set[int]) -> Node:
        # the semantic nodes come from the recognition layer (rewriter.canon.fx_nodes)
        return classify(self, raw, taken)

    def _raw_users(self, value: Value) -> list[Any]:
        return [u for u in value.users if u.op != "output"]

    def _raw_producer(self, value: Value) -> Any | None:
        return value if isinstance(value, fx.Node) and value.op.startswith("call_") else None

    def is_graph_output(self, value: Value) -> bool:
        return any(u.op == "output" for u in value.users)

    def _meta_shape(self, value: Value):
        val = value.meta.get("val") if isinstance(value, fx.Node) else None
        if val is None:
            tm = value.meta.get("tensor_meta") if isinstance(value, fx.Node) else None
            return None if tm is None else tm.shape
        return getattr(val, "shape", None)

    def rank(self, value: Value) -> int | None:
        s = self._meta_shape(value)
        return None if s is None else len(s)

    def shape(self, value: Value) -> tuple | None:
        s = self._meta_shape(value)
        if s is None:
            return None
        return tuple(int(d) if isinstance(d, int) or str(d).isdigit() else None for d in s)

    def value_name(self, value: Value) -> str:
        return value.name

    # -- constants ---------------------------------------------------------------------
    def const_value(self, value: Any) -> np.ndarray | None:
        t = self._const_tensor(value)
        # bfloat16 as float32: the same values, and numpy math works on it
        return None if t is None else to_numpy(t.float() if t.dtype == torch.bfloat16 else t)

    def _const_tensor(self, value: Any) -> torch.Tensor | None:
        if not isinstance(value, fx.Node):
            return None
        if value in self._const_cache:
            return self._const_cache[value]
        self._const_cache[value] = None
        result = None
        if value.op == "get_attr":
            obj = self._attr(value.target)
            if isinstance(obj, torch.Tensor):
                result = obj
        elif value.op == "call_function" and isinstance(value.target, torch._ops.OpOverload):
            name = str(value.target)
            if value.all_input_nodes and not any(k in name for k in _IMPURE_NAMES):
                if all(self._const_tensor(a) is not None for a in value.all_input_nodes):
                    args, kwargs = fx.node.map_arg((value.args, value.kwargs), self._const_tensor)
                    try:
                        with torch.no_grad():
                            out = value.target(*args, **kwargs)
                        if isinstance(out, torch.Tensor):
                            result = out
                    except Exception as err:  # noqa: BLE001 - best effort
                        log.debug("could not evaluate %s: %s", value.name, err)
        self._const_cache[value] = result
        return result

    def _attr(self, target: str) -> Any:
        obj: Any = self.gm
        for part in target.split("."):
            obj = getattr(obj, part, None)
            if obj is None:
                return None
        return obj

    def _new_param(self, before: fx.Node, base: str, array: np.ndarray, like: Any) -> fx.Node:
        like_t = self._const_tensor(like) if isinstance(like, fx.Node) else None
        dtype = like_t.dtype if like_t is not None else torch.float32
        device = like_t.device if like_t is not None else torch.device("cpu")
        requires_grad = bool(like_t is not None and like_t.requires_grad) or like_t is None
        tensor = torch.as_tensor(np.ascontiguousarray(array)).to(dtype=dtype, device=device)
        name = f"_rw_{base.replace('.', '_')}_{next(self._names)}"
        while hasattr(self.gm, name):
            name = f"_rw_{base.replace('.', '_')}_{next(self._names)}"
        self.gm.register_parameter(name, torch.nn.Parameter(tensor, requires_grad=requires_grad))
        with self.graph.inserting_before(before):
            node = self.graph.get_attr(name)
        node.meta["val"] = tensor
        return node

    # -- semantics ---------------------------------------------------------------------
    def linear(self, node: Node, *, dtype: Any = np.float64) -> LinearParams:
        raw = node.raw[0]
        t = raw.target
        if t is aten.linear.default:
            w = self.const_value(raw.args[1])
            b = self.const_value(raw.args[2]) if len(raw.args) > 2 and raw.args[2] is not None else None
        elif t is aten.addmm.default:
            w = self.const_value(raw.args[2]).T
            b = self.const_value(raw.args[0])
        else:
            w, b = self.const_value(raw.args[1]).T, None
        if dtype is None:
            return LinearParams(w, b)
        return LinearParams(w.astype(dtype), None if b is None else b.astype(dtype))

    def set_linear(self, node: Node, params: LinearParams) -> None:
        raw = node.raw[0]
        wsrc = raw.args[1] if raw.target is not aten.addmm.default else raw.args[2]
        base = wsrc.target if wsrc.op == "get_attr" else node.name
        w = self._new_param(raw, base, params.weight, wsrc)
        b = None if params.bias is None else self._new_param(raw, base + "_bias", params.bias, wsrc)
        # rewrite in place (addmm / mm become aten.linear) so the node keeps its identity
        x = raw.args[1] if raw.target is aten.addmm.default else raw.args[0]
        raw.target = aten.linear.default
        raw.args = (x, w, b)
        raw.kwargs = {}
        shape = self.shape(raw)
        if shape and shape[-1] != params.weight.shape[0]:
            self.set_dim(raw, -1, params.weight.shape[0])
        self.invalidate()

    def conv(self, node: Node) -> ConvParams:
        raw = node.raw[0]
        t = raw.target
        args = list(raw.args)
        w = self.const_value(args[1])
        if w is None:
            raise Declined(f"conv {node.name} has a non-constant weight")
        b = self.const_value(args[2]) if len(args) > 2 and args[2] is not None else None
        if t is aten.convolution.default:
            padding, groups = args[4], args[8]
        else:
            padding = args[4] if len(args) > 4 else raw.kwargs.get("padding", 0)
            groups = args[6] if len(args) > 6 else raw.kwargs.get("groups", 1)
        if isinstance(padding, str):
            padded = padding != "valid"
        else:
            padded = any(p != 0 for p in (padding if isinstance(padding, (list, tuple)) else [padding]))
        return ConvParams(w.astype(np.float64), None if b is None else b.astype(np.float64),
                          int(groups), padded)

    def set_conv(self, node: Node, params: ConvParams) -> None:
        raw = node.raw[0]
        args = list(raw.args)
        base = args[1].target if args[1].op == "get_attr" else node.name
        args[1] = self._new_param(raw, base, params.weight, raw.args[1])
        if params.bias is not None:
            while len(args) < 3:
                args.append(None)
            args[2] = self._new_param(raw, base + "_bias", params.bias, raw.args[1])
        raw.args = tuple(args)
        shape = self.shape(raw)
        if shape and len(shape) > 1 and shape[1] != params.weight.shape[0]:
            self.set_dim(raw, 1, params.weight.shape[0])
        self.invalidate()

    def affine(self, node: Node) -> Affine | None:
        raw = node.raw[0]
        if node.op == "batch_norm":
            args = list(raw.args)
            if raw.target is aten.batch_norm.default:
                training, eps = args[5], args[7]
            else:
                training, eps = False, args[6]
            if training:
                raise Declined(f"{node.name} is a norm in training mode")
            rank = self.rank(node.inputs[0])
            if rank is None:
                raise Declined(f"{node.name}: the rank of its input is unknown")
            c = self.shape(node.inputs[0])[1] if rank > 1 else self.shape(node.inputs[0])[0]
            vals = [self.const_value(a) if a is not None else None for a in args[1:5]]
            gamma = np.ones(c) if vals[0] is None else vals[0].astype(np.float64)
            beta = np.zeros(c) if vals[1] is None else vals[1].astype(np.float64)
            if vals[2] is None or vals[3] is None:
                raise Declined(f"{node.name} has no running statistics")
            mean, var = vals[2].astype(np.float64), vals[3].astype(np.float64)
            k = gamma / np.sqrt(var + eps)
            return Affine(1 - rank if rank > 1 else -1, k, beta - mean * k)
        if node.op not in ("mul", "add", "sub", "div"):
            return None
        if raw.kwargs.get("alpha", 1) != 1 or raw.kwargs.get("rounding_mode") is not None:
            return None
        if len(raw.args) != 2:
            return None
        a, b = raw.args
        ca, cb = self._operand(a), self._operand(b)
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
        if const_first:
            return None
        return Affine(axis, 1.0 / c, np.zeros_like(c))

    def _operand(self, a: Any) -> np.ndarray | None:
        if isinstance(a, (int, float)) and not isinstance(a, bool):
            return np.asarray(float(a), dtype=np.float64)
        return self.const_value(a) if isinstance(a, fx.Node) else None

    def perm(self, node: Node) -> list[int]:
        raw = node.raw[0]
        if raw.target is aten.permute.default:
            r = len(raw.args[1])
            return [d % r for d in raw.args[1]]
        if raw.target is aten.t.default:
            return [1, 0] if self.rank(raw.args[0]) == 2 else [0]
        r = self.rank(raw.args[0])
        if r is None:
            raise Declined(f"{node.name}: rank unknown")
        p = list(range(r))
        d0, d1 = raw.args[1] % r, raw.args[2] % r
        p[d0], p[d1] = p[d1], p[d0]
        return p


    # -- residual-stream queries -------------------------------------------------------
    def norm(self, node: Node) -> NormParams:
        raw = node.raw[0]
        args = list(raw.args) + [None] * 6
        shape = args[1]
        if not isinstance(shape, (list, tuple)) or len(shape) != 1:
            raise Declined(f"{node.name} normalizes over {shape} (not only the last axis)")
        width = int(shape[0])
        if raw.target is aten.layer_norm.default:
            w, b = args[2], args[3]
            eps = args[4] if args[4] is not None else raw.kwargs.get("eps", 1e-5)
        else:
            w, b = args[2], None
            eps = args[3] if args[3] is not None else raw.kwargs.get("eps", None)
            if eps is None:
                raise Declined(f"{node.name}: RMSNorm without an explicit epsilon (dtype-dependent)")
        params = []
        for p in (w, b):
            if p is None:
                params.append(None)
                continue
            c = self.const_value(p)
            if c is None:
                raise Declined(f"{node.name} has a non-constant scale or bias")
            params.append(c.astype(np.float64).reshape(-1))
        return NormParams(width, float(eps), params[0], params[1])

    def operands(self, node: Node) -> list[Value]:
        out: list[Value] = []
        for a in node.raw[0].args:
            if isinstance(a, fx.Node):
                out.append(a)
            elif isinstance(a, (list, tuple)):
                out.extend(x for x in a if isinstance(x, fx.Node))
        return out

    def embedding(self, node: Node, *, dtype: Any = np.float64) -> np.ndarray:
        table = self.const_value(node.raw[0].args[0])
        if table is None or table.ndim != 2:
            raise Declined(f"{node.name}: its table is not a constant matrix")
        return table if dtype is None else table.astype(dtype)

    def set_embedding(self, node: Node, table: np.ndarray) -> None:
        raw = node.raw[0]
        src = raw.args[0]
        base = src.target if src.op == "get_attr" else node.name
        new = self._new_param(raw, base, table, src)
        raw.args = (new, *raw.args[1:])
        self.set_dim(raw, -1, table.shape[1])
        self.invalidate()

    def layout(self, node: Node) -> Layout | None:
        raw = node.raw[0]
        t = raw.target
        if raw.op != "call_function" or not raw.args or not isinstance(raw.args[0], (fx.Node, list, tuple)):
            return None
        x = raw.args[0]
        rank = self.rank(x) if isinstance(x, fx.Node) else None
        if t in _IDENTITY:
            return Layout("identity")
        if t is aten.dropout.default:
            train = raw.args[2] if len(raw.args) > 2 else raw.kwargs.get("train", False)
            return None if train else Layout("identity")
        if t in _TO:
            val = raw.meta.get("val")
            return Layout("identity") if val is None or val.dtype.is_floating_point else None
        if t in _RESHAPE:
            target = raw.args[1]
            ok = all(isinstance(d, int) for d in target)
            return Layout("reshape", [], list(target) if ok else None)
        if t in _RESHAPE_NOTARGET:
            return Layout("reshape")
        if t is aten.expand.default:
            target = raw.args[1]
            ok = all(isinstance(d, int) for d in target)
            return Layout("expand", [], list(target) if ok else None)
        if rank is None:
            return None
        if t is aten.mean.dim:
            dims = raw.args[1]
            if dims is None:
                return None
            dims = [dims] if isinstance(dims, int) else dims
            return Layout("reduce", sorted(int(d) % rank for d in dims))
        if t in (aten.select.int, aten.slice.Tensor, aten.index_select.default):
            dim = raw.args[1] if len(raw.args) > 1 else raw.kwargs.get("dim", 0)
            return Layout("select", [int(dim) % rank])
        if t is aten.cat.default:
            first = x[0] if isinstance(x, (list, tuple)) and x else None
            r = self.rank(first) if isinstance(first, fx.Node) else None
            dim = raw.args[1] if len(raw.args) > 1 else raw.kwargs.get("dim", 0)
            return None if r is None else Layout("concat", [int(dim) % r])
        return None

    def is_harmless_reader(self, node: Node) -> bool:
        """Readers that do not compute anything from the value (metadata assertions)."""
        return node.raw[0].target in _HARMLESS

    def is_shape_reader(self, node: Node) -> bool:
        raw = node.raw[0]
        if raw.op == "call_function":
            return raw.target in _SHAPE_READERS or (raw.target is getattr and len(raw.args) > 1
                                                    and raw.args[1] in ("shape", "ndim", "dtype", "device"))
        return raw.op == "call_method" and raw.target in ("size", "dim", "numel")

    def _entry(self, a: Any):
        if isinstance(a, int) and not isinstance(a, bool):
            return a
        if isinstance(a, fx.Node):
            c = self.const_value(a) if a.op != "call_function" or a.target not in _SYM_SIZE else None
            if c is not None and c.ndim == 0 and np.issubdtype(c.dtype, np.integer):
                return int(c)
            if a.op == "call_function" and a.target is aten.sym_size.int:
                r = self.rank(a.args[0])
                if r is not None:
                    return Dim(a.args[0], int(a.args[1]) % r - r)
            if a.op == "call_method" and a.target == "size" and len(a.args) > 1 and isinstance(a.args[1], int):
                r = self.rank(a.args[0])
                if r is not None:
                    return Dim(a.args[0], a.args[1] % r - r)
        return None

    def shape_target(self, node: Node) -> list | None:
        raw = node.raw[0]
        if raw.op != "call_function" or (raw.target not in _RESHAPE and raw.target is not aten.expand.default):
            return None
        target = raw.args[1] if len(raw.args) > 1 else None
        if not isinstance(target, (list, tuple)):
            return None
        return [self._entry(a) for a in target]

    def can_narrow_target(self, node: Node, index: int) -> str:
        t = self.shape_target(node)
        if t is None or type(node.raw[0].args[1][index]) is not int:
            return f"{node.name}: entry {index} of its target is not a constant"
        return ""

    def narrow_target(self, node: Node, index: int, size: int) -> None:
        raw = node.raw[0]
        target = list(raw.args[1])
        target[index] = int(size)
        raw.args = (raw.args[0], target, *raw.args[2:])
        self.invalidate()

    def shape_read_problems(self, node: Node, narrowed, changes=None) -> list[str]:
        raw = node.raw[0]
        x = raw.args[0] if raw.args else None
        changes = changes or narrowed
        axis = changes(x) if isinstance(x, fx.Node) else None
        r = self.rank(x) if isinstance(x, fx.Node) else None
        if raw.target in ("dim", "ndim", "dtype", "device") or (raw.target is getattr and raw.args[1] != "shape"):
            return []
        if (raw.target is aten.sym_size.int or (raw.op == "call_method" and raw.target == "size"
                                                 and len(raw.args) > 1)):
            if r is not None and axis is not None and int(raw.args[1]) % r != axis % r:
                return []  # the batch or sequence size
        problems = []
        for u in raw.users:
            t = self.shape_target(self.node_of(u)) if self.node_of(u) is not None else None
            if t is not None and u.args[0] is not raw:
                where = [i for i, a in enumerate(u.args[1]) if a is raw]
                out_axis = narrowed(u)
                if out_axis is not None and where == [len(t) + out_axis]:
                    continue
            problems.append(f"{_target_name(u)} ({u.name}) computes from the width of {x.name} "
                            f"(read by {node.name}): narrowing would change its result")
        return problems

    def set_layout_target(self, node: Node, target) -> None:
        raw = node.raw[0]
        raw.args = (raw.args[0], [int(t) for t in target], *raw.args[2:])
        self.invalidate()

    def edit_const(self, value: Value, fn, *, width: int, new_width: int | None = None,
                   reader: Node | None = None) -> str:
        chain: list[fx.Node] = []
        v = value
        while v.op != "get_attr":
            t = v.target
            if v.op != "call_function" or not v.args or not isinstance(v.args[0], fx.Node):
                raise Declined(f"constant {value.name} is not computed from a parameter")
            ok = (t in _IDENTITY or t in _TO or t in _RESHAPE or t in _RESHAPE_NOTARGET
                  or t is aten.expand.default)
            if t in (aten.select.int, aten.slice.Tensor):
                r = self.rank(v.args[0])
                ok = r is not None and int(v.args[1]) % r != r - 1
            if not ok:
                raise Declined(f"constant {value.name} is computed by {_target_name(v)}: its parameter cannot be edited")
            if len(v.users) > 1 and chain:
                raise Declined(f"constant {v.name} is shared: cannot edit it for one reader")
            chain.append(v)
            v = v.args[0]
        source = self.const_value(v)
        if source is None or source.ndim == 0 or source.shape[-1] not in (width, 1):
            raise Declined(f"parameter {v.target} is not [..., {width}]")
        new = np.asarray(fn(source.astype(np.float64)))
        consumer = chain[-1] if chain else None
        anchor = consumer if consumer is not None else next(iter(value.users))
        param = self._new_param(anchor, v.target, new, v)
        if consumer is None and reader is not None:
            for r in reader.raw:
                if isinstance(r, fx.Node):
                    r.replace_input_with(value, param)
        elif consumer is None:
            value.replace_all_uses_with(param)
        else:
            consumer.args = (param, *consumer.args[1:])
        if new_width is not None:
            for p in chain:
                if (p.target in _RESHAPE or p.target is aten.expand.default) and p.args[1] \
                        and p.args[1][-1] == width:
                    p.args = (p.args[0], [*p.args[1][:-1], new_width], *p.args[2:])
                self.set_dim(p, -1, new_width)
        self.invalidate()
        return str(v.target)

    def set_dim(self, value: Value, axis: int, size: int) -> None:
        val = value.meta.get("val") if isinstance(value, fx.Node) else None
        if val is None or not hasattr(val, "shape"):
            return
        shape = list(val.shape)
        if not shape:
            return
        shape[axis] = size
        value.meta["val"] = torch.empty(shape, dtype=val.dtype, device="meta")

    def _call(self, before: fx.Node, target, args, like: fx.Node, shape=None) -> fx.Node:
        with self.graph.inserting_before(before):
            n = self.graph.call_function(target, tuple(args))
        val = like.meta.get("val") if isinstance(like, fx.Node) else None
        if val is not None and hasattr(val, "shape"):
            n.meta["val"] = torch.empty(list(shape) if shape is not None else list(val.shape),
                                        dtype=val.dtype, device="meta")
        return n

    def insert(self, value: Value, op: str, *, n: int | None = None, weight: np.ndarray | None = None,
               bias: np.ndarray | None = None) -> Value:
        users = [u for u in value.users]
        anchor = value.next
        val = value.meta.get("val") if isinstance(value, fx.Node) else None
        # the dims as the meta value holds them (symbolic sizes of dynamic axes included)
        shape = list(val.shape) if val is not None and hasattr(val, "shape") else self.shape(value)
        if shape is not None and any(d is None for d in shape):
            shape = None
        if op == "center":
            m = self._call(anchor, aten.mean.dim, (value, [-1], True), value,
                           None if shape is None else [*shape[:-1], 1])
            out = self._call(anchor, aten.sub.Tensor, (value, m), value)
        elif op == "keep":
            out = self._call(anchor, aten.slice.Tensor, (value, -1, 0, n), value,
                             None if shape is None else [*shape[:-1], n])
        elif op == "scale_shift":
            out = value
            if weight is not None:
                out = self._call(anchor, aten.mul.Tensor, (out, self._new_param(anchor, f"{value.name}_weight", weight, None)), value)
            if bias is not None:
                out = self._call(anchor, aten.add.Tensor, (out, self._new_param(anchor, f"{value.name}_bias", bias, None)), value)
            if out is value:
                return value
        elif op == "uncompress":
            s = self._call(anchor, aten.sum.dim_IntList, (value, [-1], True), value,
                           None if shape is None else [*shape[:-1], 1])
            neg = self._call(anchor, aten.neg.default, (s,), s)
            out = self._call(anchor, aten.cat.default, ([value, neg], -1), value,
                             None if shape is None else [*shape[:-1], shape[-1] + 1])
        else:
            raise ValueError(f"unknown insert op {op!r}")
        for u in users:
            u.replace_input_with(value, out)
        self.invalidate()
        return out

    def replace_norm(self, node: Node, kind: str, *, eps: float, weight: np.ndarray | None = None,
                     bias: np.ndarray | None = None) -> Node:
        raw = node.raw[0]
        x = raw.args[0]
        width = int(raw.args[1][0])
        params = [a for a in raw.args[2:4] if isinstance(a, fx.Node)]
        like = params[0] if params else None

        def param(base, arr):
            return self._new_param(raw, f"{node.name}_{base}", arr, like)

        if kind == "rms_norm":
            w = param("weight", weight) if weight is not None else None
            new = self._call(raw, aten.rms_norm.default, (x, [width], w, float(eps)), raw)
            weight = None
        elif kind == "crms_norm":
            from backends.triton.crms_norm import crms_norm_op

            new = self._call(raw, crms_norm_op(), (x, None, float(eps)), raw)
        else:
            raise ValueError(f"unknown norm kind {kind!r}")
        last = new
        if weight is not None:
            last = self._call(raw, aten.mul.Tensor, (last, param("weight", weight)), raw)
        if bias is not None:
            last = self._call(raw, aten.add.Tensor, (last, param("bias", bias)), raw)
        if isinstance(x, fx.Node) and "val" in x.meta:
            for n_ in {new, last}:
                n_.meta["val"] = torch.empty(list(x.meta["val"].shape), dtype=x.meta["val"].dtype, device="meta")
        raw.replace_all_uses_with(last)
        self.graph.erase_node(raw)
        self.invalidate()
        self.nodes()
        return self.node_of(new)

    # -- edits -------------------------------------------------------------------------
    def bypass(self, node: Node) -> None:
        node = self.node_of(node.raw[0]) or node  # inputs may have been rewired since
        self._rewire(node.output, node.inputs[0])
        node.output.replace_all_uses_with(node.inputs[0])
        for raw in reversed(node.raw):
            self.graph.erase_node(raw)
        self._drop(node)

    def tag(self, node: Node, pass_name: str, replaced: Iterable[str]) -> None:
        for raw in node.raw:
            raw.meta["rewriter"] = {"pass": pass_name, "replaced": list(replaced)}

    def finalize(self) -> None:
        """Drop dead nodes and parameters no node reads any more; recompile."""
        g = self.graph
        for n in list(reversed(g.nodes)):
            if n.op in ("get_attr", "call_function") and not n.users:
                if n.op == "get_attr" or self.const_value(n) is not None:
                    g.erase_node(n)
        used = {n.target for n in g.nodes if n.op == "get_attr"}
        for name, _ in list(self.gm.named_parameters(recurse=False)):
            if name.startswith("_rw_") and name not in used:
                delattr(self.gm, name)
        g.lint()
        self.gm.recompile()
        self.invalidate()

    def capture(self, values, feeds) -> list[np.ndarray]:
        names = [n.name for n in self.graph.nodes if n.op == "placeholder"]
        args = [to_torch(feeds[n]) for n in names]
        want: dict[fx.Node, Any] = {v: None for v in values}

        class _Recorder(fx.Interpreter):
            def run_node(self, n):
                result = super().run_node(n)
                if n in want:
                    want[n] = result.detach().clone()
                return result

        # export specialises the batch dim: run in chunks of the example inputs' batch
        ex = [to_torch(e) for e in self.example_inputs]
        step = min((e.shape[0] for e in ex if e.dim()), default=None)
        total = min((a.shape[0] for a in args if a.dim()), default=None)
        starts = [0] if not step or not total or total <= step else range(0, total // step * step, step)
        got: dict[fx.Node, list] = {v: [] for v in values}
        for i in starts:
            chunk = [a[i : i + step] if step and a.dim() and len(starts) > 1 else a for a in args]
            with torch.no_grad():
                _Recorder(self.gm).run(*chunk)
            for v in values:
                got[v].append(want[v].float() if want[v].dtype == torch.bfloat16 else want[v])
        return [torch.cat(got[v]).numpy() if len(got[v]) > 1 else got[v][0].numpy() for v in values]

    def set_norm(self, node: Node, *, weight: np.ndarray | None = None, bias: np.ndarray | None = None) -> None:
        raw = node.raw[0]
        is_ln = raw.target is aten.layer_norm.default
        if bias is not None and not is_ln:
            raise Declined(f"{node.name}: {_target_name(raw)} has no bias")
        names = ["input", "normalized_shape", "weight", "bias", "eps", "cudnn_enable"] if is_ln else \
            ["input", "normalized_shape", "weight", "eps"]
        args, kwargs = list(raw.args), dict(raw.kwargs)
        last = 3 if (is_ln and bias is not None) else 2
        while len(args) <= last:  # make weight (and bias) positional
            k = names[len(args)]
            args.append(kwargs.pop(k, None))
        for idx, arr in ((2, weight), (3, bias)):
            if arr is None:
                continue
            old = args[idx] if isinstance(args[idx], fx.Node) else None
            like = old if old is not None else None
            base = old.target if old is not None and old.op == "get_attr" else f"{node.name}_{names[idx]}"
            args[idx] = self._new_param(raw, base, np.asarray(arr).reshape(-1), like)
        raw.args, raw.kwargs = tuple(args), kwargs
        self.invalidate()

    def insert_scale(self, value: Value, factor: float, name: str) -> Value:
        val = value.meta.get("val") if isinstance(value, fx.Node) else None
        dtype = val.dtype if val is not None and getattr(val, "dtype", None) is not None and val.dtype.is_floating_point \
            else torch.float32
        users = list(value.users)
        base = "".join(c if c.isalnum() else "_" for c in name)
        target = f"_rw_{base}_{next(self._names)}"
        while hasattr(self.gm, target):
            target = f"_rw_{base}_{next(self._names)}"
        self.gm.add_submodule(target, ConstantScale(factor, dtype))
        with self.graph.inserting_after(value):
            out = self.graph.call_module(target, (value,))
        if val is not None and hasattr(val, "shape"):
            out.meta["val"] = torch.empty(list(val.shape), dtype=val.dtype, device="meta")
        for u in users:
            u.replace_input_with(value, out)
        self.invalidate()
        return out

    def replace_linear(self, node: Node, op, bias: np.ndarray | None) -> Node:
        raw, x = node.raw[0], node.inputs[0]
        wsrc = raw.args[1] if raw.target is not aten.addmm.default else raw.args[2]
        old = [a for a in raw.all_input_nodes if a.op == "get_attr"]
        consts = []
        for k, a in op.consts.items():
            arr = np.ascontiguousarray(a)
            if arr.dtype == np.uint32:  # torch has no uint32 bit ops: same bits as int32
                arr = arr.view(np.int32)
            name = f"_rw_{node.name}_{k}_{next(self._names)}"
            self.gm.register_buffer(name, torch.from_numpy(arr.copy()))
            with self.graph.inserting_before(raw):
                g = self.graph.get_attr(name)
            g.meta["val"] = getattr(self.gm, name)
            consts.append(g)
        b = None if bias is None else self._new_param(raw, f"{node.name}_bias", bias, wsrc)
        call = self._call(raw, op.torch_op(), (x, *consts, b, *[int(v) for v in op.attrs.values()]), raw)
        raw.replace_all_uses_with(call)
        self.graph.erase_node(raw)
        for a in old:  # drop the replaced weight (and bias) when nothing else reads it
            if not a.users:
                target = a.target
                self.graph.erase_node(a)
                if not any(n.op == "get_attr" and n.target == target for n in self.graph.nodes):
                    parent, _, leaf = target.rpartition(".")
                    mod = self.gm.get_submodule(parent) if parent else self.gm
                    if hasattr(mod, leaf):
                        delattr(mod, leaf)
        self.invalidate()
        self.nodes()
        return self.node_of(call)

    # -- whole model -------------------------------------------------------------------
    def copy(self) -> FxView:
        return FxView(copy.deepcopy(self.gm), self.example_inputs)

    def raw_op_types(self) -> list[str]:
        return [_target_name(n) for n in self.graph.nodes
                if n.op in ("call_function", "call_module", "call_method")
                and not _target_name(n).startswith("_guards")]
