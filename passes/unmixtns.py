"""``unmixtns``: frozen BatchNorm -> UnMix-TNS, test-time normalization with K statistics
components per layer, updated online (Un-Mixing Test-Time Normalization Statistics).
Architectural and stateful.

Why. Test-time BatchNorm assumes each test batch is an i.i.d. sample of the target domain.
A stream that is label-shifted or temporally correlated (a camera that sees one kind of
object for a while) violates that: the batch's statistics describe one class, and
normalizing with them erases the very features that separate the classes. UnMix-TNS keeps,
per BatchNorm layer, K statistics components that together stand for the whole target
distribution, normalizes each instance with the components closest to it, and updates the
components online with the instances that resemble them, so the normalization behaves as
if the batch had been drawn i.i.d.

The form implemented here (per channel ``c``; instance statistics over the spatial axes):

* State: component means and variances ``m_k, v_k`` ``[K, C]``, initialised from the frozen
  statistics, ``m_k = mu_s + spread z_k sqrt(var_s)`` with ``z_k`` evenly spaced in
  ``[-1, 1]``, ``v_k = var_s``.
* Instance statistics: ``mu_i = mean_hw(x_i)``, ``q_i = mean_hw(x_i^2)`` (raw second moment).
* Assignment: ``w_ik = softmax_k(-d_ik / tau)``, ``d_ik = mean_c (mu_ic - m_kc)^2 / (var_s_c + eps)``
  (a squared distance in units of the source spread).
* Update (before normalizing: the current batch counts), with ``s_k = v_k + m_k^2``::

      m_k <- m_k + (rho / N) sum_i w_ik (mu_i - m_k)
      s_k <- s_k + (rho / N) sum_i w_ik (q_i - s_k),    v_k = max(s_k - m_k^2, 0)

  a component moves in proportion to the share of the batch assigned to it.
* Normalization of instance ``i`` with the mixture of the components it is assigned to
  (law of total variance)::

      mu~_i  = sum_k w_ik m_k,     var~_i = sum_k w_ik (v_k + m_k^2) - mu~_i^2
      y_i    = gamma (x_i - mu~_i) / sqrt(var~_i + eps) + beta

With ``rho = 0`` and ``spread = 0`` every component is the source statistics and the call is
the frozen BatchNorm (a test checks it). The instance's own statistics enter only through
the assignment and the update, never alone: at batch 1 the normalization is still a
mixture of K components that have seen the whole stream.

Rewrite. ONNX: each BatchNormalization becomes a ``rewriter::UnMixTNS`` call
(``backends/ort/tta.py``) with the state as explicit graph inputs ``unmixtns_{i}_mean`` /
``_var`` (defaults: the initial components) and outputs ``unmixtns_{i}_mean_out`` /
``_var_out``; ``backends.ort.tta.UnmixRunner`` carries them from call to call. FX: a call
of the ``unmixtns`` state module (``backends/tta.py``, ``UnmixTnsState``: the components as
buffers, updated in place by each call; ``reset()`` restores them).

Declined as ``alphabn`` declines (training mode, non-constant statistics, folded norms,
non-float32 ONNX), plus every BatchNorm over ``[N, C]``: without spatial axes an instance
has no statistics of its own, and a BatchNorm whose output is a graph output in ONNX.
"""

from __future__ import annotations

import dataclasses
import logging

import numpy as np
import torch

from backends.ort.tta import MIN_OPSET, state_names
from backends.tta import init_components, state_module, unmix_step
from passes.alphabn import EXACT_TOL, BnParams, bn_params, folded_sites
from rewriter.ir.view import Declined, GraphView
from rewriter.lower import tta as lower_tta
from rewriter.pass_api import Kind, Pass, Site, register
from rewriter.run.capture import capture

log = logging.getLogger(__name__)


@register
class UnmixTns(Pass):
    name = "unmixtns"
    kind = Kind.ARCHITECTURAL
    summary = ("frozen BatchNorm -> UnMix-TNS: each instance normalized with a mixture of K statistics "
               "components updated online (stateful; label-shifted / correlated test streams)")

    @dataclasses.dataclass
    class Options:
        k: int = 4  # statistics components per BatchNorm
        tau: float = 1.0  # softmax temperature of the assignment
        rho: float = 0.1  # update rate of the components per call
        spread: float = 0.5  # initial component means: mu_s +- spread * sqrt(var_s)

    def __init__(self, options=None, context=None):
        super().__init__(options, context)
        self.applied: list[dict] = []

    def match(self, view: GraphView) -> list[Site]:
        o = self.options
        problem = ""
        if o.k < 1 or o.tau <= 0 or not 0 <= o.rho <= 1 or o.spread < 0:
            problem = f"k={o.k} >= 1, tau={o.tau} > 0, 0 <= rho={o.rho} <= 1 and spread={o.spread} >= 0 are required"
        onnx = view.ir == "onnx"
        sites: list[Site] = []
        for node in view.nodes():
            if node.op != "batch_norm":
                continue
            if problem:
                sites.append(Site(node.name, False, problem))
                continue
            try:
                p = bn_params(view, node)
            except Declined as why:
                sites.append(Site(node.name, False, str(why).replace("; set flat=true to rewrite it anyway", "")))
                continue
            if onnx and (p.dtype != np.float32 or getattr(view, "opset", 0) < MIN_OPSET):
                sites.append(Site(node.name, False, f"{node.name}: float32 BatchNorms at opset >= {MIN_OPSET} only"))
                continue
            if onnx and view.is_graph_output(node.output):
                sites.append(Site(node.name, False, f"{node.name}: its output is a graph output"))
                continue
            sites.append(Site(node.name, True, f"{len(p.mean)} channels, {o.k} components", plan=p))
        return sites + folded_sites(view)

    def apply(self, view: GraphView, sites: list[Site]) -> None:
        o = self.options
        for site in sites:
            p: BnParams = site.plan
            node = next(n for n in view.nodes() if n.name == site.site and n.op == "batch_norm")
            x = node.inputs[0]
            new, out, index, state = lower_tta.replace_unmix(
                view, node, site.site, gamma=p.gamma, beta=p.beta, mean=p.mean, var=p.var, eps=p.eps,
                k=o.k, spread=o.spread, tau=o.tau, rho=o.rho)
            if new is not None:
                view.tag(new, self.name, [site.site])
            self.applied.append({"site": site.site, "index": index, "input": x, "output": out, "params": p,
                                 "state": state})
            log.debug("unmixtns: %s -> site %d", site.site, index)

    def check(self, before: GraphView, after: GraphView, feeds) -> dict:
        """One call from the initial components: each site's output and updated components
        == the float64 formula on the input the site receives. Tolerance: float32 sums of
        the instance statistics, ``H W`` x float32 eps (at least the exact-pass tolerance)."""
        fx = after.ir == "torch"
        if fx:
            state_module(after.gm).reset()
        values = [v for a in self.applied for v in (a["input"], a["output"])]
        extra = [] if fx else [v for a in self.applied for v in _outputs_named(after, a["state"])]
        got = capture(after, values + extra, feeds)
        outputs, worst_abs, worst_rel = [], 0.0, 0.0
        o = self.options
        for i, a in enumerate(self.applied):
            x, y = got[2 * i], got[2 * i + 1]
            if fx:
                st = state_module(after.gm)
                m_got, v_got = (t.detach().numpy() for t in st.components(a["index"]))
            else:
                m_got, v_got = got[len(values) + 2 * i], got[len(values) + 2 * i + 1]
            want = reference_step(x, a["params"], o)
            hw = int(np.prod(x.shape[2:])) if x.ndim > 2 else 1
            tol = max(EXACT_TOL, hw * float(np.finfo(np.float32).eps))
            for label, w, g in (("output", want[0], y), ("component means", want[1], m_got),
                                ("component variances", want[2], v_got)):
                diff = float(np.abs(np.asarray(g, np.float64) - w).max()) if w.size else 0.0
                scale = float(np.abs(w).max()) if w.size else 0.0
                rel = diff / scale if scale > 0 else diff
                worst_abs, worst_rel = max(worst_abs, diff), max(worst_rel, rel)
                outputs.append({"name": f"{a['site']} {label}", "max_abs_error": diff, "max_rel_error": rel,
                                "tolerance": tol, "passed": rel <= tol})
        if fx:
            state_module(after.gm).reset()
        return {"passed": all(r["passed"] for r in outputs), "max_abs_error": worst_abs, "max_rel_error": worst_rel,
                "outputs": outputs,
                "check": "each site's output and updated components equal UnMix-TNS (float64) from the initial state"}


def reference_step(x: np.ndarray, p: BnParams, o, comp: tuple[np.ndarray, np.ndarray] | None = None):
    """``(y, m_new, v_new)`` of one call in float64 (from the initial components unless
    ``comp`` gives the current ones)."""
    m, v = comp if comp is not None else init_components(p.mean, p.var, o.k, o.spread)
    t = lambda a: torch.as_tensor(np.asarray(a, np.float64))  # noqa: E731
    y, mn, vn = unmix_step(t(x), t(m), t(v), t(p.var), t(p.gamma), t(p.beta), p.eps, o.tau, o.rho)
    return y.numpy(), mn.numpy(), vn.numpy()


def _outputs_named(view: GraphView, names) -> list:
    outs = {view.value_name(v): v for v in view.graph.outputs}
    return [outs[n] for n in names]


__all__ = ["UnmixTns", "reference_step", "state_names"]
