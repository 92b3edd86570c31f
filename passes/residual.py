"""Residual-stream analysis, shared by ``rms``, ``crms`` (and later ``lns``, ``osplus``).

Found from the graph alone, never from module names:

* **joins**: the residual adds (and the concatenations along a token axis, such as a cls
  token joined to the patch tokens) reached by walking back from every norm's input;
  walking back goes through layout ops that keep the channel axis last (copies, eval
  dropout, reshapes such as ``[B, T, d] -> [B*T, d]``, token pooling / selection).
* **stream values**: the outputs of the joins and the layout ops between them.
* **writers**: what enters a join and is not itself a join: a token/position embedding
  gather, a linear (a branch's output projection or a patch-embedding linear), a conv
  whose channel axis becomes the last axis through flatten/transpose (patch embedding), a
  constant or parameter (learned positions, a cls token), a per-token gated branch
  output, or anything else (a norm, a graph input: not re-centrable by parameters).
* **readers**: the norms whose input is a stream value (pre-norms, the final norm), each
  with its block depth; the linear layers reading each norm's output (through layout ops).

Eligibility (``ResidualStream.problems``, model level, and per-norm reasons):

* post-LN: a norm reads the stream and its output is written back into it;
* the raw stream read by anything but joins, stream layout ops and norms (an exported
  hidden state, an op reading the stream), or a stream value that is a graph output;
* a branch output scaled channel-wise by a gate computed from a conditioning input
  (adaLN-Zero; the rule is ``rewriter.canon.gates``, decided by data dependence whether or
  not the gate's channel size is known): the update ``gate * f(x)`` is not zero-mean for
  any re-centring of ``f``;
* ops that read only the stream's shape are not readers of its values: a ``Shape`` /
  ``Size`` (ONNX) or ``aten.sym_size`` (FX) of a stream value or of a norm output (the
  ``Shape -> Gather -> Unsqueeze -> Concat -> Reshape`` chains of dynamic axes) is listed
  in ``shape_readers``; reshapes whose target is computed that way are layout ops when
  the target's last entry is the input's width (``keeps_width``). Harmless for ``rms``,
  ``lns``, ``osplus``; ``crms`` follows what each such read computes (``GraphView.
  shape_read_problems``). Constant-folded reads (``Shape`` of a static tensor) are in
  ``shape_reads``;
* norms that do not read the stream are listed apart with the reason (an embedding
  LayerNorm, a QK-norm) and stay as they are. A norm that starts the stream (no norm
  upstream, its output written into a residual add: CLIP's ``pre_layrnorm``; the rule is
  ``rewriter.canon.embedding_norms``) is a writer of the stream, not a post-LN norm.

Depth: ``StreamNorm.depth`` counts the stream norms upstream of a norm; ``block`` counts
the upstream norms whose branch has no attention (the MLP pre-norms), which is the
0-based transformer block of a pre-norm and ``L`` for the final norm, for sequential and
parallel blocks alike.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

import networkx as nx
import numpy as np

from rewriter.canon.embedding_norms import embedding_norm
from rewriter.canon.gates import conditioning_gate
from rewriter.ir.view import Declined, Dim, GraphView, Layout, Node, NormParams

log = logging.getLogger(__name__)

NORM_OPS = ("layer_norm", "rms_norm")
_SOFTMAX = ("other:Softmax", "other:aten.softmax.int", "other:aten._softmax.default", "attention")


@dataclasses.dataclass
class Writer:
    """One write into the stream: ``value`` enters a join; ``node`` computes it through
    ``path`` (layout ops, each with the channel axis of its output, negative). A ``const``
    writer with a path (a token parameter expanded over the batch at run time) has the
    parameter as ``value`` and the path from it to the join."""

    kind: str  # embedding | linear | conv | const | norm | input | other | gated
    value: Any
    node: Node | None
    path: list[tuple[Node, int]] = dataclasses.field(default_factory=list)
    note: str = ""

    @property
    def name(self) -> str:
        return self.node.name if self.node is not None else str(getattr(self.value, "name", "?"))


@dataclasses.dataclass
class StreamNorm:
    """A norm reading the stream, through ``reads`` (stream layout ops)."""

    node: Node
    params: NormParams | None
    error: str = ""  # why its parameters cannot be used
    depth: int = 0
    block: int = 0
    attention: bool = False  # its branch contains attention
    linears: list[tuple[Node, list[Node]]] = dataclasses.field(default_factory=list)
    others: list[str] = dataclasses.field(default_factory=list)  # non-linear readers

    @property
    def foldable(self) -> bool:
        """Its output reaches only linear layers (through layout ops)."""
        return bool(self.linears) and not self.others


@dataclasses.dataclass
class ResidualStream:
    width: int | None
    values: list[Any]
    joins: list[Node]
    layouts: list[Node]
    writers: list[Writer]
    norms: list[StreamNorm]
    other_norms: list[tuple[Node, str]]
    problems: list[str]
    notes: list[str]
    shape_reads: list[str] = dataclasses.field(default_factory=list)  # constant-folded reads of its shape
    shape_readers: list[Node] = dataclasses.field(default_factory=list)  # Shape / sym_size of a stream value

    @property
    def final_norms(self) -> list[StreamNorm]:
        top = max((n.depth for n in self.norms), default=0)
        return [n for n in self.norms if n.depth == top]


class _Analysis:
    def __init__(self, view: GraphView):
        self.view = view
        self.joins: dict[int, Node] = {}  # id(raw[0]) -> join
        self.values: dict[int, Any] = {}  # id(value) -> value on the stream
        self.layouts: dict[int, Node] = {}
        self.leaves: dict[int, Any] = {}  # writer values
        self.problems: list[str] = []
        self.memo: dict[int, bool] = {}  # id(value) -> computed from the stream (canon.gates)

    def on_stream(self, value) -> bool:
        return id(value) in self.values

    # -- layout helpers ------------------------------------------------------------------
    def _layout(self, node: Node | None) -> Layout | None:
        if node is None or node.op == "transpose":
            return None
        try:
            return self.view.layout(node)
        except Declined:
            return None

    def _keeps_last(self, node: Node, lay: Layout) -> bool:
        """The op keeps the channel axis last and does not mix channels."""
        v = self.view
        x = node.inputs[0] if node.inputs else None
        if x is None:
            return False
        rank = v.rank(x)
        if lay.kind == "identity":
            return True
        if lay.kind in ("reduce", "select"):
            return rank is not None and (rank - 1) not in lay.axes
        if lay.kind in ("reshape", "expand"):
            si, so = v.shape(x), v.shape(node.output)
            if bool(si) and bool(so) and si[-1] is not None and si[-1] == so[-1]:
                return True
            return keeps_width(v, node, x)
        return False

    def _is_join(self, node: Node | None) -> bool:
        if node is None:
            return False
        if node.op == "add":  # two operands (three: a fused Skip*Norm's input + skip + bias)
            return len(self.view.operands(node)) in (2, 3) if "skip" in node.attrs else len(self.view.operands(node)) == 2
        lay = self._layout(node)
        if lay is not None and lay.kind == "concat":
            rank = self.view.rank(node.output)
            return rank is not None and lay.axes[0] != rank - 1
        return False

    def back(self, value) -> tuple[Any, list[Node]]:
        """Walk back from ``value`` through channel-keeping layout ops."""
        chain = []
        u = value
        while True:
            p = self.view.producer(u)
            lay = self._layout(p)
            if p is None or lay is None or lay.kind == "concat" or not self._keeps_last(p, lay):
                return u, chain
            if self.view.const_value(u) is not None:
                return u, chain
            chain.append(p)
            u = p.inputs[0]

    # -- phase 1: joins ------------------------------------------------------------------
    def visit(self, value) -> None:
        """``value`` is read by a join or a norm: record the stream behind it (depth first,
        with an explicit stack: a 10,000-long chain of joins is no recursion)."""
        end = object()
        stack = [self._enter(value)]
        while stack:
            o = next(stack[-1], end)
            if o is end:
                stack.pop()
                continue
            if self.view.const_value(o) is not None and not self._embedding_source(o):
                self.leaves[id(o)] = o
                continue
            s, ch = self.back(o)
            if self._is_join(self.view.producer(s)) and self.view.const_value(s) is None:
                stack.append(self._enter(o))
            else:
                self.leaves[id(o)] = o

    def _enter(self, value):
        """``visit``'s step: record the join behind ``value``; its operands still to visit."""
        start, chain = self.back(value)
        p = self.view.producer(start)
        if self._is_join(p) and self.view.const_value(start) is None:
            for n in chain:
                self.layouts[id(n.raw[0])] = n
                self.values[id(n.output)] = n.output
            if id(p.raw[0]) in self.joins:
                return iter(())
            self.joins[id(p.raw[0])] = p
            self.values[id(p.output)] = p.output
            return iter(self.view.operands(p))
        return iter(())

    def _embedding_source(self, value) -> bool:
        p = self.view.producer(value)
        return p is not None and p.op == "embedding"


def _classify_writer(a: _Analysis, value, width: int | None) -> Writer:
    """What computes ``value`` (a tensor entering a join)."""
    state: dict[str, Writer] = {}
    w = _walk_writer(a, value, width, state)
    if "unconfirmed" in state and w.kind != "const":
        return state["unconfirmed"]  # the reshape taken on trust was not confirmed
    return w


def _walk_writer(a: _Analysis, value, width: int | None, state: dict) -> Writer:
    v = a.view
    p = v.producer(value)
    if p is not None and p.op == "embedding":
        return Writer("embedding", value, p)
    if v.const_value(value) is not None:
        return Writer("const", value, None)
    path: list[tuple[Node, int]] = []
    axis = -1
    u = value
    # a reshape whose input width is not known statically, taken as keeping the width on
    # trust: confirmed only when the walk ends at a parameter whose channel axis is ``width``
    unconfirmed: Writer | None = None
    while True:
        if u is not value and v.const_value(u) is not None:
            c = v.const_value(u)
            if axis != -1 or (unconfirmed is not None and (c.ndim == 0 or c.shape[-1] != width)):
                return unconfirmed or Writer("other", value, v.producer(value), path)
            # a parameter (a cls / distillation token, a position embedding) reaching the
            # stream through run-time expands / reshapes / resampling: re-centred through
            # its parameter, read by the last op of the path only
            return Writer("const", u, None, path)
        p = v.producer(u)
        if p is None:
            return Writer("input", value, None, path, f"the stream starts at graph input {v.value_name(u)}")
        rank = v.rank(u)
        if p.op == "embedding" and axis == -1:
            return Writer("embedding", value, p, path)
        if p.op == "linear" and axis == -1:
            return Writer("linear", value, p, path)
        if p.op == "conv" and rank is not None and axis % rank == 1:
            return Writer("conv", value, p, path)
        if p.op in NORM_OPS and axis == -1:
            return Writer("norm", value, p, path)
        if p.op == "mul" and len(p.inputs) == 1 and axis == -1:
            try:
                aff = v.affine(p)
            except Declined:
                aff = None
            if aff is not None and aff.axis is None:  # a constant scalar keeps the mean at zero
                path.append((p, axis))
                u = p.inputs[0]
                continue
            return Writer("other", value, p, path)
        if p.op == "mul" and len(p.inputs) == 2 and axis == -1:
            gate = conditioning_gate(v, p, a.on_stream, a.memo)
            if gate is not None and gate.scalar:  # one factor per token keeps the mean at zero
                path.append((p, axis))
                u = gate.branch
                continue
            if gate is not None:
                return Writer("gated", value, p, path,
                              f"branch output {v.value_name(gate.branch)} is scaled channel-wise by a data-dependent "
                              f"gate computed from a conditioning input, not from the tokens ({p.name}, as in "
                              "adaLN-Zero): the stream stops being zero-mean")
            shapes = [v.shape(x) for x in p.inputs]
            if all(s for s in shapes):
                narrow = [i for i, s in enumerate(shapes) if s[-1] == 1]
                if len(narrow) == 1:  # a per-token scalar gate keeps the mean at zero
                    path.append((p, axis))
                    u = p.inputs[1 - narrow[0]]
                    continue
                if width is not None and all(s[-1] == width for s in shapes):
                    return Writer("gated", value, p, path,
                                  f"branch output {v.value_name(u)} is scaled channel-wise by a "
                                  f"data-dependent gate ({p.name}, as in adaLN-Zero): the stream "
                                  "stops being zero-mean")
            return Writer("other", value, p, path)
        if p.inputs and v.resize_keeps(p, axis):
            # a resampling that keeps the channel axis (an interpolated position embedding)
            path.append((p, axis))
            u = _data_input(v, p)
            continue
        lay = a._layout(p)
        if p.op == "transpose":
            r = v.rank(p.inputs[0])
            if r is None or rank is None:
                return Writer("other", value, p, path)
            perm = v.perm(p)
            path.append((p, axis))
            axis = perm[axis % rank] - r
            u = p.inputs[0]
            continue
        if not p.inputs:  # an op of parameters only that is not folded to a constant
            return Writer("other", value, p, path)
        if lay is not None and lay.kind in ("identity", "reshape", "expand", "select", "reduce"):
            si, so = v.shape(p.inputs[0]), v.shape(u)
            new_axis = _map_axis_back(lay, si, so, axis)
            if new_axis is None and axis == -1 and lay.kind in ("reshape", "expand") and keeps_width(v, p, _data_input(v, p)):
                new_axis = -1  # a target computed at run time whose last entry is the input's width
            if new_axis is None and axis == -1 and lay.kind == "reshape" and unconfirmed is None \
                    and _reads_width(v, p, width):
                unconfirmed = state["unconfirmed"] = Writer("other", value, p, list(path))
                new_axis = -1
            if new_axis is None:
                return Writer("other", value, p, path)
            path.append((p, axis))
            axis = new_axis
            u = _data_input(v, p)
            continue
        return Writer("other", value, p, path)


def _reads_width(view: GraphView, node: Node, width: int | None) -> bool:
    """A reshape whose input width is unknown and whose target ends with a run-time read
    of a ``width``-wide last axis (the stream's)."""
    si = view.shape(_data_input(view, node))
    if width is None or (si and si[-1] is not None):
        return False
    t = view.shape_target(node)
    last = t[-1] if t else None
    if not isinstance(last, Dim) or last.axis != -1:
        return False
    so = view.shape(last.value)
    return bool(so) and so[-1] == width


def _data_input(view: GraphView, node: Node):
    """The tensor a layout op moves: its first operand, also when that is a parameter
    (an ONNX node's semantic inputs leave initializers out)."""
    raw = node.raw[0] if node.raw else None
    ins = getattr(raw, "inputs", None)
    if getattr(view, "ir", "") == "onnx" and ins and ins[0] is not None:
        return ins[0]
    return node.inputs[0]


def keeps_width(view: GraphView, node: Node, x) -> bool:
    """A reshape / expand whose target (computed at run time: dynamic axes) ends with the
    width of its input ``x``: the constant ``x.shape[-1]``, a run-time read of it
    (``Shape(x)[-1]``, or of a tensor of the same static width), or an expand's 1. Rows of
    the last axis stay whole, so the channel axis stays last."""
    t = view.shape_target(node)
    if not t:
        return False
    last, si = t[-1], view.shape(x)
    width = si[-1] if si else None
    if isinstance(last, Dim):
        if last.axis != -1:
            return False
        if last.value is x:
            return True
        so = view.shape(last.value)
        return width is not None and bool(so) and so[-1] == width
    if isinstance(last, int):
        if width is not None and last == width:
            return True
        return last == 1 and _layout_kind(view, node) == "expand"
    return False


def _layout_kind(view: GraphView, node: Node) -> str:
    try:
        lay = view.layout(node)
    except Declined:
        return ""
    return lay.kind if lay is not None else ""


def _map_axis_back(lay: Layout, si, so, axis: int) -> int | None:
    """The input axis (negative) holding output ``axis`` through a layout op."""
    if lay.kind == "identity":
        return axis
    if not si or not so or any(d is None for d in si) or any(d is None for d in so):
        return None
    ao = axis % len(so)
    if lay.kind in ("select", "reduce"):
        if len(si) != len(so) or ao in lay.axes:
            return None
        return ao - len(si)
    if lay.kind == "expand":
        off = len(so) - len(si)
        ai = ao - off
        if ai < 0 or si[ai] != so[ao]:
            return None
        return ai - len(si)
    # reshape: the input axis with the same size and the same product before it
    before = int(np.prod(so[:ao]))
    for ai in range(len(si)):
        if si[ai] == so[ao] and int(np.prod(si[:ai])) == before:
            return ai - len(si)
    return None


def _norm_readers(a: _Analysis, sn: StreamNorm) -> None:
    """The linear layers reading the norm's output, through channel-keeping layout ops."""
    v = a.view

    def visit(value, chain: list[Node]):
        if v.is_graph_output(value):
            sn.others.append(f"the normalized tensor {v.value_name(value)} is a graph output")
        return value, chain, iter(v.users(value))

    # depth first with an explicit stack (a 10,000-long Identity chain is no recursion)
    stack = [visit(sn.node.output, [])]
    while stack:
        value, chain, users = stack[-1]
        u = next(users, None)
        if u is None:
            stack.pop()
            continue
        if v.is_harmless_reader(u) or v.is_shape_reader(u):
            continue  # a read of the shape only (dynamic axes): values unchanged
        if u.op == "linear" and u.inputs and u.inputs[0] is value:
            sn.linears.append((u, list(chain)))
            continue
        lay = a._layout(u)
        if lay is not None and lay.kind != "concat" and a._keeps_last(u, lay) and u.output is not None:
            stack.append(visit(u.output, chain + [u]))
            continue
        # any other reader blocks, a node of an If / Loop subgraph (no output of this graph) too
        sn.others.append(f"{u.op} ({u.name})" + (" in a subgraph" if u.output is None else ""))


def analyze(view: GraphView) -> ResidualStream:
    """Find the residual stream of ``view`` and decide its eligibility (see module doc)."""
    a = _Analysis(view)
    nodes = view.nodes()
    norms = [n for n in nodes if n.op in NORM_OPS and n.inputs]
    # a norm that starts the stream (rewriter.canon.embedding_norms) reads the embeddings,
    # not the stream: its output is a writer
    starts = [n for n in norms if embedding_norm(view, n, NORM_OPS)]
    norms = [n for n in norms if not any(n is e for e in starts)]
    for n in norms:
        a.visit(n.inputs[0])
    # norms on the stream: their input (through layouts) is a stream value or a writer value
    stream_norms: list[StreamNorm] = []
    other_norms: list[tuple[Node, str]] = []
    for n in norms:
        start, chain = a.back(n.inputs[0])
        walked = [n.inputs[0]] + [c.inputs[0] for c in chain]  # a writer value may sit on the walk
        if id(start) in a.values or any(id(u) in a.leaves for u in walked):
            for c in chain:
                a.layouts[id(c.raw[0])] = c
                a.values[id(c.output)] = c.output
            try:
                params, err = view.norm(n), ""
            except Declined as why:
                params, err = None, str(why)
            stream_norms.append(StreamNorm(n, params, err))
        else:
            p = view.producer(start)
            what = f"{p.op} {p.name}" if p is not None else view.value_name(start)
            other_norms.append((n, f"{n.name} does not read the residual stream (it reads {what})"))
    for n in starts:
        other_norms.append((n, f"{n.name} does not read the residual stream: an embedding norm, it reads "
                               "the embeddings and starts the stream (a writer of it)"))
    widths = {sn.params.width for sn in stream_norms if sn.params is not None}
    width = widths.pop() if len(widths) == 1 else None
    problems: list[str] = []
    notes: list[str] = []
    if len(widths) > 1:
        problems.append(f"the norms on the stream have different widths {sorted(widths)} (the stream changes width, "
                        "as at a patch merging)")
    if not a.joins and stream_norms:
        notes.append("no residual adds: the norms read their writers directly")

    writers = [_classify_writer(a, val, width) for val in a.leaves.values()]
    stream_norm_raw = {id(sn.node.raw[0]) for sn in stream_norms}
    gated, post = [], []
    for w in writers:
        if w.kind == "gated":
            gated.append(w)
        if w.kind == "norm":
            src, _ = a.back(w.node.inputs[0])
            if id(src) in a.values or id(src) in a.leaves:
                post.append(w.node.name)
                w.note = "post-LN"
    if post:
        problems.append(f"post-LN: {_names(post)} normalize{'s' if len(post) == 1 else ''} the residual stream "
                        "and write the result back into it (a norm on the stream itself)")
    if gated:
        problems.append(f"{gated[0].note}" + (f" (and {len(gated) - 1} more gated branches)" if len(gated) > 1 else ""))
    # readers of the raw stream
    allowed = set(a.joins) | set(a.layouts) | stream_norm_raw
    shape_reads: list[str] = []
    shape_readers: list[Node] = []
    post_ln = any(w.note == "post-LN" for w in writers)
    for val in list(a.values.values()) + list(a.leaves.values()):
        if view.const_value(val) is not None:
            continue
        if view.is_graph_output(val):
            problems.append(f"the residual stream {view.value_name(val)} is a graph output "
                            "(an exported hidden state reads the raw stream)")
        if post_ln:
            continue
        for u in view.users(val):
            if id(u.raw[0]) in allowed or view.is_harmless_reader(u):
                continue
            if view.is_shape_reader(u):
                shape_readers.append(u)  # its shape only: harmless unless the width changes (crms)
                continue
            if view.const_value(u.output) is not None:
                if _only_feeds(view, u.output, stream_norm_raw):
                    continue  # e.g. the exporter's ones(d) scale of an affine-free norm
                shape_reads.append(f"{u.name} reads the shape of the stream {view.value_name(val)}")
                continue
            if u.op == "add" and u.output is not None and view.is_graph_output(u.output):
                problems.append(f"the raw residual stream {view.value_name(val)} is read by add ({u.name}), "
                                "whose output is a graph output (the model returns the unnormalized stream)")
                continue
            problems.append(f"the raw residual stream {view.value_name(val)} is read by {u.op} ({u.name})")
    for sn in stream_norms:
        _norm_readers(a, sn)
    _depths(view, stream_norms, a)
    problems = list(dict.fromkeys(problems))
    return ResidualStream(width, list(a.values.values()), list(a.joins.values()), list(a.layouts.values()),
                          writers, stream_norms, other_norms, problems, notes, shape_reads, shape_readers)


def _only_feeds(view: GraphView, value, targets: set[int], depth: int = 8) -> bool:
    """Every path from ``value`` ends in one of the ``targets`` nodes (or dies)."""
    if depth == 0 or value is None or view.is_graph_output(value):
        return False
    for u in view.users(value):
        if id(u.raw[0]) in targets:
            continue
        if not _only_feeds(view, u.output, targets, depth - 1):
            return False
    return True


def _names(names: list[str], limit: int = 3) -> str:
    head = ", ".join(names[:limit])
    return head + (f" and {len(names) - limit} more" if len(names) > limit else "")


def _depths(view: GraphView, norms: list[StreamNorm], a: _Analysis) -> None:
    if not norms:
        return
    g = view.to_networkx()
    names = {sn.node.name for sn in norms}
    stops = names | {j.name for j in a.joins.values()}
    attn_ops = {n.name for n in view.nodes() if n.op in _SOFTMAX}
    for sn in norms:
        seen, todo = set(), [sn.node.name]
        while todo:
            cur = todo.pop()
            for nxt in g.successors(cur):
                if nxt in seen or nxt in stops:
                    continue
                seen.add(nxt)
                todo.append(nxt)
        sn.attention = bool(seen & attn_ops)
    # the stream norms upstream of each norm, as bit masks propagated once in topological
    # order (one ancestors() search per norm would be quadratic in depth)
    bit = {sn.node.name: 1 << i for i, sn in enumerate(norms)}
    mlp = sum(bit[sn.node.name] for sn in norms if not sn.attention)
    upstream: dict[str, int] = {}
    for n in nx.topological_sort(g):
        m = 0
        for p in g.predecessors(n):
            m |= upstream[p] | bit.get(p, 0)
        upstream[n] = m
    for sn in norms:
        m = upstream[sn.node.name]
        sn.depth = bin(m).count("1")
        sn.block = bin(m & mlp).count("1")


def describe(stream: ResidualStream) -> str:
    """A few lines for logs and ``rewrite explain``."""
    lines = [f"residual stream: width {stream.width}, {len(stream.joins)} joins, "
             f"{len(stream.writers)} writers, {len(stream.norms)} norms"]
    for w in stream.writers:
        lines.append(f"  writer {w.kind:9s} {w.name}" + (f"  ({w.note})" if w.note else ""))
    for sn in stream.norms:
        lines.append(f"  norm block {sn.block} depth {sn.depth} {sn.node.name} "
                     f"{'attn' if sn.attention else 'mlp'} readers={len(sn.linears)} others={sn.others}")
    for n, why in stream.other_norms:
        lines.append(f"  other norm {n.name}: {why}")
    for p in stream.problems:
        lines.append(f"  PROBLEM {p}")
    return "\n".join(lines)
