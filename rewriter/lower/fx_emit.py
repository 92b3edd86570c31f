"""Emission of new ops in torch.fx (layer 4, docs/architecture.md): the edits that build
calls the GraphModule did not have, through the FX view's edit primitives. New weights
become new ``nn.Parameter`` attributes (copy-on-write), so the module stays trainable.

* ``insert(view, value, op)``: ``center``, ``keep``, ``scale_shift``, ``uncompress`` (as in
  ``rewriter/lower/onnx_emit.py``).
* ``replace_norm(view, node, kind)``: ``aten.rms_norm`` or the project's ``crms_norm``
  op (``backends/triton/crms_norm.py``), then the affine.
* ``insert_scale`` (a ``ConstantScale`` module holding the factor as a buffer),
  ``replace_linear``.

The pass-facing entry points, one per edit for both IRs, are in ``rewriter/lower/__init__.py``."""

from __future__ import annotations

import numpy as np
import torch
import torch.fx as fx

from backends.triton.crms_norm import crms_norm_op
from rewriter.ir.fx_view import FxView
from rewriter.ir.view import Node, Value

aten = torch.ops.aten


class ConstantScale(torch.nn.Module):
    """``y = x * scale``, ``scale`` a 0-d buffer (not trained): the explicit, inspectable
    scaling op rewrites such as ``lns`` insert into a GraphModule (``insert_scale``)."""

    def __init__(self, factor: float, dtype: torch.dtype = torch.float32):
        super().__init__()
        self.register_buffer("scale", torch.tensor(float(factor), dtype=dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.scale


def insert(view: FxView, value: Value, op: str, *, n: int | None = None, weight: np.ndarray | None = None,
           bias: np.ndarray | None = None) -> Value:
    users = [u for u in value.users]
    anchor = value.next
    val = value.meta.get("val") if isinstance(value, fx.Node) else None
    # the dims as the meta value holds them (symbolic sizes of dynamic axes included)
    shape = list(val.shape) if val is not None and hasattr(val, "shape") else view.shape(value)
    if shape is not None and any(d is None for d in shape):
        shape = None
    if op == "center":
        m = view._call(anchor, aten.mean.dim, (value, [-1], True), value,
                       None if shape is None else [*shape[:-1], 1])
        out = view._call(anchor, aten.sub.Tensor, (value, m), value)
    elif op == "keep":
        out = view._call(anchor, aten.slice.Tensor, (value, -1, 0, n), value,
                         None if shape is None else [*shape[:-1], n])
    elif op == "scale_shift":
        out = value
        if weight is not None:
            out = view._call(anchor, aten.mul.Tensor, (out, view._new_param(anchor, f"{value.name}_weight", weight, None)), value)
        if bias is not None:
            out = view._call(anchor, aten.add.Tensor, (out, view._new_param(anchor, f"{value.name}_bias", bias, None)), value)
        if out is value:
            return value
    elif op == "uncompress":
        s = view._call(anchor, aten.sum.dim_IntList, (value, [-1], True), value,
                       None if shape is None else [*shape[:-1], 1])
        neg = view._call(anchor, aten.neg.default, (s,), s)
        out = view._call(anchor, aten.cat.default, ([value, neg], -1), value,
                         None if shape is None else [*shape[:-1], shape[-1] + 1])
    else:
        raise ValueError(f"unknown insert op {op!r}")
    for u in users:
        u.replace_input_with(value, out)
    view.invalidate()
    return out


def replace_norm(view: FxView, node: Node, kind: str, *, eps: float, weight: np.ndarray | None = None,
                 bias: np.ndarray | None = None) -> Node:
    raw = node.raw[0]
    x = raw.args[0]
    width = int(raw.args[1][0])
    params = [a for a in raw.args[2:4] if isinstance(a, fx.Node)]
    like = params[0] if params else None

    def param(base, arr):
        return view._new_param(raw, f"{node.name}_{base}", arr, like)

    if kind == "rms_norm":
        w = param("weight", weight) if weight is not None else None
        new = view._call(raw, aten.rms_norm.default, (x, [width], w, float(eps)), raw)
        weight = None
    elif kind == "crms_norm":
        new = view._call(raw, crms_norm_op(), (x, None, float(eps)), raw)
    else:
        raise ValueError(f"unknown norm kind {kind!r}")
    last = new
    if weight is not None:
        last = view._call(raw, aten.mul.Tensor, (last, param("weight", weight)), raw)
    if bias is not None:
        last = view._call(raw, aten.add.Tensor, (last, param("bias", bias)), raw)
    if isinstance(x, fx.Node) and "val" in x.meta:
        for n_ in {new, last}:
            n_.meta["val"] = torch.empty(list(x.meta["val"].shape), dtype=x.meta["val"].dtype, device="meta")
    raw.replace_all_uses_with(last)
    view.graph.erase_node(raw)
    view.invalidate()
    view.nodes()
    return view.node_of(new)


def insert_scale(view: FxView, value: Value, factor: float, name: str) -> Value:
    val = value.meta.get("val") if isinstance(value, fx.Node) else None
    dtype = val.dtype if val is not None and getattr(val, "dtype", None) is not None and val.dtype.is_floating_point \
        else torch.float32
    users = list(value.users)
    base = "".join(c if c.isalnum() else "_" for c in name)
    target = f"_rw_{base}_{next(view._names)}"
    while hasattr(view.gm, target):
        target = f"_rw_{base}_{next(view._names)}"
    view.gm.add_submodule(target, ConstantScale(factor, dtype))
    with view.graph.inserting_after(value):
        out = view.graph.call_module(target, (value,))
    if val is not None and hasattr(val, "shape"):
        out.meta["val"] = torch.empty(list(val.shape), dtype=val.dtype, device="meta")
    for u in users:
        u.replace_input_with(value, out)
    view.invalidate()
    return out


def replace_linear(view: FxView, node: Node, op, bias: np.ndarray | None) -> Node:
    raw, x = node.raw[0], node.inputs[0]
    wsrc = raw.args[1] if raw.target is not aten.addmm.default else raw.args[2]
    old = [a for a in raw.all_input_nodes if a.op == "get_attr"]
    consts = []
    for k, a in op.consts.items():
        arr = np.ascontiguousarray(a)
        if arr.dtype == np.uint32:  # torch has no uint32 bit ops: same bits as int32
            arr = arr.view(np.int32)
        name = f"_rw_{node.name}_{k}_{next(view._names)}"
        view.gm.register_buffer(name, torch.from_numpy(arr.copy()))
        with view.graph.inserting_before(raw):
            g = view.graph.get_attr(name)
        g.meta["val"] = getattr(view.gm, name)
        consts.append(g)
    b = None if bias is None else view._new_param(raw, f"{node.name}_bias", bias, wsrc)
    call = view._call(raw, op.torch_op(), (x, *consts, b, *[int(v) for v in op.attrs.values()]), raw)
    raw.replace_all_uses_with(call)
    view.graph.erase_node(raw)
    for a in old:  # drop the replaced weight (and bias) when nothing else reads it
        if not a.users:
            target = a.target
            view.graph.erase_node(a)
            if not any(n.op == "get_attr" and n.target == target for n in view.graph.nodes):
                parent, _, leaf = target.rpartition(".")
                mod = view.gm.get_submodule(parent) if parent else view.gm
                if hasattr(mod, leaf):
                    delattr(mod, leaf)
    view.invalidate()
    view.nodes()
    return view.node_of(call)
