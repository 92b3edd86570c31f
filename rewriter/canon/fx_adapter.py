"""The torch.fx side of the canonicalization layer: ATen graphs (``torch.export``) seen
through the abstract ops of ``rewriter.canon.patterns``, and ``canonicalize_norms``, which
rewrites each recognised chain into one ``aten.layer_norm`` / ``aten.rms_norm`` call (the
same arithmetic: equal within float rounding, which verification checks)."""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import torch
import torch.fx as fx

from rewriter.canon.norms import NormAdapter, NormMatch, find_norms

log = logging.getLogger(__name__)
aten = torch.ops.aten

_OPS = {
    aten.add.Tensor: "add", aten.sub.Tensor: "sub", aten.mul.Tensor: "mul", aten.div.Tensor: "div",
    aten.pow.Tensor_Scalar: "pow", aten.pow.Tensor_Tensor: "pow", aten.sqrt.default: "sqrt",
    aten.rsqrt.default: "rsqrt", aten.reciprocal.default: "reciprocal", aten.mean.dim: "mean_last",
    aten.to.dtype: "cast", aten._to_copy.default: "cast", aten.to.dtype_layout: "cast",
}
_HARMLESS = {aten._assert_tensor_metadata.default}


class FxNormAdapter(NormAdapter):
    def __init__(self, gm: fx.GraphModule, view):
        self.gm = gm
        self.view = view  # an FxView of gm: its constant folding and shapes

    def nodes(self) -> list[fx.Node]:
        return list(self.gm.graph.nodes)

    def op(self, raw: Any) -> str | None:
        if not isinstance(raw, fx.Node) or raw.op != "call_function":
            return None
        return _OPS.get(raw.target)

    def operands(self, raw: fx.Node) -> list[Any]:
        if raw.target in (aten.mean.dim, aten.to.dtype, aten._to_copy.default, aten.to.dtype_layout):
            return [raw.args[0]]
        return list(raw.args)

    def producer(self, value: Any) -> fx.Node | None:
        return value if isinstance(value, fx.Node) and value.op == "call_function" else None

    def const(self, value: Any) -> np.ndarray | None:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return np.asarray(float(value))
        return self.view.const_value(value) if isinstance(value, fx.Node) else None

    def check(self, raw: fx.Node, op: str) -> str | None:
        if raw.kwargs.get("alpha", 1) != 1 or raw.kwargs.get("rounding_mode") is not None:
            return f"{raw.name}: alpha / rounding_mode"
        if op == "mean_last":
            dims = raw.args[1] if len(raw.args) > 1 else raw.kwargs.get("dim")
            keep = raw.args[2] if len(raw.args) > 2 else raw.kwargs.get("keepdim", False)
            if raw.kwargs.get("dtype") is not None:
                return f"{raw.name}: a mean with a dtype"
            if not keep:
                return f"{raw.name}: keepdim=False"
            dims = [dims] if isinstance(dims, int) else list(dims or [])
            rank = self.rank(raw.args[0])
            if not dims:
                return f"{raw.name}: a mean over every axis"
            if rank is None:
                return None if dims == [-1] else f"{raw.name}: mean over dims {dims} of unknown rank"
            if sorted(int(d) % rank for d in dims) != [rank - 1]:
                return f"{raw.name}: mean over dims {dims}, not the last axis only"
            return None
        if op == "cast":
            a, b = self.float_kind(raw.args[0]), self.float_kind(raw)
            if a is None or b is None:
                return f"{raw.name}: not a float -> float cast"
            if raw.target is aten._to_copy.default and set(raw.kwargs) - {"dtype"}:
                return f"{raw.name}: a copy with {sorted(set(raw.kwargs) - {'dtype'})}"
        return None

    def readers(self, value: Any) -> list[fx.Node]:
        return [u for u in value.users if u.op != "output" and u.target not in _HARMLESS]

    def is_output(self, value: Any) -> bool:
        return any(u.op == "output" for u in value.users)

    def output(self, raw: fx.Node) -> Any:
        return raw

    def float_kind(self, value: Any) -> tuple[str, int] | None:
        val = value.meta.get("val") if isinstance(value, fx.Node) else None
        dt = getattr(val, "dtype", None)
        if dt is None or not dt.is_floating_point:
            return None
        return str(dt), torch.finfo(dt).bits

    def width(self, value: Any) -> int | None:
        s = self.view.shape(value) if isinstance(value, fx.Node) else None
        return s[-1] if s else None

    def rank(self, value: Any) -> int | None:
        return self.view.rank(value) if isinstance(value, fx.Node) else None


def canonicalize_norms(gm: fx.GraphModule, view) -> int:
    """Rewrite every recognised norm chain of ``gm`` into ``aten.rms_norm`` /
    ``aten.layer_norm`` over the last axis; returns how many. A chain whose scale or shift
    is not a ``[width]`` tensor of the input's dtype is left as it is. ``view``: an
    ``FxView`` of ``gm`` (constants and shapes)."""
    ad = FxNormAdapter(gm, view)
    search = find_norms(ad)
    done = 0
    for m in search.matches:
        if _rewrite(gm, ad, m):
            done += 1
    for raw, why in search.near_misses:
        log.debug("canon: %s is not a norm: %s", raw.name, why)
    if done:
        gm.graph.lint()
        gm.recompile()
    return done


def _param_ok(ad: FxNormAdapter, v: Any, x: fx.Node, width: int) -> bool:
    if v is None:
        return True
    if not isinstance(v, fx.Node):
        return False
    c = ad.view._const_tensor(v)
    xv = x.meta.get("val")
    return c is not None and tuple(c.shape) == (width,) and xv is not None and c.dtype == xv.dtype


def _rewrite(gm: fx.GraphModule, ad: FxNormAdapter, m: NormMatch) -> bool:
    g = gm.graph
    x = m.x
    width = ad.width(x)
    if width is None or not _param_ok(ad, m.weight, x, width) or not _param_ok(ad, m.bias, x, width):
        return False
    order = {n: i for i, n in enumerate(g.nodes)}
    nodes = sorted(m.nodes, key=order.__getitem__)
    with g.inserting_before(m.out):
        if m.kind == "rms_norm":
            if m.bias is not None:
                return False
            new = g.call_function(aten.rms_norm.default, (x, [width], m.weight, m.eps))
        else:
            new = g.call_function(aten.layer_norm.default, (x, [width], m.weight, m.bias, m.eps))
    new.meta.update({k: v for k, v in m.out.meta.items() if k in ("val", "tensor_meta", "stack_trace", "nn_module_stack")})
    m.out.replace_all_uses_with(new)
    for n in reversed(nodes):
        for u in list(n.users):
            if u.target in _HARMLESS:
                g.erase_node(u)
        g.erase_node(n)
    return True
