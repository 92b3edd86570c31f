"""``rms``: Pre-LN -> Pre-RMSNorm, an exact rewrite (Jiang et al. 2023, "Pre-RMSNorm and
Pre-CRMSNorm Transformers"; ``docs/passes/rms.md``).

``LN(x) = gamma * (x - mean(x)) / sqrt(var(x) + eps) + beta`` and, for ``mean(x) == 0``,
``var(x) == mean(x^2)``, so::

    LN(x) == gamma * RMSNorm(x) + beta        whenever mean(x) == 0     # same eps

The residual stream ``x`` of a pre-norm transformer is a sum of writes (embeddings, branch
output projections); it is read only by the norms. Making every write zero-mean over the
channels makes the stream zero-mean, and then every LN on it is an RMSNorm:

A. fold each norm's affine into the linears reading it (``passes/residual.py`` finds them,
   through layout ops): ``W <- W diag(gamma)``, ``b <- b + W beta``; a norm whose output
   also goes elsewhere (a data-dependent modulation, a graph output) keeps ``gamma`` as
   the RMSNorm scale and ``beta`` as an add;
B. re-centre every writer: embedding tables ``E <- E - mean_row(E)``; linear / conv
   writers ``W <- W - mean_over_out(W)``, ``b <- b - mean(b)``; constants (positions, cls
   token) ``c <- c - mean(c)``; a writer with no such parameters (an embedding LayerNorm
   as in BLOOM, a sandwich norm) gets one explicit ``x - mean(x)`` op after it;
C. replace every LN on the stream, the final one included, by RMSNorm with the same eps.

All folding is done in float64 and cast back once, by the view. A tied embedding / head is
untied: the view writes every changed parameter as a new tensor (copy-on-write) and the
site says so. ONNX: ``RMSNormalization`` when the model's opset is >= 23; otherwise the
model is upgraded to opset 23 when no op in it changed meaning (``upgrade_opset``, on by
default: the standard-op chain is 2.5x slower than LayerNormalization in ORT), else the
standard-op chain. FX: ``aten.rms_norm``.

Declined (the whole model, with the reason): post-LN, the raw stream read by anything but
the norms (an exported hidden state), a branch gated channel-wise by data (adaLN-Zero),
an RMSNorm already on the stream (re-centring would change its input), a writer that
cannot be re-centred nor followed by a centring op.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

import numpy as np

from passes.residual import NORM_OPS, ResidualStream, StreamNorm, Writer, analyze
from rewriter import lower
from rewriter.canon import near_miss_note
from rewriter.ir.view import Declined, GraphView, LinearParams, map_rows, scale_linear
from rewriter.pass_api import Kind, Pass, Site, register

log = logging.getLogger(__name__)


@dataclasses.dataclass
class _Plan:
    role: str  # writer | norm | stream
    item: Any
    stream: ResidualStream


def _center_rows(a: np.ndarray) -> np.ndarray:
    """Subtract each row's mean over the last axis (channels)."""
    return a - a.mean(axis=-1, keepdims=True)


def _centered(k: int):
    """A ``map_rows`` function: each float64 row minus its mean, first ``k`` columns kept."""
    def fn(block: np.ndarray, rows: slice) -> np.ndarray:
        block -= block.mean(axis=1, keepdims=True)
        return block[:, :k]
    return fn


class _StreamPass(Pass):
    """The shared engine of ``rms`` and ``crms`` (``compress`` drops one coordinate)."""

    bisectable = False  # the stream is rewritten as a whole (widths change together)

    compress = False

    @dataclasses.dataclass
    class Options:
        upgrade_opset: bool = True  # ONNX: move to opset 23 for the fused RMSNormalization
        center_unknown: bool = True  # insert x - mean(x) after writers without parameters

    # -- match -------------------------------------------------------------------------
    def match(self, view: GraphView) -> list[Site]:
        stream = analyze(view)
        if not stream.norms:
            why = "no norm reads a residual stream" + near_miss_note(view)
            if stream.other_norms:
                why += f" ({stream.other_norms[0][1]})"
            return [Site("model", False, why)]
        problems = list(stream.problems)
        for sn in stream.norms:
            if sn.node.op == "rms_norm":
                problems.append(f"{sn.node.name} is an RMSNorm on the stream: re-centring the writers "
                                "would change its input")
        if stream.width is None:
            problems.append("the width of the residual stream is unknown")
        writer_sites = [self._writer_site(view, stream, w) for w in stream.writers]
        problems += [s.reason for s, w in zip(writer_sites, stream.writers)
                     if not s.accepted and w.kind not in ("gated", "norm")]
        norm_sites = [self._norm_site(view, stream, sn) for sn in stream.norms]
        if self.compress:
            problems += [f"crms needs every norm on the stream replaced: {s.reason}"
                         for s in norm_sites if not s.accepted]
        problems += self._extra_problems(view, stream)
        sites = writer_sites + norm_sites
        if self.compress:
            sites.append(Site("stream", True, f"residual stream {stream.width} -> {(stream.width or 1) - 1} wide",
                              _Plan("stream", None, stream)))
        if problems:
            reason = "; ".join(dict.fromkeys(problems))
            return [dataclasses.replace(s, accepted=False, reason=reason) for s in sites]
        return sites

    def _extra_problems(self, view: GraphView, stream: ResidualStream) -> list[str]:
        return []

    def _writer_site(self, view: GraphView, stream: ResidualStream, w: Writer) -> Site:
        label = f"writer:{w.name}"
        plan = _Plan("writer", w, stream)
        if w.kind in ("gated",):
            return Site(label, False, w.note)
        if w.kind == "norm" and w.note == "post-LN":
            return Site(label, False, f"post-LN: {w.name} is a norm on the stream itself")
        if w.kind in ("linear", "embedding", "conv") and not _exclusive(view, w):
            w.kind, w.path = "other", []
            w.node = view.producer(w.value)
        if w.kind == "embedding":
            note = "embedding table re-centred"
            tied = _tied_reader(view, stream, w)
            if tied:
                note = f"tied embedding/head ({tied}): untied by copying, then re-centred"
            return Site(label, True, note, plan)
        if w.kind in ("linear", "conv"):
            return Site(label, True, f"{w.kind} writer re-centred (W - mean over outputs)", plan)
        if w.kind == "const":
            return Site(label, True, "constant re-centred", plan)
        if w.kind == "input":
            return Site(label, False, w.note + ": cannot re-centre it")
        if not self.options.center_unknown:
            return Site(label, False, f"writer {w.name} ({w.node.op if w.node else '?'}) cannot be re-centred "
                                      "by its parameters (center_unknown=false)")
        what = w.node.op if w.node is not None else "?"
        return Site(label, True, f"writer {w.name} ({what}) cannot be re-centred by its parameters: "
                                 "one explicit centering op (x - mean(x)) inserted after it", plan)

    def _norm_site(self, view: GraphView, stream: ResidualStream, sn: StreamNorm) -> Site:
        label = sn.node.name
        if sn.node.op != "layer_norm":
            return Site(label, False, f"{label} is already an RMSNorm")
        if sn.params is None:
            return Site(label, False, sn.error)
        target = "CRMSNorm" if self.compress else "RMSNorm"
        where = f"block {sn.block}" + (" (final norm)" if sn in stream.final_norms and sn.depth > 0 else "")
        if sn.foldable and sn.params.weight is None and sn.params.bias is None:
            how = "no affine to fold"
        elif sn.foldable:
            how = f"gamma/beta folded into {len(sn.linears)} linear reader(s)"
        else:
            how = (f"gamma/beta kept after the norm (read by {', '.join(sn.others[:3])})"
                   + ("; the dropped coordinate is re-expanded" if self.compress else ""))
        return Site(label, True, f"{where}: LayerNorm -> {target} (eps={sn.params.eps:g}); {how}",
                    _Plan("norm", sn, stream))

    # -- apply -------------------------------------------------------------------------
    def apply(self, view: GraphView, sites: list[Site]) -> None:
        if not sites:
            return
        if getattr(view, "ir", "") == "onnx" and self.options.upgrade_opset:
            replaced = [r for s in sites if s.plan is not None and s.plan.role == "norm" for r in s.plan.item.node.raw]
            why = lower.upgrade_opset(view, 23, ignore=replaced)
            if why:
                log.info("%s: staying at opset %d (%s): RMSNorm becomes a standard-op chain",
                         self.name, view.opset, why)
            else:
                log.info("%s: model upgraded to opset 23 for RMSNormalization", self.name)
        plans = [s.plan for s in sites if s.plan is not None]
        for p in plans:
            if p.role == "writer":
                self._apply_writer(view, p.item, p.stream.width)
        for p in plans:
            if p.role == "stream":
                self._apply_stream(view, p.stream)
        for p in plans:
            if p.role == "norm":
                self._apply_norm(view, p.item, p.stream.width)

    def _apply_writer(self, view: GraphView, w: Writer, d: int) -> None:
        k = d - 1 if self.compress else d
        if w.kind == "embedding":
            table = view.embedding(w.node, dtype=None)
            view.set_embedding(w.node, map_rows(table, _centered(k), k, table.dtype))
        elif w.kind == "linear":
            # centre over the outputs: row-wise on W.T ([in, out]); keep the first k outputs
            p = view.linear(w.node, dtype=None)
            wt = map_rows(p.weight.T, _centered(k), k, p.weight.dtype).T
            b = None if p.bias is None else p.bias.astype(np.float64)
            view.set_linear(w.node, LinearParams(wt, None if b is None else (b - b.mean())[:k]))
        elif w.kind == "conv":
            p = view.conv(w.node)
            wt = p.weight - p.weight.mean(axis=0, keepdims=True)
            b = None if p.bias is None else p.bias - p.bias.mean()
            view.set_conv(w.node, dataclasses.replace(p, weight=wt[:k], bias=None if b is None else b[:k]))
        elif w.kind == "const":
            def fn(a: np.ndarray) -> np.ndarray:
                c = _center_rows(a)
                return c[..., :k] if c.shape[-1] == d else c
            # a parameter reached through a path (a token expanded over the batch): only
            # the path's first op reads the edited copy
            reader = w.path[-1][0] if w.path else None
            view.edit_const(w.value, fn, width=d, new_width=k if self.compress else None, reader=reader)
        else:
            out = lower.insert(view, w.value, "center")
            if self.compress:
                lower.insert(view, out, "keep", n=k)
            return
        if w.node is not None:
            view.tag(w.node, self.name, [w.node.name])
        if self.compress:
            for node, axis in w.path:
                self._narrow_layout(view, node, axis, d)

    def _narrow_layout(self, view: GraphView, node, axis: int, d: int) -> None:
        """The layout op's target (constant, or computed at run time from a Concat of
        constants and shape reads) narrowed where it states the width ``d``."""
        lay = view.layout(node) if node.op != "transpose" else None
        if lay is not None and lay.kind in ("reshape", "expand"):
            t = view.shape_target(node)
            i = axis % len(t) if t and len(t) == (view.rank(node.output) or len(t)) else None
            if i is not None and type(t[i]) is int and t[i] == d:
                view.narrow_target(node, i, d - 1)
        view.set_dim(node.output, axis, d - 1)

    def _apply_stream(self, view: GraphView, stream: ResidualStream) -> None:
        """crms: every tensor on the stream becomes d - 1 wide."""

    def _apply_norm(self, view: GraphView, sn: StreamNorm, d: int) -> None:
        params = sn.params
        gamma = params.weight
        beta = params.bias
        fold = sn.foldable and (gamma is not None or beta is not None)
        if sn.foldable and (fold or self.compress):
            # one read and one write per reader: fold gamma/beta, then (crms) the dropped column
            for lin, chain in sn.linears:
                p = view.linear(lin, dtype=None)
                w, shift = scale_linear(p.weight, in_scale=gamma if fold else None, in_shift=beta if fold else None,
                                        drop_last_input=self.compress)
                b = None if p.bias is None else p.bias.astype(np.float64)
                if shift is not None:
                    b = shift if b is None else b + shift
                view.set_linear(lin, LinearParams(w, b))
                if fold:
                    view.tag(lin, self.name, [sn.node.name])
                if self.compress:
                    for node in chain:
                        self._narrow_layout(view, node, -1, d)
            if fold:
                gamma = beta = None
        if self.compress:
            new = lower.replace_norm(view, sn.node, "crms_norm", eps=params.eps)
            view.tag(new, self.name, [sn.node.name])
            if not sn.foldable:
                out = lower.insert(view, new.output, "uncompress")
                lower.insert(view, out, "scale_shift", weight=gamma, bias=beta)
            return
        new = lower.replace_norm(view, sn.node, "rms_norm", eps=params.eps, weight=gamma, bias=beta)
        view.tag(new, self.name, [sn.node.name])


def _exclusive(view: GraphView, w: Writer) -> bool:
    """The writer's output reaches only the stream (so changing its parameters changes
    nothing else)."""
    vals = [w.node.output] + [n.output for n, _ in w.path]
    for v in vals:
        if view.is_graph_output(v):
            return False
        users = view.data_users(v)  # a read of the shape alone is not a read of the values
        if len(users) > 1:
            return False
    return True


def _tied_reader(view: GraphView, stream: ResidualStream, w: Writer) -> str:
    """The name of a linear reading a norm whose weight equals this embedding table."""
    try:
        table = view.embedding(w.node, dtype=None)
    except Declined:
        return ""
    for sn in stream.norms:
        for lin, _ in sn.linears:
            out = view.shape(lin.output) if lin.output is not None else None
            if out and out[-1] is not None and out[-1] != table.shape[0]:
                continue  # fewer or more outputs than the table has rows: no need to read it
            wt = view.linear(lin, dtype=None).weight
            if wt.shape == table.shape and (wt is table or np.array_equal(wt, table)):
                return lin.name
    return ""


@register
class Rms(_StreamPass):
    name = "rms"
    kind = Kind.EXACT
    summary = "Pre-LN -> Pre-RMSNorm: fold LN affines into readers, re-centre stream writers, LN -> RMSNorm"
