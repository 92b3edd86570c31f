"""Layer 4, lowering: emitting new ops in each IR (RMSNorm, CRMSNorm, Re-ttention,
shift-add, scales) and opset upgrades, through the views' edit primitives
(docs/architecture.md).

The pass-facing edits that build new ops, one function per edit for both IRs (the passes
call these; the views keep only the primitives: nodes, constants, shapes, rewiring).
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np

from rewriter.ir.onnx_view import OnnxView
from rewriter.ir.view import GraphView, LinearOp, Node, Value
from rewriter.lower import fx_emit, onnx_emit


def _emit(view: GraphView):
    return onnx_emit if isinstance(view, OnnxView) else fx_emit


def replace_norm(view: GraphView, node: Node, kind: str, *, eps: float, weight: np.ndarray | None = None,
                 bias: np.ndarray | None = None) -> Node:
    """Replace a norm by ``kind`` (``rms_norm`` or ``crms_norm``) over the last axis with
    epsilon ``eps``, then ``* weight + bias`` when given. Returns the new norm node."""
    return _emit(view).replace_norm(view, node, kind, eps=eps, weight=weight, bias=bias)


def insert(view: GraphView, value: Value, op: str, *, n: int | None = None, weight: np.ndarray | None = None,
           bias: np.ndarray | None = None) -> Value:
    """Insert an op after ``value`` and make every reader read its result instead.
    ``center``: ``x - mean(x, -1)``; ``keep``: ``x[..., :n]``; ``uncompress``:
    ``concat(x, -sum(x, -1))`` (undoes a dropped zero-mean coordinate);
    ``scale_shift``: ``x * weight + bias`` over the last axis (either may be None)."""
    return _emit(view).insert(view, value, op, n=n, weight=weight, bias=bias)


def replace_linear(view: GraphView, node: Node, op: LinearOp, bias: np.ndarray | None) -> Node:
    """Replace the linear ``node`` by a call of ``op`` on its input (plus ``bias``); the
    old weight is dropped. Returns the new semantic node (tag it)."""
    return _emit(view).replace_linear(view, node, op, bias)


def insert_scale(view: GraphView, value: Value, factor: float, name: str) -> Value:
    """Multiply ``value`` by the constant scalar ``factor`` and make every reader read the
    product: ONNX a ``Mul`` by a constant; FX a call of a small module holding the factor
    as a buffer (not a parameter: it is not trained). Returns the new value."""
    return _emit(view).insert_scale(view, value, factor, name)


def upgrade_opset(view: GraphView, version: int, ignore: Iterable = ()) -> str | None:
    """ONNX: bump the default-domain opset to ``version`` when no op in the model changed
    meaning on the way; None on success (and always for FX), else the reason."""
    if not isinstance(view, OnnxView):
        return None
    return onnx_emit.upgrade_opset(view, version, ignore)
