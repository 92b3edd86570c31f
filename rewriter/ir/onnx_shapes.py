"""Shape-entry arithmetic and layout edits over an ONNX graph (layer 3, beside
``rewriter/ir/onnx_view.py``, whose methods of the same names call these).

A shape value (the target of a Reshape / Expand, built from ``Shape`` / ``Gather`` /
``Concat`` / arithmetic) is read as a list of entries: an int, a ``Dim`` (the size of an
axis of a value, read at run time), or None (not followed). A pass that narrows a channel
axis asks which entries of which targets carry that width (``layout``, ``shape_target``,
``shape_read_problems``) and rewrites them (``narrow_target``, ``set_layout_target``,
``edit_const``)."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from rewriter.ir.onnx_consts import _read_tensor
from rewriter.ir.view import Declined, Dim, Layout, Node, Value

_IDENTITY_OPS = {"Identity"}
_RESHAPE_OPS = {"Reshape", "Flatten", "Squeeze", "Unsqueeze"}
# ops a constant operand may be computed through from its parameter (edit_const)
_CONST_CHAIN_OPS = {"Identity", "Cast", "Reshape", "Expand", "Unsqueeze", "Squeeze", "Gather", "Slice"}

# ops of shape arithmetic whose output entries are entries of their first input (rank <= 1)
_SHAPE_PASS_OPS = {"Identity", "Cast", "Squeeze", "Unsqueeze", "Reshape", "Gather", "Slice", "Concat"}


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


def shape_entries(view, value: ir.Value | None, depth: int = 0) -> list | None:
    """An integer tensor of rank <= 1 (a shape being computed) as entries: ints, ``Dim``
    (``Shape`` reads) and None (not followed); None when its length is unknown."""
    if value is None or depth > 64:
        return None
    c = view.const_value(value)
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
        r = view.rank(p.inputs[0])
        if r is None:
            # the length of a shape vector being computed (TorchScript's expand idiom:
            # ConstantOfShape(Shape(target)))
            inner = shape_entries(view, p.inputs[0], depth + 1)
            plain = p.attributes.get_int("start", 0) == 0 and "end" not in p.attributes
            return [len(inner)] if inner is not None and plain else fallback
        start = p.attributes.get_int("start", 0)
        end = p.attributes.get_int("end", r)
        start, end = (min(max(a + r if a < 0 else a, 0), r) for a in (start, end))
        return [Dim(p.inputs[0], a - r) for a in range(start, end)]
    if op in ("Identity", "Cast", "Squeeze", "Unsqueeze", "Reshape"):
        inner = shape_entries(view, p.inputs[0], depth + 1)
        return inner if inner is not None else fallback
    if op == "Gather" and p.attributes.get_int("axis", 0) == 0:
        inner = shape_entries(view, p.inputs[0], depth + 1)
        idx = view.const_value(p.inputs[1])
        if inner is None or idx is None or idx.ndim > 1:
            return fallback
        try:
            return [inner[int(i)] for i in idx.reshape(-1)]
        except IndexError:
            return fallback
    if op == "Slice":
        inner = shape_entries(view, p.inputs[0], depth + 1)
        if inner is None:
            return fallback
        if len(p.inputs) > 1:
            args = [view.const_value(v) if v is not None else None for v in p.inputs[1:5]]
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
        n = shape_entries(view, p.inputs[0], depth + 1)
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
        parts = [shape_entries(view, v, depth + 1) for v in p.inputs]
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
            part = shape_entries(view, v, depth + 1)
            if part is None:
                return fallback
            out += part
        return out
    return fallback


def resize_keeps(view, node: Node, axis: int) -> bool:
    raw = node.raw[0]
    if raw.domain not in ("", "ai.onnx") or raw.op_type != "Resize" or not raw.inputs:
        return False
    x = raw.inputs[0]
    r = view.rank(x)
    if r is None or not -r <= axis < 0 or raw.attributes.get_ints("axes", None) is not None:
        return False
    sizes = raw.inputs[3] if len(raw.inputs) > 3 else None
    scales = raw.inputs[2] if len(raw.inputs) > 2 else None
    if sizes is not None:
        e = shape_entries(view, sizes)
        if e is None or len(e) != r:
            return False
        k = e[r + axis]
        si = view.shape(x)
        return (isinstance(k, Dim) and k.value is x and k.axis == axis) or (
            type(k) is int and si is not None and si[axis] == k)
    if scales is not None:
        c = view.const_value(scales)
        return c is not None and c.size == r and float(c.reshape(-1)[r + axis]) == 1.0
    return False


def shape_target(view, node: Node) -> list | None:
    raw = node.raw[0]
    if raw.domain not in ("", "ai.onnx") or raw.op_type not in ("Reshape", "Expand") or len(raw.inputs) < 2:
        return None
    return shape_entries(view, raw.inputs[1])


def _retarget(view, value: ir.Value, index: int, size: int, before: ir.Node | None) -> ir.Value:
    """``value`` (a shape being computed) with its constant entry ``index`` set to
    ``size``: a new initializer, or copies of the Concat / Unsqueeze / ... nodes that
    build it, each inserted after its original (``before`` None: check only)."""
    key = (value, index, size)
    if key in view._retargeted:
        return view._retargeted[key]
    c = view.const_value(value)
    if c is not None:
        if c.ndim > 1 or index >= c.size:
            raise Declined(f"{view.value_name(value)} is not a shape vector")
        if before is None:
            return value
        arr = c.reshape(-1).copy()
        arr[index] = size
        new = view._new_initializer(f"{view.value_name(value)}_narrow", arr.reshape(c.shape))
        view._retargeted[key] = new
        return new
    p = value.producer()
    if p is None or p.domain not in ("", "ai.onnx"):
        raise Declined(f"{view.value_name(value)} is computed at run time")
    inputs = list(p.inputs)
    if p.op_type == "Concat":
        off = 0
        for k, v in enumerate(inputs):
            part = shape_entries(view, v)
            if part is None:
                raise Declined(f"{p.op_type} ({p.name}) has a part of unknown length")
            if off <= index < off + len(part):
                inputs[k] = _retarget(view, v, index - off, size, before)
                break
            off += len(part)
        else:
            raise Declined(f"{p.op_type} ({p.name}) has no entry {index}")
    elif p.op_type in ("Identity", "Cast", "Squeeze", "Unsqueeze", "Reshape"):
        inputs[0] = _retarget(view, inputs[0], index, size, before)
    else:
        raise Declined(f"entry {index} of {view.value_name(value)} is computed by {p.op_type} ({p.name})")
    if before is None:
        return value
    clone = ir.Node(p.domain, p.op_type, inputs, [ir.Attr(a.name, a.type, a.value) for a in p.attributes.values()],
                    name=f"{p.name}_narrow__rw{next(view._names)}")
    clone.outputs[0].dtype, clone.outputs[0].shape = p.outputs[0].dtype, p.outputs[0].shape
    clone.outputs[0].name = view._free_name(f"{view.value_name(value)}_narrow")
    view.graph.insert_after(p, clone)  # beside the original: every later reader may share it
    if view._nodes is not None:  # keep the semantic-node cache in graph order
        orig = view._by_raw.get(id(p))
        fresh = view._classify(clone, set())
        at = view._nodes.index(orig) + 1 if orig is not None else len(view._nodes)
        view._nodes.insert(at, fresh)
        view._by_raw[id(clone)] = fresh
    view._retargeted[key] = clone.outputs[0]
    return clone.outputs[0]


def can_narrow_target(view, node: Node, index: int) -> str:
    raw = node.raw[0]
    try:
        _retarget(view, raw.inputs[1], index, 0, None)
    except Declined as why:
        return f"{raw.op_type} ({node.name}): {why}"
    return ""


def narrow_target(view, node: Node, index: int, size: int) -> None:
    raw = node.raw[0]
    raw.replace_input_with(1, _retarget(view, raw.inputs[1], index, size, raw))


def shape_read_problems(view, node: Node, narrowed, changes=None) -> list[str]:
    raw = node.raw[0]
    x = raw.inputs[0]

    changes = changes or narrowed

    def tainted(e) -> bool:
        return e is None or (isinstance(e, Dim) and changes(e.value) == e.axis)

    out = raw.outputs[0]
    if raw.op_type == "Shape":
        entries = shape_entries(view, out)
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
            problems.append(f"the shape {view.value_name(t)} of {view.value_name(x)} (read by {node.name}) "
                            "is a graph output")
        for use in t.uses():
            u = use.node
            op = u.op_type if u.domain in ("", "ai.onnx") else f"{u.domain}::{u.op_type}"
            if op in ("Reshape", "Expand", "ConstantOfShape") and use.idx == (0 if op == "ConstantOfShape" else 1):
                entries = shape_entries(view, t)
                where = [i for i, e in enumerate(entries or [None]) if tainted(e)]
                axis = narrowed(u.outputs[0])
                if entries is not None and axis is not None and where == [len(entries) + axis]:
                    continue  # the width of a value that narrows, as the channel axis of one that narrows too
                problems.append(f"{op} ({u.name}) builds its shape from the width of "
                                f"{view.value_name(x)} (read by {node.name}), but not as the channel axis "
                                "of a tensor that narrows with it")
                continue
            if op == "Resize" and use.idx == 3:
                entries = shape_entries(view, t)
                where = _tainted_parts(view, t, entries, seen, tainted)
                axis = narrowed(u.outputs[0])
                if entries is not None and axis is not None and where == [len(entries) + axis] \
                        and narrowed(u.inputs[0]) == axis:
                    continue  # the resampled tensor keeps its (narrowing) channel axis as it is
                problems.append(f"{op} ({u.name}) sizes its output from the width of {view.value_name(x)} "
                                f"(read by {node.name}), but not as the channel axis of a tensor that "
                                "narrows with it")
                continue
            if op in _SHAPE_PASS_OPS and (use.idx == 0 or op == "Concat"):
                entries = shape_entries(view, u.outputs[0])
                if entries is not None and not any(tainted(e) for e in entries):
                    continue  # e.g. Gather(shape, 0): the batch size only
                todo.append(u.outputs[0])
                continue
            problems.append(f"{op} ({u.name}) computes from the width of {view.value_name(x)} "
                            f"(read by {node.name}): narrowing would change its result")
    return list(dict.fromkeys(problems))


def _tainted_parts(view, t: ir.Value, entries: list | None, reached: set, tainted) -> list[int]:
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
        pe = shape_entries(view, part)
        if pe is None:
            return [-1]
        strict = part in reached
        out += [off + i for i, e in enumerate(pe)
                if (tainted(e) if strict else isinstance(e, Dim) and tainted(e))]
        off += len(pe)
    return out


def layout(view, node: Node) -> Layout | None:
    if "canon" in node.attrs:
        return None
    raw = node.raw[0]
    if raw.domain not in ("", "ai.onnx") or not raw.inputs or raw.inputs[0] is None:
        return None
    op = raw.op_type
    rank = view.rank(raw.inputs[0])
    if op in _IDENTITY_OPS:
        return Layout("identity")
    if op == "Dropout":
        training = raw.inputs[2] if len(raw.inputs) > 2 else None
        t = view.const_value(training) if training is not None else np.array(False)
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
            c = view.const_value(raw.inputs[1])
            target = None if c is None else [int(t) for t in c.reshape(-1)]
        return Layout("reshape", [], target)
    if op == "Expand":
        c = view.const_value(raw.inputs[1])
        return Layout("expand", [], None if c is None else [int(t) for t in c.reshape(-1)])
    if rank is None:
        return None
    if op == "ReduceMean":
        axes = None
        if len(raw.inputs) > 1 and raw.inputs[1] is not None:
            c = view.const_value(raw.inputs[1])
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
        if view.const_value(raw.inputs[1]) is None:
            return None
        return Layout("select", [raw.attributes.get_int("axis", 0) % rank])
    if op == "Slice":
        if any(view.const_value(v) is None for v in raw.inputs[1:] if v is not None):
            return None
        if len(raw.inputs) > 3 and raw.inputs[3] is not None:
            axes = [int(a) % rank for a in view.const_value(raw.inputs[3]).reshape(-1)]
        else:
            axes = list(range(view.const_value(raw.inputs[1]).size))
        return Layout("select", axes)
    if op == "Concat":
        return Layout("concat", [raw.attributes.get_int("axis", 0) % rank])
    return None


def set_layout_target(view, node: Node, target) -> None:
    raw = node.raw[0]
    arr = np.asarray(list(target), dtype=np.int64)
    raw.replace_input_with(1, view._new_initializer(f"{node.name}_shape", arr))
    view._const_cache.clear()


def edit_const(view, value: Value, fn, *, width: int, new_width: int | None = None,
               reader: Node | None = None) -> str:
    chain: list[ir.Node] = []
    v = value
    while True:
        if v.const_value is not None and not v.is_graph_input():
            break
        p = v.producer()
        if p is None:
            raise Declined(f"{view.value_name(value)} is not computed from a parameter")
        if p.op_type == "Constant" and "value" in p.attributes:
            break
        if p.op_type not in _CONST_CHAIN_OPS or p.domain not in ("", "ai.onnx"):
            raise Declined(f"constant {view.value_name(value)} is computed by {p.op_type} "
                           f"({p.name}): its parameter cannot be edited")
        if len(list(v.uses())) > 1 and chain:
            raise Declined(f"constant {view.value_name(v)} is shared: cannot edit it for one reader")
        rank = view.rank(p.inputs[0])
        if p.op_type in ("Gather", "Slice") and rank is not None:
            lay = layout(view, view.node_of(p) or Node("other", p.name or "?", [p.inputs[0]], v, [p]))
            if lay is None or rank - 1 in lay.axes:
                raise Declined(f"constant {view.value_name(value)} is selected along its channel axis")
        chain.append(p)
        v = p.inputs[0]
    source = view.const_value(v) if v.const_value is None else _read_tensor(v.const_value)
    if source.ndim == 0 or source.shape[-1] not in (width, 1):
        raise Declined(f"parameter {view.value_name(v)} has shape {list(source.shape)}, not [..., {width}]")
    new = np.asarray(fn(source.astype(np.float64)))
    consumer = chain[-1] if chain else None
    init = view._new_initializer(v.name or "const", new.astype(source.dtype))
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
                c = view.const_value(p.inputs[1])
                if c is not None and c.size and int(c.reshape(-1)[-1]) == width:
                    t = c.reshape(-1).astype(np.int64).copy()
                    t[-1] = new_width
                    p.replace_input_with(1, view._new_initializer(f"{p.name}_shape", t))
            view.set_dim(p.outputs[0], -1, new_width)
    view.invalidate()
    return v.name or "?"
