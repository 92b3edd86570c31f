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
from torch.fx.passes.shape_prop import ShapeProp

from rewriter.canon.fx_nodes import canonicalize, classify
from rewriter.ir import fx_consts, fx_params, fx_shapes
from rewriter.ir.fx_consts import FxConsts
from rewriter.ir.fx_ops import (  # noqa: F401 - the op tables, shared with recognition
    _BN,
    _CONV,
    _ELEMENTWISE,
    _HARMLESS,
    _IDENTITY,
    _LINEAR,
    _RESHAPE,
    _RESHAPE_NOTARGET,
    _SHAPE_READERS,
    _SIMPLE,
    _SYM_SIZE,
    _TO,
    _TRANSPOSE,
    _target_name,
    aten,
)
from rewriter.ir.view import (
    Affine,
    ConvParams,
    GraphView,
    Layout,
    LinearParams,
    Node,
    NormParams,
    Value,
)

log = logging.getLogger(__name__)


def capture(module: torch.nn.Module, example_inputs: Sequence[Any]) -> fx.GraphModule:
    """torch.export first (real models); symbolic_trace for what export cannot take."""
    try:
        ep = torch.export.export(module, tuple(example_inputs))
        gm = ep.module()
    except Exception as err:  # noqa: BLE001 - fall back, and say so
        log.info("torch.export failed (%s); falling back to symbolic_trace", err)
        gm = fx.symbolic_trace(module)
        try:
            ShapeProp(gm).propagate(*example_inputs)
        except Exception as perr:  # noqa: BLE001
            log.info("shape propagation failed: %s", perr)
    return canonicalize(gm)


class FxView(GraphView):
    """A GraphView over a ``torch.fx.GraphModule``."""

    ir = "torch"

    def __init__(self, gm: fx.GraphModule, example_inputs: Sequence[Any] = (), source: torch.nn.Module | None = None):
        super().__init__()
        self.gm = gm
        self.example_inputs = tuple(example_inputs)
        self.source = source  # the user's module ``gm`` was captured from: verification's reference
        self.consts = FxConsts(gm)
        self._names = itertools.count()

    @property
    def graph(self) -> fx.Graph:
        return self.gm.graph

    def invalidate(self) -> None:
        super().invalidate()
        self.consts.clear()

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
        return fx_consts.meta_shape(value)

    def rank(self, value: Value) -> int | None:
        return fx_consts.rank(value)

    def shape(self, value: Value) -> tuple | None:
        return fx_consts.shape(value)

    def value_name(self, value: Value) -> str:
        return value.name

    # -- constants ---------------------------------------------------------------------
    def const_value(self, value: Any) -> np.ndarray | None:
        return self.consts.value(value)

    def _const_tensor(self, value: Any) -> torch.Tensor | None:
        return self.consts.tensor(value)

    def _attr(self, target: str) -> Any:
        return fx_consts.attr(self.gm, target)

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
        return fx_params.linear(self, node, dtype=dtype)

    def set_linear(self, node: Node, params: LinearParams) -> None:
        return fx_params.set_linear(self, node, params)

    def conv(self, node: Node) -> ConvParams:
        return fx_params.conv(self, node)

    def set_conv(self, node: Node, params: ConvParams) -> None:
        return fx_params.set_conv(self, node, params)

    def affine(self, node: Node) -> Affine | None:
        return fx_params.affine(self, node)

    def perm(self, node: Node) -> list[int]:
        return fx_params.perm(self, node)

    # -- residual-stream queries -------------------------------------------------------
    def norm(self, node: Node) -> NormParams:
        return fx_params.norm(self, node)

    def operands(self, node: Node) -> list[Value]:
        out: list[Value] = []
        for a in node.raw[0].args:
            if isinstance(a, fx.Node):
                out.append(a)
            elif isinstance(a, (list, tuple)):
                out.extend(x for x in a if isinstance(x, fx.Node))
        return out

    def embedding(self, node: Node, *, dtype: Any = np.float64) -> np.ndarray:
        return fx_params.embedding(self, node, dtype=dtype)

    def set_embedding(self, node: Node, table: np.ndarray) -> None:
        return fx_params.set_embedding(self, node, table)

    def layout(self, node: Node) -> Layout | None:
        return fx_shapes.layout(self, node)

    def is_harmless_reader(self, node: Node) -> bool:
        """Readers that do not compute anything from the value (metadata assertions)."""
        return node.raw[0].target in _HARMLESS

    def is_shape_reader(self, node: Node) -> bool:
        raw = node.raw[0]
        if raw.op == "call_function":
            return raw.target in _SHAPE_READERS or (raw.target is getattr and len(raw.args) > 1
                                                    and raw.args[1] in ("shape", "ndim", "dtype", "device"))
        return raw.op == "call_method" and raw.target in ("size", "dim", "numel")

    def shape_target(self, node: Node) -> list | None:
        return fx_shapes.shape_target(self, node)

    def can_narrow_target(self, node: Node, index: int) -> str:
        return fx_shapes.can_narrow_target(self, node, index)

    def narrow_target(self, node: Node, index: int, size: int) -> None:
        return fx_shapes.narrow_target(self, node, index, size)

    def shape_read_problems(self, node: Node, narrowed, changes=None) -> list[str]:
        return fx_shapes.shape_read_problems(self, node, narrowed, changes)

    def set_layout_target(self, node: Node, target) -> None:
        return fx_shapes.set_layout_target(self, node, target)

    def edit_const(self, value: Value, fn, *, width: int, new_width: int | None = None,
                   reader: Node | None = None) -> str:
        return fx_shapes.edit_const(self, value, fn, width=width, new_width=new_width, reader=reader)

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

    def set_norm(self, node: Node, *, weight: np.ndarray | None = None, bias: np.ndarray | None = None) -> None:
        return fx_params.set_norm(self, node, weight=weight, bias=bias)

    # -- whole model -------------------------------------------------------------------
    def copy(self) -> FxView:
        return FxView(copy.deepcopy(self.gm), self.example_inputs, self.source)

    def raw_op_types(self) -> list[str]:
        return [_target_name(n) for n in self.graph.nodes
                if n.op in ("call_function", "call_module", "call_method")
                and not _target_name(n).startswith("_guards")]
