"""Graph diff of two models (two ONNX files, or the before/after of a run).

What it reports (the ``diff`` section of the JSON document, see ``rewriter.report_schema``):

- ``op_counts``: IR-level op type -> count, before and after (the table users paste);
- ``params`` / ``bytes``: parameter elements and bytes, before and after;
- ``nodes``: nodes ``added``, ``removed`` and ``changed``, and how each pair was matched;
- ``io``: graph input/output signature changes (name, dtype, shape);
- ``widths``: tensors whose shape changed (activations and parameters).

Nodes are matched in three steps, each only among the nodes still unmatched:

1. **provenance**: a node tagged by a pass (ONNX ``metadata_props["rewriter.pass"]``,
   FX ``node.meta["rewriter"]``) is the new version of the node of the same name, or an
   added node; the nodes named in its ``rewriter.replaced`` list that are gone are removed
   *by that pass*;
2. **name**: same node name and same op type;
3. **topology**: same op type and the same (already matched) producers, then the same
   matched consumers, repeated to a fixpoint; last, a unique Weisfeiler-Lehman hash of the
   node's neighbourhood.

A matched pair is *changed* when its attributes, its parameters (shape or content), its
wiring (its inputs come from other nodes) or its output shapes differ, or when a pass
tagged it. Removed nodes that only fed nodes removed by a pass (a BatchNorm's constant
subgraph, the zero bias of a conv the pass gave a real bias) are attributed to that pass
too, marked ``dead``.
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import logging
from typing import Any

import networkx as nx
import numpy as np
import onnx_ir as ir
import torch

from rewriter.ir.dtypes import to_numpy
from rewriter.ir.fx_view import _target_name
from rewriter.ir.onnx_reader import is_mapped, map_array
from rewriter.ir.onnx_view import OnnxView, PROVENANCE_PASS, PROVENANCE_REPLACED
from rewriter.loader import as_view, param_stats

log = logging.getLogger(__name__)

__all__ = ["Snapshot", "SnapNode", "snapshot", "graph_diff", "diff_models"]


@dataclasses.dataclass
class Param:
    """A constant input of a node: shape, dtype and a content digest. The digest is computed
    on first use from ``source`` (a callable returning the array), and only when two
    parameters have to be told apart by content: the same tensor object on both sides is
    the same parameter without reading it (rewrites are copy-on-write)."""

    shape: tuple[int, ...]
    dtype: str
    source: Any  # a str digest, or a callable returning the array
    size: int
    nbytes: int
    ident: Any = None  # the tensor object, when identity tells sameness

    @property
    def digest(self) -> str:
        if callable(self.source):
            try:
                self.source = _digest(self.source())
            except Exception:  # noqa: BLE001 - data not loadable: compare by shape
                self.source = "?"
        return self.source

    def same(self, other: Param, copy_on_write: bool = False) -> bool:
        """Same content. ``copy_on_write``: ``other`` comes from a rewrite of this model,
        which writes a new tensor exactly when it changes a parameter, so two different
        in-memory tensor objects are different parameters (no read needed)."""
        if (self.shape, self.dtype) != (other.shape, other.dtype):
            return False
        if self.ident is not None and other.ident is not None:
            if self.ident is other.ident:
                return True
            if copy_on_write:
                return False
        return self.digest == other.digest


@dataclasses.dataclass
class SnapNode:
    """One IR node, reduced to what the diff compares."""

    key: str  # unique name within its graph
    op: str
    inputs: list[str]  # value names read (data and params, in order; "" for a missing optional)
    outputs: list[str]
    params: dict[int, Param]  # input index -> constant parameter
    attrs: str  # canonical text of the attributes (digests for tensors)
    provenance: dict[str, Any] | None = None  # {"pass": str, "replaced": [str]}


@dataclasses.dataclass
class Snapshot:
    """An IR-neutral picture of a graph: nodes in topological order, value shapes, I/O."""

    ir: str
    nodes: dict[str, SnapNode]
    shapes: dict[str, tuple | None]  # value name -> shape (None entries: unknown dims)
    inputs: list[dict[str, Any]]  # [{"name", "dtype", "shape"}]
    outputs: list[dict[str, Any]]
    op_counts: dict[str, int]
    params: dict[str, int]  # {"count", "bytes"}

    def producers(self) -> dict[str, str]:
        """value name -> key of the node producing it."""
        return {o: n.key for n in self.nodes.values() for o in n.outputs if o}

    def to_networkx(self) -> nx.DiGraph:
        """Nodes keyed by ``key`` with attribute ``op``; an edge per data dependency."""
        g = nx.DiGraph()
        prod = self.producers()
        for n in self.nodes.values():
            g.add_node(n.key, op=n.op)
        for n in self.nodes.values():
            for v in n.inputs:
                p = prod.get(v)
                if p is not None and p != n.key:
                    g.add_edge(p, n.key)
        return g


# -- snapshots -------------------------------------------------------------------------
def _digest(arr: np.ndarray) -> str:
    a = np.ascontiguousarray(arr)
    h = hashlib.blake2b(digest_size=8)
    h.update(str(a.dtype).encode() + str(a.shape).encode())
    h.update(a.tobytes())
    return h.hexdigest()


def _shape_json(shape: tuple | None) -> list | None:
    return None if shape is None else [d if isinstance(d, int) else (None if d is None else str(d)) for d in shape]


def _onnx_snapshot(view) -> Snapshot:
    graph = view.graph
    nodes: dict[str, SnapNode] = {}
    shapes: dict[str, tuple | None] = {}

    def vshape(v) -> tuple | None:
        if v.shape is None:
            return None
        return tuple(d if isinstance(d, int) else (str(d) if d is not None else None) for d in v.shape)

    counter = collections.Counter()
    for raw in graph:
        op = raw.op_type if raw.domain in ("", "ai.onnx") else f"{raw.domain}::{raw.op_type}"
        key = raw.name or f"{op}_{counter[op]}"
        counter[op] += 1
        while key in nodes:
            key += "'"
        params: dict[int, Param] = {}
        ins = []
        for i, v in enumerate(raw.inputs):
            if v is None:
                ins.append("")
                continue
            ins.append(v.name or f"?{id(v)}")
            if v.is_initializer() and v.const_value is not None and not v.is_graph_input():
                t = v.const_value
                if isinstance(t, ir.ExternalTensor) and not is_mapped(t):
                    # passes never change external tensors in place (edits make new
                    # in-memory ones), so where the bytes live identifies them: no read
                    digest = f"external:{t.location}:{getattr(t, 'offset', None)}:{getattr(t, 'length', None)}"
                else:  # read only if a digest is needed (a mapped weight: without pinning the file)
                    digest = (lambda t=t: map_array(t)) if is_mapped(t) else t.numpy
                params[i] = Param(tuple(int(d) for d in t.shape), str(t.dtype), digest, int(t.size), int(t.nbytes), t)
        outs = []
        for o in raw.outputs:
            name = o.name or f"?{id(o)}"
            outs.append(name)
            shapes[name] = vshape(o)
        attrs = []
        for name, a in sorted(raw.attributes.items()):
            if a.type in (ir.AttributeType.GRAPH, ir.AttributeType.GRAPHS):
                text = "<graph>"
            elif a.type == ir.AttributeType.TENSOR:
                text = _digest(a.value.numpy())
            elif a.type == ir.AttributeType.TENSORS:
                text = ",".join(_digest(t.numpy()) for t in a.value)
            else:
                text = repr(a.value)
            attrs.append(f"{name}={text}")
        prov = None
        if PROVENANCE_PASS in raw.metadata_props:
            rep = raw.metadata_props.get(PROVENANCE_REPLACED, "")
            prov = {"pass": raw.metadata_props[PROVENANCE_PASS], "replaced": [r for r in rep.split(",") if r]}
        nodes[key] = SnapNode(key, op, ins, outs, params, ";".join(attrs), prov)
    io_in, io_out = [], []
    for v in graph.inputs:
        if v.is_initializer():
            continue
        shapes[v.name] = vshape(v)
        io_in.append({"name": v.name, "dtype": str(v.dtype) if v.dtype is not None else None,
                      "shape": _shape_json(vshape(v))})
    for v in graph.outputs:
        io_out.append({"name": v.name, "dtype": str(v.dtype) if v.dtype is not None else None,
                       "shape": _shape_json(vshape(v))})
    count = nbytes = 0
    for v in graph.initializers.values():
        t = v.const_value
        if t is not None:
            shapes.setdefault(v.name, tuple(int(d) for d in t.shape))
            count += int(t.size)
            nbytes += int(t.nbytes)
    return Snapshot("onnx", nodes, shapes, io_in, io_out, view.op_counts(),
                    {"count": count, "bytes": nbytes})


def _fx_snapshot(view) -> Snapshot:
    gm = view.gm
    nodes: dict[str, SnapNode] = {}
    shapes: dict[str, tuple | None] = {}
    params_of: dict[str, Any] = {}
    io_in, io_out = [], []

    def meta_shape(n) -> tuple | None:
        val = n.meta.get("val") if hasattr(n, "meta") else None
        if isinstance(val, torch.Tensor):
            return tuple(int(d) if isinstance(d, int) or str(d).isdigit() else str(d) for d in val.shape)
        return None

    for n in gm.graph.nodes:
        if n.op == "get_attr":
            try:
                t = gm.get_parameter(n.target) if n.target in dict(gm.named_parameters()) else getattr(gm, n.target)
                params_of[n.name] = t
                shapes[n.name] = tuple(t.shape)
            except AttributeError:
                pass
            continue
        if n.op == "placeholder":
            shapes[n.name] = meta_shape(n)
            val = n.meta.get("val")
            io_in.append({"name": n.name, "dtype": str(val.dtype).replace("torch.", "") if isinstance(val, torch.Tensor) else None,
                          "shape": _shape_json(meta_shape(n))})
            continue
        if n.op == "output":
            for i, a in enumerate(torch.utils._pytree.tree_leaves(n.args)):
                if isinstance(a, torch.fx.Node):
                    io_out.append({"name": f"output_{i}", "dtype": None, "shape": _shape_json(meta_shape(a))})
            continue
        ins, params = [], {}
        flat = [a for a in torch.utils._pytree.tree_leaves((n.args, n.kwargs)) if isinstance(a, torch.fx.Node)]
        for i, a in enumerate(flat):
            ins.append(a.name)
            if a.name in params_of:
                t = params_of[a.name].detach()
                params[i] = Param(tuple(t.shape), str(t.dtype).replace("torch.", ""),
                                  lambda t=t: to_numpy(t),
                                  int(t.numel()), int(t.numel() * t.element_size()))
        other = [repr(a) for a in torch.utils._pytree.tree_leaves((n.args, n.kwargs)) if not isinstance(a, torch.fx.Node)]
        shapes[n.name] = meta_shape(n)
        prov = n.meta.get("rewriter")
        nodes[n.name] = SnapNode(n.name, _target_name(n), ins, [n.name], params, ";".join(other),
                                 dict(prov) if prov else None)
    return Snapshot("torch", nodes, shapes, io_in, io_out, view.op_counts(), param_stats(view))


def snapshot(model: Any) -> Snapshot:
    """A Snapshot of a GraphView, an ``onnx.ModelProto``, an ``onnx_ir.Model`` or a path."""
    if isinstance(model, Snapshot):
        return model
    if not hasattr(model, "ir") or not hasattr(model, "op_counts"):
        model = as_view(model)
    return _onnx_snapshot(model) if isinstance(model, OnnxView) else _fx_snapshot(model)


# -- matching --------------------------------------------------------------------------
def _wl_hashes(snap: Snapshot, g: nx.DiGraph, rounds: int = 2) -> dict[str, str]:
    label = {k: n.op for k, n in snap.nodes.items()}
    for _ in range(rounds):
        new = {}
        for k in label:
            ins = sorted(label[p] for p in g.predecessors(k))
            outs = sorted(label[s] for s in g.successors(k))
            new[k] = hashlib.blake2b(f"{label[k]}|{ins}|{outs}".encode(), digest_size=8).hexdigest()
        label = new
    return label


class _Matcher:
    copy_on_write = False

    def __init__(self, a: Snapshot, b: Snapshot):
        self.a, self.b = a, b
        self.ga, self.gb = a.to_networkx(), b.to_networkx()
        self.prod_a, self.prod_b = a.producers(), b.producers()
        self.b2a: dict[str, str] = {}
        self.a2b: dict[str, str] = {}
        self.how: dict[str, str] = {}  # b key -> provenance/name/topology

    def pair(self, ka: str, kb: str, how: str) -> None:
        self.b2a[kb], self.a2b[ka] = ka, kb
        self.how[kb] = how

    def unmatched_a(self) -> list[str]:
        return [k for k in self.a.nodes if k not in self.a2b]

    def unmatched_b(self) -> list[str]:
        return [k for k in self.b.nodes if k not in self.b2a]

    def _src_a(self, node: SnapNode) -> tuple:
        return tuple(self.prod_a.get(v, "in:" + v) for i, v in enumerate(node.inputs)
                     if v and i not in node.params)

    def _src_b(self, node: SnapNode) -> tuple:
        """The sources of a B node's data inputs, in A's terms (None where unmatched)."""
        out = []
        for i, v in enumerate(node.inputs):
            if not v or i in node.params:
                continue
            p = self.prod_b.get(v)
            out.append("in:" + v if p is None else self.b2a.get(p))
        return tuple(out)

    def run(self) -> None:
        a, b = self.a, self.b
        # 1. provenance: a tagged node keeps its name when it was changed in place
        for kb, nb in b.nodes.items():
            if nb.provenance and kb in a.nodes and a.nodes[kb].op == nb.op:
                self.pair(kb, kb, "provenance")
        # 2. name
        for kb, nb in b.nodes.items():
            if kb not in self.b2a and kb in a.nodes and kb not in self.a2b and a.nodes[kb].op == nb.op \
                    and not _autoname(kb):
                self.pair(kb, kb, "name")
        # 3. topology: same op and same matched producers; then same matched consumers
        changed = True
        while changed:
            changed = False
            by_src: dict[tuple, list[str]] = collections.defaultdict(list)
            for ka in self.unmatched_a():
                na = a.nodes[ka]
                by_src[(na.op, self._src_a(na))].append(ka)
            for kb in self.unmatched_b():
                nb = b.nodes[kb]
                src = self._src_b(nb)
                if not src or None in src:
                    continue
                cands = [k for k in by_src.get((nb.op, src), []) if k not in self.a2b]
                if len(cands) == 1:
                    self.pair(cands[0], kb, "topology")
                    changed = True
            for kb in self.unmatched_b():
                succ = [self.b2a.get(s) for s in self.gb.successors(kb)]
                if not succ or None in succ:
                    continue
                op = b.nodes[kb].op
                cands = [ka for ka in self.unmatched_a() if a.nodes[ka].op == op
                         and sorted(self.ga.successors(ka)) == sorted(succ)]
                if len(cands) == 1:
                    self.pair(cands[0], kb, "topology")
                    changed = True
        # 4. a unique neighbourhood hash among what is left
        ha, hb = _wl_hashes(a, self.ga), _wl_hashes(b, self.gb)
        left_a = collections.defaultdict(list)
        for ka in self.unmatched_a():
            left_a[ha[ka]].append(ka)
        left_b = collections.defaultdict(list)
        for kb in self.unmatched_b():
            left_b[hb[kb]].append(kb)
        for h, kbs in left_b.items():
            if len(kbs) == 1 and len(left_a.get(h, [])) == 1:
                self.pair(left_a[h][0], kbs[0], "topology")


def _autoname(key: str) -> bool:
    """Names a snapshot made up (the node had none): not evidence of identity."""
    return key.endswith("'")


# -- the diff --------------------------------------------------------------------------
def _changes(m: _Matcher, ka: str, kb: str) -> list[str]:
    na, nb = m.a.nodes[ka], m.b.nodes[kb]
    what = []
    if na.attrs != nb.attrs:
        what.append("attributes")
    if na.params.keys() != nb.params.keys() or any(not na.params[i].same(nb.params[i], m.copy_on_write)
                                                    for i in na.params):
        what.append("parameters")
    if len(na.inputs) != len(nb.inputs) or m._src_a(na) != m._src_b(nb):
        what.append("inputs")
    sa = [m.a.shapes.get(o) for o in na.outputs]
    sb = [m.b.shapes.get(o) for o in nb.outputs]
    if len(sa) != len(sb) or any(x is not None and y is not None and x != y for x, y in zip(sa, sb)):
        what.append("shape")
    return what


def _io_diff(before: list[dict], after: list[dict]) -> dict[str, list]:
    ba = {x["name"]: x for x in before}
    aa = {x["name"]: x for x in after}
    return {
        "added": [aa[n] for n in aa if n not in ba],
        "removed": [ba[n] for n in ba if n not in aa],
        "changed": [{"name": n, "before": {"dtype": ba[n]["dtype"], "shape": ba[n]["shape"]},
                     "after": {"dtype": aa[n]["dtype"], "shape": aa[n]["shape"]}}
                    for n in ba if n in aa and (ba[n]["dtype"], ba[n]["shape"]) != (aa[n]["dtype"], aa[n]["shape"])],
    }


def _changed_axes(x: tuple, y: tuple) -> list[int] | None:
    if len(x) != len(y):
        return None
    return [i for i, (p, q) in enumerate(zip(x, y)) if p != q]


def _tag_pass(snap: Snapshot, key: str | None) -> str | None:
    node = snap.nodes.get(key) if key else None
    return node.provenance["pass"] if node is not None and node.provenance else None


def graph_diff(before: Any, after: Any, *, copy_on_write: bool = False) -> dict[str, Any]:
    """The diff of two models (anything ``snapshot`` accepts) as a JSON-ready dict.
    ``copy_on_write``: ``after`` is a rewrite of ``before`` in this process (parameters
    are then compared by tensor identity, see ``Param.same``)."""
    a, b = snapshot(before), snapshot(after)
    m = _Matcher(a, b)
    m.copy_on_write = copy_on_write
    m.run()
    added, removed, changed = [], [], []
    removed_by: dict[str, str] = {}
    for nb in b.nodes.values():
        for r in (nb.provenance or {}).get("replaced", []):
            removed_by.setdefault(r, nb.provenance["pass"])
    unchanged = 0
    for kb, nb in b.nodes.items():
        if kb not in m.b2a:
            entry = {"name": kb, "op": nb.op}
            if nb.provenance:
                entry.update({"pass": nb.provenance["pass"], "replaced": nb.provenance.get("replaced", [])})
            added.append(entry)
            continue
        ka = m.b2a[kb]
        what = _changes(m, ka, kb)
        if nb.provenance and a.nodes[ka].provenance != nb.provenance:
            what.append("tagged")
        if not what:
            unchanged += 1
            continue
        entry = {"name": kb, "op": nb.op, "what": what, "matched_by": m.how[kb]}
        if ka != kb:
            entry["before_name"] = ka
        if nb.provenance:
            entry["pass"] = nb.provenance["pass"]
        changed.append(entry)
    gone = set(m.unmatched_a())
    # Removed nodes that only fed nodes removed by a pass died with them.
    attributed = {k: removed_by[k] for k in gone if k in removed_by}
    for k in reversed(list(nx.topological_sort(m.ga)) if nx.is_directed_acyclic_graph(m.ga) else []):
        if k in gone and k not in attributed:
            succ = list(m.ga.successors(k))
            passes = {attributed.get(s) if s in gone else _tag_pass(b, m.a2b.get(s)) for s in succ}
            if succ and len(passes) == 1 and None not in passes:
                attributed[k] = passes.pop()
    for ka in a.nodes:
        if ka in gone:
            entry = {"name": ka, "op": a.nodes[ka].op}
            if ka in attributed:
                entry["pass"] = attributed[ka]
                if ka not in removed_by:
                    entry["dead"] = True
            removed.append(entry)
    # Tensors whose shape changed: by value name, and by position on matched nodes.
    widths, seen = [], set()
    pa, pb = set(), set()
    for nb in b.nodes.values():
        pb.update(nb.inputs[i] for i in nb.params)
    for na in a.nodes.values():
        pa.update(na.inputs[i] for i in na.params)

    def add_width(tensor: str, kind: str, x: tuple, y: tuple, node: str | None = None) -> None:
        if tensor in seen:
            return
        seen.add(tensor)
        e = {"tensor": tensor, "kind": kind, "before": _shape_json(x), "after": _shape_json(y),
             "axes": _changed_axes(x, y)}
        if node:
            e["node"] = node
        widths.append(e)

    io_names = {x["name"] for x in a.inputs + a.outputs}
    for name, sx in a.shapes.items():
        sy = b.shapes.get(name)
        if sx is not None and sy is not None and sx != sy:
            kind = "param" if name in pa or name in pb else ("io" if name in io_names else "activation")
            add_width(name, kind, sx, sy)
    for kb, ka in m.b2a.items():
        na, nb = a.nodes[ka], b.nodes[kb]
        for i, xa in na.params.items():
            xb = nb.params.get(i)
            if xb is not None and xa.shape != xb.shape:
                add_width(nb.inputs[i], "param", xa.shape, xb.shape, kb)
        for oa, ob in zip(na.outputs, nb.outputs):
            sx, sy = a.shapes.get(oa), b.shapes.get(ob)
            if sx is not None and sy is not None and sx != sy:
                add_width(ob, "activation", sx, sy, kb)
    how = collections.Counter(m.how.values())
    return {
        "op_counts": {"before": a.op_counts, "after": b.op_counts},
        "params": {"before": a.params["count"], "after": b.params["count"]},
        "bytes": {"before": a.params["bytes"], "after": b.params["bytes"]},
        "nodes": {
            "before": len(a.nodes), "after": len(b.nodes),
            "added": added, "removed": removed, "changed": changed, "unchanged": unchanged,
            "matched_by": {k: how.get(k, 0) for k in ("provenance", "name", "topology")},
        },
        "io": {"inputs": _io_diff(a.inputs, b.inputs), "outputs": _io_diff(a.outputs, b.outputs)},
        "widths": widths,
    }


def diff_models(before: Any, after: Any, *, copy_on_write: bool = False) -> tuple[dict[str, Any], Snapshot, Snapshot]:
    """``graph_diff`` plus the two snapshots (for pictures)."""
    a, b = snapshot(before), snapshot(after)
    return graph_diff(a, b, copy_on_write=copy_on_write), a, b


def op_rows(before: dict[str, int], after: dict[str, int]) -> list[tuple[str, int, int, int]]:
    """(op, before, after, delta) rows, most frequent first."""
    return [(op, before.get(op, 0), after.get(op, 0), after.get(op, 0) - before.get(op, 0))
            for op in sorted(set(before) | set(after), key=lambda o: (-before.get(o, 0), -after.get(o, 0), o))]


def summary_line(d: dict[str, Any]) -> str:
    """One line: ``+2 -5 ~3 nodes; params 3,994 -> 3,530``."""
    n = d["nodes"]
    return (f"+{len(n['added'])} -{len(n['removed'])} ~{len(n['changed'])} nodes; "
            f"params {d['params']['before']:,} -> {d['params']['after']:,}; "
            f"bytes {d['bytes']['before']:,} -> {d['bytes']['after']:,}")


def statuses(d: dict[str, Any]) -> tuple[dict[str, str], dict[str, str]]:
    """Per-node status for pictures: (before: key -> removed/changed/rewired, after: key ->
    added/changed/rewired); "rewired": only its inputs now come from elsewhere."""
    sa: dict[str, str] = {}
    sb: dict[str, str] = {}
    for e in d["nodes"]["removed"]:
        sa[e["name"]] = "removed"
    for e in d["nodes"]["added"]:
        sb[e["name"]] = "added"
    for e in d["nodes"]["changed"]:
        st = "rewired" if e.get("what") == ["inputs"] and "pass" not in e else "changed"
        sb[e["name"]] = st
        sa[e.get("before_name", e["name"])] = st
    return sa, sb
