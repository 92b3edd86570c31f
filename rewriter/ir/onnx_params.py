"""Parameter access on an ONNX graph (layer 3, beside ``rewriter/ir/onnx_view.py``, whose
methods of the same names call these): the weights of linear, conv, affine, norm and
embedding nodes read as arrays and written back copy-on-write (a changed weight becomes a
new initializer, so a tensor shared by two nodes is never changed behind the other
reader's back)."""

from __future__ import annotations

from typing import Any

import numpy as np
import onnx_ir as ir

from rewriter.ir.view import Affine, ConvParams, Declined, LinearParams, Node, NormParams, binary_affine


def linear(view, node: Node, *, dtype: Any = np.float64) -> LinearParams:
    def cast(a: np.ndarray) -> np.ndarray:
        return a if dtype is None else a.astype(dtype)

    raw = node.raw[0]
    if raw.op_type == "MatMul":
        w = cast(view.const_value(raw.inputs[1])).T
        b = None
        if len(node.raw) > 1:
            add = node.raw[1]
            other = add.inputs[1] if add.inputs[0] is raw.outputs[0] else add.inputs[0]
            b = cast(view.const_value(other)).reshape(-1)
        return LinearParams(w, b)
    # Gemm: Y = alpha * A @ B' + beta * C, B' = B.T if transB
    alpha = raw.attributes.get_float("alpha", 1.0)
    beta = raw.attributes.get_float("beta", 1.0)
    if dtype is None and (alpha != 1.0 or beta != 1.0):
        dtype = np.float64
    bmat = cast(view.const_value(raw.inputs[1]))
    w = bmat if raw.attributes.get_int("transB", 0) else bmat.T
    if alpha != 1.0:
        w = alpha * w
    b = None
    if len(raw.inputs) > 2 and raw.inputs[2] is not None:
        c = cast(view.const_value(raw.inputs[2])).reshape(-1)
        b = np.broadcast_to(c, (w.shape[0],))
        b = beta * b if beta != 1.0 else (b if dtype is None else b.copy())
    return LinearParams(w, b)


def set_linear(view, node: Node, params: LinearParams) -> None:
    raw = node.raw[0]
    wdt = view._dtype_of(raw.inputs[1])
    base = raw.inputs[1].name or node.name
    out_width = params.weight.shape[0]
    for r in node.raw:
        if r.outputs and r.outputs[0].shape is not None and len(r.outputs[0].shape):
            if r.outputs[0].shape[-1] != out_width:
                view.set_dim(r.outputs[0], -1, out_width)
    if raw.op_type == "MatMul":
        raw.replace_input_with(1, view._new_initializer(base, params.weight.T.astype(wdt, copy=False)))
        if params.bias is None:
            return
        if len(node.raw) > 1:
            add = node.raw[1]
            idx = 1 if add.inputs[0] is raw.outputs[0] else 0
            bdt = view._dtype_of(add.inputs[idx])
            add.replace_input_with(idx, view._new_initializer(base + ".bias", params.bias.astype(bdt)))
        else:
            bias = view._new_initializer(base + ".bias", params.bias.astype(wdt))
            out = raw.outputs[0]
            add = ir.Node("", "Add", [out, bias], name=f"{node.name}_bias")
            view._replace_uses(out, add.outputs[0], exclude=add)
            view.graph.insert_after(raw, add)
            add.outputs[0].dtype = out.dtype if out.dtype is not None else ir.DataType.from_numpy(wdt)
            add.outputs[0].shape = out.shape
            node.raw.append(add)
            node.output = add.outputs[0]
            node.attrs["_internal"] = [out]
            if view._nodes is not None:
                view._by_raw[id(add)] = node
        return
    # Gemm: write the effective weight back with alpha = beta = 1
    trans_b = raw.attributes.get_int("transB", 0)
    w = params.weight if trans_b else params.weight.T
    raw.replace_input_with(1, view._new_initializer(base, np.ascontiguousarray(w).astype(wdt, copy=False)))
    raw.attributes["alpha"] = ir.AttrFloat32("alpha", 1.0)
    raw.attributes["beta"] = ir.AttrFloat32("beta", 1.0)
    if params.bias is not None:
        bias = view._new_initializer(base + ".bias", params.bias.astype(wdt))
        if len(raw.inputs) < 3:
            raw.resize_inputs(3)
        raw.replace_input_with(2, bias)
    elif len(raw.inputs) > 2 and raw.inputs[2] is not None:
        raw.replace_input_with(2, None)


def conv(view, node: Node) -> ConvParams:
    raw = node.raw[0]
    w = view.const_value(raw.inputs[1])
    if w is None:
        raise Declined(f"conv {node.name} has a non-constant weight")
    b = None
    if len(raw.inputs) > 2 and raw.inputs[2] is not None:
        bv = view.const_value(raw.inputs[2])
        if bv is None:
            raise Declined(f"conv {node.name} has a non-constant bias")
        b = bv.astype(np.float64)
    auto_pad = raw.attributes.get_string("auto_pad", "NOTSET")
    pads = raw.attributes.get_ints("pads", None) or []
    padded = any(p != 0 for p in pads) or auto_pad in ("SAME_UPPER", "SAME_LOWER")
    return ConvParams(w.astype(np.float64), b, raw.attributes.get_int("group", 1), padded)


def set_conv(view, node: Node, params: ConvParams) -> None:
    raw = node.raw[0]
    wdt = view._dtype_of(raw.inputs[1])
    base = raw.inputs[1].name or node.name
    raw.replace_input_with(1, view._new_initializer(base, params.weight.astype(wdt)))
    out = raw.outputs[0]
    if out.shape is not None and len(out.shape) > 1 and out.shape[1] != params.weight.shape[0]:
        view.set_dim(out, 1, params.weight.shape[0])
    if params.bias is not None:
        if len(raw.inputs) < 3:
            raw.resize_inputs(3)
        raw.replace_input_with(2, view._new_initializer(base + ".bias", params.bias.astype(wdt)))


def affine(view, node: Node) -> Affine | None:
    raw = node.raw[0]
    rank = view.rank(node.inputs[0]) if node.inputs else None
    if node.op == "batch_norm":
        if raw.attributes.get_int("training_mode", 0):
            raise Declined(f"{node.name} is a norm in training mode (training_mode=1)")
        if any(o.uses() or o.is_graph_output() for o in raw.outputs[1:]):
            raise Declined(f"{node.name} is a norm in training mode (running statistics are read)")
        params = [view.const_value(v) for v in raw.inputs[1:5]]
        if any(p is None for p in params):
            raise Declined(f"{node.name} has non-constant statistics")
        if rank is None:
            raise Declined(f"{node.name}: the rank of its input is unknown{rank_lost_note(view, node.inputs[0])}")
        gamma, beta, mean, var = (p.astype(np.float64) for p in params)
        eps = raw.attributes.get_float("epsilon", 1e-5)
        k = gamma / np.sqrt(var + eps)
        axis = 1 - rank if rank > 1 else -1
        return Affine(axis, k, beta - mean * k)
    if node.op not in ("mul", "add", "sub", "div") or len(raw.inputs) != 2:
        return None
    a, b = raw.inputs
    ca, cb = view.const_value(a), view.const_value(b)
    if (ca is None) == (cb is None):
        return None
    data, const, const_first = (b, ca, True) if ca is not None else (a, cb, False)
    return binary_affine(node.op, const, const_first, view.rank(data))


def perm(view, node: Node) -> list[int]:
    raw = node.raw[0]
    p = raw.attributes.get_ints("perm", None)
    if p is None:
        r = view.rank(node.inputs[0])
        if r is None:
            raise Declined(f"{node.name}: rank unknown")
        p = list(reversed(range(r)))
    return list(p)


def rank_lost_note(view, value: ir.Value, depth: int = 64) -> str:
    """Where shape inference lost the rank on the way to ``value``: the first op back from it
    whose run-time inputs all have a known rank and whose output has none (the tool's limit,
    not the model's), as a clause to append to a reason; '' when the walk reaches an input."""
    for _ in range(depth):
        node = value.producer()
        if node is None:
            return ""
        unknown = next((x for x in node.inputs if x is not None and view.const_value(x) is None
                        and view.rank(x) is None), None)
        if unknown is None:
            return (f" (shape inference stopped at {node.op_type} {node.name or '?'}: its output's rank is not "
                    "derived from its inputs' known shapes)")
        value = unknown
    return ""


def norm(view, node: Node) -> NormParams:
    m = node.attrs.get("canon")
    if m is not None:
        return _chain_norm(view, node, m)
    raw = node.raw[0]
    x = node.inputs[0]
    if "skip" in node.attrs:
        return _skip_norm(view, node, raw)
    rank = view.rank(x)
    axis = raw.attributes.get_int("axis", -1)
    if rank is None:
        raise Declined(f"{node.name}: the rank of its input is unknown{rank_lost_note(view, x)}")
    if axis % rank != rank - 1:
        raise Declined(f"{node.name} normalizes over axes {axis}.. (not only the last axis)")
    if any(o.uses() or o.is_graph_output() for o in raw.outputs[1:]):
        raise Declined(f"{node.name}: its mean / inverse std outputs are read")
    if raw.op_type == "LayerNormalization" and raw.attributes.get_int("stash_type", 1) != 1:
        raise Declined(f"{node.name}: stash_type != 1 (statistics not in float32)")
    width = view.shape(x)[-1] if view.shape(x) else None
    params = []
    for i in (1, 2):
        v = raw.inputs[i] if len(raw.inputs) > i else None
        if v is None:
            params.append(None)
            continue
        c = view.const_value(v)
        if c is None:
            raise Declined(f"{node.name} has a non-constant scale or bias")
        params.append(np.broadcast_to(c.astype(np.float64).reshape(-1), (width or c.size,)).copy())
    if width is None:
        if params[0] is None:
            raise Declined(f"{node.name}: the width of its input is unknown")
        width = params[0].size
    return NormParams(int(width), raw.attributes.get_float("epsilon", 1e-5), params[0], params[1])


def _skip_norm(view, node: Node, raw: ir.Node) -> NormParams:
    if any(o.uses() or o.is_graph_output() for o in raw.outputs[1:3]):
        raise Declined(f"{node.name}: its mean / inverse std outputs are read")
    shape = view.shape(raw.inputs[0])
    params = []
    idxs = (2, 3) if raw.op_type == "SkipLayerNormalization" else (2,)
    for i in idxs:
        v = raw.inputs[i] if len(raw.inputs) > i else None
        c = None if v is None else view.const_value(v)
        if v is not None and c is None:
            raise Declined(f"{node.name} ({raw.op_type}) has a non-constant gamma or beta")
        params.append(None if c is None else c.astype(np.float64).reshape(-1))
    width = shape[-1] if shape and shape[-1] is not None else (params[0].size if params[0] is not None else None)
    if width is None:
        raise Declined(f"{node.name}: the width of its input is unknown")
    gamma = None if params[0] is None else np.broadcast_to(params[0], (width,)).copy()
    beta = None if len(params) < 2 or params[1] is None else np.broadcast_to(params[1], (width,)).copy()
    return NormParams(int(width), raw.attributes.get_float("epsilon", 1e-12), gamma, beta)


def _chain_norm(view, node: Node, m) -> NormParams:
    shape = view.shape(m.x)
    width = shape[-1] if shape else None
    params = []
    for v in (m.weight, m.bias):
        c = None if v is None else view.const_value(v)
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


def embedding(view, node: Node, *, dtype: Any = np.float64) -> np.ndarray:
    raw = node.raw[0]
    if raw.attributes.get_int("axis", 0) != 0:
        raise Declined(f"{node.name} gathers along axis {raw.attributes.get_int('axis', 0)}, not rows")
    table = view.const_value(raw.inputs[0])
    if table is None or table.ndim != 2:
        raise Declined(f"{node.name}: its table is not a constant matrix")
    return table if dtype is None else table.astype(dtype)


def set_embedding(view, node: Node, table: np.ndarray) -> None:
    raw = node.raw[0]
    dt = view._dtype_of(raw.inputs[0])
    raw.replace_input_with(0, view._new_initializer(raw.inputs[0].name or node.name, table.astype(dt, copy=False)))
    view.set_dim(raw.outputs[0], -1, table.shape[1])
    view._const_cache.clear()


def set_norm(view, node: Node, *, weight: np.ndarray | None = None, bias: np.ndarray | None = None) -> None:
    if "canon" in node.attrs:
        _set_chain_norm(view, node, node.attrs["canon"], weight, bias)
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
        dt = view._dtype_of(old) if old is not None else view._dtype_of(x)
        base = old.name if old is not None and old.name else f"{node.name}.{suffix}"
        if len(raw.inputs) <= idx:
            raw.resize_inputs(idx + 1)
        raw.replace_input_with(idx, view._new_initializer(base, np.asarray(arr).reshape(-1).astype(dt)))
    view.invalidate()


def _set_chain_norm(view, node: Node, m, weight: np.ndarray | None, bias: np.ndarray | None) -> None:
    """A recognised chain gets new affine constants in its scale / shift ops; a missing
    one is added (``* gamma`` before the shift, ``+ beta`` at the end): the chain stays
    the user's ops, only parameters change."""
    for arr, const, op_node, op in ((weight, m.weight, m.weight_node, "Mul"), (bias, m.bias, m.bias_node, "Add")):
        if arr is None:
            continue
        if op_node is not None:
            idx = 0 if op_node.inputs[0] is const else 1
            dt = view._dtype_of(const)
            base = const.name if const.name else f"{node.name}.{op.lower()}"
            op_node.replace_input_with(idx, view._new_initializer(base, np.asarray(arr).reshape(-1).astype(dt)))
            continue
        if op == "Mul" and m.bias_node is not None:  # y * gamma goes before + beta
            after, reads = m.bias_node.inputs[0].producer(), m.bias_node.inputs[0]
        else:
            after, reads = m.out.producer(), m.out
        dt = view._dtype_of(reads)
        const_v = view._new_initializer(f"{node.name}.{'scale' if op == 'Mul' else 'bias'}",
                                        np.asarray(arr).reshape(-1).astype(dt))
        new = view._new_node(op, [reads, const_v], (), f"{node.name}_{'scale' if op == 'Mul' else 'shift'}")
        new.outputs[0].dtype, new.outputs[0].shape = reads.dtype, reads.shape
        view._splice(after, reads, [new], new.outputs[0])
        if op == "Mul":
            m.weight, m.weight_node = const_v, new
            if m.out is reads:
                m.out = new.outputs[0]
        else:
            m.bias, m.bias_node, m.out = const_v, new, new.outputs[0]
    view.invalidate()
