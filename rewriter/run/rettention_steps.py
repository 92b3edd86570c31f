"""Checking Re-ttention's sparse schedule (layer 5, docs/architecture.md): a rewritten model
is run for a number of denoising steps and every site's output is compared with the
formula (float64) from the Q, K, V that site received and the state it carried
(``check_steps``). Verification proper runs the default, dense step; this covers the
refresh and sparse steps (docs/passes/rettention.md)."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from backends.ort import rettention as ort_rt
from backends.rettention_spec import PHASES, Schedule
from backends.triton import rettention as kern
from passes.rettention_runtime import state_module
from rewriter.ir.fx_view import FxView
from rewriter.ir.onnx_view import OnnxView
from rewriter.ir.view import GraphView


def check_steps(view: GraphView, feeds: dict[str, np.ndarray], steps: int, *, request: Any = 0) -> list[dict]:
    """Run a rewritten model for ``steps`` denoising steps on the same ``feeds`` and compare
    every site's output with the formula (float64) from the Q, K, V that site received and
    the state it carried. Returns one record per step: ``{step, phase, max_rel_error}``."""
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
    out = []
    if isinstance(view, FxView):
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
