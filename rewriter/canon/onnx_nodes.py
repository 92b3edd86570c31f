"""The ONNX side of recognition: each onnx-ir node (or group of nodes) as the semantic
``Node`` the passes see. ``OnnxView`` takes its nodes from ``build_nodes``.

Rules (each with its gloss; the exporters that write it):

* ``linear``: ``MatMul(x, W)`` with a constant 2-D ``W``, and the ``Add`` of a constant
  ``[n_out]`` bias after it when it is the product's only reader: ``y = x W + b``
  (TorchScript and dynamo exporters' ``nn.Linear``); ``Gemm(x, W, b)`` without ``transA``
  (``nn.Linear`` on 2-D inputs, older exporters). Through views that keep the feature
  axis: ``rewriter.canon.linear``.
* ``embedding``: ``Gather(table, ids)`` with a constant table (``nn.Embedding``).
* ``layer_norm`` / ``rms_norm``: ``LayerNormalization`` / ``RMSNormalization``,
  onnxruntime's ``LayerNormalization`` / ``SimplifiedLayerNormalization``, and chains of
  standard ops (``rewriter.canon.norms``).
* skip-norms: onnxruntime's ``SkipLayerNormalization`` / ``SkipSimplifiedLayerNormalization``
  (its transformers optimizer's fusion of the residual add into the norm) as two nodes:
  a join ``s = input + skip (+ bias)`` and a norm of ``s``.
* ``mul`` / ``add`` / ``sub`` / ``div`` over their run-time operands; ``transpose``,
  ``conv``, ``batch_norm``, ``attention`` by op type; anything else ``other:OP``.

Tests: ``tests/canon/test_norms.py``, ``tests/canon/test_library_classes.py``.
"""

from __future__ import annotations

from collections.abc import Callable

import onnx_ir as ir

from rewriter.canon.norms import find_norms
from rewriter.canon.onnx_adapter import OnnxNormAdapter
from rewriter.ir.view import Node

_ELEMENTWISE = {"Mul": "mul", "Add": "add", "Sub": "sub", "Div": "div"}
_SIMPLE = {
    "Transpose": "transpose",
    "Conv": "conv",
    "BatchNormalization": "batch_norm",
    "LayerNormalization": "layer_norm",
    "RMSNormalization": "rms_norm",
    "Attention": "attention",
}
# ONNX Runtime's own norms (contrib ops; SimplifiedLayerNormalization also in the default
# domain): the same inputs and attributes as LayerNormalization / RMSNormalization
_ORT_NORMS = {
    ("com.microsoft", "LayerNormalization"): "layer_norm",
    ("com.microsoft", "SimplifiedLayerNormalization"): "rms_norm",
    ("", "SimplifiedLayerNormalization"): "rms_norm",
}
# ONNX Runtime norms that fuse the residual add into the norm (see ``norm``)
_ORT_SKIP_NORMS = ("SkipLayerNormalization", "SkipSimplifiedLayerNormalization")


def build_nodes(view, free_name: Callable[[str], str]) -> tuple[list[Node], dict, list[tuple[str, str]]]:
    """The semantic nodes of ``view``'s graph in order, the joins of its fused skip-norms
    (keyed by the ``input_skip_bias_sum`` value) and the norm-like chains not recognised
    (name, why). ``free_name(base)`` gives an unused value name."""
    nodes: list[Node] = []
    taken: set[int] = set()
    chains, misses = norm_chains(view)
    joins: dict = {}
    for raw in view.graph:
        chain = chains.get(id(raw))
        if chain is not None:
            if chain is not True:  # the chain's last node: the norm takes its place
                nodes.append(chain)
            continue
        if id(raw) in taken:
            continue
        if raw.domain == "com.microsoft" and raw.op_type in _ORT_SKIP_NORMS:
            nodes.extend(skip_nodes(raw, free_name, joins))
            continue
        node = classify(view, raw, taken)
        nodes.append(node)
    return nodes, joins, misses


def skip_nodes(raw: ir.Node, free_name: Callable[[str], str], joins: dict) -> list[Node]:
    """``SkipLayerNormalization`` / ``SkipSimplifiedLayerNormalization`` (com.microsoft) as
    what they compute: a residual join ``s = input + skip (+ bias)`` and a norm of ``s``,
    two semantic nodes over the one IR node. ``s`` is the op's optional fourth output
    (``input_skip_bias_sum``); when the file leaves it out, the output is declared (named,
    unread: the op computes it anyway), so that the join has a value to write."""
    name = raw.name or f"{raw.op_type}_{id(raw)}"
    if len(raw.outputs) < 4:
        raw.resize_outputs(4)
        for o in raw.outputs[1:3]:
            if o.name is None:
                o.name = ""  # left out, as in the file
    s = raw.outputs[3]
    if not s.name:
        s.name = free_name(f"{name}_input_skip_bias_sum")
    if s.dtype is None:
        s.dtype = raw.inputs[0].dtype or raw.inputs[2].dtype
    if s.shape is None:
        s.shape = raw.inputs[0].shape
    join = Node("add", f"{name}__add", [raw.inputs[0], raw.inputs[1]], s, [raw], {"skip": raw})
    kind = "layer_norm" if raw.op_type == "SkipLayerNormalization" else "rms_norm"
    norm = Node(kind, name, [s], raw.outputs[0], [raw], {"skip": raw, "join": join})
    joins[s] = join
    return [join, norm]


def skip_bias(raw: ir.Node) -> ir.Value | None:
    idx = 4 if raw.op_type == "SkipLayerNormalization" else 3
    return raw.inputs[idx] if len(raw.inputs) > idx else None


def norm_chains(view) -> tuple[dict[int, Node | bool], list[tuple[str, str]]]:
    """Norms spelled as chains of standard ops (``rewriter.canon.norms``), as semantic nodes
    over the chain's IR nodes; the graph itself is not changed. Maps the id of each
    chain's last IR node to its Node and the other members to True; and the near misses."""
    search = find_norms(OnnxNormAdapter(view))
    misses = [(r.name or r.op_type, why) for r, why in search.near_misses]
    if not search.matches:
        return {}, misses
    pos = {id(r): i for i, r in enumerate(view.graph)}
    out: dict[int, Node | bool] = {}
    for m in search.matches:
        raws = sorted(m.nodes, key=lambda r: pos[id(r)])
        m.nodes = raws
        anchor = m.core.producer()
        name = anchor.name or f"{anchor.op_type}_{id(anchor)}"
        node = Node(m.kind, name, [m.x], m.out, raws, {"canon": m, "rule": m.rule})
        for r in raws:
            out[id(r)] = True
        out[id(raws[-1])] = node
    return out, misses

def classify(view, raw: ir.Node, taken: set[int]) -> Node:
    name = raw.name or f"{raw.op_type}_{id(raw)}"
    out = raw.outputs[0] if raw.outputs else None
    op_type = raw.op_type if raw.domain in ("", "ai.onnx") else f"{raw.domain}::{raw.op_type}"
    if raw.domain in ("", "ai.onnx"):
        if raw.op_type == "MatMul" and const_2d(view, raw.inputs[1]):
            group = [raw]
            badd = bias_add(view, raw)
            if badd is not None:
                group.append(badd)
                taken.add(id(badd))
                attrs = {"_internal": [out]}
                return Node("linear", name, [raw.inputs[0]], badd.outputs[0], group, attrs)
            return Node("linear", name, [raw.inputs[0]], out, group)
        if raw.op_type == "Gemm" and gemm_is_linear(view, raw):
            return Node("linear", name, [raw.inputs[0]], out, [raw])
        if raw.op_type in _ELEMENTWISE:
            data = [v for v in raw.inputs if v is not None and not is_const(view, v)]
            return Node(_ELEMENTWISE[raw.op_type], name, data, out, [raw])
        if raw.op_type == "Gather" and is_const(view, raw.inputs[0]):
            return Node("embedding", name, [raw.inputs[1]], out, [raw])
        if raw.op_type in _SIMPLE:
            return Node(_SIMPLE[raw.op_type], name, [raw.inputs[0]], out, [raw])
    if (raw.domain, raw.op_type) in _ORT_NORMS:
        return Node(_ORT_NORMS[(raw.domain, raw.op_type)], name, [raw.inputs[0]], out, [raw])
    data = [v for v in raw.inputs if v is not None and not v.is_initializer()]
    return Node(f"other:{op_type}", name, data, out, [raw])

def is_const(view, v: ir.Value | None) -> bool:
    """``const_value(v) is not None``, from the metadata alone for an initializer."""
    if v is not None and v.const_value is not None:
        return not v.is_graph_input()
    return view.const_value(v) is not None

def const_2d(view, v: ir.Value | None) -> bool:
    if v is None:
        return False
    if v.const_value is not None and not v.is_graph_input():
        return len(v.const_value.shape) == 2
    c = view.const_value(v)
    return c is not None and c.ndim == 2

def bias_add(view, matmul: ir.Node) -> ir.Node | None:
    out = matmul.outputs[0]
    uses = list(out.uses())
    if len(uses) != 1 or out.is_graph_output():
        return None
    add = uses[0].node
    if add.op_type != "Add" or add.domain not in ("", "ai.onnx"):
        return None
    other = add.inputs[1 - uses[0].idx]
    c = view.const_value(other) if other is not None else None
    w = matmul.inputs[1]
    n_out = int(w.const_value.shape[1]) if w.const_value is not None else view.const_value(w).shape[1]
    if c is None or c.size != n_out or (c.ndim > 0 and c.shape[-1] != n_out):
        return None
    return add

def gemm_is_linear(view, raw: ir.Node) -> bool:
    if raw.attributes.get_int("transA", 0) != 0:
        return False
    if not is_const(view, raw.inputs[1]):
        return False
    if len(raw.inputs) > 2 and raw.inputs[2] is not None:
        c = view.const_value(raw.inputs[2])
        if c is None or (c.ndim == 2 and c.shape[0] != 1):
            return False
    return True
