"""Parameter access on a torch.fx graph (layer 3, beside ``rewriter/ir/fx_view.py``, whose
methods of the same names call these): the weights of linear, conv, affine, norm and
embedding calls read as arrays and written back as new ``nn.Parameter`` attributes
(copy-on-write), so gradients flow to them."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch.fx as fx

from rewriter.ir.fx_ops import _target_name, aten
from rewriter.ir.view import Affine, ConvParams, Declined, LinearParams, Node, NormParams, binary_affine


def linear(view, node: Node, *, dtype: Any = np.float64) -> LinearParams:
    raw = node.raw[0]
    t = raw.target
    if t is aten.linear.default:
        w = view.const_value(raw.args[1])
        b = view.const_value(raw.args[2]) if len(raw.args) > 2 and raw.args[2] is not None else None
    elif t is aten.addmm.default:
        w = view.const_value(raw.args[2]).T
        b = view.const_value(raw.args[0])
    else:
        w, b = view.const_value(raw.args[1]).T, None
    if dtype is None:
        return LinearParams(w, b)
    return LinearParams(w.astype(dtype), None if b is None else b.astype(dtype))


def set_linear(view, node: Node, params: LinearParams) -> None:
    raw = node.raw[0]
    wsrc = raw.args[1] if raw.target is not aten.addmm.default else raw.args[2]
    base = wsrc.target if wsrc.op == "get_attr" else node.name
    w = view._new_param(raw, base, params.weight, wsrc)
    b = None if params.bias is None else view._new_param(raw, base + "_bias", params.bias, wsrc)
    # rewrite in place (addmm / mm become aten.linear) so the node keeps its identity
    x = raw.args[1] if raw.target is aten.addmm.default else raw.args[0]
    raw.target = aten.linear.default
    raw.args = (x, w, b)
    raw.kwargs = {}
    shape = view.shape(raw)
    if shape and shape[-1] != params.weight.shape[0]:
        view.set_dim(raw, -1, params.weight.shape[0])
    view.invalidate()


def conv(view, node: Node) -> ConvParams:
    raw = node.raw[0]
    t = raw.target
    args = list(raw.args)
    w = view.const_value(args[1])
    if w is None:
        raise Declined(f"conv {node.name} has a non-constant weight")
    b = view.const_value(args[2]) if len(args) > 2 and args[2] is not None else None
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


def set_conv(view, node: Node, params: ConvParams) -> None:
    raw = node.raw[0]
    args = list(raw.args)
    base = args[1].target if args[1].op == "get_attr" else node.name
    args[1] = view._new_param(raw, base, params.weight, raw.args[1])
    if params.bias is not None:
        while len(args) < 3:
            args.append(None)
        args[2] = view._new_param(raw, base + "_bias", params.bias, raw.args[1])
    raw.args = tuple(args)
    shape = view.shape(raw)
    if shape and len(shape) > 1 and shape[1] != params.weight.shape[0]:
        view.set_dim(raw, 1, params.weight.shape[0])
    view.invalidate()


def affine(view, node: Node) -> Affine | None:
    raw = node.raw[0]
    if node.op == "batch_norm":
        args = list(raw.args)
        if raw.target is aten.batch_norm.default:
            training, eps = args[5], args[7]
        else:
            training, eps = False, args[6]
        if training:
            raise Declined(f"{node.name} is a norm in training mode")
        rank = view.rank(node.inputs[0])
        if rank is None:
            raise Declined(f"{node.name}: the rank of its input is unknown")
        c = view.shape(node.inputs[0])[1] if rank > 1 else view.shape(node.inputs[0])[0]
        vals = [view.const_value(a) if a is not None else None for a in args[1:5]]
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
    ca, cb = _operand(view, a), _operand(view, b)
    if (ca is None) == (cb is None):
        return None
    data, const, const_first = (b, ca, True) if ca is not None else (a, cb, False)
    return binary_affine(node.op, const, const_first, view.rank(data))


def _operand(view, a: Any) -> np.ndarray | None:
    if isinstance(a, (int, float)) and not isinstance(a, bool):
        return np.asarray(float(a), dtype=np.float64)
    return view.const_value(a) if isinstance(a, fx.Node) else None


def perm(view, node: Node) -> list[int]:
    raw = node.raw[0]
    if raw.target is aten.permute.default:
        r = len(raw.args[1])
        return [d % r for d in raw.args[1]]
    if raw.target is aten.t.default:
        return [1, 0] if view.rank(raw.args[0]) == 2 else [0]
    r = view.rank(raw.args[0])
    if r is None:
        raise Declined(f"{node.name}: rank unknown")
    p = list(range(r))
    d0, d1 = raw.args[1] % r, raw.args[2] % r
    p[d0], p[d1] = p[d1], p[d0]
    return p


def norm(view, node: Node) -> NormParams:
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
        c = view.const_value(p)
        if c is None:
            raise Declined(f"{node.name} has a non-constant scale or bias")
        params.append(c.astype(np.float64).reshape(-1))
    return NormParams(width, float(eps), params[0], params[1])


def embedding(view, node: Node, *, dtype: Any = np.float64) -> np.ndarray:
    table = view.const_value(node.raw[0].args[0])
    if table is None or table.ndim != 2:
        raise Declined(f"{node.name}: its table is not a constant matrix")
    return table if dtype is None else table.astype(dtype)


def set_embedding(view, node: Node, table: np.ndarray) -> None:
    raw = node.raw[0]
    src = raw.args[0]
    base = src.target if src.op == "get_attr" else node.name
    new = view._new_param(raw, base, table, src)
    raw.args = (new, *raw.args[1:])
    view.set_dim(raw, -1, table.shape[1])
    view.invalidate()


def set_norm(view, node: Node, *, weight: np.ndarray | None = None, bias: np.ndarray | None = None) -> None:
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
        args[idx] = view._new_param(raw, base, np.asarray(arr).reshape(-1), like)
    raw.args, raw.kwargs = tuple(args), kwargs
    view.invalidate()
