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
a 2-D local window on the token grid (``mask=window2d``, ``grid=HxW``, square by
default), or the paper's video / joint text+image mask (``mask=joint``): text rows and
columns dense, a 2-D window inside each frame and at the same position in the frames
within ``frames_window`` (-1: all). ``mask=auto`` chooses from the token layout: joint
when it has text tokens or several frames, window2d for one image grid, the band when no
layout is known. The layout (``T`` text tokens first, then ``F x H x W``) comes from the
``layout`` option (``"226+13x30x45"``) or from the patch embedding: a convolution whose
kernel tiles its input (``H_in = h * kh``) gives the grid ``h x w``, its batch over the
attention's batch the frames, and the remaining tokens are text (assumed first, as in
CogVideoX's joint attention). The site reason says which mask was chosen and why, with
the token density and the block density of the sparse kernels' layout.

Sites: self-attention found by ``rewriter/canon/attention.py`` (FX SDPA or the matmul-softmax
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

from backends.rettention_spec import BlockLayout, MaskSpec, Schedule, TokenLayout, auto_block
from rewriter.canon.attention import SHAPES_UNKNOWN, AttentionSite, describe, find_attention
from rewriter.ir.onnx_view import OnnxView
from rewriter.ir.view import Declined, GraphView
from rewriter.lower.rettention import lower_rettention, lowering_problem
from rewriter.pass_api import Kind, Pass, Site, register
from rewriter.run.rettention_steps import check_steps  # noqa: F401 - part of this pass's interface
from rewriter.run.shapes import resolve_static

log = logging.getLogger(__name__)


# find_attention's reasons that better shape inference may lift (rewriter.run.shapes.resolve_static)
_SHAPE_PROBLEMS = (SHAPES_UNKNOWN, "Q, K, V are not [B, H, N, Dh]")


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
        mask: Literal["band", "window2d", "joint", "auto"] = "band"  # sparse mask (auto: from the layout)
        grid: str = ""  # window2d token grid "HxW" (default: the layout's, else square)
        layout: str = ""  # token layout "T+FxHxW" (text first; default: read from the patch embedding)
        frames_window: int = -1  # joint: frames each side a video token also sees (-1: every frame)
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

    def _mask(self, view: GraphView, s: AttentionSite) -> tuple[MaskSpec, str]:
        """The site's mask and, for ``mask=auto`` / a layout, what was chosen and why."""
        o, n = self.options, s.tokens
        if o.mask == "band":
            return MaskSpec.band(n, o.density), ""
        lay, source = None, ""
        if o.layout:
            lay, source = TokenLayout.parse(o.layout), "layout option"
        elif o.mask in ("joint", "auto") or (o.mask == "window2d" and not o.grid):
            lay, source = layout_from_patch_embed(view, s)
        if lay is not None and lay.n != n:
            if o.layout:
                raise ValueError(f"layout={o.layout} holds {lay.n} tokens, the site has {n}")
            lay = None  # the patch embedding does not describe this site's tokens
        joint = lay is not None and (lay.text > 0 or lay.frames > 1)
        if o.mask == "joint" or (o.mask == "auto" and joint):
            if lay is None:
                raise ValueError("mask=joint needs the token layout: give layout=T+FxHxW "
                                 "(no patch embedding of this site's tokens was found)")
            spec = MaskSpec.joint(lay, o.density, o.frames_window)
            why = f"layout {lay.describe()} from the {source}"
            return spec, (f"mask=auto chose joint ({why}: text tokens or frames)" if o.mask == "auto" else why)
        grid = None
        if o.grid:
            try:
                gh, gw = (int(x) for x in o.grid.lower().split("x"))
            except ValueError:
                raise ValueError(f"grid={o.grid!r}: expected HxW") from None
            grid = (gh, gw)
        elif lay is not None and not joint:
            grid = (lay.grid_h, lay.grid_w)
        if o.mask == "auto":
            if grid is None:
                return MaskSpec.band(n, o.density), "mask=auto chose band (no token layout found)"
            return (MaskSpec.window2d(n, o.density, grid),
                    f"mask=auto chose window2d (image grid {grid[0]}x{grid[1]} from the {source or 'grid option'})")
        return MaskSpec.window2d(n, o.density, grid), (f"grid from the {source}" if grid and lay is not None
                                                         and not o.grid else "")

    def match(self, view: GraphView) -> list[Site]:
        sites: list[Site] = []
        problem = self._problem()
        found = find_attention(view)
        shape_note = ""
        if isinstance(view, OnnxView) and any(p in s.reason for s in found for p in _SHAPE_PROBLEMS):
            if resolve_static(view):  # static inputs: infer the inner shapes onnx's inference left open
                found = find_attention(view)
            shape_note = _shape_note(view)
        for s in found:
            if shape_note and SHAPES_UNKNOWN in s.reason:
                s.reason += shape_note
            if s.reason and not (self.options.cross and not s.self_attention and s.tokens
                                 and view.shape(s.v) and s.reason.startswith(f"{s.name}: cross-attention (keys are")):
                sites.append(Site(s.name, False, s.reason))
                continue
            s.reason = ""
            why = problem or lowering_problem(view, s)
            layout, chose = None, ""
            if not why:
                try:
                    spec, chose = self._mask(view, s)
                    layout = BlockLayout(spec, self.options.block or auto_block(spec))
                except ValueError as err:
                    why = f"{s.name}: {err}"
            if why:
                sites.append(Site(s.name, False, why))
                continue
            note = f"{describe(s)}; {layout.spec.describe()}, block {layout.block} ({layout.width} keys per query block)"
            if chose:
                note += f"; {chose}"
            note += f"; token density {100 * layout.spec.density():.3g} %, {layout.describe()}"
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


def layout_from_patch_embed(view: GraphView, s: AttentionSite) -> tuple[TokenLayout | None, str]:
    """The token layout of site ``s`` read from a patch embedding (module doc), with where
    it came from; ``(None, "")`` when no convolution tiles its input into this site's tokens."""
    qs = view.shape(s.q)
    batch = qs[0] if qs and isinstance(qs[0], int) else None
    for node in view.nodes():
        if node.op != "conv" or not node.inputs:
            continue
        src, out = view.shape(node.inputs[0]), view.shape(node.output)
        if not src or not out or len(src) != 4 or len(out) != 4 or not all(isinstance(d, int) for d in (*src, *out)):
            continue
        try:
            w = view.conv(node).weight
        except Declined:  # a conv the view cannot read (non-constant weight) is not a patch embedding
            continue
        kh, kw = w.shape[2:4]
        h, gw = out[2], out[3]
        if src[2] != h * kh or src[3] != gw * kw or (kh, kw) == (1, 1):
            continue
        frames = out[0] // batch if batch and out[0] % batch == 0 else 1
        text = s.tokens - frames * h * gw
        if text >= 0:
            return TokenLayout(text, frames, h, gw), f"patch embedding {node.name} ({kh}x{kw} patches)"
    return None, ""


def _shape_note(view: OnnxView) -> str:
    """What was tried for a site whose shapes inference left open (a limit of the tool's
    shape inference, not of the file): the input sizes that would fix them."""
    symbolic = [v.name for v in view.graph.inputs if not v.is_initializer()
                and (v.shape is None or not all(isinstance(d, int) for d in v.shape))]
    if view.shape_hints and not symbolic:
        return "; symbolic shape inference from the static input shapes did not fix them either"
    if view.shape_hints:
        return "; symbolic shape inference from the given input shapes did not fix them either"
    if symbolic:
        return (f"; the inputs {', '.join(symbolic[:3])} have symbolic dims: give their sizes "
                "(--shape NAME=D0,D1,..., or rewrite(shapes=...)) to infer the inner shapes from them")
    return "; symbolic shape inference from the static input shapes failed"


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
