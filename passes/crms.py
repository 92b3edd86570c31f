"""``crms``: Pre-LN -> Pre-CRMSNorm, an exact rewrite that also narrows the residual stream
from ``d`` to ``d - 1`` channels (Jiang et al. 2023, section 3;
``docs/passes/crms.md``).

After ``rms`` (affines folded, writers re-centred, so every stream vector is zero-mean) the
last channel is redundant: ``x_d = -sum(x[:d-1])``. Store ``x~ = x[:d-1]``; then::

    RMSNorm(x)[:d-1] == CRMSNorm(x~) = x~ / sqrt((||x~||^2 + (sum x~)^2) / d + eps)

and a linear reading the normalized vector ``n`` (zero-mean, ``n_d = -sum(n~)``) reads::

    W n = W[:, :d-1] n~ + W[:, d-1] n_d = (W[:, :d-1] - W[:, d-1:d]) n~          # bias unchanged

So: writers drop their last output (``E[:, :d-1]``, ``W_o[:d-1]``, ``b_o[:d-1]``, constants
``c[..., :d-1]``; a writer without parameters gets ``x - mean(x)`` then ``x[..., :d-1]``),
readers fold the dropped column in, every LN on the stream becomes CRMSNorm, and every op
that carries the width on the stream (Reshape / view / Expand targets, shape annotations)
follows. A norm whose output is also read by something other than linears (data-dependent
modulation, a graph output) gets its dropped coordinate re-expanded
(``concat(y, -sum(y))``) and keeps ``gamma``/``beta`` after it.

ONNX: a model-local function ``rewriter::CRMSNormalization`` whose body is standard ops
(``backends/ort/functions.py``: fused RMSNormalization plus a row-wise correction at
opset 23, a ReduceSumSquare/ReduceSum chain below). FX: the custom op
``torch.ops.rewriter.crms_norm`` (Triton kernel on CUDA, plain torch on CPU;
``backends/triton/crms_norm.py``).

Dynamic axes: a reshape / expand target built at run time (``Concat`` of constants and
``Shape`` reads, a torch.export ``view`` of ``sym_size`` reads and ints) is narrowed where a
constant states the width (the ``Concat`` is copied for that op); a run-time read of the
width of a value that narrows is left to read ``d - 1``, which is right wherever it
reshapes a value that narrows along the same axis. Every other use of a narrowed value's
width (a ``Size``, the width used as a number, a mask of another tensor's shape, a target
computed in a way that cannot be followed) is found by following each ``Shape`` read
forward (``GraphView.shape_read_problems``) and declines the pass, naming the op.

Declined, besides every reason of ``rms``: a norm on the stream that cannot be replaced
(every reader of the stream must take the narrow width), a width-carrying op on the
stream whose target cannot be narrowed, a use of the width that would change meaning.
"""

from __future__ import annotations

import logging

from passes.residual import ResidualStream
from passes.rms import _StreamPass
from rewriter.ir.view import Dim, GraphView, Node
from rewriter.pass_api import Kind, register

log = logging.getLogger(__name__)


@register
class Crms(_StreamPass):
    name = "crms"
    kind = Kind.EXACT
    summary = "Pre-LN -> Pre-CRMSNorm: rms, then the residual stream narrowed from d to d-1 channels"
    compress = True

    def _extra_problems(self, view: GraphView, stream: ResidualStream) -> list[str]:
        d = stream.width
        out = []
        narrowed = _narrowed_values(view, stream)

        def narrows(value) -> int | None:
            return narrowed[id(value)][1] if id(value) in narrowed else None

        for node, axis in _width_carriers(view, stream):
            why = _target_problem(view, node, axis, d, narrows)
            if why:
                out.append(why)
        for r in stream.shape_reads:
            out.append(f"{r}: narrowing the stream would change what it reads")
        # Shape / sym_size reads of every value that narrows: what they compute must follow
        seen: set[int] = set()
        # the readers of a writer without parameters read the slice inserted after it
        sliced = [w.value for w in stream.writers if w.kind not in _PARAM_WRITERS]
        changed = {**narrowed, **{id(v): (v, -1) for v in sliced}}

        def changes(value) -> int | None:
            return changed[id(value)][1] if id(value) in changed else None

        for value, _ in list(changed.values()):
            for u in view.users(value):
                if view.is_shape_reader(u) and id(u.raw[0]) not in seen:
                    seen.add(id(u.raw[0]))
                    out += view.shape_read_problems(u, narrows, changes)
        for w in stream.writers:
            if w.kind == "input":
                out.append(f"{w.note}: cannot narrow it")
        return out

    def _apply_stream(self, view: GraphView, stream: ResidualStream) -> None:
        d = stream.width
        for node in stream.layouts:
            self._narrow_layout(view, node, -1, d)
        for v in stream.values:
            view.set_dim(v, -1, d - 1)
        for w in stream.writers:
            # a writer narrowed through its parameters; the others keep their width and are
            # followed by an inserted centring + slice (``_apply_writer``), already d - 1 wide
            if w.kind in ("embedding", "linear", "conv") or (w.kind == "const" and not w.path):
                view.set_dim(w.value, -1, d - 1)


_PARAM_WRITERS = ("embedding", "linear", "conv", "const")


def _narrowed_values(view: GraphView, stream: ResidualStream) -> dict[int, tuple[object, int]]:
    """Every value whose channel axis goes from d to d - 1, keyed by id, with that axis
    (negative): the stream, the writers' outputs and their layout paths (a conv writer's
    channel axis is 1), the outputs of the norms whose readers are all linear (a
    re-expanded norm output keeps d) and the layouts between them and their readers. A
    writer without parameters keeps d: an inserted slice follows it."""
    out: dict[int, tuple[object, int]] = {}

    def add(v, axis: int = -1) -> None:
        if v is not None:
            out[id(v)] = (v, axis)

    for v in stream.values:
        add(v)
    for w in stream.writers:
        if w.kind in _PARAM_WRITERS:
            add(w.value)
        if w.kind in _PARAM_WRITERS and w.node is not None:
            rank = view.rank(w.node.output)
            add(w.node.output, 1 - rank if w.kind == "conv" and rank else -1)
        if w.kind in _PARAM_WRITERS:
            for n, axis in w.path:
                add(n.output, axis)
    for sn in stream.norms:
        if sn.foldable:
            add(sn.node.output)
            for _, chain in sn.linears:
                for n in chain:
                    add(n.output)
    return out


def _width_carriers(view: GraphView, stream: ResidualStream) -> list[tuple[Node, int]]:
    """The layout ops that carry the width (with the channel axis of their output): the
    stream's own layouts, the writers' paths, the layouts between norms and linears."""
    out = [(n, -1) for n in stream.layouts]
    out += [(n, a) for w in stream.writers if w.kind in _PARAM_WRITERS for n, a in w.path]
    out += [(n, -1) for sn in stream.norms if sn.foldable for _, ch in sn.linears for n in ch]
    seen: set[int] = set()
    return [(n, a) for n, a in out if not (id(n.raw[0]) in seen or seen.add(id(n.raw[0])))]


def _target_problem(view: GraphView, node: Node, axis: int, d: int, narrows) -> str:
    """Why the target shape of ``node`` (a layout op on a value that narrows) cannot follow
    the narrowing at ``axis``; empty when it can (a constant d to be narrowed, -1, or a
    run-time read of the width of a value that narrows too)."""
    lay = view.layout(node) if node.op != "transpose" else None
    if lay is None or lay.kind not in ("reshape", "expand"):
        return ""
    t = view.shape_target(node)
    raw_op = node.op.split(":")[-1]
    if t is None:
        if lay.target is None and _computed_target(view, node):
            return (f"{raw_op} ({node.name}) reshapes the stream to a shape computed at run time that cannot be "
                    "followed: its width cannot be narrowed")
        return ""
    rank = view.rank(node.output) or len(t)
    if len(t) != rank:
        return f"{raw_op} ({node.name}) has a target of {len(t)} entries for a rank-{rank} output"
    e = t[axis % len(t)]
    if isinstance(e, int):
        if e == d:
            why = view.can_narrow_target(node, axis % len(t))
            return f"{why}: its width cannot be narrowed" if why else ""
        if e == -1 or (e == 1 and lay.kind == "expand"):
            return ""
        return f"{raw_op} ({node.name}) reshapes the stream to {_show(t)}: its width cannot be narrowed"
    if isinstance(e, Dim):
        if narrows(e.value) is not None and e.axis == narrows(e.value):
            return ""
        return (f"{raw_op} ({node.name}) takes the width of its target from {view.value_name(e.value)}, "
                "which does not narrow with the stream")
    return (f"{raw_op} ({node.name}) reshapes the stream to {_show(t)}, computed at run time in a way "
            "that cannot be followed: its width cannot be narrowed")


def _computed_target(view: GraphView, node: Node) -> bool:
    """The node takes a target shape (Reshape / Expand / view) that is not a constant."""
    return node.op in ("other:Reshape", "other:Expand") or any(
        k in node.op for k in ("aten.view", "aten.reshape", "aten._unsafe_view", "aten.expand"))


def _show(t: list) -> str:
    def one(e) -> str:
        if isinstance(e, Dim):
            return f"{getattr(e.value, 'name', '?')}.shape[{e.axis}]"
        return "?" if e is None else str(e)
    return "[" + ", ".join(one(e) for e in t) + "]"
