"""``foldnorm``: fold frozen-statistics normalizations into adjacent linear / conv layers.

At inference a batch-style norm with frozen statistics is a per-channel affine map
``y = k * x + c``:

* BatchNorm:           ``k = gamma / sqrt(var + eps)``,  ``c = beta - mean * k``
* Unified Norm (eval): ``k = gamma / sqrt(rv + eps)``,   ``c = beta``  (no centring)
* PowerNorm (eval):    the same with ``running_phi``; its per-token group scaling is
  data-dependent and stays, only the affine after it folds.

In a graph these appear either as one node (BatchNormalization, aten.batch_norm) or as a
chain of elementwise ops with constant operands (``x / sqrt(rv + eps) * gamma + beta``);
both are recognised as the same composite affine, composed in float64.

Folding (Unified Normalization, ``docs/passes/foldnorm.md``):

* into the preceding layer, when it is the norm's sole producer and the norm its only
  reader::

      W' = diag(k) @ W          b' = k * b + c

* otherwise into the following layers, when they are the norm's only readers (the
  pre-norm layout of UN transformers)::

      W' = W @ diag(k)          b' = b + W @ c

  A following conv with zero padding is exact only when ``c == 0`` (padding would pad the
  un-normalised input with zeros, not with ``-c / k``).

Layout ops between the norm and the layer (``Transpose``/``permute``, as in a BatchNorm1d
applied to ``[B, N, C]`` activations through transposes) are seen through: the norm's
channel axis is mapped through the permutation and must land on the layer's feature axis.
After the norm is gone, a transpose followed by its inverse is removed too. Reads of a
tensor's shape only (``Shape`` / ``Size``, ``aten.sym_size``: dynamic axes) are not
readers: folding changes no shape.

Declined, with the reason: a norm in training mode; a normalized tensor that is also a
graph output or feeds a residual add or any other non-linear reader; a channel axis that
is not the layer's feature axis; a following conv with zero padding and a non-zero shift.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Literal

import numpy as np

from rewriter.canon.linear import keeps_features, producer_through_views
from rewriter.ir.view import Affine, Declined, GraphView, LinearParams, Node, scale_linear
from rewriter.pass_api import Kind, Pass, Site, register

log = logging.getLogger(__name__)

_AFFINE_OPS = ("batch_norm", "mul", "add", "sub", "div")


@dataclasses.dataclass
class _Plan:
    chain: list[Node]
    affine: Affine
    direction: str  # "prev" or "next"
    targets: list[tuple[Node, int]]  # layer, channel axis of the affine in that layer's frame
    transposes: list[Node]  # layout ops between norm and layers (for clean-up)


def _map_axis_forward(perm: list[int], axis: int, rank: int) -> int:
    """Axis ``axis`` (negative) of a transpose's input -> the axis in its output."""
    a = axis % rank
    return perm.index(a) - rank


def _map_axis_backward(perm: list[int], axis: int, rank: int) -> int:
    """Axis ``axis`` (negative) of a transpose's output -> the axis in its input."""
    return perm[axis % rank] - rank


@register
class FoldNorm(Pass):
    name = "foldnorm"
    kind = Kind.EXACT
    summary = "fold frozen-statistics norms (BatchNorm, Unified Norm, PowerNorm) into adjacent linear/conv layers"

    @dataclasses.dataclass
    class Options:
        direction: Literal["auto", "prev", "next"] = "auto"  # fold into prev (producer) / next; auto: either

    # -- match -------------------------------------------------------------------------
    def match(self, view: GraphView) -> list[Site]:
        sites: list[Site] = []
        seen: set[int] = set()
        for node in view.nodes():
            if id(node) in seen or node.op not in _AFFINE_OPS:
                continue
            try:
                first = view.affine(node)
            except Declined as why:
                seen.add(id(node))
                sites.append(Site(node.name, False, str(why)))
                continue
            if first is None or self._continues_chain(view, node):
                continue
            chain, affine, why = self._grow_chain(view, node, first)
            seen.update(id(n) for n in chain)
            if not any(n.op == "batch_norm" or (n.op in ("mul", "div") and view.affine(n).width > 1) for n in chain):
                continue  # scalar arithmetic, not a norm
            label = self._label(chain)
            if why:
                sites.append(Site(label, False, why))
                continue
            sites.append(self._plan(view, label, chain, affine))
        return sites

    def _affine_or_none(self, view: GraphView, node: Node) -> Affine | None:
        if node.op not in _AFFINE_OPS:
            return None
        try:
            return view.affine(node)
        except Declined:
            return None

    def _continues_chain(self, view: GraphView, node: Node) -> bool:
        """Whether ``node`` extends an affine chain started before it."""
        p = view.producer(node.inputs[0]) if node.inputs else None
        if p is None or self._affine_or_none(view, p) is None:
            return False
        return len(view.data_users(p.output)) == 1 and not view.is_graph_output(p.output)

    def _grow_chain(self, view: GraphView, node: Node, affine: Affine) -> tuple[list[Node], Affine, str]:
        chain = [node]
        while True:
            out = chain[-1].output
            users = view.data_users(out)
            if len(users) != 1 or view.is_graph_output(out):
                break
            nxt = users[0]
            a = self._affine_or_none(view, nxt)
            if a is None:
                break
            composed = affine.then(a)
            if composed is None:
                break
            chain.append(nxt)
            affine = composed
        return chain, affine, ""

    @staticmethod
    def _label(chain: list[Node]) -> str:
        return chain[0].name if len(chain) == 1 else f"{chain[0].name}..{chain[-1].name}"

    def _plan(self, view: GraphView, label: str, chain: list[Node], affine: Affine) -> Site:
        direction = self.options.direction
        reasons = []
        if direction in ("auto", "prev"):
            plan, why = _declines(self._plan_prev, view, chain, affine)
            if plan:
                return Site(label, True, "folded into the producer", plan)
            reasons.append(f"not into the producer: {why}")
        if direction in ("auto", "next"):
            plan, why = _declines(self._plan_next, view, chain, affine)
            if plan:
                return Site(label, True, "folded into the readers", plan)
            reasons.append(f"not into the readers: {why}")
        return Site(label, False, "; ".join(reasons))

    def _plan_prev(self, view: GraphView, chain: list[Node], affine: Affine):
        src = chain[0].inputs[0]
        axis = affine.axis
        transposes = []
        consumer = chain[0]
        while True:
            p = view.producer(src)
            if p is None:
                return None, "the norm reads a graph input or a constant"
            if view.data_users(src) != [consumer] or view.is_graph_output(src):
                return None, f"{p.name}'s output has other readers"
            if p.op != "transpose":
                if axis in (None, -1) and keeps_features(view, p):
                    # a Flatten / Reshape keeping the feature axis (LeViT's BatchNorm1d over
                    # linear(x).flatten(0, 1)): rewriter.canon.linear
                    q, _ = producer_through_views(view, src, consumer)
                    if q is not None and q.op == "linear":
                        p = q
                break
            if axis is not None:
                rank = view.rank(p.output)
                if rank is None:
                    return None, f"rank unknown at {p.name}"
                axis = _map_axis_backward(view.perm(p), axis, rank)
            transposes.append(p)
            consumer, src = p, p.inputs[0]
        rank = view.rank(p.output)
        if p.op == "linear":
            if axis is not None and axis != -1:
                return None, f"the norm's channel axis is not {p.name}'s feature axis"
            n_out = view.linear(p, dtype=None).weight.shape[0]
        elif p.op == "conv":
            if axis is not None and (rank is None or axis != 1 - rank):
                return None, f"the norm's channel axis is not {p.name}'s channel axis"
            n_out = view.conv(p).weight.shape[0]
        else:
            return None, f"its producer {p.name} is {p.op}, not a linear or conv layer"
        if affine.width not in (1, n_out):
            return None, f"{affine.width} channels against {p.name}'s {n_out}"
        return _Plan(chain, affine, "prev", [(p, -1)], transposes), ""

    def _plan_next(self, view: GraphView, chain: list[Node], affine: Affine):
        targets: list[tuple[Node, int]] = []
        transposes: list[Node] = []

        def walk(value, axis, depth: int = 0) -> str:
            if value is None:
                return "the normalized tensor is read inside a subgraph"
            if depth > 64:
                return "more than 64 transposes after the norm"
            if view.is_graph_output(value):
                return "the normalized tensor is a graph output"
            users = view.data_users(value)
            if not users:
                return "the normalized tensor has no readers"
            for u in users:
                if u.op == "transpose":
                    if axis is not None:
                        rank = view.rank(value)
                        if rank is None:
                            return f"rank unknown at {u.name}"
                        ax = _map_axis_forward(view.perm(u), axis, rank)
                    else:
                        ax = None
                    transposes.append(u)
                    why = walk(u.output, ax, depth + 1)
                    if why:
                        return why
                elif u.op == "linear" and u.inputs[0] is value:
                    if axis is not None and axis != -1:
                        return f"the norm's channel axis is not the feature axis of {u.name}"
                    n_in = view.linear(u, dtype=None).weight.shape[1]
                    if affine.width not in (1, n_in):
                        return f"{affine.width} channels against {u.name}'s {n_in} inputs"
                    targets.append((u, -1))
                elif u.op == "conv" and u.inputs[0] is value:
                    rank = view.rank(value)
                    if axis is not None and (rank is None or axis != 1 - rank):
                        return f"the norm's channel axis is not the channel axis of {u.name}"
                    cp = view.conv(u)
                    if cp.padded and np.any(affine.shift != 0):
                        return (f"{u.name} is a conv with zero padding: folding a non-zero "
                                "shift into it is not exact")
                    n_in = cp.weight.shape[1] * cp.groups
                    if affine.width not in (1, n_in):
                        return f"{affine.width} channels against {u.name}'s {n_in} inputs"
                    targets.append((u, 1))
                elif u.op == "add" and len(u.inputs) == 2:
                    return f"the normalized tensor also feeds a residual add ({u.name})"
                else:
                    return f"the normalized tensor is also read by {u.op} ({u.name})"
            return ""

        why = walk(chain[-1].output, affine.axis)
        if why:
            return None, why
        return _Plan(chain, affine, "next", targets, transposes), ""

    # -- apply -------------------------------------------------------------------------
    def apply(self, view: GraphView, sites: list[Site]) -> None:
        for site in sites:
            plan: _Plan = site.plan
            replaced = [n.name for n in plan.chain]
            before = view.producer(plan.chain[0].inputs[0])
            around = plan.transposes + ([before] if before is not None and before.op == "transpose" else [])
            for layer, _ in plan.targets:
                if plan.direction == "prev":
                    self._fold_into_producer(view, layer, plan.affine)
                else:
                    self._fold_into_reader(view, layer, plan.affine)
                view.tag(layer, self.name, replaced)
            for node in reversed(plan.chain):  # last first: each reads its predecessor
                view.bypass(node)
            _cancel_transposes(view, around)

    @staticmethod
    def _fold_into_producer(view: GraphView, layer: Node, affine: Affine) -> None:
        if layer.op == "linear":
            p = view.linear(layer, dtype=None)
            k, c = affine.channels(p.weight.shape[0])
            b = p.bias.astype(np.float64) if p.bias is not None else np.zeros(p.weight.shape[0])
            w, _ = scale_linear(p.weight, out_scale=k)
            view.set_linear(layer, LinearParams(w, k * b + c))
        else:
            p = view.conv(layer)
            k, c = affine.channels(p.weight.shape[0])
            b = p.bias if p.bias is not None else np.zeros(p.weight.shape[0])
            kshape = (-1,) + (1,) * (p.weight.ndim - 1)
            view.set_conv(layer, dataclasses.replace(p, weight=p.weight * k.reshape(kshape), bias=k * b + c))

    @staticmethod
    def _fold_into_reader(view: GraphView, layer: Node, affine: Affine) -> None:
        if layer.op == "linear":
            p = view.linear(layer, dtype=None)
            k, c = affine.channels(p.weight.shape[1])
            b = p.bias.astype(np.float64) if p.bias is not None else np.zeros(p.weight.shape[0])
            w, shift = scale_linear(p.weight, in_scale=k, in_shift=c)
            view.set_linear(layer, LinearParams(w, b + shift))
        else:
            p = view.conv(layer)
            w = p.weight  # [out, in/groups, *kernel]
            cin_g = w.shape[1]
            out_g = w.shape[0] // p.groups
            k, c = affine.channels(cin_g * p.groups)
            # input channel of (out o, local in j) is (o // out_g) * cin_g + j
            idx = (np.arange(w.shape[0])[:, None] // out_g) * cin_g + np.arange(cin_g)[None, :]
            ks, cs = k[idx], c[idx]  # [out, in/groups]
            extra = (1,) * (w.ndim - 2)
            new_w = w * ks.reshape(ks.shape + extra)
            b = p.bias if p.bias is not None else np.zeros(w.shape[0])
            new_b = b + (w.sum(axis=tuple(range(2, w.ndim))) * cs).sum(axis=1)
            view.set_conv(layer, dataclasses.replace(p, weight=new_w, bias=new_b))


def _declines(planner, *args):
    try:
        return planner(*args)
    except Declined as why:
        return None, str(why)


def _cancel_transposes(view: GraphView, candidates: list[Node]) -> None:
    """Remove ``Transpose(p) -> Transpose(q)`` pairs with ``q o p == identity``."""
    for t1 in candidates:
        if view.node_of(t1.raw[0]) is None:
            continue  # already removed
        users = view.users(t1.output)
        if len(users) != 1 or users[0].op != "transpose" or view.is_graph_output(t1.output):
            continue
        t2 = users[0]
        if view.is_graph_output(t2.output):
            continue
        p, q = view.perm(t1), view.perm(t2)
        if len(p) == len(q) and [p[q[i]] for i in range(len(q))] == list(range(len(p))):
            view.bypass(t2)
            view.bypass(t1)
