"""Finding attention in both IRs: where ``softmax(scale * Q K^T) V`` is computed, with
``Q, K, V: [B, H, N, Dh]`` and what may stop a rewrite of it.

Recognised forms:

* ``sdpa``: FX ``aten.scaled_dot_product_attention`` (``scale=None`` means ``Dh^-1/2``);
* ``attention``: ONNX opset-23 ``Attention`` with 4-D inputs (default scale ``Dh^-1/2``);
* ``chain``: ``MatMul(a, b) -> [Mul|Div by a scalar] -> Softmax(-1) -> MatMul(., V)``, the
  decomposition the opset-18 exporter writes (``a = Q * sqrt(s)``, ``b = K^T * sqrt(s)``)
  and the one ``torch.export`` keeps for hand-written attention. The site then computes
  ``softmax(c * a b) V``: ``Q := a``, ``K := b^T``, ``scale := c`` (1 without the scalar op).
  The TorchScript and dynamo exporters' spelling of masked SDPA is the same chain with a mask
  on the scores (``Add(scores, mask)`` or ``Where(m, scores, -inf)``; BLOOM's alibi
  ``baddbmm`` adds a bias too) and a NaN guard after the Softmax (``Where(IsNaN(p), 0, p)``);
  in FX, ``softmax(.., dtype) -> to -> dropout(p=0) -> view -> bmm``. Such a site is found
  when the scores come from a MatMul of two run-time tensors and the probabilities meet a
  run-time V, and is declined as ``causal attention`` (the mask is built from a comparison
  of two position tensors, ``j <= i``, or a Trilu) or ``has an attention mask`` (padding
  mask or bias).

A mask that keeps every key is no mask: transformers 5 passes bidirectional encoders
(ViT, DeiT, Dinov2) an all-true mask built from aranges (``create_bidirectional_mask``).
ONNX: a constant of zeros (additive) / true (boolean), an ``Expand`` / ``Cast`` of one,
or ``Where(all true, 0, .)``, at every run-time shape; FX: an SDPA mask computed from no
input at all, evaluated once and all true / all zero. The mask op then goes with the chain.

Self- or cross-attention is decided by dataflow, never by equal lengths (``token_source``).
Rule ``self``: ``Q`` and ``K`` derive from the same token tensor through per-token ops,
each in the list below, or from one concatenation of token tensors along the tokens:

* head reshapes, transposes, splits of a fused projection, float casts, copies;
* scalar scales (constant, or computed from a ``Shape`` under dynamic axes);
* a qk-norm (``layer_norm`` / ``rms_norm``: HunyuanDiT, CogVideoX, SD3, Flux);
* RoPE: products and sums with position tables (operands that derive from no linear
  projection, constants or inputs), rotate-half (negation, and a concatenation along the
  feature axis whose parts come from one tensor);
* one linear projection: the tensor it reads is the token source;
* a concatenation along a token axis of projections of several sequences (SD3 / Flux
  joint attention; CogVideoX concatenates before projecting) is a ``Joint`` source; Q and
  K must concatenate the same sources in the same order.

Otherwise the keys derive from another tensor than the queries: cross-attention
(text-conditioned DiTs: the keys of ``attn2`` are projected from the text embedding),
declined also when the text happens to be as long as the image token sequence. Where the
trace meets any other op, the site is declined and the reason names that op (it cannot be
told apart). Keys of another length than the queries are cross-attention in any case.

Declined (the reason names the site): an attention mask, causal attention, dropout, soft
capping, a KV cache, GQA (fewer key heads), 3-D inputs, unknown static H / N / Dh, extra
outputs of ONNX ``Attention`` in use, an additive term between the MatMul and the Softmax,
and onnxruntime's ``com.microsoft`` attention ops (``Attention``, ``MultiHeadAttention``,
``GroupQueryAttention``, ...: ``CONTRIB_ATTENTION``), named in the reason.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import operator
from typing import Any

import numpy as np
import torch
from torch import fx

from rewriter.ir.view import Declined, GraphView, Layout, Node, Value

log = logging.getLogger(__name__)


@dataclasses.dataclass
class AttentionSite:
    """One attention computation; ``reason`` set when it cannot be rewritten."""

    name: str
    form: str  # "sdpa" | "attention" | "chain"
    q: Value | None = None
    k: Value | None = None  # [B, H, N, Dh]; for "chain" the value holding K^T
    v: Value | None = None
    k_transposed: bool = False
    scale: float = 1.0
    out: Value | None = None  # the value the rewrite replaces
    raw: list[Any] = dataclasses.field(default_factory=list)  # IR nodes the rewrite removes
    batch: int | None = None
    heads: int = 0
    tokens: int = 0
    head_dim: int = 0
    dtype: Any = None
    self_attention: bool = True
    note: str = ""
    reason: str = ""

    @property
    def ok(self) -> bool:
        return not self.reason


def find_attention(view: GraphView) -> list[AttentionSite]:
    """Every attention site of ``view`` in graph order, each with its shapes and scale, or
    with the reason it cannot be rewritten."""
    if view.ir == "onnx":
        sites = _onnx_sites(view)
    elif view.ir == "torch":
        sites = _fx_sites(view)
    else:  # pragma: no cover - only two IRs
        return []
    sites += linear_attention(view)
    for s in sites:
        if not s.ok:
            continue
        _classify_self(view, s)
        decided, self_attention = s.reason, s.self_attention
        s.reason, s.self_attention = "", True
        _check_shapes(view, s)
        if decided and s.self_attention:  # cross-attention, or undecided, before any shape question
            s.reason, s.self_attention = decided, self_attention
    return sites


# -- linear attention ----------------------------------------------------------------------------
_MATMUL = ("matmul", "bmm")
_FEATURE_MAPS = ("relu", "elu", "sigmoid", "softplus")


def _feature_map(view: GraphView, value: Value, depth: int = 4) -> Node | None:
    """The kernel feature map (``relu(Q)``, ``elu(K) + 1``) ``value`` is a per-token view of."""
    for _ in range(depth):
        node = view.producer(value)
        if node is None or not node.inputs:
            return None
        name = _op_name(node)
        if name in _FEATURE_MAPS:
            return node
        if not (node.op == "transpose" or name in _PER_TOKEN or name in ("add", "pad")):
            return None
        value = node.inputs[0]
    return None


def linear_attention(view: GraphView) -> list[AttentionSite]:
    """Linear attention (Sana, Linformer-style kernels): ``phi(Q) (phi(K)^T V)`` as two
    products of run-time tensors with a kernel feature map ``phi`` (ReLU, ELU + 1) on an
    operand and no softmax. Recognised so that a decline names it; never rewritten."""
    sites = []
    for node in view.nodes():
        if _op_name(node) not in _MATMUL or len(node.inputs) != 2:
            continue
        if any(view.const_value(x) is not None for x in node.inputs):
            continue
        inner = [view.producer(x) for x in node.inputs]
        inner = [n for n in inner if n is not None and _op_name(n) in _MATMUL and len(n.inputs) == 2
                 and all(view.const_value(x) is None for x in n.inputs)]
        if not inner:
            continue
        phi = next((f for x in [*node.inputs, *inner[0].inputs] if (f := _feature_map(view, x)) is not None), None)
        if phi is None:
            continue
        sites.append(AttentionSite(node.name, "linear", raw=[inner[0].raw[0], node.raw[0]], reason=(
            f"{node.name}: linear attention (feature map {phi.op.split(':', 1)[-1]} {phi.name}, products "
            f"{inner[0].name} and {node.name}, no softmax): Re-ttention sparsifies softmax attention only")))
    return sites


# -- shared ------------------------------------------------------------------------------------
# the start of a decline that better shape inference may lift (``rewriter.run.shapes``)
SHAPES_UNKNOWN = "shape inference left the heads, tokens or head width unknown"


def _known(shape) -> bool:
    """Every axis but the first (the batch, symbolic under dynamic axes) is known."""
    return shape is not None and all(d is not None for d in shape[1:])


def shape_stop(view: GraphView, value: Value, depth: int = 64) -> Node | None:
    """The op where shape inference stopped on the way to ``value``: the first op back
    from it whose data inputs all have known shapes (but the batch) and whose output has
    not; None when the walk reaches an input first."""
    for _ in range(depth):
        node = view.producer(value)
        if node is None:
            return None
        unknown = next((x for x in node.inputs if x is not None and view.const_value(x) is None
                        and not _known(view.shape(x))), None)
        if unknown is None:
            return node
        value = unknown
    return None


def shape_stop_note(view: GraphView, value: Value, which: str = "") -> str:
    node = shape_stop(view, value)
    if node is None:
        return ""
    op = node.op.split(":", 1)[-1]
    return (f"; inference stops at {op} {node.name}"
            + (f" on the way to {which}" if which else "")
            + " (its output shape is not derived from its inputs' known shapes)")


def _check_shapes(view: GraphView, s: AttentionSite) -> None:
    qs, ks, vs = view.shape(s.q), view.shape(s.k), view.shape(s.v)
    if (ks is None or None in ks[1:]) and s.k_transposed and qs is not None and vs is not None and len(qs) == len(vs) == 4:
        ks = (qs[0], qs[1], qs[3], vs[2])  # K^T of the decomposition often has no shape: Q @ K^T says it
    if qs is None or ks is None or vs is None:
        which = next(w for w, x in (("Q", qs), ("K", ks), ("V", vs)) if x is None)
        value = {"Q": s.q, "K": s.k, "V": s.v}[which]
        s.reason = f"{s.name}: {SHAPES_UNKNOWN} ({which}'s rank is unknown){shape_stop_note(view, value)}"
        return
    if len(qs) != 4 or len(ks) != 4 or len(vs) != 4:
        s.reason = f"{s.name}: Q, K, V are not [B, H, N, Dh] (ranks {len(qs)}, {len(ks)}, {len(vs)})"
        return
    if s.k_transposed:
        ks = (ks[0], ks[1], ks[3], ks[2])
    b, h, n, d = qs
    if None in (h, n, d) or None in ks[1:] or None in vs[1:]:
        which, value = next((w, x) for w, x, sh in (("Q", s.q, qs), ("K", s.k, ks), ("V", s.v, vs))
                            if None in sh[1:])
        s.reason = (f"{s.name}: {SHAPES_UNKNOWN} (Q is {list(qs)}, K {list(ks)}, V {list(vs)})"
                    f"{shape_stop_note(view, value, which)}")
        return
    if ks[1] != h or vs[1] != h:
        s.reason = f"{s.name}: {ks[1]} key heads for {h} query heads (GQA/MQA is not supported)"
        return
    if ks[3] != d or vs[3] != d:
        s.reason = f"{s.name}: value or key width differs from the query width {d}"
        return
    s.batch, s.heads, s.tokens, s.head_dim = b, h, n, d
    if ks[2] != n:
        s.self_attention = False
        s.reason = (f"{s.name}: cross-attention ({ks[2]} keys for {n} queries); Re-ttention's "
                    "static mask is defined over one token sequence")


class Undecided(Exception):
    """The token-source trace met an op it cannot see through (the node)."""

    def __init__(self, node: Node | None, what: str = ""):
        super().__init__(what)
        self.node = node
        self.what = what


@dataclasses.dataclass(frozen=True)
class Joint:
    """Q or K as one concatenation of per-sequence projections along a token axis (joint
    attention: SD3, Flux): the token source of each part, in order."""

    parts: tuple


# ops that map each token to itself: head reshapes, transposes, casts, copies, splits of a
# fused projection, negations (RoPE's rotate-half), by the name the view gives an op it
# does not classify (``other:NAME``; ONNX op types and aten targets)
_PER_TOKEN = frozenset({
    "identity", "cast", "reshape", "flatten", "squeeze", "unsqueeze", "expand", "split", "neg", "gather", "slice",
    "getitem", "view", "_unsafe_view", "clone", "contiguous", "alias", "detach", "_to_copy", "to", "unbind",
    "chunk", "select", "permute", "unflatten", "split_with_sizes", "transpose", "t", "narrow",
    "splittosequence", "sequenceat",  # the dynamo exporter's torch.split / chunk of a fused QKV
})
_QK_NORMS = ("layer_norm", "rms_norm")


def _op_name(node: Node) -> str:
    """``Reshape`` / ``aten.view.default`` / ``getitem`` -> ``reshape`` / ``view`` / ``getitem``."""
    op = node.op.split(":", 1)[1] if node.op.startswith("other:") else node.op
    if op.startswith("aten."):
        op = op.split(".")[1]
    return op.lower()


def token_source(view: GraphView, value: Value, depth: int = 48):
    """The token tensor ``value`` (Q or K) is computed from by per-token ops: back through
    head reshapes / transposes / splits / casts, scalar scales, a qk-norm, RoPE (products
    with position tables, rotate-half) and one linear projection, whose input it returns.
    A concatenation along a token axis gives a ``Joint`` of its parts' sources (one along
    the feature axis, as RoPE's rotate-half, needs one source for every part). Returns the
    value itself when it is a graph input; raises ``Undecided`` at any other op."""
    for _ in range(depth):
        node = view.producer(value)
        if node is None:
            return value
        if node.op == "linear":
            return node.inputs[0]
        name = _op_name(node)
        if name in ("mul", "div", "add", "sub") and len(node.inputs) == 2:
            return _binary_source(view, node, depth - 1)
        lay = _layout(view, node)
        if lay is None and name in ("cat", "concat"):
            lay = _fx_cat(view, node)
        if lay is not None and lay.kind == "concat":
            return _concat_source(view, node, lay, depth - 1)
        if not node.inputs:
            raise Undecided(node, "an op without a data input")
        if (node.op in ("transpose", *_QK_NORMS) or name in _PER_TOKEN
                or (lay is not None and lay.kind in ("identity", "reshape", "expand", "select"))
                or (name in ("mul", "div") and len(node.inputs) == 1)):
            value = node.inputs[0]
            continue
        raise Undecided(node)
    raise Undecided(view.producer(value), "a trace longer than the depth limit")


def _layout(view: GraphView, node: Node):
    try:
        return view.layout(node)
    except Declined:
        return None


def _fx_cat(view: GraphView, node: Node) -> Layout | None:
    """``aten.cat(tensors, dim)`` as a concat layout (FX views leave it unclassified)."""
    raw = node.raw[0] if node.raw else None
    args = getattr(raw, "args", None)
    rank = view.rank(node.output)
    if not args or rank is None:
        return None
    dim = args[1] if len(args) > 1 else getattr(raw, "kwargs", {}).get("dim", 0)
    return Layout("concat", [int(dim) % rank]) if isinstance(dim, int) else None


def _same(a, b) -> bool:
    if isinstance(a, Joint) or isinstance(b, Joint):
        return (isinstance(a, Joint) and isinstance(b, Joint) and len(a.parts) == len(b.parts)
                and all(_same(x, y) for x, y in zip(a.parts, b.parts)))
    return a is b


def _concat_source(view: GraphView, node: Node, lay, depth: int):
    parts = [x for x in view.operands(node) if view.const_value(x) is None]
    rank = view.rank(node.output)
    if rank is None:
        raise Undecided(node, "a concatenation of unknown rank")
    srcs = [token_source(view, x, depth) for x in parts]
    if not srcs:
        raise Undecided(node, "a concatenation of constants")
    if lay.axes[0] == rank - 1:  # along the features (rotate-half): one token tensor
        if all(_same(srcs[0], x) for x in srcs[1:]):
            return srcs[0]
        raise Undecided(node, "a concatenation of features of different tensors")
    return Joint(tuple(srcs))


def _is_table(view: GraphView, value: Value, limit: int = 64) -> bool:
    """``value`` does not derive from any linear projection (a scalar, a constant, RoPE's
    cos / sin tables from positions or given as inputs) or is scalar-sized: a per-token
    product or sum with it keeps the tokens' source."""
    if view.const_value(value) is not None:
        return True
    shape = view.shape(value)
    if shape is not None and all(d == 1 for d in shape):
        return True
    seen, todo = set(), [value]
    while todo and len(seen) < limit:
        v = todo.pop()
        n = view.producer(v)
        if n is None or id(n) in seen or view.is_shape_reader(n):
            continue
        seen.add(id(n))
        if n.op in ("linear", "conv", "embedding", "attention"):
            return False
        todo.extend(n.inputs)
    return len(seen) < limit


def _binary_source(view: GraphView, node: Node, depth: int):
    srcs, failures = [], []
    for x in node.inputs:
        if _is_table(view, x):
            continue
        try:
            srcs.append(token_source(view, x, depth))
        except Undecided as why:
            failures.append(why)
    if failures:
        raise failures[0]
    if not srcs:
        raise Undecided(node, "a product of position tables")
    if all(_same(srcs[0], x) for x in srcs[1:]):
        return srcs[0]
    raise Undecided(node, "a combination of two token tensors")


def _describe_source(view: GraphView, src) -> str:
    if isinstance(src, Joint):
        return "concat(" + ", ".join(_describe_source(view, p) for p in src.parts) + ")"
    return view.value_name(src)


def _classify_self(view: GraphView, s: AttentionSite) -> None:
    """Self- or cross-attention by dataflow: self when Q and K derive from the same token
    tensor (or the same concatenation of token tensors) through per-token ops."""
    found = {}
    for which, value in (("queries", s.q), ("keys", s.k)):
        try:
            found[which] = token_source(view, value)
        except Undecided as why:
            n = why.node
            op = "?" if n is None else (n.op.split(":", 1)[-1])
            where = "" if n is None else f" {n.name}"
            s.self_attention = False
            s.reason = (f"{s.name}: cannot tell self- from cross-attention: the trace of the {which} to "
                        f"their token tensor stops at {op}{where}" + (f" ({why.what})" if why.what else ""))
            return
    sq, sk = found["queries"], found["keys"]
    if _same(sq, sk):
        joint = " (joint attention over one concatenation)" if isinstance(sq, Joint) else ""
        s.note = f"self-attention: queries and keys derive from {_describe_source(view, sq)}{joint}"
        return
    s.self_attention = False
    s.reason = (f"{s.name}: cross-attention (keys are projected from {_describe_source(view, sk)}, "
                f"queries from {_describe_source(view, sq)})")


def _scalar(arr: np.ndarray | None) -> float | None:
    if arr is None or arr.size != 1 or not np.issubdtype(arr.dtype, np.floating):
        return None
    return float(arr.reshape(()))


# -- ONNX --------------------------------------------------------------------------------------
# onnxruntime's contrib attention ops (what its transformers optimizer fuses attention into)
CONTRIB_ATTENTION = frozenset({
    "Attention", "MultiHeadAttention", "GroupQueryAttention", "PackedAttention", "PackedMultiHeadAttention",
    "DecoderAttention", "DecoderMaskedSelfAttention", "DecoderMaskedMultiHeadAttention", "SparseAttention",
    "LongformerAttention", "QAttention", "QOrderedAttention", "QOrderedLongformerAttention", "PagedAttention",
})


def _onnx_sites(view: GraphView) -> list[AttentionSite]:
    sites = []
    for raw in view.graph:
        if raw.domain == "com.microsoft" and raw.op_type in CONTRIB_ATTENTION:
            name = raw.name or raw.op_type
            sites.append(AttentionSite(name, "contrib", raw=[raw], reason=(
                f"{name}: com.microsoft {raw.op_type} (an onnxruntime contrib op, as its transformers optimizer "
                "writes) is not rewritten: rewrite the model before onnxruntime's optimizer")))
            continue
        if raw.domain not in ("", "ai.onnx"):
            continue
        if raw.op_type == "Attention":
            sites.append(_onnx_attention(view, raw))
        elif raw.op_type == "Softmax":
            s = _onnx_chain(view, raw)
            if s is not None:
                sites.append(s)
    return sites


def _onnx_attention(view: GraphView, raw) -> AttentionSite:
    name = raw.name or "Attention"
    s = AttentionSite(name, "attention", raw=[raw])
    ins = list(raw.inputs) + [None] * 6
    s.q, s.k, s.v = ins[0], ins[1], ins[2]
    s.out = raw.outputs[0]
    s.dtype = s.q.dtype if s.q is not None else None
    a = raw.attributes
    if ins[3] is not None:
        s.reason = f"{name}: has an attention mask"
    elif ins[4] is not None or ins[5] is not None:
        s.reason = f"{name}: uses a KV cache (past_key / past_value)"
    elif a.get_int("is_causal", 0):
        s.reason = f"{name}: causal attention (Re-ttention is for bidirectional diffusion transformers)"
    elif a.get_float("softcap", 0.0):
        s.reason = f"{name}: soft-capped scores"
    elif any(o.uses() or o.is_graph_output() for o in raw.outputs[1:]):
        s.reason = f"{name}: its present_key / present_value / QK outputs are read"
    if s.reason:
        return s
    shape = view.shape(s.q)
    d = shape[-1] if shape else None
    scale = a.get_float("scale", None) if "scale" in a else None
    s.scale = scale if scale is not None else (1.0 / math.sqrt(d) if d else 1.0)
    return s


def _single_user(value) -> Any | None:
    uses = list(value.uses())
    if len(uses) != 1 or value.is_graph_output():
        return None
    return uses[0]


# ops the exporters put between the score MatMul, the Softmax and the value MatMul that do not
# change which scores are computed: value-preserving casts and head reshapes
_PASS_THROUGH = ("Cast", "Reshape", "Identity", "Dropout")
# comparisons of two position tensors: how exporters spell a causal mask (j <= i)
_POSITION_COMPARE = ("Less", "LessOrEqual", "Greater", "GreaterOrEqual", "Trilu")


def _nan_guard(softmax) -> Any | None:
    """The ``Where(IsNaN(p), 0, p)`` after ``p = Softmax(.)`` (the TorchScript / dynamo export
    of SDPA with a mask writes it so that a fully masked row gives zeros): its Where node."""
    uses = list(softmax.outputs[0].uses())
    if len(uses) != 2 or softmax.outputs[0].is_graph_output():
        return None
    isnan = next((u.node for u in uses if u.node.op_type == "IsNaN"), None)
    where = next((u.node for u in uses if u.node.op_type == "Where" and u.idx == 2), None)
    if isnan is None or where is None or where.inputs[0] is not isnan.outputs[0]:
        return None
    if len(list(isnan.outputs[0].uses())) != 1:
        return None
    return where


def _score_root(view: GraphView, value, depth: int = 8):
    """The ``MatMul(a, b)`` of two run-time tensors that ``value`` is (up to scalar scales,
    casts, reshapes and additive / Where masks) computed from, or None."""
    for _ in range(depth):
        node = value.producer()
        if node is None:
            return None
        op = node.op_type
        if op == "MatMul":
            if any(view.const_value(i) is not None for i in node.inputs[:2]):
                return None
            return node
        if op in _PASS_THROUGH or op in ("Mul", "Div", "Sub"):
            value = node.inputs[0]
            if op == "Mul" and _scalar(view.const_value(value)) is not None:
                value = node.inputs[1]
            continue
        if op in ("Add", "Where"):
            cands = node.inputs[1:3] if op == "Where" else node.inputs[:2]
            for c in cands:
                if c is not None and view.const_value(c) is None:
                    root = _score_root(view, c, depth - 1)
                    if root is not None:
                        return root
            return None
        return None
    return None


def _scalar_like(view: GraphView, value) -> bool:
    arr = view.const_value(value)
    if arr is not None:
        return arr.size == 1
    shape = view.shape(value)
    return shape is not None and all(d == 1 for d in shape)


def _mask_kind(view: GraphView, node, score_side, limit: int = 400) -> str:
    """``causal`` when the mask applied by ``node`` (an Add or Where on the scores) is built
    from a comparison of two position tensors (``j <= i``, not a tensor against a scalar as a
    padding mask's ``m >= 0``) or a Trilu; else ``padding``."""
    start = [i for i in node.inputs if i is not None and i is not score_side]
    seen, stack = set(), [v.producer() for v in start if v.producer() is not None]
    while stack and len(seen) < limit:  # breadth first: the comparison sits near the mask's root
        n = stack.pop(0)
        if id(n) in seen:
            continue
        seen.add(id(n))
        if n.op_type == "Trilu" or (n.op_type in _POSITION_COMPARE
                                     and not any(_scalar_like(view, i) for i in n.inputs[:2])):
            return "causal"
        stack.extend(i.producer() for i in n.inputs if i is not None and i.producer() is not None)
    return "padding"


def _neutral(view: GraphView, value, fill: float | None, depth: int = 6) -> bool:
    """Whether ``value`` is, at every run-time shape, filled with ``fill`` (a float: an additive
    mask that adds nothing, 0) or all true (``fill`` None: a boolean mask that keeps every key):
    a constant of that value, or an ``Expand`` / ``Cast`` of one, or ``Where(c, a, b)`` with
    ``c`` all true and ``a`` neutral. transformers 5 builds such a mask for bidirectional
    encoders (``create_bidirectional_mask``), and the dynamo exporter folds it to these ops."""
    if value is None or depth <= 0:
        return False
    arr = view.const_value(value)
    if arr is not None:
        return bool(np.all(arr)) if fill is None else bool(np.all(arr == fill))
    node = value.producer()
    if node is None:
        return False
    if node.op_type == "Expand":
        return _neutral(view, node.inputs[0], fill, depth - 1)
    if node.op_type == "Cast" and fill is None:
        return _neutral(view, node.inputs[0], None, depth - 1)
    if node.op_type == "Where":
        return _neutral(view, node.inputs[0], None, depth - 1) and _neutral(view, node.inputs[1], fill, depth - 1)
    return False


def _onnx_chain(view: GraphView, softmax) -> AttentionSite | None:
    x = softmax.inputs[0]
    rank = view.rank(x)
    axis = softmax.attributes.get_int("axis", -1)
    name = softmax.name or "Softmax"
    reason = ""
    chain = [softmax]
    # forward: Softmax -> [NaN guard] -> [Cast / Reshape]* -> MatMul(., V)
    probs = softmax.outputs[0]
    guard = _nan_guard(softmax)
    if guard is not None:
        chain.append(guard)
        chain.insert(1, next(u.node for u in probs.uses() if u.node.op_type == "IsNaN"))
        probs = guard.outputs[0]
    reshaped = False
    for _ in range(4):
        out_use = _single_user(probs)
        if out_use is None or out_use.node.op_type not in _PASS_THROUGH or out_use.idx != 0:
            break
        reshaped = True
        chain.append(out_use.node)
        probs = out_use.node.outputs[0]
    out_use = _single_user(probs)
    if out_use is None or out_use.node.op_type != "MatMul" or out_use.idx != 0:
        return None
    pv = out_use.node
    if view.const_value(pv.inputs[1]) is not None:
        return None
    chain.append(pv)
    scale = 1.0
    node = x.producer()
    while node is not None and node.op_type in ("Mul", "Div", "Add", "Where") and _single_user(node.outputs[0]):
        if node.op_type in ("Add", "Where"):
            # an additive mask / bias (Add) or a boolean mask (Where(m, scores, -inf)): the
            # site is attention only when the scores come from a MatMul of two run-time tensors
            cands = node.inputs[1:3] if node.op_type == "Where" else node.inputs[:2]
            side = next((c for c in cands if c is not None and view.const_value(c) is None
                         and _score_root(view, c) is not None), None)
            if side is None:
                return None
            other = [c for c in (node.inputs[:2] if node.op_type == "Add" else node.inputs[:1]) if c is not side]
            srank = view.rank(side)
            if (other and all(_neutral(view, c, 0.0 if node.op_type == "Add" else None) for c in other)
                    and all(view.rank(c) is not None and srank is not None and view.rank(c) <= srank for c in other)
                    and (node.op_type == "Add" or node.inputs[1] is side)):
                # a mask that keeps every key (all zeros added, or Where(all true, scores, .)):
                # the scores pass unchanged; the node goes with the chain
                chain.insert(0, node)
                node = side.producer()
                continue
            kind = _mask_kind(view, node, side)
            what = ("causal attention (a causal mask" if kind == "causal"
                    else "has an attention mask (a padding mask or bias")
            s = AttentionSite(name, "chain", raw=chain, reason=(
                f"{name}: {what} is applied to the scores by {node.op_type} {node.name or ''}".rstrip()
                + "); Re-ttention is for unmasked bidirectional attention"))
            return s
        c = [_scalar(view.const_value(i)) for i in node.inputs]
        if c[1] is not None:
            scale = scale * c[1] if node.op_type == "Mul" else scale / c[1]
            data = node.inputs[0]
        elif c[0] is not None and node.op_type == "Mul":
            scale *= c[0]
            data = node.inputs[1]
        else:
            return None
        chain.insert(0, node)
        node = data.producer()
    if node is None or node.op_type != "MatMul" or not _single_user(node.outputs[0]):
        return None
    qk = node
    if view.const_value(qk.inputs[0]) is not None or view.const_value(qk.inputs[1]) is not None:
        return None
    chain.insert(0, qk)
    # the exporters scale Q and K^T by sqrt(scale) each: fold those into the scale
    operands = []
    for operand in qk.inputs[:2]:
        p = operand.producer()
        while p is not None and p.op_type == "Mul" and _single_user(operand) is not None:
            c = [_scalar(view.const_value(i)) for i in p.inputs]
            if (c[0] is None) == (c[1] is None):
                break
            scale *= c[1] if c[1] is not None else c[0]
            chain.insert(0, p)
            operand = p.inputs[0] if c[1] is not None else p.inputs[1]
            p = operand.producer()
        operands.append(operand)
    s = AttentionSite(name, "chain", q=operands[0], k=operands[1], v=pv.inputs[1], k_transposed=True,
                      scale=scale, out=pv.outputs[0], raw=chain)
    s.dtype = s.q.dtype
    if rank is not None and axis % rank != rank - 1:
        s.reason = f"{name}: softmax over axis {axis}, not over the keys"
    elif reshaped:
        s.reason = (f"{name}: the probabilities are cast or reshaped before the value product "
                    "(a batched 3-D layout), not [B, H, N, N] @ [B, H, N, Dh]")
    if reason:
        s.reason = reason
    return s


# -- FX ----------------------------------------------------------------------------------------
def _fx_sites(view: GraphView) -> list[AttentionSite]:
    aten = torch.ops.aten
    softmaxes = {aten.softmax.int, aten._softmax.default, torch.softmax, torch.nn.functional.softmax}
    sites = []
    for raw in view.graph.nodes:
        if raw.op != "call_function":
            continue
        if raw.target is aten.scaled_dot_product_attention.default:
            sites.append(_fx_sdpa(view, raw))
        elif raw.target in softmaxes:
            s = _fx_chain(view, raw)
            if s is not None:
                sites.append(s)
    return sites


def _fx_sdpa(view: GraphView, raw) -> AttentionSite:
    args = list(raw.args) + [None] * 8
    kw = raw.kwargs
    s = AttentionSite(raw.name, "sdpa", q=args[0], k=args[1], v=args[2], out=raw, raw=[raw])
    mask = args[3] if args[3] is not None else kw.get("attn_mask")
    dropout = args[4] if args[4] is not None else kw.get("dropout_p", 0.0)
    causal = args[5] if args[5] is not None else kw.get("is_causal", False)
    scale = args[6] if args[6] is not None else kw.get("scale")
    gqa = kw.get("enable_gqa", False)
    if mask is not None and _fx_keeps_every_key(mask):
        mask = None  # transformers 5's all-true bidirectional mask: no mask
    if mask is not None:
        s.reason = f"{raw.name}: has an attention mask"
    elif dropout:
        s.reason = f"{raw.name}: attention dropout p={dropout} (training)"
    elif causal:
        s.reason = f"{raw.name}: causal attention (Re-ttention is for bidirectional diffusion transformers)"
    elif gqa:
        s.reason = f"{raw.name}: grouped-query attention (enable_gqa)"
    shape = view.shape(s.q)
    d = shape[-1] if shape else None
    s.scale = float(scale) if scale is not None else (1.0 / math.sqrt(d) if d else 1.0)
    val = raw.meta.get("val")
    s.dtype = getattr(val, "dtype", None)
    return s


# aten ops whose values the graph does not fix (a mask built from them is not a constant)
_FX_NONDETERMINISTIC = ("rand", "empty", "bernoulli", "dropout", "normal", "uniform", "multinomial")


def _fx_keeps_every_key(mask, limit: int = 40) -> bool:
    """Whether an SDPA mask is computed from no input at all (aranges, fills: transformers 5's
    ``create_bidirectional_mask`` under ``torch.export``) and keeps every key: all true when
    boolean, all zeros when additive. Evaluated once, on the captured static shapes."""
    if not isinstance(mask, fx.Node):
        return False
    order, stack, seen = [], [mask], set()
    while stack:
        n = stack.pop()
        if n in seen:
            continue
        seen.add(n)
        if (n.op != "call_function" or not isinstance(n.target, torch._ops.OpOverload) or len(seen) > limit
                or any(k in str(n.target) for k in _FX_NONDETERMINISTIC)):
            return False  # an input, a parameter, not a plain aten op, or values not fixed by the graph
        order.append(n)
        stack.extend(n.all_input_nodes)
    index = {n: i for i, n in enumerate(mask.graph.nodes)}
    vals: dict = {}
    try:
        with torch.no_grad():
            for n in sorted(order, key=index.__getitem__):
                args, kwargs = fx.node.map_arg((n.args, n.kwargs), vals.__getitem__)
                vals[n] = n.target(*args, **kwargs)
    except Exception as err:  # noqa: BLE001 - not evaluable: treated as a real mask
        log.debug("mask %s not evaluated: %s", mask.name, err)
        return False
    m = vals[mask]
    if not isinstance(m, torch.Tensor):
        return False
    return bool(m.all()) if m.dtype == torch.bool else bool((m == 0).all())


def _fx_chain(view: GraphView, softmax) -> AttentionSite | None:
    aten = torch.ops.aten
    matmuls = {aten.matmul.default, operator.matmul, torch.matmul}
    dim = softmax.args[1] if len(softmax.args) > 1 else softmax.kwargs.get("dim", -1)
    # forward: softmax -> [to(dtype) / eval dropout / view]* -> matmul or bmm (BLOOM's baddbmm
    # attention: ``softmax(..., dtype)``, ``to``, ``dropout(p=0)``, ``view`` to 3-D, ``bmm``)
    probs, passed = softmax, []
    for _ in range(5):
        users = [u for u in probs.users if "assert_tensor_metadata" not in str(u.target)]
        if len(users) != 1 or users[0].args[0] is not probs:
            return None
        u = users[0]
        if u.target in matmuls or u.target is aten.bmm.default:
            break
        uname = str(u.target)
        dropout_p = u.args[1] if len(u.args) > 1 else u.kwargs.get("p", 0.0)
        train = u.args[2] if len(u.args) > 2 else u.kwargs.get("train", False)
        if not (("dropout" in uname and (not dropout_p or not train))
                or any(k in uname for k in ("aten.to.", "aten._to_copy", "aten.view.", "aten.reshape.", "aten.clone."))):
            return None
        passed.append(u)
        probs = u
    else:
        return None
    pv = u
    # only a mask decline goes through casts / views / bmm: the rewrite needs the plain form
    reshaped = bool(passed) or pv.target is aten.bmm.default
    chain = [softmax, *passed, pv]
    scale = 1.0
    node = softmax.args[0]
    reason = ""
    while getattr(node, "op", None) == "call_function" and len(node.users) == 1:
        name = getattr(node.target, "__name__", str(node.target))
        if node.target in matmuls:
            break
        a, b = (list(node.args) + [None, None])[:2]
        ca = a if isinstance(a, (int, float)) else _scalar(view.const_value(a)) if hasattr(a, "op") else None
        cb = b if isinstance(b, (int, float)) else _scalar(view.const_value(b)) if hasattr(b, "op") else None
        if "add" in name or "where" in name or "masked_fill" in name:
            reason = f"{softmax.name}: has an attention mask or bias on the scores ({node.name})"
            break
        if "mul" in name and cb is not None:
            scale *= float(cb)
            data = a
        elif "mul" in name and ca is not None:
            scale *= float(ca)
            data = b
        elif "div" in name and cb is not None:
            scale /= float(cb)
            data = a
        else:
            return None
        chain.insert(0, node)
        node = data
    if reason:
        return AttentionSite(softmax.name, "chain", raw=chain, reason=reason)
    if getattr(node, "target", None) not in matmuls or len(node.users) != 1 or reshaped:
        return None
    chain.insert(0, node)
    qk = node
    s = AttentionSite(softmax.name, "chain", q=qk.args[0], k=qk.args[1], v=pv.args[1], k_transposed=True,
                      scale=scale, out=pv, raw=chain)
    val = pv.meta.get("val")
    s.dtype = getattr(val, "dtype", None)
    r = view.rank(softmax)
    if r is not None and int(dim) % r != r - 1:
        s.reason = f"{softmax.name}: softmax over dim {dim}, not over the keys"
    return s


def describe(site: AttentionSite) -> str:
    """One line for a report: what the site is."""
    kind = "self" if site.self_attention else "cross"
    return (f"{site.name}: {kind}-attention ({site.form}), H={site.heads}, N={site.tokens}, "
            f"Dh={site.head_dim}, scale={site.scale:.4g}")


def site_nodes(view: GraphView, site: AttentionSite) -> list[Node]:
    """The semantic nodes the site covers (for provenance)."""
    out = []
    for r in site.raw:
        n = view.node_of(r)
        if n is not None and n not in out:
            out.append(n)
    return out
