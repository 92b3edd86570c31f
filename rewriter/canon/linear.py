"""Linear layers seen through views that keep the feature axis.

Rule ``feature_view``: a ``Flatten`` / ``Reshape`` / ``Squeeze`` / ``Unsqueeze`` (or a
float cast, a copy) whose input and output have the same last axis keeps every row of
features whole: row ``r`` of the output is one row of the input, so a per-feature map
after it (a ``BatchNorm1d`` over ``[B*N, C]``) is the same per-feature map before it.

Gloss: ``reshape(x W^T)`` with the last axis kept ``== reshape(x) W^T`` row by row; a
per-channel affine ``k * y + c`` on the kept axis folds into ``W`` and ``b``.

Exporters: TorchScript writes LeViT's ``BatchNorm1d(linear(x).flatten(0, 1))`` as
``MatMul -> Flatten -> BatchNormalization -> Reshape``; dynamo as ``MatMul -> Reshape ->
BatchNormalization -> Reshape``. Test: ``tests/canon/test_library_classes.py`` (LevitModel).
"""

from __future__ import annotations

from typing import Any

from rewriter.ir.view import Declined, GraphView, Node

_KINDS = ("identity", "reshape")


def keeps_features(view: GraphView, node: Node) -> bool:
    """``node`` is a view op (reshape kind, or identity) whose output has its input's
    last axis (both widths known and equal, or a constant target ending in the input's width)."""
    if node.op == "transpose" or not node.inputs:
        return False
    try:
        lay = view.layout(node)
    except Declined:
        return False
    if lay is None or lay.kind not in _KINDS:
        return False
    if lay.kind == "identity":
        return True
    si, so = view.shape(node.inputs[0]), view.shape(node.output)
    width = si[-1] if si else None
    if width is None:
        return False
    if so and so[-1] is not None:
        return so[-1] == width
    return bool(lay.target) and lay.target[-1] == width


def producer_through_views(view: GraphView, value: Any, consumer: Node) -> tuple[Node | None, list[Node]]:
    """The op behind ``value`` seen through feature-keeping views each read by the next
    op alone (``consumer`` reads ``value``): that op (None for a graph input) and the
    views walked, nearest first. The caller checks the op's kind."""
    views: list[Node] = []
    while True:
        p = view.producer(value)
        if p is None or view.is_graph_output(value) or view.data_users(value) != [consumer]:
            return p, views
        if not keeps_features(view, p):
            return p, views
        views.append(p)
        consumer, value = p, p.inputs[0]
