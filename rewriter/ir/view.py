"""The IR-neutral view every pass is written against.

A pass never touches onnx-ir or torch.fx directly. It sees a graph of *semantic nodes*
(``Node``): each covers one or a few IR nodes (an ONNX ``MatMul`` plus its bias ``Add`` is
one ``linear``) and names what they compute. Everything the passes do not reason about is
``other:<op type>`` and stays opaque. Parameters are read and written as float64 numpy
arrays in a fixed layout (linear weights are ``[out, in]`` whatever the IR stores), so the
math of a pass is plain array code shared by both IRs; the adapter casts back once, to the
tensor's original dtype, when it writes.

Semantic op names (``Node.op``):

=================  ===============================================================
``linear``         y = x @ W.T + b over the last axis (MatMul[+Add], Gemm; aten.linear,
                   addmm, mm)
``conv``           Conv / aten.conv{1,2,3}d, channel axis 1
``batch_norm``     BatchNormalization / aten.batch_norm (frozen statistics or training)
``mul`` ``add``    elementwise ops; ``affine()`` tells whether one operand is constant
``sub`` ``div``
``transpose``      Transpose / permute / transpose.int (``perm()``)
``layer_norm``     LayerNormalization / aten.layer_norm over the last axis, or a chain
                   of standard ops recognised as one (``rewriter.canon``)
``rms_norm``       RMSNormalization / aten.rms_norm, or a recognised chain
``embedding``      Gather of a constant table / aten.embedding
``attention``      Attention / aten.scaled_dot_product_attention
``other:T``        anything else
=================  ===============================================================

Queries and edits used by the residual-stream passes (``rms``, ``crms``; see
``passes/residual.py``): ``norm`` (norm parameters), ``embedding`` / ``set_embedding``,
``operands`` (every input, constants included), ``layout`` / ``set_layout_target`` (ops
that move or copy data without mixing channels: reshape, transpose, expand, pooling,
selection, concat), ``edit_const`` (change the parameter a constant operand is computed
from) and ``set_dim`` (the static shape annotation of a value whose width changed). Edits
that build new ops (``replace_norm``, ``insert``, ``replace_linear``, ``insert_scale``,
``upgrade_opset``) are lowering, in ``rewriter/lower/`` (docs/architecture.md).
"""

from __future__ import annotations

import abc
import collections
import concurrent.futures
import dataclasses
import os
from collections.abc import Iterable, Sequence
from typing import Any

import networkx as nx
import numpy as np

Value = Any  # an IR value: onnx_ir.Value or torch.fx.Node


@dataclasses.dataclass(eq=False)
class Node:
    """A semantic node: one op the passes reason about, over one or more IR nodes."""

    op: str
    name: str
    inputs: list[Value]  # data inputs (parameters excluded)
    output: Value  # the main output
    raw: list[Any]  # the IR nodes it covers, in order
    attrs: dict[str, Any] = dataclasses.field(default_factory=dict)

    def __repr__(self) -> str:
        return f"Node({self.op}, {self.name!r})"


@dataclasses.dataclass
class LinearParams:
    """``y = x @ weight.T + bias``; weight ``[out, in]``, bias ``[out]`` or None (float64)."""

    weight: np.ndarray
    bias: np.ndarray | None


_BLOCK_ELEMS = 1 << 18  # float64 elements per block of map_rows (2 MiB: fastest measured here)
_THREAD_ELEMS = 1 << 22  # arrays at least this large are split across threads


def map_rows(a: np.ndarray, fn, width: int, dtype: Any) -> np.ndarray:
    """``fn`` applied to ``a`` (2-D, any dtype) in blocks of rows converted to float64, the
    results (``width`` columns each) cast once to ``dtype``: ``fn(block64, rows) -> array``
    where ``rows`` is the block's slice. Equals ``fn(a.astype(float64), slice(None))
    .astype(dtype)`` for a row-wise ``fn``, without materialising ``a`` in float64: large
    weights are folded at memory speed. ``fn`` may write to its block and to other arrays
    at ``rows`` only: blocks of a large array run on several threads (numpy releases the
    GIL). The result has ``a``'s memory order, so that a transposed weight (an ONNX
    MatMul's ``[in, out]`` seen as ``[out, in]``) goes back to its layout without a copy."""
    a = a.view(np.ndarray)  # a plain view of a memory map: slicing a np.memmap is slow
    rows = a.shape[0]
    order = "F" if a.flags.f_contiguous and not a.flags.c_contiguous else "C"
    out = np.empty((rows, width), dtype=dtype, order=order)
    step = max(1, _BLOCK_ELEMS // max(1, a.shape[1]))

    def run(lo: int, hi: int) -> None:
        for s in range(lo, hi, step):
            sl = slice(s, min(s + step, hi))
            out[sl] = fn(a[sl].astype(np.float64), sl)

    workers = min(os.cpu_count() or 1, max(1, a.size // _THREAD_ELEMS), 16)
    if workers == 1:
        run(0, rows)
        return out
    per = -(-rows // (workers * step)) * step  # whole blocks per worker
    with concurrent.futures.ThreadPoolExecutor(workers) as pool:
        for f in [pool.submit(run, lo, min(lo + per, rows)) for lo in range(0, rows, per)]:
            f.result()
    return out


def scale_linear(w: np.ndarray, *, out_scale: np.ndarray | None = None, in_scale: np.ndarray | None = None,
                 in_shift: np.ndarray | None = None, drop_last_input: bool = False
                 ) -> tuple[np.ndarray, np.ndarray | None]:
    """``W' = diag(out_scale) W diag(in_scale)`` in ``w``'s dtype and layout, and ``W @ in_shift``
    (float64, of the unscaled ``W``), for a linear weight ``w [out, in]`` as ``linear(...,
    dtype=None)`` returns it. ``drop_last_input``: the last input is folded into the others
    and dropped, ``W'[:, :-1] - W'[:, -1:]`` (``crms``: the dropped coordinate of a zero-mean
    vector is minus the sum of the others). Folded in float64 blocks along the stored rows
    (``map_rows``), so a transposed (ONNX MatMul ``[in, out]``) weight is read and written in
    memory order. The ``W @ in_shift`` partial sums are added in row order: the result does
    not depend on the threads."""
    wt = w.T
    transposed = not w.flags.c_contiguous and wt.flags.c_contiguous
    src, rs, cs = (wt, in_scale, out_scale) if transposed else (w, out_scale, in_scale)
    partials: dict[int, np.ndarray] = {}
    shift_out = None if in_shift is None else np.zeros(w.shape[0])
    last = None  # transposed + drop_last_input: the last stored row (input), scaled
    if transposed and drop_last_input:
        k = src.shape[0] - 1
        last = src[k].astype(np.float64) * (1.0 if rs is None else rs[k])
        if cs is not None:
            last *= cs
        if in_shift is not None:
            partials[k] = in_shift[k] * src[k].astype(np.float64)
        src = src[:k]

    def fn(block: np.ndarray, rows: slice) -> np.ndarray:
        if in_shift is not None:
            if transposed:
                partials[rows.start] = in_shift[rows] @ block
            else:
                shift_out[rows] = block @ in_shift
        if rs is not None:
            block *= rs[rows, None]
        if cs is not None:
            block *= cs[None, :]
        if last is not None:
            block -= last[None, :]
        elif drop_last_input:
            return block[:, :-1] - block[:, -1:]
        return block

    out = map_rows(src, fn, src.shape[1] - (drop_last_input and not transposed), w.dtype)
    for start in sorted(partials):
        shift_out += partials[start]
    return (out.T if transposed else out), shift_out


@dataclasses.dataclass
class ConvParams:
    """Convolution weight ``[out, in/groups, *kernel]``, bias ``[out]`` or None (float64)."""

    weight: np.ndarray
    bias: np.ndarray | None
    groups: int
    padded: bool  # any non-zero (implicit zero) padding


@dataclasses.dataclass
class Affine:
    """``y = scale * x + shift`` broadcast along ``axis`` (negative, from the end).

    ``axis`` None means scale and shift are scalars (shape ``[1]``), valid on any axis.
    """

    axis: int | None
    scale: np.ndarray
    shift: np.ndarray

    @staticmethod
    def identity() -> Affine:
        return Affine(None, np.ones(1), np.zeros(1))

    def then(self, other: Affine) -> Affine | None:
        """The composition ``other(self(x))``, or None when the axes disagree."""
        if self.axis is not None and other.axis is not None and self.axis != other.axis:
            return None
        if len(self.scale) > 1 and len(other.scale) > 1 and len(self.scale) != len(other.scale):
            return None
        axis = self.axis if self.axis is not None else other.axis
        return Affine(axis, other.scale * self.scale, other.scale * self.shift + other.shift)

    def channels(self, n: int) -> tuple[np.ndarray, np.ndarray]:
        """Scale and shift broadcast to ``n`` channels."""
        return np.broadcast_to(self.scale, (n,)).copy(), np.broadcast_to(self.shift, (n,)).copy()

    @property
    def width(self) -> int:
        return max(len(self.scale), len(self.shift))


@dataclasses.dataclass
class NormParams:
    """A layer/RMS norm over the last axis: ``width`` channels, ``eps``, and its affine
    ``weight`` / ``bias`` ``[width]`` (float64) or None when absent."""

    width: int
    eps: float
    weight: np.ndarray | None
    bias: np.ndarray | None


@dataclasses.dataclass
class Layout:
    """An op that moves, copies or selects data without mixing channels.

    ``kind``: ``identity`` (copy, eval dropout, float cast), ``reshape`` (view, flatten,
    squeeze...: axes are matched through the static shapes), ``expand``, ``reduce``
    (mean over ``axes``), ``select`` (slice/gather/select along ``axes`` with constant
    indices), ``concat`` (along ``axes[0]``). ``axes`` are non-negative, in the input's
    frame. ``target`` is the constant target shape a reshape/expand carries, or None.
    """

    kind: str
    axes: list[int] = dataclasses.field(default_factory=list)
    target: list[int] | None = None


@dataclasses.dataclass
class LinearOp:
    """A new op replacing a ``linear``: ``y = op(x, *consts) (+ bias)`` (``replace_linear``).

    ``consts``: named constant tensors, in call order (uint32 arrays reach torch as int32
    with the same bits). ``attrs``: integer attributes. ``onnx_function(opset)`` returns
    the model-local ``onnx_ir.Function`` (standard ops) the ONNX call names (its domain and
    name); ``torch_op()`` returns the custom op, called as
    ``op(x, *consts, bias_or_None, *attrs.values())``."""

    consts: dict[str, np.ndarray]
    attrs: dict[str, int]
    onnx_function: Any
    torch_op: Any
    onnx_attrs: dict[str, int] = dataclasses.field(default_factory=dict)  # ONNX call only (after attrs)


@dataclasses.dataclass(eq=False)
class Dim:
    """One entry of a shape computed at run time: ``value.shape[axis]`` (``axis`` negative),
    as an exporter's ``Shape -> Gather`` (ONNX) or ``aten.sym_size.int`` (FX) reads it."""

    value: Any
    axis: int

    def __repr__(self) -> str:
        return f"Dim({getattr(self.value, 'name', '?')}, {self.axis})"


Entry = Any  # int (a constant), Dim (read at run time) or None (computed in a way not followed)


class Declined(Exception):
    """Raised by view queries when a node cannot be used; the message is the reason."""


class GraphView(abc.ABC):
    """A model in one IR, seen as semantic nodes. Subclasses: OnnxView, FxView."""

    ir: str = ""

    def __init__(self) -> None:
        self._nodes: list[Node] | None = None
        self._by_raw: dict[int, Node] = {}
        self._users: dict[int, list[Node]] = {}

    # -- structure ---------------------------------------------------------------------
    @abc.abstractmethod
    def _build_nodes(self) -> list[Node]:
        """Group the IR's nodes into semantic nodes, in topological order."""

    @abc.abstractmethod
    def _raw_users(self, value: Value) -> list[Any]:
        """IR nodes reading ``value``."""

    @abc.abstractmethod
    def _raw_producer(self, value: Value) -> Any | None:
        """The IR node producing ``value``, or None (graph input, parameter)."""

    @abc.abstractmethod
    def is_graph_output(self, value: Value) -> bool: ...

    @abc.abstractmethod
    def rank(self, value: Value) -> int | None: ...

    @abc.abstractmethod
    def shape(self, value: Value) -> tuple | None:
        """Static shape; a dim is an int or None when unknown."""

    @abc.abstractmethod
    def value_name(self, value: Value) -> str: ...

    def invalidate(self) -> None:
        """Forget the semantic grouping (call after an edit changes the structure)."""
        self._nodes = None

    def _rewire(self, old: Value, new: Value) -> None:
        """Keep cached semantic nodes coherent when readers of ``old`` now read ``new``."""
        if self._nodes is None:
            return
        for r in self._raw_users(old):
            n = self._by_raw.get(id(r))
            if n is not None:
                n.inputs = [new if v is old else v for v in n.inputs]

    def _drop(self, node: Node) -> None:
        """Forget a removed semantic node without regrouping the whole graph."""
        if self._nodes is None:
            return
        self._nodes = [n for n in self._nodes if n is not node]
        for r in node.raw:
            self._by_raw.pop(id(r), None)

    def nodes(self) -> list[Node]:
        if self._nodes is None:
            self._nodes = self._build_nodes()
            self._by_raw = {id(r): n for n in self._nodes for r in n.raw}
        return self._nodes

    def node_of(self, raw: Any) -> Node | None:
        self.nodes()
        return self._by_raw.get(id(raw))

    def users(self, value: Value) -> list[Node]:
        """Semantic nodes reading ``value`` (each once), in graph order."""
        src = self._raw_producer(value)
        out: list[Node] = []
        for r in self._raw_users(value):
            n = self.node_of(r)
            if n is None:  # e.g. a node inside a subgraph reading an outer value: opaque
                n = Node(f"other:subgraph:{getattr(r, 'op_type', r)}", getattr(r, "name", "?") or "?", [value], None, [r])
            internal = src is not None and any(x is src for x in n.raw) if n else False
            if n is not None and n not in out and not internal:
                out.append(n)
        return out

    def producer(self, value: Value) -> Node | None:
        raw = self._raw_producer(value)
        return None if raw is None else self.node_of(raw)

    # -- semantics ---------------------------------------------------------------------
    @abc.abstractmethod
    def linear(self, node: Node, *, dtype: Any = np.float64) -> LinearParams:
        """The parameters of a ``linear`` node as ``dtype`` arrays (fresh copies). With
        ``dtype=None``: as stored when no arithmetic is needed to present them in the
        ``[out, in]`` layout (possibly a read-only view: do not write to it; see
        ``map_rows``), float64 otherwise."""

    @abc.abstractmethod
    def set_linear(self, node: Node, params: LinearParams) -> None: ...

    @abc.abstractmethod
    def conv(self, node: Node) -> ConvParams: ...

    @abc.abstractmethod
    def set_conv(self, node: Node, params: ConvParams) -> None: ...

    @abc.abstractmethod
    def affine(self, node: Node) -> Affine | None:
        """For batch_norm and elementwise ops with a constant operand: the per-channel
        affine map they compute. None when the node is not such a map. Raises
        ``Declined`` for a norm that is not frozen (training mode)."""

    @abc.abstractmethod
    def perm(self, node: Node) -> list[int]:
        """The permutation of a ``transpose`` node (``out.shape[i] == in.shape[perm[i]]``)."""

    # -- residual-stream queries (rms, crms, lns, osplus) ---------------------------------
    def norm(self, node: Node) -> NormParams:
        """Parameters of a ``layer_norm`` / ``rms_norm`` node; raises ``Declined`` when it
        normalizes over more than the last axis or its parameters are not constant."""
        raise NotImplementedError

    def operands(self, node: Node) -> list[Value]:
        """Every tensor input of the node's first IR node, constants included, in order."""
        raise NotImplementedError

    def const_value(self, value: Value) -> np.ndarray | None:
        """The value as an array when it depends on constants only, else None."""
        raise NotImplementedError

    def embedding(self, node: Node, *, dtype: Any = np.float64) -> np.ndarray:
        """The table ``[rows, width]`` of an ``embedding`` node as ``dtype`` (``None``: as
        stored, read-only)."""
        raise NotImplementedError

    def set_embedding(self, node: Node, table: np.ndarray) -> None:
        """Give ``node`` a new table (copy-on-write: a shared table is not changed)."""
        raise NotImplementedError

    def layout(self, node: Node) -> Layout | None:
        """How ``node`` moves data, when it is a layout op (see ``Layout``); else None."""
        raise NotImplementedError

    def set_layout_target(self, node: Node, target: Sequence[int]) -> None:
        """Replace the constant target shape of a reshape / expand node."""
        raise NotImplementedError

    def edit_const(self, value: Value, fn, *, width: int, new_width: int | None = None,
                   reader: Node | None = None) -> str:
        """Change the parameter a constant ``value`` is computed from: the chain of copies,
        casts, reshapes, expands and selections between a parameter and ``value`` is
        walked back and ``fn`` (float64 array -> array, acting on the last axis, where the
        ``width`` channels are) is applied to the parameter, copy-on-write. With
        ``new_width`` the width changes and reshape/expand targets along the chain follow.
        With ``reader`` (a node reading ``value`` itself) only that reader gets the edited
        parameter; the others keep the original.
        Returns the parameter's name; raises ``Declined`` when no such chain exists."""
        raise NotImplementedError

    def set_dim(self, value: Value, axis: int, size: int) -> None:
        """Update the static shape annotation of ``value`` at ``axis`` (if it has one)."""

    # -- shape arithmetic (dynamic axes) ------------------------------------------------
    def is_shape_reader(self, node: Node) -> bool:
        """Whether ``node`` reads only the shape of its input, not its values (ONNX
        ``Shape`` / ``Size``; FX ``aten.sym_size`` / ``.size()`` / ``.shape``)."""
        return False

    def data_users(self, value: Value) -> list[Node]:
        """``users(value)`` less the readers of its shape or metadata only."""
        return [u for u in self.users(value) if not self.is_shape_reader(u) and not self.is_harmless_reader(u)]

    def resize_keeps(self, node: Node, axis: int) -> bool:
        """``node`` is a resampling (ONNX ``Resize``) that leaves ``axis`` (negative) as it
        is: the same linear map on every slice along it, so a centring or a narrowing of
        that axis commutes with it."""
        return False

    def shape_target(self, node: Node) -> list[Entry] | None:
        """The target shape of a reshape / expand node, one entry per output axis: an int
        (a constant, ``-1`` / ``0`` as the op reads them), a ``Dim`` (a size read at run
        time) or None (computed in a way not followed); None when not even the number of
        entries is known."""
        lay = self.layout(node)
        return None if lay is None or lay.target is None else list(lay.target)

    def can_narrow_target(self, node: Node, index: int) -> str:
        """Empty when the constant entry ``index`` of the node's target can be changed by
        ``narrow_target``; else the reason."""
        return "" if self.layout(node) is not None and self.layout(node).target is not None else \
            f"{node.name}: its target shape is not a constant"

    def narrow_target(self, node: Node, index: int, size: int) -> None:
        """Set the constant entry ``index`` of the node's target shape to ``size``, for this
        node only (a target shared with other nodes is copied)."""
        t = list(self.layout(node).target)
        t[index] = size
        self.set_layout_target(node, t)

    def shape_read_problems(self, node: Node, narrowed, changes=None) -> list[str]:
        """``node`` reads the shape of a value whose channel axis is about to narrow:
        what, downstream of it, would compute a wrong result from the new width.
        ``narrowed(value)`` is the channel axis (negative) of a value that narrows, else
        None; ``changes(value)`` the same for the values whose shape reads change (default
        ``narrowed``; a value followed by an inserted slice changes for its readers without
        narrowing itself). The width may only reach the channel entry of the target of a
        reshape / expand whose output narrows along that axis; reads of other axes (batch,
        sequence) are harmless."""
        return [f"{node.op} ({node.name}) reads the shape of a narrowed value: not followed"]

    def is_harmless_reader(self, node: Node) -> bool:
        """Whether ``node`` reads a value without computing from it (a metadata check)."""
        return False

    def set_norm(self, node: Node, *, weight: np.ndarray | None = None, bias: np.ndarray | None = None) -> None:
        """Give a ``layer_norm`` / ``rms_norm`` a new affine ``weight`` and/or ``bias``
        (float64 ``[width]``, cast back to the norm's dtype); a parameter the norm lacks is
        added, one given as None is left as it is. Copy-on-write (used by ``lns``, ``osplus``)."""
        raise NotImplementedError

    # -- edits -------------------------------------------------------------------------
    @abc.abstractmethod
    def bypass(self, node: Node) -> None:
        """Remove ``node``; its readers read its first data input instead."""

    @abc.abstractmethod
    def tag(self, node: Node, pass_name: str, replaced: Iterable[str]) -> None:
        """Record provenance: ``node`` was made or changed by ``pass_name``."""

    def finalize(self) -> None:
        """Tidy after a pass: drop what no node reads any more."""

    # -- whole model -------------------------------------------------------------------
    @abc.abstractmethod
    def copy(self) -> GraphView: ...

    def op_counts(self) -> dict[str, int]:
        """IR-level op type -> count (what a user sees in Netron / the FX graph)."""
        return dict(collections.Counter(self.raw_op_types()))

    @abc.abstractmethod
    def raw_op_types(self) -> list[str]: ...

    def to_networkx(self) -> nx.DiGraph:
        """The semantic graph as a networkx DiGraph (nodes keyed by name, attr ``op``)."""
        g = nx.DiGraph()
        for n in self.nodes():
            g.add_node(n.name, op=n.op)
        for n in self.nodes():
            for v in n.inputs:
                p = self.producer(v)
                if p is not None:
                    g.add_edge(p.name, n.name)
        return g


def broadcast_axis(const_shape: Sequence[int], data_rank: int) -> int | None | str:
    """The single axis (negative) along which a constant of ``const_shape`` varies when
    broadcast against a rank-``data_rank`` tensor; None for a scalar; "bad" otherwise."""
    shape = list(const_shape)
    if len(shape) > data_rank:
        if any(d != 1 for d in shape[: len(shape) - data_rank]):
            return "bad"
        shape = shape[len(shape) - data_rank :]
    axes = [i - len(shape) for i, d in enumerate(shape) if d != 1]
    if not axes:
        return None
    if len(axes) > 1:
        return "bad"
    return axes[0]


def binary_affine(op: str, const: np.ndarray, const_first: bool, data_rank: int | None) -> Affine | None:
    """``x op c`` (``c op x`` when ``const_first``) as a per-channel affine map of ``x``, for
    ``op`` in mul / add / sub / div and a floating constant that varies along one axis at
    most; None otherwise (``c / x`` is not affine)."""
    if data_rank is None or const.ndim > data_rank or not np.issubdtype(const.dtype, np.floating):
        return None
    axis = broadcast_axis(const.shape, data_rank)
    if axis == "bad":
        return None
    c = const.astype(np.float64).reshape(-1)
    if op == "mul":
        return Affine(axis, c, np.zeros_like(c))
    if op == "add":
        return Affine(axis, np.ones_like(c), c)
    if op == "sub":
        return Affine(axis, -np.ones_like(c), c) if const_first else Affine(axis, np.ones_like(c), -c)
    if const_first:
        return None
    return Affine(axis, 1.0 / c, np.zeros_like(c))
