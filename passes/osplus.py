"""``osplus``: Outlier Suppression+ equivalent shift and scale (Wei et al. 2023,
``ModelTC/Outlier_Suppression_Plus``; ``docs/passes/osplus.md``).

Activation outliers in transformers sit in a few channels of the norm outputs, which makes
per-tensor activation quantization coarse. For a norm output ``X`` read only by linear
layers ``y = W x + b``, a per-channel shift ``z`` and scale ``s`` are migrated exactly::

    X~ = (X - z) / s        W~ = W diag(s)        b~ = b + W z          # W~ X~ + b~ == W X + b

and absorbed into the norm's affine (``fuse_migration``)::

    gamma <- gamma / s      beta <- (beta - z) / s

so the graph keeps its ops; only parameters change (folded in float64, cast back once).

* **Shift** ``z_j = (max_t X_tj + min_t X_tj) / 2`` over the calibration tokens: centres
  every channel. RMSNorm has no ``beta``: RMSNorm models get scaling only (``z = 0``).
* **Scale** ``s_j = max(1, max_t X'_tj / t, -min_t X'_tj / t)`` with ``X' = X - z``: the
  channels whose range exceeds ``[-t, t]`` are squeezed into it. The single threshold ``t``
  comes from a 1-D grid search (``grid`` points from ``max|X'|`` down to ``max|X'|/grid``)
  minimising the fake-quantized output error of the following linear layers (together:
  q/k/v, fc1, gate/up)::

      loss(t) = mean_tokens || (Q(X~) - X~) diag(s) W^T ||^2 = mean_tokens e H e^T,  H = W^T W

  with ``Q`` per-tensor uniform fake quantization of ``bits`` bits (min-max, asymmetric;
  symmetric with ``--set osplus.symmetric=true``). ``t = max|X'|`` (no scaling) is a grid
  point, so the search never does worse than the shift alone; a site whose best loss does
  not improve on quantizing the unmigrated ``X`` is declined.

Preconditions: the norm reads the residual stream (``passes/residual.py``) and its output
reaches only linear layers (through layout ops that keep the channel axis); its affine is
constant. The final norm (read by the output head) is left alone unless
``include_final=true``. The model's outputs are unchanged (an exact pass).

Calibration (``passes/calibration.py``): ``--calib FILE.npz``, else the model's example
inputs, else seeded random inputs with a logged warning. The search runs at ``match``
time, so ``rewrite explain`` shows the per-site figures: the activation range before and
after (``max |X|``, and the ratio of the largest per-channel ``max |X_j|`` to the median
one) and the relative fake-quantized output error before and after migration; the pass
keeps them per site in ``self.stats``.

Not done: the optional migration of the out-projection input into ``v_proj`` (exact only
when the head layout maps v channels to out-projection inputs one to one), and the paper's
loss measured after the full attention (here: at the linear outputs, as the issue asks).
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

import networkx as nx
import numpy as np

from passes.calibration import calibration_feeds, capture_rows
from passes.residual import StreamNorm, analyze
from rewriter.canon import near_miss_note
from rewriter.ir.view import GraphView, LinearParams
from rewriter.pass_api import Kind, Pass, Site, register

log = logging.getLogger(__name__)


def fake_quant(x: np.ndarray, bits: int, symmetric: bool = False) -> np.ndarray:
    """Per-tensor uniform fake quantization (quantize, then dequantize) of ``x``."""
    if symmetric:
        qmax = 2 ** (bits - 1) - 1
        step = float(np.abs(x).max()) / qmax
        if step == 0:
            return x.copy()
        return np.clip(np.round(x / step), -qmax - 1, qmax) * step
    lo, hi = min(float(x.min()), 0.0), max(float(x.max()), 0.0)
    levels = 2**bits - 1
    step = (hi - lo) / levels
    if step == 0:
        return x.copy()
    zp = np.round(-lo / step)
    return (np.clip(np.round(x / step) + zp, 0, levels) - zp) * step


def output_error(x: np.ndarray, s: np.ndarray, h: np.ndarray, bits: int, symmetric: bool) -> float:
    """``mean_t (Q(x) - x) diag(s) H diag(s) (Q(x) - x)^T``: the output error of the linear
    layers (``H = W^T W``) when their migrated input ``x`` is fake-quantized."""
    e = (fake_quant(x, bits, symmetric) - x) * s
    return float(np.einsum("ti,ij,tj->", e, h, e, optimize=True) / len(x))


def search_scale(xs: np.ndarray, h: np.ndarray, bits: int, symmetric: bool, grid: int
                 ) -> tuple[float, np.ndarray, float]:
    """The threshold ``t``, the scale ``s`` and the loss of the best grid point for the
    shifted activations ``xs`` ``[tokens, channels]``."""
    hi, lo = xs.max(0), xs.min(0)
    amx = float(np.abs(xs).max())
    best = (amx, np.ones(xs.shape[1]), np.inf)
    if amx == 0:
        return best[0], best[1], 0.0
    for k in range(grid, 0, -1):
        t = amx * k / grid
        s = np.maximum(1.0, np.maximum(hi / t, -lo / t))
        loss = output_error(xs / s, s, h, bits, symmetric)
        if loss < best[2]:
            best = (t, s, loss)
    return best


def _range(x: np.ndarray) -> tuple[np.ndarray, float, float]:
    """Per-channel ``max |X_j|``, the overall max, and the max / median channel ratio."""
    ch = np.abs(x).max(0)
    med = float(np.median(ch))
    return ch, float(ch.max()), float(ch.max() / med) if med > 0 else float("inf")


@dataclasses.dataclass
class _Plan:
    norm: StreamNorm
    shift: np.ndarray
    scale: np.ndarray
    stats: dict[str, Any]


@register
class OutlierSuppressionPlus(Pass):
    name = "osplus"
    kind = Kind.EXACT
    summary = ("Outlier Suppression+: per-channel shift/scale of norm outputs migrated into the norm "
               "and the following linears (calibrated)")
    needs_calibration = True

    @dataclasses.dataclass
    class Options:
        bits: int = 8  # activation bits of the fake quantizer (per-tensor)
        symmetric: bool = False  # symmetric quantizer (default: asymmetric min-max)
        grid: int = 100  # threshold candidates in the 1-D search
        shift: bool = True  # LayerNorm: channel shift z (RMSNorm: never)
        max_tokens: int = 2048  # calibration tokens used per site
        include_final: bool = False  # also migrate the final norm into the output head

    def __init__(self, options: Any = None, context=None):
        super().__init__(options, context)
        self.stats: list[dict[str, Any]] = []  # per accepted site (see module doc)

    # -- match: eligibility, calibration, search ------------------------------------------
    def match(self, view: GraphView) -> list[Site]:
        o = self.options
        stream = analyze(view)
        sites = [Site(n.name, False, f"{why}: osplus migrates stream norms only") for n, why in stream.other_norms]
        if not stream.norms:
            return sites or [Site("model", False, "no norm reads a residual stream" + near_miss_note(view))]
        g = view.to_networkx()
        joins = {j.name for j in stream.joins}
        todo: list[StreamNorm] = []
        for sn in stream.norms:
            name = sn.node.name
            if sn.params is None:
                sites.append(Site(name, False, sn.error))
            elif not sn.linears or sn.others:
                what = ", ".join(sn.others[:3]) or "no linear layer"
                sites.append(Site(name, False, f"its output is read by {what}: the migration needs linear "
                                               "readers only"))
            elif not o.include_final and stream.joins and not (nx.descendants(g, name) & joins):
                sites.append(Site(name, False, "final norm (read by the output head): not migrated "
                                               "(--set osplus.include_final=true)"))
            else:
                todo.append(sn)
        if not todo:
            return sites
        feeds, source = calibration_feeds(self.name, view, self.context)
        acts = capture_rows(view, [sn.node.output for sn in todo], feeds, o.max_tokens)
        for sn, x in zip(todo, acts):
            sites.append(self._site(view, sn, x, source))
        return sites

    def _site(self, view: GraphView, sn: StreamNorm, x: np.ndarray, source: str) -> Site:
        o = self.options
        name = sn.node.name
        ws = [view.linear(lin).weight for lin, _ in sn.linears]
        w = np.concatenate(ws, axis=0)
        h = w.T @ w
        shift = o.shift and sn.node.op == "layer_norm"
        z = (x.max(0) + x.min(0)) / 2 if shift else np.zeros(x.shape[1])
        xs = x - z
        base = output_error(x, np.ones(x.shape[1]), h, o.bits, o.symmetric)
        t, s, loss = search_scale(xs, h, o.bits, o.symmetric, o.grid)
        signal = float(np.einsum("ti,ij,tj->", x, h, x, optimize=True) / len(x)) or 1.0
        _, a0, r0 = _range(x)
        ch1, a1, r1 = _range(xs / s)
        readers = ", ".join(lin.name for lin, _ in sn.linears)
        stats = {"site": name, "readers": [lin.name for lin, _ in sn.linears], "bits": o.bits,
                 "calibration": source, "tokens": len(x), "threshold": t,
                 "scaled_channels": int((s > 1).sum()), "max_scale": float(s.max()), "shift": bool(shift),
                 "max_abs_before": a0, "max_abs_after": a1, "ratio_before": r0, "ratio_after": r1,
                 "channel_max_before": np.abs(x).max(0).tolist(), "channel_max_after": ch1.tolist(),
                 "error_before": base / signal, "error_after": loss / signal}
        figures = (f"max|X| {a0:.4g} -> {a1:.4g}, max/median channel {r0:.3g} -> {r1:.3g}; "
                   f"{o.bits}-bit fake-quant output error (rel.) {base / signal:.3g} -> {loss / signal:.3g}")
        if not loss < base:
            return Site(name, False, f"migration does not lower the quantization error ({figures})")
        what = "shift+scale" if shift else "scale"
        reason = (f"{what} into {readers}: {stats['scaled_channels']}/{len(s)} channels scaled "
                  f"(t={t:.4g}, max s={s.max():.3g}); {figures}; calibration: {source}, {len(x)} tokens")
        return Site(name, True, reason, _Plan(sn, z, s, stats))

    # -- apply: gamma <- gamma/s, beta <- (beta - z)/s, W <- W diag(s), b <- b + W z ------
    def apply(self, view: GraphView, sites: list[Site]) -> None:
        self.stats = []
        for site in sites:
            plan: _Plan = site.plan
            sn, z, s = plan.norm, plan.shift, plan.scale
            node = view.node_of(sn.node.raw[0]) or sn.node
            p = view.norm(node)
            gamma = (p.weight if p.weight is not None else np.ones(p.width)) / s
            beta = None
            if np.any(z != 0) or p.bias is not None:
                beta = ((p.bias if p.bias is not None else 0.0) - z) / s
            view.set_norm(node, weight=gamma, bias=beta)
            view.tag(view.node_of(sn.node.raw[0]) or node, self.name, [sn.node.name])
            for lin, _ in sn.linears:
                lp = view.linear(lin)
                b = lp.bias if lp.bias is not None else np.zeros(lp.weight.shape[0])
                new_b = b + lp.weight @ z
                keep_none = lp.bias is None and not np.any(z != 0)
                view.set_linear(lin, LinearParams(lp.weight * s[None, :], None if keep_none else new_b))
                view.tag(lin, self.name, [sn.node.name])
            self.stats.append(plan.stats)
            log.info("osplus: %s: %s", site.site, site.reason)
