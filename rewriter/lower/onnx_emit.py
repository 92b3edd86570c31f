"""Emission of new ops in ONNX (layer 4, docs/architecture.md): the edits that build nodes
the model did not have, through the ONNX view's edit primitives.

* ``insert(view, value, op)``: ``center`` (x - mean(x)), ``keep`` (the first ``n`` channels),
  ``scale_shift`` (a channel-wise Mul / Add), ``uncompress`` (append ``-sum(x)``).
* ``replace_norm(view, node, kind)``: a norm (a recognised chain, a LayerNormalization or
  a fused Skip*Norm) replaced by RMSNorm (``RMSNormalization`` from opset 23, the
  standard-op chain below) or CRMSNorm (a ``rewriter::CRMSNorm`` function,
  ``backends/ort/functions.py``), then the affine as Mul / Add.
* ``insert_scale``, ``replace_linear``, ``upgrade_opset``.

The pass-facing entry points, one per edit for both IRs, are in ``rewriter/lower/__init__.py``."""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import onnx_ir as ir

from backends.ort import functions as F
from backends.ort.functions import OPSET18_CHANGED, OPSET_UPGRADE_BLOCKERS, OPSET_UPGRADE_MIN
from rewriter.ir.onnx_view import OnnxView
from rewriter.ir.view import Declined, Node, Value


def insert(view: OnnxView, value: Value, op: str, *, n: int | None = None, weight: np.ndarray | None = None,
           bias: np.ndarray | None = None) -> Value:
    anchor = value.producer()
    if anchor is None:
        raise Declined(f"cannot insert after graph input {view.value_name(value)}")
    name = view.value_name(value)
    axes = view._int64_const(f"{name}_axes", [-1])
    shape_last = None
    if op == "center":
        m = view._new_node("ReduceMean", [value, axes], [ir.AttrInt64("keepdims", 1)], f"{name}_center_mean")
        if view.opset < 18:
            m = view._new_node("ReduceMean", [value], [ir.AttrInt64s("axes", [-1]), ir.AttrInt64("keepdims", 1)],
                               f"{name}_center_mean")
        sub = view._new_node("Sub", [value, m.outputs[0]], (), f"{name}_center")
        nodes, out = [m, sub], sub.outputs[0]
    elif op == "keep":
        sl = view._new_node("Slice", [value, view._int64_const(f"{name}_start", [0]),
                                      view._int64_const(f"{name}_end", [n]), axes], (), f"{name}_keep")
        nodes, out, shape_last = [sl], sl.outputs[0], n
    elif op == "scale_shift":
        nodes, out = [], value
        dt = view._dtype_of(value)
        if weight is not None:
            nodes.append(view._new_node("Mul", [out, view._new_initializer(f"{name}.weight", weight.astype(dt))],
                                        (), f"{name}_weight"))
            out = nodes[-1].outputs[0]
        if bias is not None:
            nodes.append(view._new_node("Add", [out, view._new_initializer(f"{name}.bias", bias.astype(dt))],
                                        (), f"{name}_bias"))
            out = nodes[-1].outputs[0]
        if not nodes:
            return value
    elif op == "uncompress":
        s = view._new_node("ReduceSum", [value, axes], [ir.AttrInt64("keepdims", 1)], f"{name}_sum")
        neg = view._new_node("Neg", [s.outputs[0]], (), f"{name}_neg")
        cat = view._new_node("Concat", [value, neg.outputs[0]], [ir.AttrInt64("axis", -1)], f"{name}_uncompress")
        nodes, out = [s, neg, cat], cat.outputs[0]
        w = view.shape(value)
        shape_last = None if not w or w[-1] is None else w[-1] + 1
    else:
        raise ValueError(f"unknown insert op {op!r}")
    old_shape = value.shape
    view._splice(anchor, value, nodes, out, shape_last=shape_last)
    if op in ("center", "uncompress"):
        for nd in nodes[:-1]:
            nd.outputs[0].shape = None
    if old_shape is not None and shape_last is None:
        out.shape = old_shape
    view.invalidate()
    return out


def upgrade_opset(view: OnnxView, version: int, ignore: Iterable[ir.Node] = ()) -> str | None:
    """Bump the default-domain opset to ``version`` when no op in the model changed
    meaning on the way; returns None on success, else the reason it was not done.
    ``ignore``: nodes the caller is about to remove (the norm chains it replaces)."""
    if view.opset >= version:
        return None
    if view.opset < OPSET_UPGRADE_MIN:
        return f"opset {view.opset} < {OPSET_UPGRADE_MIN}: too many ops changed meaning since"
    changed = OPSET_UPGRADE_BLOCKERS | (OPSET18_CHANGED if view.opset < 18 else frozenset())
    skip = {id(n) for n in ignore}
    blockers = sorted({n.op_type for n in view.graph.all_nodes()
                       if n.domain in ("", "ai.onnx") and n.op_type in changed and id(n) not in skip})
    if blockers:
        return f"the model uses {', '.join(blockers)}, whose meaning changed after opset {view.opset}"
    if any(n.version is not None for n in view.graph.all_nodes()):
        return "nodes carry their own opset versions"
    view.model.opset_imports[""] = version
    return None


def replace_norm(view: OnnxView, node: Node, kind: str, *, eps: float, weight: np.ndarray | None = None,
                 bias: np.ndarray | None = None) -> Node:
    raw = node.raw[0]
    # read from the IR, not the Node: an edit since it was grouped may have rewired it
    # (a chain's first op reads x first; its last op writes the output)
    x, out = raw.inputs[0], node.raw[-1].outputs[0]
    if "skip" in node.attrs:
        x = raw.outputs[3]
    shape = view.shape(x)
    width = shape[-1] if shape else None
    dt = view._dtype_of(x)
    name = node.name
    nodes: list[ir.Node] = []
    if "skip" in node.attrs:  # the join comes out of the fused op: s = input + skip (+ bias)
        add = ir.Node("", "Add", [raw.inputs[0], raw.inputs[1]], name=f"{name}_add")
        nodes.append(add)
        skip_bias = view._skip_bias(raw)
        if skip_bias is not None:
            nodes.append(ir.Node("", "Add", [add.outputs[0], skip_bias], name=f"{name}_add_bias"))
        s_new = nodes[-1].outputs[0]
        for n in nodes:
            n.outputs[0].dtype, n.outputs[0].shape = x.dtype, raw.inputs[0].shape
            n.outputs[0].name = view._free_name(f"{n.name}_out")
        view._replace_uses(x, s_new)
        x = s_new
        shape = view.shape(raw.inputs[0])
        width = shape[-1] if shape else None
        if width is None:
            g = view.const_value(raw.inputs[2])
            width = None if g is None else int(g.size)
        dt = view._dtype_of(x)
    if kind == "rms_norm":
        if width is None and weight is None:
            raise Declined(f"{name}: the width of its input is unknown")
        xin, cdt = x, dt
        if view.opset < 23 and dt.itemsize < 4:
            # the standard-op chain runs in float32, as the exporters' fp16/bf16 chains do
            # (RMSNormalization computes in float32 itself: stash_type=1)
            cast_in = ir.Node("", "Cast", [x], [ir.AttrInt64("to", ir.DataType.FLOAT)], name=f"{name}_to_f32")
            nodes.append(cast_in)
            xin, cdt = cast_in.outputs[0], np.dtype(np.float32)
        keep_weight = xin is not x
        scale = weight if weight is not None and not keep_weight else np.ones(width or weight.size)
        scale_v = view._new_initializer(f"{name}.scale", scale.astype(cdt))
        consts = {} if view.opset >= 23 else {
            "axes": view._int64_const(f"{name}_axes", [-1]),
            "eps": view._new_initializer(f"{name}_eps", np.asarray([eps], dtype=cdt)),
            "two": view._new_initializer(f"{name}_two", np.asarray(2, dtype=cdt))}
        nodes += F.rms_nodes(xin, scale_v, eps, view.opset, f"{name}_rms", consts)
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
        F.ensure_crms_function(view.model, "rms" if view.opset >= 23 else "chain")
        dtype = (x.dtype or ir.DataType.FLOAT) if F.needs_dtype(view.opset) else None
        nodes.append(F.crms_call(x, eps, width, f"{name}_crms", dtype))
    else:
        raise ValueError(f"unknown norm kind {kind!r}")
    norm_node = nodes[-1]
    last = norm_node.outputs[0]
    if weight is not None:
        nodes.append(ir.Node("", "Mul", [last, view._new_initializer(f"{name}.weight", weight.astype(dt))],
                             name=f"{name}_weight"))
        last = nodes[-1].outputs[0]
    if bias is not None:
        nodes.append(ir.Node("", "Add", [last, view._new_initializer(f"{name}.bias", bias.astype(dt))],
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
    view.graph.insert_before(raw, nodes)
    view._replace_uses(out, last)
    view.graph.remove(list(reversed(node.raw)), safe=True)
    if "skip" in node.attrs:
        view.invalidate()  # the join went with the fused op
    else:
        view._splice_cache(raw, nodes)
    return view.node_of(norm_node)


def insert_scale(view: OnnxView, value: Value, factor: float, name: str) -> Value:
    anchor = value.producer()
    if anchor is None:
        raise Declined(f"cannot insert after graph input {view.value_name(value)}")
    const = view._new_initializer(f"{name}.factor", np.asarray(factor, dtype=view._dtype_of(value)))
    mul = view._new_node("Mul", [value, const], (), name)
    mul.outputs[0].name = f"{mul.name}_out"
    old_shape = value.shape
    view._splice(anchor, value, [mul], mul.outputs[0])
    mul.outputs[0].shape = old_shape
    view.invalidate()
    return mul.outputs[0]


def replace_linear(view: OnnxView, node: Node, op, bias: np.ndarray | None) -> Node:
    fn = op.onnx_function(view.opset)
    key = fn.identifier()
    if key not in view.model.functions:
        view.model.functions[key] = fn
    view.model.opset_imports.setdefault(fn.domain, 1)
    raw, x, out = node.raw[0], node.inputs[0], node.output
    inits = [view._new_initializer(f"{node.name}.{k}", np.ascontiguousarray(a)) for k, a in op.consts.items()]
    attrs = {**op.attrs, **getattr(op, "onnx_attrs", {})}
    call = ir.Node(fn.domain, fn.name, [x, *inits], [ir.AttrInt64(k, int(v)) for k, v in attrs.items()],
                   name=f"{node.name}_{fn.name}__rw{next(view._names)}")
    nodes, last = [call], call.outputs[0]
    if bias is not None:
        b = view._new_initializer(f"{node.name}.bias", bias.astype(view._dtype_of(x)))
        nodes.append(ir.Node("", "Add", [last, b], name=f"{node.name}_bias__rw{next(view._names)}"))
        last = nodes[-1].outputs[0]
    for n in nodes:
        n.outputs[0].dtype, n.outputs[0].shape = out.dtype, out.shape
    view.graph.insert_before(raw, nodes)
    view._replace_uses(out, last)
    for r in reversed(node.raw):
        view.graph.remove(r, safe=True)
    view.invalidate()
    view.nodes()
    return view.node_of(call)
