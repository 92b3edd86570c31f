"""Shape targets and layout edits over a torch.fx graph (layer 3, beside
``rewriter/ir/fx_view.py``, whose methods of the same names call these): the target list of
a ``view`` / ``reshape`` / ``expand`` read as entries (an int, a ``Dim`` read with
``sym_size`` at run time, or None), narrowed when a pass drops channels, and constant
operands edited through the ops that compute them from a parameter (``edit_const``)."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch.fx as fx

from rewriter.ir.fx_ops import _IDENTITY, _RESHAPE, _RESHAPE_NOTARGET, _SYM_SIZE, _TO, _target_name, aten
from rewriter.ir.view import Declined, Dim, Layout, Node, Value


def layout(view, node: Node) -> Layout | None:
    raw = node.raw[0]
    t = raw.target
    if raw.op != "call_function" or not raw.args or not isinstance(raw.args[0], (fx.Node, list, tuple)):
        return None
    x = raw.args[0]
    rank = view.rank(x) if isinstance(x, fx.Node) else None
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
        r = view.rank(first) if isinstance(first, fx.Node) else None
        dim = raw.args[1] if len(raw.args) > 1 else raw.kwargs.get("dim", 0)
        return None if r is None else Layout("concat", [int(dim) % r])
    return None


def _entry(view, a: Any):
    if isinstance(a, int) and not isinstance(a, bool):
        return a
    if isinstance(a, fx.Node):
        c = view.const_value(a) if a.op != "call_function" or a.target not in _SYM_SIZE else None
        if c is not None and c.ndim == 0 and np.issubdtype(c.dtype, np.integer):
            return int(c)
        if a.op == "call_function" and a.target is aten.sym_size.int:
            r = view.rank(a.args[0])
            if r is not None:
                return Dim(a.args[0], int(a.args[1]) % r - r)
        if a.op == "call_method" and a.target == "size" and len(a.args) > 1 and isinstance(a.args[1], int):
            r = view.rank(a.args[0])
            if r is not None:
                return Dim(a.args[0], a.args[1] % r - r)
    return None


def shape_target(view, node: Node) -> list | None:
    raw = node.raw[0]
    if raw.op != "call_function" or (raw.target not in _RESHAPE and raw.target is not aten.expand.default):
        return None
    target = raw.args[1] if len(raw.args) > 1 else None
    if not isinstance(target, (list, tuple)):
        return None
    return [_entry(view, a) for a in target]


def can_narrow_target(view, node: Node, index: int) -> str:
    t = shape_target(view, node)
    if t is None or type(node.raw[0].args[1][index]) is not int:
        return f"{node.name}: entry {index} of its target is not a constant"
    return ""


def narrow_target(view, node: Node, index: int, size: int) -> None:
    raw = node.raw[0]
    target = list(raw.args[1])
    target[index] = int(size)
    raw.args = (raw.args[0], target, *raw.args[2:])
    view.invalidate()


def shape_read_problems(view, node: Node, narrowed, changes=None) -> list[str]:
    raw = node.raw[0]
    x = raw.args[0] if raw.args else None
    changes = changes or narrowed
    axis = changes(x) if isinstance(x, fx.Node) else None
    r = view.rank(x) if isinstance(x, fx.Node) else None
    if raw.target in ("dim", "ndim", "dtype", "device") or (raw.target is getattr and raw.args[1] != "shape"):
        return []
    if (raw.target is aten.sym_size.int or (raw.op == "call_method" and raw.target == "size"
                                             and len(raw.args) > 1)):
        if r is not None and axis is not None and int(raw.args[1]) % r != axis % r:
            return []  # the batch or sequence size
    problems = []
    for u in raw.users:
        t = shape_target(view, view.node_of(u)) if view.node_of(u) is not None else None
        if t is not None and u.args[0] is not raw:
            where = [i for i, a in enumerate(u.args[1]) if a is raw]
            out_axis = narrowed(u)
            if out_axis is not None and where == [len(t) + out_axis]:
                continue
        problems.append(f"{_target_name(u)} ({u.name}) computes from the width of {x.name} "
                        f"(read by {node.name}): narrowing would change its result")
    return problems


def set_layout_target(view, node: Node, target) -> None:
    raw = node.raw[0]
    raw.args = (raw.args[0], [int(t) for t in target], *raw.args[2:])
    view.invalidate()


def edit_const(view, value: Value, fn, *, width: int, new_width: int | None = None,
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
            r = view.rank(v.args[0])
            ok = r is not None and int(v.args[1]) % r != r - 1
        if not ok:
            raise Declined(f"constant {value.name} is computed by {_target_name(v)}: its parameter cannot be edited")
        if len(v.users) > 1 and chain:
            raise Declined(f"constant {v.name} is shared: cannot edit it for one reader")
        chain.append(v)
        v = v.args[0]
    source = view.const_value(v)
    if source is None or source.ndim == 0 or source.shape[-1] not in (width, 1):
        raise Declined(f"parameter {v.target} is not [..., {width}]")
    new = np.asarray(fn(source.astype(np.float64)))
    consumer = chain[-1] if chain else None
    anchor = consumer if consumer is not None else next(iter(value.users))
    param = view._new_param(anchor, v.target, new, v)
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
            view.set_dim(p, -1, new_width)
    view.invalidate()
    return str(v.target)
