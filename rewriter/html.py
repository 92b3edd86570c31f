"""One self-contained HTML page for a report: no network access, inline SVG and CSS only.

Sections (each only when the report has the data): the two graphs side by side as
pictures (nodes a pass added or changed highlighted in the after graph, removed ones in the
before graph, provenance on hover through SVG ``<title>``), the op-count table, latency
bars (p50 before/after and per op type from ORT profiling), the numerics table, the
passes' applied and declined sites, for ``rewrite check`` the goals, and, when the report
has a ``samples`` section (generative models: the same seeds sampled with the original and
the rewritten model), its metrics under the sample pictures (PNG data URIs).

The graph layout is computed here: a layered (Sugiyama-style) layout, layer = longest
path from a source, order within a layer by the barycenter of the predecessors, two sweeps.
"""

from __future__ import annotations

import base64
import html
import logging
import math
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import networkx as nx

from rewriter.diff import Snapshot, op_rows, statuses
from rewriter.report import _share, profile_note, profiled_side

log = logging.getLogger(__name__)

MAX_DRAWN_NODES = 3000
_HIDDEN_OPS = {"Constant"}  # drawn graphs skip these (they clutter and never compute)

_BOX_W, _BOX_H, _GAP_X, _GAP_Y, _PAD = 132, 30, 14, 52, 12
_FILL = {"added": "#c8e6c9", "changed": "#ffe0b2", "removed": "#ffcdd2", "rewired": "#eceff1", None: "#eceff1"}
_STROKE = {"added": "#2e7d32", "changed": "#ef6c00", "removed": "#c62828", "rewired": "#ef6c00", None: "#90a4ae"}

_CSS = """
body{font:14px/1.4 system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:24px;color:#212121;background:#fff}
h1{font-size:22px;margin:0 0 4px} h2{font-size:18px;margin:28px 0 8px;border-bottom:1px solid #e0e0e0}
.sub{color:#616161} table{border-collapse:collapse;margin:6px 0} td,th{padding:3px 10px;border-bottom:1px solid #eee;text-align:left}
td.n,th.n{text-align:right;font-variant-numeric:tabular-nums} .ok{color:#2e7d32;font-weight:600} .bad{color:#c62828;font-weight:600}
.neg{color:#2e7d32} .pos{color:#ef6c00} .graphs{display:flex;gap:12px} .graph{flex:1;min-width:0}
.graph .box{border:1px solid #ddd;overflow:auto;max-height:720px;background:#fafafa}
.legend span{display:inline-block;padding:1px 8px;margin-right:6px;border-radius:3px;border:1px solid}
svg .node:hover rect{stroke-width:3} svg text{font:11px monospace;pointer-events:none}
.chip{display:inline-block;background:#eceff1;border-radius:10px;padding:1px 9px;margin:2px}
.samples{display:flex;gap:18px;flex-wrap:wrap} .samples figure{margin:0}
.samples img{image-rendering:pixelated;border:1px solid #ddd;display:block}
.samples figcaption{margin-top:4px;font-variant-numeric:tabular-nums}
"""


def _e(x: Any) -> str:
    return html.escape(str(x), quote=True)


# -- layout ----------------------------------------------------------------------------
def layout(g: nx.DiGraph) -> dict[str, tuple[float, float]]:
    """Node -> (x, y) centre: layered top to bottom, barycenter ordering within a layer."""
    if not nx.is_directed_acyclic_graph(g):
        g = nx.DiGraph(e for e in g.edges if e[0] != e[1])
        g.add_nodes_from(g.nodes)
        while not nx.is_directed_acyclic_graph(g):
            g.remove_edge(*nx.find_cycle(g)[0])
    layer: dict[str, int] = {}
    order = list(nx.topological_sort(g))
    for n in order:
        preds = list(g.predecessors(n))
        layer[n] = 1 + max((layer[p] for p in preds), default=-1)
    for n in reversed(order):  # a source sits right above its first reader, not all in the top row
        succ = list(g.successors(n))
        if succ and not any(True for _ in g.predecessors(n)):
            layer[n] = max(0, min(layer[m] for m in succ) - 1)
    layers: dict[int, list[str]] = {}
    for n in g.nodes:  # insertion order = graph order: a stable first ordering
        layers.setdefault(layer.get(n, 0), []).append(n)
    pos_index: dict[str, float] = {}
    for i in sorted(layers):
        for j, n in enumerate(layers[i]):
            pos_index[n] = j
    for _ in range(2):
        for i in sorted(layers)[1:]:
            def bary(n: str) -> float:
                ps = [pos_index[p] for p in g.predecessors(n)]
                return sum(ps) / len(ps) if ps else pos_index[n]
            layers[i].sort(key=bary)
            for j, n in enumerate(layers[i]):
                pos_index[n] = j
    width = max((len(v) for v in layers.values()), default=1)
    pos = {}
    for i, nodes in layers.items():
        offset = (width - len(nodes)) * (_BOX_W + _GAP_X) / 2
        for j, n in enumerate(nodes):
            pos[n] = (_PAD + offset + j * (_BOX_W + _GAP_X) + _BOX_W / 2, _PAD + i * (_BOX_H + _GAP_Y) + _BOX_H / 2)
    return pos


def graph_svg(snap: Snapshot, status: Mapping[str, str], *, title: str) -> str:
    """The graph of ``snap`` as an inline SVG; ``status`` colours nodes (added/changed/removed)."""
    g = snap.to_networkx()
    hidden = [n for n, d in g.nodes(data=True) if d.get("op") in _HIDDEN_OPS and n not in status]
    g.remove_nodes_from(hidden)
    if g.number_of_nodes() > MAX_DRAWN_NODES:
        return (f'<p class="sub">{_e(title)}: {g.number_of_nodes()} nodes, more than '
                f"{MAX_DRAWN_NODES}: not drawn (see the node tables below).</p>")
    pos = layout(g)
    w = max((x for x, _ in pos.values()), default=0) + _BOX_W / 2 + _PAD
    h = max((y for _, y in pos.values()), default=0) + _BOX_H / 2 + _PAD
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{w:.0f}" height="{h:.0f}" '
             f'viewBox="0 0 {w:.0f} {h:.0f}" role="img" aria-label="{_e(title)}" class="graph-svg">',
             f"<title>{_e(title)}</title>",
             '<defs><marker id="arr" viewBox="0 0 8 8" refX="8" refY="4" markerWidth="6" markerHeight="6" '
             'orient="auto"><path d="M0,0 L8,4 L0,8 z" fill="#90a4ae"/></marker></defs><g class="edges">']
    for u, v in g.edges:
        (x1, y1), (x2, y2) = pos[u], pos[v]
        y1 += _BOX_H / 2
        y2 -= _BOX_H / 2
        my = (y1 + y2) / 2
        parts.append(f'<path d="M{x1:.1f},{y1:.1f} C{x1:.1f},{my:.1f} {x2:.1f},{my:.1f} {x2:.1f},{y2:.1f}" '
                     'fill="none" stroke="#b0bec5" stroke-width="1.2" marker-end="url(#arr)"/>')
    parts.append("</g><g class=\"nodes\">")
    for n in g.nodes:
        node = snap.nodes[n]
        st = status.get(n)
        x, y = pos[n]
        tip = [f"{node.op}  {n}"]
        if st:
            tip.append(f"status: {st}")
        if node.provenance:
            tip.append(f"pass: {node.provenance['pass']}")
            if node.provenance.get("replaced"):
                tip.append("replaced: " + ", ".join(node.provenance["replaced"]))
        for i, p in node.params.items():
            tip.append(f"param {node.inputs[i]}: {list(p.shape)} {p.dtype}")
        for o in node.outputs:
            s = snap.shapes.get(o)
            if s is not None:
                tip.append(f"out {o}: {list(s)}")
        label = node.op if len(node.op) <= 18 else node.op[:17] + "…"
        dash = ' stroke-dasharray="4 3"' if st == "rewired" else ""
        parts.append(
            f'<g class="node {st or "same"}" data-name="{_e(n)}"><title>{_e(chr(10).join(tip))}</title>'
            f'<rect x="{x - _BOX_W / 2:.1f}" y="{y - _BOX_H / 2:.1f}" width="{_BOX_W}" height="{_BOX_H}" rx="5" '
            f'fill="{_FILL[st]}" stroke="{_STROKE[st]}" stroke-width="{2 if st else 1}"'
            f'{dash}/>'
            f'<text x="{x:.1f}" y="{y + 4:.1f}" text-anchor="middle">{_e(label)}</text></g>')
    parts.append("</g></svg>")
    return "".join(parts)


# -- sections --------------------------------------------------------------------------
def _graphs(diff: dict, before: Snapshot, after: Snapshot) -> str:
    sa, sb = statuses(diff) if "nodes" in diff else ({}, {})
    legend = "".join(f'<span style="background:{_FILL[k]};border-color:{_STROKE[k]}">{k}</span>'
                     for k in ("added", "changed", "removed")) + \
        f'<span style="border-color:{_STROKE["rewired"]};border-style:dashed">rewired</span>'
    return (f'<h2>Graphs</h2><p class="legend">{legend} <i class="sub">hover a node for its provenance; '
            f"Constant nodes are not drawn</i></p><div class=\"graphs\" id=\"graphs\">"
            f'<div class="graph" id="graph-before"><b>before</b> ({len(before.nodes)} nodes)<div class="box">'
            f"{graph_svg(before, sa, title='before')}</div></div>"
            f'<div class="graph" id="graph-after"><b>after</b> ({len(after.nodes)} nodes)<div class="box">'
            f"{graph_svg(after, sb, title='after')}</div></div></div>")


def _op_table(diff: dict) -> str:
    ops = diff.get("op_counts")
    if not ops:
        return ""
    rows = []
    for op, b, a, d in op_rows(ops["before"], ops["after"]):
        cls = "neg" if d < 0 else ("pos" if d > 0 else "")
        rows.append(f'<tr><td>{_e(op)}</td><td class="n">{b}</td><td class="n">{a}</td>'
                    f'<td class="n {cls}">{d:+d}</td></tr>')
    tb, ta = sum(ops["before"].values()), sum(ops["after"].values())
    rows.append(f'<tr><th>total</th><th class="n">{tb}</th><th class="n">{ta}</th><th class="n">{ta - tb:+d}</th></tr>')
    extra = ""
    if "params" in diff:
        extra = (f'<p>parameters {diff["params"]["before"]:,} → {diff["params"]["after"]:,}; '
                 f'bytes {diff["bytes"]["before"]:,} → {diff["bytes"]["after"]:,}</p>')
    return ('<h2>Op counts</h2><table><tr><th>op</th><th class="n">before</th><th class="n">after</th>'
            f'<th class="n">delta</th></tr>{"".join(rows)}</table>{extra}')


def _node_tables(diff: dict) -> str:
    n = diff.get("nodes")
    if not n:
        return ""
    out = [f'<h2>Nodes</h2><p>{n["before"]} → {n["after"]} nodes: <span class="chip">+{len(n["added"])} added</span>'
           f'<span class="chip">−{len(n["removed"])} removed</span><span class="chip">~{len(n["changed"])} changed</span>'
           f'<span class="chip">{n["unchanged"]} unchanged</span> <span class="sub">matched by '
           + ", ".join(f"{k}: {v}" for k, v in n["matched_by"].items()) + "</span></p>"]
    rows = []
    for kind in ("added", "removed", "changed"):
        for e in n[kind]:
            what = ", ".join(e.get("what", [])) + (" (dead)" if e.get("dead") else "")
            rows.append(f"<tr><td>{kind}</td><td>{_e(e['op'])}</td><td>{_e(e['name'])}</td>"
                        f"<td>{_e(e.get('pass', ''))}</td><td>{_e(what)}</td></tr>")
    if rows:
        out.append("<table><tr><th>change</th><th>op</th><th>node</th><th>pass</th><th>what</th></tr>"
                   + "".join(rows) + "</table>")
    widths = diff.get("widths") or []
    if widths:
        out.append("<h2>Tensors whose shape changed</h2><table><tr><th>tensor</th><th>kind</th>"
                   "<th>before</th><th>after</th></tr>" + "".join(
                       f"<tr><td>{_e(w['tensor'])}</td><td>{w['kind']}</td><td>{_e(w['before'])}</td>"
                       f"<td>{_e(w['after'])}</td></tr>" for w in widths) + "</table>")
    io = diff.get("io") or {}
    io_rows = []
    for side in ("inputs", "outputs"):
        for kind in ("added", "removed", "changed"):
            for e in io.get(side, {}).get(kind, []):
                io_rows.append(f"<tr><td>{side}</td><td>{kind}</td><td>{_e(e['name'])}</td>"
                               f"<td>{_e({k: v for k, v in e.items() if k != 'name'})}</td></tr>")
    out.append("<h2>Input/output signature</h2>" + (
        "<table><tr><th></th><th>change</th><th>name</th><th>detail</th></tr>" + "".join(io_rows) + "</table>"
        if io_rows else "<p>unchanged</p>") if io else "")
    return "".join(out)


def _bar(x: float, scale: float, color: str, label: str, y: float, width: float = 360, text: str | None = None) -> str:
    w = 0 if scale <= 0 else max(1.0, width * x / scale)
    return (f'<rect x="150" y="{y:.0f}" width="{w:.1f}" height="10" fill="{color}"><title>{_e(label)}</title></rect>'
            f'<text x="{150 + w + 4:.1f}" y="{y + 9:.0f}">{_e(text) if text is not None else f"{x:.4g} ms"}</text>')


def _latency(lat: dict | None) -> str:
    if not lat:
        return ""
    b, a = lat["before"], lat.get("after")
    rows = [("p50", b["p50_ms"], a["p50_ms"] if a else None), ("p90", b["p90_ms"], a["p90_ms"] if a else None)]
    scale = max(v for r in rows for v in r[1:] if v is not None)
    svg = [f'<svg xmlns="http://www.w3.org/2000/svg" width="620" height="{len(rows) * 34 + 8}" id="latency-summary">']
    for i, (name, vb, va) in enumerate(rows):
        y = 6 + i * 34
        svg.append(f'<text x="4" y="{y + 9}">{name} {_e(b["label"])}</text>' + _bar(vb, scale, "#78909c", f"{name} before", y))
        if va is not None:
            short = "schedule" if lat.get("phases") else a["label"]  # the phases' own rows are in the table below
            svg.append(f'<text x="4" y="{y + 23}">{name} {_e(short)}</text>' + _bar(va, scale, "#43a047", f"{name} after", y + 14))
    svg.append("</svg>")
    sp = lat.get("speedup")
    head = (f"<h2>Latency</h2><p>{_e(lat['engine'])} on {_e(lat['device'])}"
            + (f" ({_e(', '.join(lat.get('providers') or []))}, graph optimizations: {_e(lat.get('graph_optimization'))})"
               if lat["engine"] == "onnxruntime" else "")
            + f"; {lat['runs']} interleaved samples of {lat.get('inner', 1)} call(s) each, after {lat.get('warmup', 0)} warm-up calls"
            + (f'; <b>speedup {sp:.3f}×</b>' if sp else "") + "</p>")
    out = [head, "".join(svg), _phases(lat)]
    ops = lat.get("op_types") or []
    if ops:
        top = ops[:25]
        sides = [("before", "#78909c"), ("after", "#43a047")] if a else [("before", "#78909c")]
        shares = [[_share(r, s, ops) or 0.0 for s, _ in sides] for r in top]
        scale = max(max(v) for v in shares) or 1.0
        svg = [f'<h3>Time per op type (share of the ORT-profiled total)</h3><svg xmlns="http://www.w3.org/2000/svg" '
               f'width="620" height="{len(top) * 30 + 8}" id="latency-ops" role="img" aria-label="share of time per op type">']
        for i, (r, sh) in enumerate(zip(top, shares)):
            y = 6 + i * 30
            svg.append(f'<text x="4" y="{y + 15}">{_e(r["op"][:20])}</text>' + "".join(
                _bar(v, scale, color, f"{r['op']} {profiled_side(lat, s)['label']}: {100 * v:.1f}% "
                     f"({r[s + '_ms']:.4g} ms profiled)",
                     y + 12 * k, text=f"{100 * v:.1f}%")
                for k, ((s, color), v) in enumerate(zip(sides, sh))))
        svg.append("</svg>")
        out.append("".join(svg))
        out.append('<p class="legend">' + "".join(
            f'<span style="background:{color};border-color:{color};color:#fff">{_e(profiled_side(lat, s)["label"])}</span>'
            for s, color in sides) + "</p>")
        out.append(f'<p class="note" id="profile-note">{_e(profile_note(lat))}</p>')
    if lat.get("per_pass"):
        out.append("<h3>Per pass</h3><table><tr><th>after pass</th><th class=\"n\">p50 ms</th>"
                   "<th class=\"n\">speedup</th><th class=\"n\">cumulative</th></tr>" + "".join(
                       f"<tr><td>{_e(r['pass'])}</td><td class=\"n\">{r['p50_ms']:.4g}</td>"
                       f"<td class=\"n\">{_fmt(r['speedup'])}</td><td class=\"n\">{_fmt(r['cumulative_speedup'])}</td></tr>"
                       for r in lat["per_pass"]) + "</table>")
    return "".join(out)


def _phases(lat: dict) -> str:
    """A stateful model's phases and schedule (``latency.phases`` / ``latency.schedule``)."""
    rows = lat.get("phases")
    if not rows:
        return ""
    sch = lat["schedule"]
    c = sch["counts"]
    words = f"{sch['steps']} steps: " + ", ".join(f"{c[p]} {p}" for p in ("dense", "refresh", "sparse") if c.get(p))
    body = "".join(f"<tr><td>{_e(r['phase'])} step</td><td class=\"n\">{r['step']}</td><td class=\"n\">{r['count']}</td>"
                   f"<td>{_e(r.get('state_from', ''))}</td><td class=\"n\">{r['p50_ms']:.4g}</td>"
                   f"<td class=\"n\">{_fmt(r['speedup'])}×</td></tr>" for r in rows)
    body += (f"<tr><td><b>schedule</b> ({_e(words)}; mean step)</td><td class=\"n\">0-{sch['steps'] - 1}</td>"
             f"<td class=\"n\">{sch['steps']}</td><td></td><td class=\"n\">{lat['after']['p50_ms']:.4g}</td>"
             f"<td class=\"n\"><b>{_fmt(lat.get('speedup'))}×</b></td></tr>")
    return ("<h3>Per phase of the sampling schedule</h3><p class=\"note\">Each phase timed on the states the steps "
            "before it produced; the schedule's speedup weighs the phases' paired speedups by their counts "
            f"(original: {lat['before']['p50_ms']:.4g} ms per step). The per-op profile below is of a "
            f"{_e(lat.get('profiled_phase', 'sparse'))} step.</p><table id=\"latency-phases\"><tr><th>phase</th>"
            "<th class=\"n\">step</th><th class=\"n\">steps of schedule</th><th>state from</th>"
            "<th class=\"n\">p50 ms</th><th class=\"n\">speedup</th></tr>" + body + "</table>")


def _scaling(sc: dict | None) -> str:
    """Latency against tokens (``report["scaling"]``): ms per step of the original, the
    rewritten model's schedule (mean step) and its sparse step, log-log, one point per
    token count, with each size's schedule speedup; then the sentence on where it pays."""
    if not sc or not sc.get("rows"):
        return ""
    rows = sc["rows"]
    series = [("original", "before_ms", "#78909c", ""), ("rewritten, schedule mean step", "schedule_ms", "#43a047", ""),
              ("rewritten, sparse step", "sparse_ms", "#1e88e5", "4 3")]
    xs = [math.log2(r["tokens"]) for r in rows]
    ys = [math.log10(r[k]) for r in rows for _, k, _, _ in series if r.get(k, 0) > 0]
    x0, x1 = min(xs) - 0.5, max(xs) + 0.5
    y0, y1 = math.floor(min(ys) * 2) / 2, math.ceil(max(ys) * 2) / 2 + 1e-9
    w, h, left, top, bottom = 620, 300, 70, 20, 40

    def px(x):
        return left + (x - x0) / (x1 - x0) * (w - left - 20)

    def py(y):
        return top + (y1 - y) / (y1 - y0) * (h - top - bottom)

    svg = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h + 60}" id="latency-tokens" role="img" '
           'aria-label="latency against tokens">',
           f'<rect x="{left}" y="{top}" width="{w - left - 20}" height="{h - top - bottom}" fill="none" stroke="#ccc"/>']
    e = math.floor(y0)
    while e <= y1:
        for m in (1, 2, 5):
            y = e + math.log10(m)
            if y0 <= y <= y1:
                svg.append(f'<line x1="{left}" x2="{w - 20}" y1="{py(y):.1f}" y2="{py(y):.1f}" stroke="#eee"/>'
                           f'<text x="{left - 6}" y="{py(y) + 4:.1f}" text-anchor="end">{m * 10 ** e:g}</text>')
        e += 1
    for r, x in zip(rows, xs):
        sp = r.get("schedule_speedup")
        svg.append(f'<text x="{px(x):.1f}" y="{h - bottom + 16}" text-anchor="middle">{r["tokens"]}</text>'
                   f'<text x="{px(x):.1f}" y="{h - bottom + 32}" text-anchor="middle" '
                   f'fill="{"#2e7d32" if sp and sp > 1 else "#c62828"}">{_fmt(sp, ".2f")}×</text>')
    svg.append(f'<text x="{left - 60}" y="{top - 6}">ms per step</text>'
               f'<text x="{left - 6}" y="{h - bottom + 16}" text-anchor="end">tokens</text>'
               f'<text x="{left - 6}" y="{h - bottom + 32}" text-anchor="end">schedule</text>')
    for i, (label, key, color, dash) in enumerate(series):
        pts = [(px(x), py(math.log10(r[key]))) for r, x in zip(rows, xs) if r.get(key, 0) > 0]
        path = " ".join(f"{a:.1f},{b:.1f}" for a, b in pts)
        svg.append(f'<polyline points="{path}" fill="none" stroke="{color}" stroke-width="2"'
                   + (f' stroke-dasharray="{dash}"' if dash else "") + "/>")
        svg += [f'<circle cx="{a:.1f}" cy="{b:.1f}" r="3.5" fill="{color}"><title>{_e(label)}: '
                f'{r[key]:.3g} ms at {r["tokens"]} tokens</title></circle>' for (a, b), r in zip(pts, rows)]
        ly = h + 8 + 16 * i
        svg.append(f'<line x1="{left}" x2="{left + 24}" y1="{ly}" y2="{ly}" stroke="{color}" stroke-width="2"'
                   + (f' stroke-dasharray="{dash}"' if dash else "") + f'/><text x="{left + 30}" y="{ly + 4}">'
                   f'{_e(label)}</text>')
    svg.append("</svg>")
    table = ("<table id=\"latency-tokens-table\"><tr><th class=\"n\">tokens</th><th class=\"n\">original ms</th>"
             "<th class=\"n\">schedule ms</th><th class=\"n\">sparse ms</th><th class=\"n\">sparse</th>"
             "<th class=\"n\">refresh</th><th class=\"n\">dense</th><th class=\"n\">schedule</th></tr>" + "".join(
                 f"<tr><td class=\"n\">{r['tokens']}</td><td class=\"n\">{r['before_ms']:.4g}</td>"
                 f"<td class=\"n\">{r['schedule_ms']:.4g}</td><td class=\"n\">{r['sparse_ms']:.4g}</td>"
                 + "".join(f"<td class=\"n\">{_fmt(r.get(k), '.2f')}×</td>"
                           for k in ("sparse_speedup", "refresh_speedup", "dense_speedup", "schedule_speedup"))
                 + "</tr>" for r in rows) + "</table>")
    return (f"<h2>Where the rewrite pays</h2><p>Latency against tokens: {_e(sc.get('description', ''))}; each size "
            "timed like the latency section (the original interleaved with each phase; speedups are paired medians, "
            "the schedule's below each size).</p>" + "".join(svg) + table
            + f'<p id="pays-from"><b>{_e(sc["pays_from"])}</b></p>')


def _fmt(x: Any, spec: str = ".3f") -> str:
    return "-" if x is None else format(x, spec)


def _numerics(v: dict | None) -> str:
    if not v:
        return ""
    if not v.get("performed", True):
        return "<h2>Numerics</h2><p>verification skipped</p>"
    rows = []
    for o in v.get("outputs", []):
        if "error" in o:
            rows.append(f'<tr><td>{_e(o["name"])}</td><td colspan="3"></td><td class="bad">{_e(o["error"])}</td></tr>')
            continue
        rows.append(f"<tr><td>{_e(o['name'])}</td><td class=\"n\">{o['max_abs_error']:.3e}</td>"
                    f"<td class=\"n\">{o['max_rel_error']:.3e}</td><td class=\"n\">{o['tolerance']:.1e}</td>"
                    f"<td class=\"{'ok' if o['passed'] else 'bad'}\">{'yes' if o['passed'] else 'NO'}</td></tr>")
    verdict = '<span class="ok">passed</span>' if v.get("passed") else '<span class="bad">FAILED</span>'
    return (f"<h2>Numerics</h2><p>verification {verdict}</p><table id=\"numerics\"><tr><th>output</th>"
            "<th class=\"n\">max abs err</th><th class=\"n\">max rel err</th><th class=\"n\">tolerance</th><th>ok</th></tr>"
            + "".join(rows) + "</table>")


def _sites(passes: list[dict] | None) -> str:
    if not passes:
        return ""
    rows = []
    for p in passes:
        v = p.get("verification") or {}
        rows.append(f"<tr><th>{_e(p['name'])}</th><th>{_e(p['kind'])}</th><th>{p['applied']} applied, "
                    f"{len(p['declined'])} declined, {p['seconds']:.3f} s</th><th>"
                    + ("" if not v else ('<span class="ok">verified</span>' if v.get("passed") else '<span class="bad">failed</span>'))
                    + "</th></tr>")
        for s in p.get("sites", []):
            rows.append(f"<tr><td></td><td class=\"ok\">applied</td><td>{_e(s['site'])}</td><td>{_e(s.get('reason', ''))}</td></tr>")
        for s in p.get("declined", []):
            rows.append(f"<tr><td></td><td class=\"pos\">declined</td><td>{_e(s['site'])}</td><td>{_e(s['reason'])}</td></tr>")
    return "<h2>Passes and sites</h2><table id=\"sites\">" + "".join(rows) + "</table>"


def _samples(samples: dict | None, images: Mapping[str, bytes] | None) -> str:
    """Sample pictures side by side, each variant's PSNR / SSIM against the reference under it."""
    if not samples:
        return ""
    images = images or {}
    ref = samples.get("reference", "dense")
    figs = []
    for v in samples.get("variants", []):
        png = images.get(v["name"])
        img = ("" if png is None else
               f'<img src="data:image/png;base64,{base64.b64encode(png).decode("ascii")}" alt="{_e(v["name"])} samples">')
        if v["name"] == ref:
            cap = "reference"
        else:
            cap = (f'PSNR {_fmt(v.get("psnr"), ".2f")} dB · SSIM {_fmt(v.get("ssim"), ".3f")}'
                   + (f' <span class="sub">(worst seed {_fmt(v.get("psnr_min"), ".2f")} dB)</span>'
                      if v.get("psnr_min") is not None else ""))
        figs.append(f'<figure id="samples-{_e(v["name"])}">{img}<figcaption><b>{_e(v.get("label", v["name"]))}</b>'
                    f"<br>{cap}</figcaption></figure>")
    head = (f"<h2>Samples</h2><p>{_e(samples.get('description', ''))} Seeds {_e(samples.get('seeds'))}, "
            f"{samples.get('images_per_seed', '?')} images each, {samples.get('steps')} sampler steps; "
            f"PSNR / SSIM against <b>{_e(ref)}</b> sampling with the same seeds.</p>")
    chk = samples.get("step_check")
    if chk:
        by_phase: dict[str, float] = {}
        for r in chk["steps"]:
            by_phase[r["phase"]] = max(by_phase.get(r["phase"], 0.0), r["max_rel_error"])
        verdict = '<span class="ok">passed</span>' if chk["passed"] else '<span class="bad">FAILED</span>'
        head += (f'<p id="step-check">Per-step check of every rewritten site against its float64 formula, '
                 f'steps 0-{len(chk["steps"]) - 1}: {verdict} (tolerance {chk["tolerance"]:.0e}; worst '
                 + ", ".join(f"{_e(k)} {v:.1e}" for k, v in by_phase.items()) + ").</p>")
    return head + '<div class="samples" id="samples">' + "".join(figs) + "</div>"


def _goals(goals: list[dict] | None) -> str:
    if not goals:
        return ""
    rows = "".join(f"<tr><td>{_e(g['goal'])}</td><td>{_e(g['target'])}</td><td>{_e(g['measured'])}</td>"
                   f"<td class=\"{'ok' if g['passed'] else 'bad'}\">{'met' if g['passed'] else 'FAILED'}</td>"
                   f"<td>{_e(g.get('why', ''))}</td></tr>" for g in goals)
    return ("<h2>Goals</h2><table id=\"goals\"><tr><th>goal</th><th>target</th><th>measured</th><th></th><th></th></tr>"
            + rows + "</table>")


def render_html(report: Mapping[str, Any], before: Snapshot | None = None, after: Snapshot | None = None,
                *, title: str | None = None, images: Mapping[str, bytes] | None = None) -> str:
    """The page for a run report, a diff document or a bench document. ``images``: PNG
    bytes per ``report["samples"]`` variant name."""
    diff = report.get("diff") or {}
    model = report.get("model")
    name = model.get("source") if isinstance(model, dict) else (model or f"{report.get('before')} → {report.get('after')}")
    title = title or f"rewrite report: {name}"
    passes = report.get("passes") or []
    sub = " → ".join(p["name"] for p in passes)
    body = [f"<h1>{_e(title)}</h1><p class=\"sub\">{_e(report.get('schema', ''))}"
            + (f" · passes: {_e(sub)}" if sub else "") + "</p>",
            _goals(report.get("goals"))]
    body.append(_samples(report.get("samples"), images))
    if before is not None and after is not None:
        body.append(_graphs(diff, before, after))
    body += [_latency(report.get("latency")), _scaling(report.get("scaling")), _op_table(diff), _numerics(report.get("verification")),
             _sites(passes), _node_tables(diff)]
    return (f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>{_e(title)}</title>'
            f"<style>{_CSS}</style></head><body>{''.join(body)}</body></html>")


def write_html(path: str | os.PathLike, page: str) -> Path:
    """Write ``page`` atomically (temporary file in the same directory, then rename)."""
    target = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", dir=target.parent if str(target.parent) else ".")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(page)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes it 0600; a report is for reading
        os.replace(tmp, target)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return target
