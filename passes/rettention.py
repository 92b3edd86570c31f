"""``rettention``: dense self-attention -> Re-ttention sparse attention for diffusion
transformers (Re-ttention, NeurIPS 2025; ``docs/passes/rettention.md``).

Per (batch, head, query ``i``) with ``S = scale * Q K^T``, a static mask ``M`` and the
0-based denoising step ``t`` (schedule: ``warmup``, ``period``, ``lam``)::

    t < warmup                      dense:    O = softmax(S) V                   (state kept)
    (t - warmup) % period == 0      refresh:  O = softmax(S) V
                                              rho = Z_M / Z = exp(LSE_M(S) - LSE(S))   (fp32)
                                              R   = O - rho * softmax_M(S) V
    otherwise, k = (t-warmup)%period - 1   sparse: O = (rho + lam * k) * softmax_M(S) V + R

``R`` is the out-of-mask part ``sum_{j not in M_i} p_ij v_j`` of the last refresh; it is
kept before the output projection (``to_out`` is affine, so this equals the paper's
after-projection cache). ``rho`` is never clamped. Mask (``backends/rettention_spec.py``):
the paper's band ``|i - j| <= floor(floor(N * density) / 2)`` over the flattened tokens,
or a 2-D local window on the token grid (``mask=window2d``, ``grid=HxW``, square by
default).

Sites: self-attention found by ``passes/attention.py`` (FX SDPA or the matmul-softmax
chain; ONNX ``Attention`` or the opset-18 decomposition), with static ``H``, ``N``, ``Dh``.
Declined with the reason: cross-attention (keys of another length or projected from
another tensor; ``cross=true`` accepts the same-length case), masks, causal attention,
dropout, KV caches, GQA, 3-D layouts, ONNX opsets below 18, non-float dtypes.

Rewrite. ONNX: a ``rewriter::Rettention`` function call per site plus the state protocol
(``rettention_step``, ``rettention_{s}_rho`` / ``_residual`` inputs and ``_out`` outputs;
``backends/ort/rettention.py``). FX: ``call_module("rettention", (q, k, v), site=s)``, a
``RettentionState`` holding per-(site, request) state, driven by ``set_step(t)``
(``passes/rettention_runtime.py``); kernels in ``backends/triton/rettention.py``.

Verification. The manager runs the rewritten model on the verification inputs at its
default step (ONNX: ``rettention_step`` defaults to 0; FX: ``set_step(0)``), which is a
dense (or refresh) step: its output is exactly dense attention, so it must match the
original within ``budget`` (default 1e-4, float rounding of another op order). That
checks the matching and the wiring. The sparse and refresh steps are checked site by site
against the formulas by ``check_steps`` (every site's output from the Q, K, V it actually
received, over a schedule), and the sampling quality is a benchmark, not a verification.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Literal

from backends.rettention_spec import BlockLayout, MaskSpec, Schedule, auto_block
from passes.attention import AttentionSite, describe, find_attention
from rewriter.ir.onnx_view import OnnxView
from rewriter.ir.view import GraphView
from rewriter.lower.rettention import lower_rettention, lowering_problem
from rewriter.pass_api import Kind, Pass, Site, register
from rewriter.run.rettention_steps import check_steps  # noqa: F401 - part of this pass's interface
from rewriter.run.shapes import resolve_static

log = logging.getLogger(__name__)


# find_attention's reasons that better shape inference may lift (rewriter.run.shapes.resolve_static)
_SHAPE_PROBLEMS = ("the shapes of Q, K, V are unknown", "heads, tokens and head width must be static",
                   "Q, K, V are not [B, H, N, Dh]")


@dataclasses.dataclass
class _Plan:
    site: AttentionSite
    layout: BlockLayout


@register
class Rettention(Pass):
    name = "rettention"
    kind = Kind.APPROXIMATE
    summary = ("dense self-attention -> Re-ttention (static-mask sparse attention corrected by a cached "
               "residual and the attention-mass ratio) for diffusion transformers")

    @dataclasses.dataclass
    class Options:
        density: float = 0.03125  # mask density: band width floor(N * density)
        warmup: int = 5  # dense steps before the first refresh
        period: int = 5  # a refresh every `period` steps
        lam: float = 0.04  # rho grows by lam per sparse step since the refresh
        mask: Literal["band", "window2d"] = "band"  # sparse mask: 1-D band or 2-D local window
        grid: str = ""  # window2d token grid "HxW" (default: square)
        block: int = 0  # query/key block of the sparse kernels (0: auto)
        cross: bool = False  # also rewrite same-length attention over another sequence
        budget: float = 1e-4  # max rel. error of the default (dense) step vs the original

    # -- match -------------------------------------------------------------------------
    def _problem(self) -> str:
        o = self.options
        if not 0.0 < o.density <= 1.0:
            return f"density={o.density} must be in (0, 1]"
        if o.warmup < 0 or o.period < 1:
            return f"warmup={o.warmup} must be >= 0 and period={o.period} >= 1"
        if o.block < 0 or (o.block and o.block < 16):
            return f"block={o.block} must be 0 (auto) or >= 16"
        return ""

    def _mask(self, n: int) -> MaskSpec:
        o = self.options
        if o.mask == "band":
            return MaskSpec.band(n, o.density)
        grid = None
        if o.grid:
            try:
                gh, gw = (int(x) for x in o.grid.lower().split("x"))
            except ValueError:
                raise ValueError(f"grid={o.grid!r}: expected HxW") from None
            grid = (gh, gw)
        return MaskSpec.window2d(n, o.density, grid)

    def match(self, view: GraphView) -> list[Site]:
        sites: list[Site] = []
        problem = self._problem()
        found = find_attention(view)
        if isinstance(view, OnnxView) and any(p in s.reason for s in found for p in _SHAPE_PROBLEMS):
            if resolve_static(view):  # static inputs: infer the inner shapes onnx's inference left open
                found = find_attention(view)
        for s in found:
            if s.reason and not (self.options.cross and not s.self_attention and s.tokens
                                 and view.shape(s.v) and s.reason.startswith(f"{s.name}: cross-attention (keys are")):
                sites.append(Site(s.name, False, s.reason))
                continue
            s.reason = ""
            why = problem or lowering_problem(view, s)
            layout = None
            if not why:
                try:
                    spec = self._mask(s.tokens)
                    layout = BlockLayout(spec, self.options.block or auto_block(spec))
                except ValueError as err:
                    why = f"{s.name}: {err}"
            if why:
                sites.append(Site(s.name, False, why))
                continue
            note = f"{describe(s)}; {layout.spec.describe()}, block {layout.block} ({layout.width} keys per query block)"
            if s.note:
                note += f"; {s.note}"
            assumed = _assumed_dims(view, s)
            if assumed:
                note += (f"; {assumed} assumed from the given input shapes (symbolic in the file): "
                         "the rewritten site runs at these sizes only")
            sites.append(Site(s.name, True, note, plan=_Plan(s, layout)))
        return sites

    # -- apply -------------------------------------------------------------------------
    def schedule(self) -> Schedule:
        o = self.options
        return Schedule(o.warmup, o.period, o.lam)

    def apply(self, view: GraphView, sites: list[Site]) -> None:
        for site in sites:
            plan: _Plan = site.plan
            lower_rettention(view, plan.site, plan.layout, self.schedule())
        view.invalidate()

    def error_budget(self) -> float | None:
        return self.options.budget


def _assumed_dims(view: GraphView, s) -> str:
    """``H=2, N=16``: the dims of the site that the file leaves symbolic and the analysis took
    from ``--shape`` / ``--inputs`` (``rewriter.run.shapes``); empty when the file states them."""
    if not isinstance(view, OnnxView) or not view.shape_hints or s.q is None:
        return ""
    if all(v.shape is not None and all(isinstance(d, int) for d in v.shape)
           for v in view.graph.inputs if not v.is_initializer()):
        return ""  # static inputs: the inferred dims are facts, nothing was assumed
    own = s.q.shape
    if own is None or len(own) != 4:
        return f"H={s.heads}, N={s.tokens}, Dh={s.head_dim}"
    return ", ".join(f"{k}={v}" for k, v, d in (("H", s.heads, own[1]), ("N", s.tokens, own[2]),
                                                ("Dh", s.head_dim, own[3])) if not isinstance(d, int))
