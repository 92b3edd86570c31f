"""Embedding norms: a LayerNorm that starts a residual stream rather than reading one.

Rule ``embedding_norm``: a norm with no norm and no attention upstream of its input (it
reads only the embeddings: a patch embedding, a class token, positions, token / type tables, summed or
concatenated) whose output is written into a residual add (through copies / eval dropout).
Examples: CLIP's ``pre_layrnorm`` before a pre-LN stack, BERT's ``embeddings.LayerNorm``,
Swin's ``embeddings.norm``. The sums before it are not the residual stream: nothing
re-reads them after the norm (``read_once``: a block's first pre-norm, whose input the
residual add reads too, is not one). So it is not a post-LN norm: for the stream passes it is a
writer (its output enters the stream), re-centred by one explicit centring op.

Gloss: with ``e`` the embedding sum, the stream is ``h_0 = LN(e)``, ``h_{l+1} = h_l + f_l(...)``;
``e`` is read once, by the norm. Test: ``tests/canon/test_library_classes.py``
(CLIPVisionModel).
"""

from __future__ import annotations

from collections.abc import Iterable

from rewriter.ir.view import Declined, GraphView, Node


def _passes_through(view: GraphView, node: Node) -> bool:
    try:
        lay = view.layout(node)
    except Declined:
        return False
    return lay is not None and lay.kind == "identity"


def writes_into_add(view: GraphView, node: Node, depth: int = 4) -> bool:
    """``node``'s output enters a two-operand add (through identity ops)."""
    value = node.output
    for _ in range(depth):
        users = view.data_users(value)
        if any(u.op == "add" and len(view.operands(u)) == 2 for u in users):
            return True
        nxt = [u for u in users if _passes_through(view, u)]
        if len(nxt) != 1:
            return False
        value = nxt[0].output
        if value is None:  # a reader with no output of its own (a subgraph's node)
            return False
    return False


_ATTENTION = ("attention", "other:Softmax", "other:aten.softmax.int", "other:aten._softmax.default")


def norm_upstream(view: GraphView, value, norm_ops: Iterable[str], limit: int = 4000) -> bool | None:
    """Whether a norm or an attention computes part of ``value`` (a block ran before it);
    None past ``limit`` nodes."""
    ops = (*norm_ops, *_ATTENTION)
    seen, todo = set(), [value]
    while todo:
        v = todo.pop()
        n = view.producer(v)
        if n is None or id(n) in seen:
            continue
        seen.add(id(n))
        if len(seen) > limit:
            return None
        if n.op in ops:
            return True
        todo.extend(x for x in n.inputs if x is not None)
    return False


def read_once(view: GraphView, node: Node, depth: int = 4) -> bool:
    """The tensor ``node`` reads (back through identity ops: casts, copies) has no other
    data reader: nothing re-reads the embeddings after the norm. A block's first pre-norm
    reads them too, but so does the residual add that the block writes into (HunyuanDiT's
    ``norm1``, whose output enters the add of adaLN's shift)."""
    value, reader = node.inputs[0], node
    for _ in range(depth):
        if view.is_graph_output(value) or any(u is not reader for u in view.data_users(value)):
            return False
        p = view.producer(value)
        if p is None or not p.inputs or not _passes_through(view, p):
            return True
        value, reader = p.inputs[0], p
    return True


def embedding_norm(view: GraphView, node: Node, norm_ops: Iterable[str]) -> bool:
    """``node`` (a norm) starts the stream: nothing normalized or attended upstream of it,
    the embeddings it reads read by it alone, and its output written into a residual add."""
    if not node.inputs or not writes_into_add(view, node) or not read_once(view, node):
        return False
    return norm_upstream(view, node.inputs[0], norm_ops) is False
