"""``lns``: LayerNorm Scaling ("The Curse of Depth in LLMs", Sun et al. 2025;
``docs/passes/lns.md``).

Every pre-norm of transformer block ``l`` (1-based; both the attention and the MLP
pre-norm) gets its output scaled by ``1/sqrt(l)``::

    h = Norm_l(x) / sqrt(l)          l = block index + 1  in  {1 .. L}

The final norm and the embeddings are left alone. Block indices come from the graph, not
from module names: the residual-stream analysis (``passes/residual.py``) gives each norm
reading the stream its ``block`` (the number of upstream MLP pre-norms), so ``l =
block + 1`` for sequential and parallel blocks alike; a stream norm after which no
residual add follows is the final norm.

Modes (``--set lns.mode=train|fold``; ``auto``: ``train`` for torch, ``fold`` for ONNX):

* ``train``: an explicit, inspectable scaling op after each norm: FX, a call of a small
  module holding the factor as a buffer (``rewriter.lower.fx_emit.ConstantScale``: not a
  parameter, so it is not trained); ONNX, a ``Mul`` by a constant. The GraphModule still
  trains (every original parameter keeps its gradient).
* ``fold``: the factor is absorbed into the norm's affine, ``gamma <- gamma / sqrt(l)``,
  ``beta <- beta / sqrt(l)`` (a missing gamma is created), computed in float64 and cast
  back once. Zero runtime cost; its output equals ``train`` mode's (exact).

The pass is *architectural*: it changes the function on purpose (a training recipe, not a
function-preserving rewrite of a non-LNS checkpoint), so ``check`` verifies the intended
change instead of equality: every scaled norm's output equals the original norm's output
times ``1/sqrt(l)``, within the dtype tolerance. Intermediate tensors of the rewritten
model are captured (each norm's input and its scaled output) and the original norm, with
its original parameters, is recomputed in float64 on that input (earlier sites change the
inputs of later norms, so the original model's tensors are not the reference). The
result lists which norm got which ``l`` (``verification.sites``).

Declined, with the reason: a post-LN model (the norms sit on the stream, there is no
pre-norm to scale); the final norm; norms that do not read the residual stream (an
embedding LayerNorm, a QK-norm); in ``fold`` mode, a norm whose affine is not constant.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from typing import Any, Literal

import networkx as nx
import numpy as np

from passes.residual import StreamNorm, analyze
from rewriter import lower
from rewriter.canon import near_miss_note
from rewriter.ir.view import GraphView, NormParams
from rewriter.pass_api import Kind, Pass, Site, register
from rewriter.run.capture import capture
from rewriter.run.verify import tolerance

log = logging.getLogger(__name__)


@dataclasses.dataclass
class _Plan:
    norm: StreamNorm
    layer: int  # l, 1-based

    @property
    def factor(self) -> float:
        return 1.0 / math.sqrt(self.layer)


def _value_named(view: GraphView, name: str) -> Any:
    """The IR value called ``name`` (any node output or graph input)."""
    if view.ir == "torch":
        for n in view.graph.nodes:
            if n.name == name:
                return n
    else:
        for v in view.graph.inputs:
            if v.name == name:
                return v
        for n in view.graph:
            for o in n.outputs:
                if o.name == name:
                    return o
    raise KeyError(f"no value named {name!r} in the {view.ir} model")


def _reference_norm(x: np.ndarray, op: str, p: NormParams) -> np.ndarray:
    """The original norm in float64: LN ``(x - mu) / sqrt(var + eps)`` or RMS
    ``x / sqrt(mean(x^2) + eps)``, then ``* gamma + beta``."""
    x = np.asarray(x, np.float64)
    if op == "layer_norm":
        x = x - x.mean(-1, keepdims=True)
    y = x / np.sqrt((x * x).mean(-1, keepdims=True) + p.eps)
    if p.weight is not None:
        y = y * p.weight
    if p.bias is not None:
        y = y + p.bias
    return y


@register
class LayerNormScaling(Pass):
    name = "lns"
    kind = Kind.ARCHITECTURAL
    summary = "LayerNorm Scaling: scale the pre-norm outputs of block l by 1/sqrt(l) (train op or folded)"
    bisectable = False

    @dataclasses.dataclass
    class Options:
        mode: Literal["auto", "train", "fold"] = "auto"  # auto: train for torch, fold for ONNX

    def __init__(self, options: Any = None, context=None):
        super().__init__(options, context)
        self.applied: list[dict[str, Any]] = []  # per site: norm, l, factor, value names

    def _mode(self, view: GraphView) -> str:
        mode = self.options.mode
        if mode == "auto":
            return "train" if view.ir == "torch" else "fold"
        return mode

    # -- match -------------------------------------------------------------------------
    def match(self, view: GraphView) -> list[Site]:
        stream = analyze(view)
        sites = [Site(n.name, False, f"{why}: not a pre-norm, not scaled") for n, why in stream.other_norms]
        if not stream.norms:
            return sites or [Site("model", False, "no norm reads a residual stream" + near_miss_note(view))]
        post = [p for p in stream.problems if p.startswith("post-LN")]
        if post:
            return sites + [Site(sn.node.name, False, f"{post[0]}: LayerNorm Scaling applies to pre-norms only")
                            for sn in stream.norms]
        g = view.to_networkx()
        joins = {j.name for j in stream.joins}
        mode = self._mode(view)
        for sn in stream.norms:
            name = sn.node.name
            if not (nx.descendants(g, name) & joins):
                sites.append(Site(name, False, "final norm (no residual add after it): not scaled"))
                continue
            if mode == "fold" and sn.params is None:
                sites.append(Site(name, False, f"{sn.error} (cannot fold; use --set lns.mode=train)"))
                continue
            plan = _Plan(sn, sn.block + 1)
            role = "attention" if sn.attention else "MLP"
            how = "factor folded into gamma/beta" if mode == "fold" else "explicit scaling op after the norm"
            sites.append(Site(name, True, f"block l={plan.layer} {role} pre-norm: output x 1/sqrt({plan.layer}) "
                                          f"= {plan.factor:.6g} ({mode}: {how})", plan))
        return sites

    # -- apply -------------------------------------------------------------------------
    def apply(self, view: GraphView, sites: list[Site]) -> None:
        self.applied = []
        mode = self._mode(view)
        for site in sites:
            plan: _Plan = site.plan
            node, f = plan.norm.node, plan.factor
            before_name = view.value_name(node.output)
            if mode == "train":
                out = lower.insert_scale(view, node.output, f, f"{node.name}_lns")
                new = view.producer(out)
                if new is not None:
                    view.tag(new, self.name, [node.name])
                after_name = view.value_name(out)
            else:
                cur = view.node_of(node.raw[0]) or node
                p = view.norm(cur)
                gamma = p.weight if p.weight is not None else np.ones(p.width)
                view.set_norm(cur, weight=gamma * f, bias=None if p.bias is None else p.bias * f)
                now = view.node_of(node.raw[0]) or cur
                view.tag(now, self.name, [node.name])
                after_name = view.value_name(now.output)  # a chain norm may have gained a scale op
            self.applied.append({"site": site.site, "l": plan.layer, "factor": f, "mode": mode, "op": node.op,
                                 "input": view.value_name(node.inputs[0]), "norm": before_name,
                                 "after": after_name, "params": plan.norm.params})
            log.info("lns: %s: l=%d, x %.6g (%s)", site.site, plan.layer, f, mode)

    # -- verification of the intended change -------------------------------------------
    def check(self, before: GraphView, after: GraphView, feeds) -> dict[str, Any]:
        """Each scaled norm's output == the original norm's output x 1/sqrt(l), on the
        input that norm sees in the rewritten model (earlier sites change later inputs).

        The original norm is recomputed in float64 from its original parameters; a norm
        with non-constant parameters (``train`` mode) is compared with its own unscaled
        output, which ``train`` mode leaves in the graph."""
        values = []
        for a in self.applied:
            ref = a["input"] if a["params"] is not None else a["norm"]
            values += [_value_named(after, ref), _value_named(after, a["after"])]
        unique = list({id(v): v for v in values}.values())  # capture each value once
        got_by_id = dict(zip([id(v) for v in unique], capture(after, unique, feeds)))
        arrays = [got_by_id[id(v)] for v in values]
        outputs, worst_abs, worst_rel = [], 0.0, 0.0
        for i, a in enumerate(self.applied):
            src, got = arrays[2 * i], arrays[2 * i + 1]
            base = _reference_norm(src, a["op"], a["params"]) if a["params"] is not None else src
            expect = np.asarray(base, np.float64) * a["factor"]
            diff = float(np.abs(np.asarray(got, np.float64) - expect).max()) if expect.size else 0.0
            scale = float(np.abs(expect).max()) if expect.size else 0.0
            rel = diff / scale if scale > 0 else diff
            tol = tolerance(np.asarray(got).dtype)
            worst_abs, worst_rel = max(worst_abs, diff), max(worst_rel, rel)
            outputs.append({"name": f"{a['site']} (l={a['l']}, x{a['factor']:.6g})", "max_abs_error": diff,
                            "max_rel_error": rel, "tolerance": tol, "passed": rel <= tol})
        return {"passed": all(o["passed"] for o in outputs), "max_abs_error": worst_abs,
                "max_rel_error": worst_rel, "outputs": outputs,
                "check": "each scaled norm's output equals the original norm's output x 1/sqrt(l)",
                "sites": [{"site": a["site"], "l": a["l"], "factor": a["factor"], "mode": a["mode"]}
                          for a in self.applied]}
