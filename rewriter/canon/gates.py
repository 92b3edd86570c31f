"""Gated branches (adaLN-Zero): a branch output scaled by a gate computed from a
conditioning input, not from the tokens.

Rule ``conditioning_gate``: ``y = f(x) * g`` (or ``g * f(x)``) where ``f(x)`` derives from
the residual stream and ``g`` does not (its data come from a conditioning input: the
timestep embedding of DiT, CogVideoX, SD3, Flux, through ``silu -> linear -> chunk``). The
decision is data dependence only, so it does not need the gate's channel size: the
TorchScript exporter with dynamic axes leaves the gate ``[B, 1, d]`` of unknown shape, the
dynamo exporter states it, and both give the same answer. A gate whose last axis is known
to be 1 scales each token by one number (``scalar``): the branch's mean over the channels
stays zero. Any other gate (width ``d`` or unknown) scales the channels apart: the update
``g * f(x)`` is not zero-mean for any re-centring of ``f``.

Gloss: ``mean_c(g_c f_c) != 0`` for ``mean_c(f_c) == 0`` unless ``g`` is constant over ``c``.
Test: ``tests/canon/test_library_classes.py`` (diffusers CogVideoX, both exporters).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

from rewriter.ir.view import GraphView, Node


@dataclasses.dataclass
class Gate:
    """The gate operand of a gated branch output."""

    index: int  # which operand of the product is the gate
    branch: Any  # the other operand: the branch output f(x)
    scalar: bool  # the gate's last axis is known to be 1 (one factor per token)


def depends_on(view: GraphView, value: Any, targets: Callable[[Any], bool], memo: dict[int, bool],
               limit: int = 4000) -> bool | None:
    """Whether ``value`` is computed from a value ``targets`` accepts (ops reading only a
    shape do not carry data); None when the search passes ``limit`` nodes."""
    if id(value) in memo:
        return memo[id(value)]
    order, seen, todo = [], set(), [value]
    found = False
    while todo:
        v = todo.pop()
        if id(v) in seen:
            continue
        seen.add(id(v))
        if memo.get(id(v)) is True or targets(v):
            found = True
            break
        if memo.get(id(v)) is False:
            continue
        order.append(v)
        if len(seen) > limit:
            return None
        n = view.producer(v)
        if n is None or view.is_shape_reader(n):
            continue
        todo.extend(x for x in n.inputs if x is not None)
    if not found:
        for v in order:
            memo[id(v)] = False
    memo[id(value)] = found
    return found


def conditioning_gate(view: GraphView, node: Node, on_stream: Callable[[Any], bool],
                      memo: dict[int, bool]) -> Gate | None:
    """``node`` (a product of two run-time tensors) as ``f(x) * g`` with ``f(x)`` computed
    from the stream (``on_stream``) and ``g`` from data that is not: the gate, or None."""
    if node.op != "mul" or len(node.inputs) != 2:
        return None
    deps = [depends_on(view, x, on_stream, memo) for x in node.inputs]
    if None in deps or deps.count(True) != 1:
        return None
    g = deps.index(False)
    gate = node.inputs[g]
    if view.const_value(gate) is not None or not _reads_data(view, gate):
        return None
    shape = view.shape(gate)
    scalar = bool(shape) and shape[-1] == 1
    return Gate(g, node.inputs[1 - g], scalar)


def _reads_data(view: GraphView, value: Any, limit: int = 4000) -> bool:
    """``value`` is computed from a graph input (not from parameters only)."""
    seen, todo = set(), [value]
    while todo and len(seen) < limit:
        v = todo.pop()
        if id(v) in seen:
            continue
        seen.add(id(v))
        if view.const_value(v) is not None:
            continue
        n = view.producer(v)
        if n is None:
            return True
        if view.is_shape_reader(n):
            continue
        todo.extend(x for x in n.inputs if x is not None)
    return False
