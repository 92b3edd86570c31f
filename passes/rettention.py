"""``rettention``: dense self-attention -> Re-ttention sparse attention for diffusion
transformers (Re-ttention, NeurIPS 2025; ``shared/reference/rettention.md``).

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
from typing import Any, Literal

import numpy as np

from backends.rettention_spec import BlockLayout, MaskSpec, Schedule, auto_block
from rewriter.canon.attention import SHAPES_UNKNOWN, AttentionSite, describe, find_attention
from rewriter.ir.fx_view import FxView
from rewriter.ir.onnx_view import PROVENANCE_PASS, PROVENANCE_REPLACED, OnnxView
from rewriter.ir.view import GraphView
from rewriter.pass_api import Kind, Pass, Site, register

log = logging.getLogger(__name__)


# find_attention's reasons that better shape inference may lift (rewriter.shapes.resolve_static)
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
        shape_note = ""
        if isinstance(view, OnnxView) and any(p in s.reason for s in found for p in _SHAPE_PROBLEMS):
            from rewriter.shapes import resolve_static

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
            why = problem or self._ir_problem(view, s)
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

    def _ir_problem(self, view: GraphView, s: AttentionSite) -> str:
        if isinstance(view, OnnxView):
            import onnx_ir as ir

            from backends.ort.rettention import MIN_OPSET

            if view.opset < MIN_OPSET:
                return (f"{s.name}: the model's opset {view.opset} is below {MIN_OPSET} (the function body "
                        f"needs {MIN_OPSET}: convert it with onnx.version_converter)")
            if s.dtype not in (ir.DataType.FLOAT, ir.DataType.FLOAT16, ir.DataType.BFLOAT16):
                return f"{s.name}: attention in {s.dtype} (float32/16 and bfloat16 only)"
        else:
            import torch

            if s.dtype is not None and not torch.is_floating_point(torch.empty((), dtype=s.dtype)):
                return f"{s.name}: attention in {s.dtype}"
        return ""

    # -- apply -------------------------------------------------------------------------
    def schedule(self) -> Schedule:
        o = self.options
        return Schedule(o.warmup, o.period, o.lam)

    def apply(self, view: GraphView, sites: list[Site]) -> None:
        for site in sites:
            plan: _Plan = site.plan
            if isinstance(view, OnnxView):
                _apply_onnx(view, plan, self.schedule())
            else:
                _apply_fx(view, plan, self.schedule())
        view.invalidate()

    def error_budget(self) -> float | None:
        return self.options.budget


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
    from ``--shape`` / ``--inputs`` (``rewriter.shapes``); empty when the file states them."""
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


# -- ONNX ------------------------------------------------------------------------------------
def _state_value(view: OnnxView, name: str, dims: list, default_shape: list[int], dtype) -> Any:
    import onnx_ir as ir

    v = ir.Value(name=name, type=ir.TensorType(dtype), shape=ir.Shape(dims))
    v.const_value = ir.tensor(np.zeros(default_shape, dtype=dtype.numpy()), name=name)
    view.graph.inputs.append(v)
    view.graph.register_initializer(v)
    return v


def _apply_onnx(view: OnnxView, plan: _Plan, schedule: Schedule) -> None:
    import onnx_ir as ir

    from backends.ort import rettention as ort_rt

    s, g = plan.site, view.graph
    inputs = {v.name: v for v in g.inputs}
    index = ort_rt.protocol_sites(list(inputs))
    step = inputs.get(ort_rt.STEP_INPUT)
    if step is None:
        step = _state_value(view, ort_rt.STEP_INPUT, [], [], ir.DataType.INT64)
    h, n, d = s.heads, s.tokens, s.head_dim
    batch = "rettention_batch"
    rho_in, res_in, rho_out, res_out = ort_rt.state_names(index)
    rho = _state_value(view, rho_in, [batch, h, n], [0, h, n], ir.DataType.FLOAT)
    res = _state_value(view, res_in, [batch, h, n, d], [0, h, n, d], ir.DataType.FLOAT)
    cfg = ort_rt.FunctionConfig(plan.layout, d, float(s.scale), schedule, s.dtype)
    fname = ort_rt.ensure_function(view.model, cfg)
    anchor = s.raw[-1]
    new_nodes = []
    k = s.k
    if s.k_transposed:
        tr = ir.Node("", "Transpose", [k], [ir.AttrInt64s("perm", [0, 1, 3, 2])], name=f"{s.name}_rettention_k")
        tr.outputs[0].name = f"{s.name}_rettention_k"
        tr.outputs[0].dtype = k.dtype
        new_nodes.append(tr)
        k = tr.outputs[0]
    call = ir.Node(ort_rt.DOMAIN, fname, [s.q, k, s.v, step, rho, res], num_outputs=3, name=f"{s.name}_rettention")
    o, ro, rr = call.outputs
    o.name = f"{s.name}_rettention_out"
    o.type, o.shape = s.out.type, s.out.shape
    ro.name, ro.type, ro.shape = rho_out, ir.TensorType(ir.DataType.FLOAT), ir.Shape([batch, h, n])
    rr.name, rr.type, rr.shape = res_out, ir.TensorType(ir.DataType.FLOAT), ir.Shape([batch, h, n, d])
    new_nodes.append(call)
    g.insert_before(anchor, new_nodes)
    view._replace_uses(s.out, o)
    g.remove(list(s.raw), safe=True)
    g.outputs.extend([ro, rr])
    replaced = ",".join(r.name or r.op_type for r in s.raw)
    for nd in new_nodes:
        nd.metadata_props[PROVENANCE_PASS] = "rettention"
        nd.metadata_props[PROVENANCE_REPLACED] = replaced
    log.debug("rettention: %s -> %s (site %d)", s.name, fname, index)


# -- FX --------------------------------------------------------------------------------------
def _apply_fx(view: FxView, plan: _Plan, schedule: Schedule) -> None:
    import torch

    from passes.rettention_runtime import MODULE_NAME, RettentionState, SiteConfig

    s, gm, g = plan.site, view.gm, view.graph
    state = getattr(gm, MODULE_NAME, None)
    if not isinstance(state, RettentionState):
        state = RettentionState()
        gm.add_module(MODULE_NAME, state)
    index = state.add_site(SiteConfig(s.name, plan.layout, float(s.scale), schedule,
                                      heads=int(s.heads or 0), head_dim=int(s.head_dim or 0)))
    anchor = s.out
    with g.inserting_before(anchor):
        k = s.k
        if s.k_transposed:
            k = g.call_function(torch.ops.aten.transpose.int, (k, -2, -1))
            kv = s.k.meta.get("val") if hasattr(s.k, "meta") else None
            if kv is not None:
                k.meta["val"] = kv.transpose(-2, -1)
        node = g.call_module(MODULE_NAME, (s.q, k, s.v), {"site": index})
    if "val" in anchor.meta:
        node.meta["val"] = anchor.meta["val"]
    replaced = [r.name for r in s.raw]
    node.meta["rewriter"] = {"pass": "rettention", "replaced": replaced}
    if k is not s.k:
        k.meta["rewriter"] = {"pass": "rettention", "replaced": replaced}
    anchor.replace_all_uses_with(node)
    for r in reversed(s.raw):
        if not r.users:
            g.erase_node(r)
    log.debug("rettention: %s -> site %d", s.name, index)


# -- checking the sparse steps -----------------------------------------------------------------
def check_steps(view: GraphView, feeds: dict[str, np.ndarray], steps: int, *, request: Any = 0) -> list[dict]:
    """Run a rewritten model for ``steps`` denoising steps on the same ``feeds`` and compare
    every site's output with the formula (float64) from the Q, K, V that site received and
    the state it carried. Returns one record per step: ``{step, phase, max_rel_error}``."""
    import torch

    from backends.triton import rettention as kern

    records = []
    captured = _capture_sites(view, feeds, steps, request)
    for t, phase, per_site in captured:
        worst = 0.0
        for cfg, q, k, v, rho, res, out, new_rho, new_res in per_site:
            spec, scale = cfg["layout"].spec, cfg["scale"]
            q, k, v = (torch.as_tensor(x) for x in (q, k, v))
            if phase == "dense":
                want = torch.softmax(scale * q.double() @ k.double().transpose(-1, -2), -1) @ v.double()
                extra = []
            elif phase == "refresh":
                want, w_rho, w_res = kern.reference_refresh(q, k, v, scale, spec)
                extra = [(w_rho, new_rho), (w_res, new_res)]
            else:
                _, kk = cfg["schedule"].phase(t)
                want = kern.reference_sparse(q, k, v, torch.as_tensor(rho), torch.as_tensor(res),
                                             cfg["schedule"].lam * kk, scale, spec)
                extra = []
            for a, b in [(want, out), *extra]:
                a = a.numpy()
                err = float(np.abs(a - np.asarray(b, dtype=np.float64)).max() / max(np.abs(a).max(), 1e-30))
                worst = max(worst, err)
        records.append({"step": t, "phase": phase, "max_rel_error": worst})
    return records


def _capture_sites(view: GraphView, feeds, steps: int, request):
    """Per step: ``(t, phase, [(cfg, q, k, v, rho_in, res_in, out, rho_out, res_out) per site])``."""
    from backends.rettention_spec import PHASES

    out = []
    if isinstance(view, FxView):
        import torch

        from passes.rettention_runtime import state_module

        gm = view.gm
        st = state_module(gm)
        st.reset(request)
        records: list = []
        original = st.forward

        def spy(q, k, v, site=0):
            key = (site, st.request)
            before = st._state.get(key)
            o = original(q, k, v, site=site)
            after = st._state.get(key, (None, None))
            cfg = st.sites[site]
            records.append(({"layout": cfg.layout, "scale": cfg.scale, "schedule": cfg.schedule},
                            q.detach().numpy(), k.detach().numpy(), v.detach().numpy(),
                            None if before is None else before[0].numpy(), None if before is None else before[1].numpy(),
                            o.detach().numpy(), None if after[0] is None else after[0].numpy(),
                            None if after[1] is None else after[1].numpy()))
            return o

        st.forward = spy
        try:
            names = [n.name for n in gm.graph.nodes if n.op == "placeholder"]
            args = [torch.from_numpy(np.ascontiguousarray(feeds[n])) for n in names]
            for t in range(steps):
                records.clear()
                st.set_step(t, request)
                with torch.no_grad():
                    gm(*args)
                phase, _ = st.sites[0].schedule.phase(t) if st.sites else (0, -1)
                out.append((t, PHASES[phase], list(records)))
        finally:
            del st.forward
        return out
    return _capture_onnx(view, feeds, steps)


def _capture_onnx(view: OnnxView, feeds, steps: int):
    """Expose every call's Q, K, V as extra outputs of a copy and drive the protocol."""
    from backends.ort import rettention as ort_rt
    from backends.rettention_spec import PHASES

    work = view.copy()
    calls = [n for n in work.graph.all_nodes() if n.domain == ort_rt.DOMAIN and n.op_type.startswith(ort_rt.NAME)]
    cfgs, extra = [], []
    for i, c in enumerate(calls):
        fn = work.model.functions[(c.domain, c.op_type, c.overload or "")]
        fc = ort_rt.FunctionConfig.from_json(fn.metadata_props[ort_rt.CONFIG_KEY])
        cfgs.append({"layout": fc.layout, "scale": fc.scale, "schedule": fc.schedule})
        for j, v in enumerate(c.inputs[:3]):
            if not v.is_graph_output():
                work.graph.outputs.append(v)
            extra.append(v.name)
        if not c.outputs[0].is_graph_output():
            work.graph.outputs.append(c.outputs[0])
        extra.append(c.outputs[0].name)
    runner = ort_rt.RettentionRunner(work.model, optimize=False)
    runner.outputs = list(dict.fromkeys(runner.outputs + extra))
    result = []
    schedule = cfgs[0]["schedule"] if cfgs else Schedule()
    for t in range(steps):
        state_in = {k: v.copy() for k, v in runner._state.get(0, {}).items()}
        values = runner(feeds, t)
        state_out = runner._state[0]
        per_site = []
        for i, c in enumerate(calls):
            q, k, v = (values[x.name] for x in c.inputs[:3])
            rho_in, res_in, _, _ = ort_rt.state_names(i)
            per_site.append((cfgs[i], q, k, v, state_in.get(rho_in), state_in.get(res_in), values[c.outputs[0].name],
                             state_out[rho_in], state_out[res_in]))
        result.append((t, PHASES[schedule.phase(t)[0]], per_site))
    return result
