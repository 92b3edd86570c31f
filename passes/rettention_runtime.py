"""Running a Re-ttention model: the stateful torch op of rewritten GraphModules and
sampling loops driven by an explicit denoising-step index, for both IRs.

FX. The pass replaces every attention site by ``call_module("rettention", (q, k, v),
{"site": s})``: one ``RettentionState`` module per GraphModule holding, per (site,
request), the ``rho [B, H, N]`` and ``R [B, H, N, Dh]`` (fp32) of the last refresh. The
caller drives it::

    gm.rettention.set_step(t, request=r)   # before the forward pass of denoising step t
    gm(x, t_embed)                          # dense / refresh / sparse by the schedule
    gm.rettention.reset(r)                  # forget a request (all with reset())

The step is never inferred by counting calls, so CFG halves batched into one call,
multi-evaluation samplers and interleaved requests stay correct. The default step 0 is a
dense (or refresh) step, whose output is exactly dense attention.

ONNX. ``backends.ort.rettention.RettentionRunner`` feeds ``rettention_step`` and the state
tensors (the protocol of ``backends/ort/rettention.py``).

``sample_euler(fn, x, steps)``: the rectified-flow Euler sampler of ``models_zoo.eval.sample``
with the step index passed to ``fn(x, t, step)``.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from backends.ort import rettention as ort_rt
from backends.rettention_spec import BlockLayout, DENSE, REFRESH, SPARSE, Schedule
from backends.triton import rettention as kern

log = logging.getLogger(__name__)

MODULE_NAME = "rettention"


@dataclasses.dataclass(frozen=True)
class SiteConfig:
    name: str
    layout: BlockLayout
    scale: float
    schedule: Schedule
    variant: str = "rettention"  # "rettention" | "naive" (no correction) | "residual" (rho not applied)
    heads: int = 0  # H and Dh of the site (the state shapes of a StepProgram)
    head_dim: int = 0


class RettentionState(nn.Module):
    """The stateful Re-ttention op of a rewritten GraphModule (see the module doc)."""

    def __init__(self) -> None:
        super().__init__()
        self.sites: list[SiteConfig] = []
        self.step = 0
        self.request: Any = 0
        self._state: dict[tuple[int, Any], tuple[torch.Tensor, torch.Tensor]] = {}
        self._functional: dict | None = None  # set by StepProgram for one call
        # What forward reads of the step: the phase of each site (a few values) and the
        # sparse step's coefficient lam * k as a tensor filled in place. Under torch.compile
        # Dynamo then guards on the phases only, so a sampling loop compiles one graph per
        # phase (dense, refresh, sparse), not one per step value.
        self._phases: tuple[int, ...] = ()
        self.register_buffer("_coef", torch.zeros(0), persistent=False)

    def add_site(self, cfg: SiteConfig) -> int:
        self.sites.append(cfg)
        self._coef = torch.zeros(len(self.sites), device=self._coef.device)
        self._sync_step()
        return len(self.sites) - 1

    def set_step(self, step: int, request: Any = 0) -> None:
        """Set the 0-based denoising step (and the request) of the next forward passes."""
        self.step = int(step)
        self.request = request
        self._sync_step()

    def _sync_step(self) -> None:
        phases, coefs = [], []
        for cfg in self.sites:
            phase, kk = cfg.schedule.phase(self.step)
            phases.append(phase)
            coefs.append(cfg.schedule.lam * kk if phase == SPARSE else 0.0)
        self._phases = tuple(phases)
        if coefs:
            with torch.no_grad():
                self._coef.copy_(torch.tensor(coefs, dtype=self._coef.dtype))

    def reset(self, request: Any = None) -> None:
        """Forget the state of ``request`` (every request when None)."""
        if request is None:
            self._state.clear()
        else:
            self._state = {k: v for k, v in self._state.items() if k[1] != request}

    def set_variant(self, variant: str) -> None:
        """Ablations of the sparse step: ``naive`` (softmax_M V), ``residual`` (O_M + R)."""
        self.sites = [dataclasses.replace(s, variant=variant) for s in self.sites]

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, site: int = 0) -> torch.Tensor:
        if self._functional is not None:
            return self._step_forward(q, k, v, site)
        cfg = self.sites[site]
        phase = self._phases[site]  # kept current by add_site and set_step
        if phase == DENSE:
            return F.scaled_dot_product_attention(q, k, v, scale=cfg.scale)
        key = (site, self.request)
        if phase == REFRESH:
            o, rho, res = kern.refresh(q, k, v, cfg.scale, cfg.layout)
            if cfg.variant == "residual":  # DiTFastAttn's residual: R = O_full - O_M
                o_m = kern.sparse(q, k, v, torch.ones_like(rho), torch.zeros_like(res), 0.0, cfg.scale, cfg.layout)
                res = o.float() - o_m.float()
            self._state[key] = (rho, res)
            return o
        state = self._state.get(key)
        if state is None or state[0].shape != q.shape[:3]:
            raise RuntimeError(
                f"rettention site {site} ({cfg.name}): a sparse step without a refresh step for "
                f"request {self.request!r} and this batch; drive every step in order from 0 (set_step) "
                "or reset()")
        rho, res = state
        if cfg.variant == "naive":
            rho, res = torch.ones_like(rho), torch.zeros_like(res)
        elif cfg.variant == "residual":
            rho = torch.ones_like(rho)
        else:  # rho + lam * k, the coefficient a tensor (see __init__)
            rho = rho + self._coef[site].to(rho.dtype)
        return kern.sparse(q, k, v, rho, res, 0.0, cfg.scale, cfg.layout)


    def _step_forward(self, q, k, v, site: int) -> torch.Tensor:
        """One site as a pure function of the step tensor and the state tensors
        (``StepProgram``): ``torch.cond`` picks dense / refresh / sparse, so a traced
        program (torch.export) holds every phase."""
        ctx = self._functional
        cfg = self.sites[site]
        sch, scale, layout = cfg.schedule, cfg.scale, cfg.layout
        rho, res = ctx["state"][site]
        step = ctx["step"]

        def dense(q, k, v, rho, res, step):
            return F.scaled_dot_product_attention(q, k, v, scale=scale).contiguous(), rho.clone(), res.clone()

        def refresh(q, k, v, rho, res, step):
            o, r, rr = kern.refresh(q, k, v, scale, layout)
            return o.contiguous(), r.contiguous(), rr.contiguous()

        def sparse(q, k, v, rho, res, step):
            kk = torch.remainder(step - sch.warmup, sch.period) - 1
            coef = (kk.to(torch.float32) * sch.lam).reshape(())
            o = kern.sparse(q, k, v, rho + coef, res, 0.0, scale, layout)
            return o.contiguous(), rho.clone(), res.clone()

        def not_dense(q, k, v, rho, res, step):
            first = torch.remainder(step - sch.warmup, sch.period) == 0
            return torch.cond(first, refresh, sparse, (q, k, v, rho, res, step))

        o, new_rho, new_res = torch.cond(step < sch.warmup, dense, not_dense, (q, k, v, rho, res, step))
        ctx["new"][site] = (new_rho, new_res)
        return o


class StepProgram(nn.Module):
    """A rewritten GraphModule as a pure function of an explicit denoising step, the
    protocol of the ONNX models (``backends/ort/rettention.py``)::

        outputs..., rho_0, R_0, rho_1, R_1, ... = prog(*inputs, step, rho_0, R_0, rho_1, R_1, ...)

    ``step``: 0-d int64; ``rho_s`` ``[B, H, N]`` and ``R_s`` ``[B, H, N, Dh]`` fp32 (zeros
    before the first refresh). Every phase is in the program (``torch.cond``), so a saved
    ``.pt2`` (``torch.export``) runs a whole sampling loop; ``StepDriver`` feeds it."""

    def __init__(self, gm: nn.Module, n_inputs: int) -> None:
        super().__init__()
        self.gm = gm
        self.n_inputs = n_inputs
        self.n_sites = len(state_module(gm).sites)

    def forward(self, *args):
        n = self.n_inputs
        inputs, step, flat = args[:n], args[n], args[n + 1:]
        st = state_module(self.gm)
        st._functional = {"step": step, "state": [(flat[2 * i], flat[2 * i + 1]) for i in range(self.n_sites)],
                          "new": {}}
        try:
            out = self.gm(*inputs)
            new = st._functional["new"]
        finally:
            st._functional = None
        outs = tuple(out) if isinstance(out, (tuple, list)) else (out,)
        return (*outs, *(t for i in range(self.n_sites) for t in new[i]))


def initial_state(gm: nn.Module, batch: int, device=None) -> list[torch.Tensor]:
    """Zero ``rho_s, R_s`` tensors for ``StepProgram`` (per site, in order)."""
    out = []
    for cfg in state_module(gm).sites:
        h_n_d = cfg_shape(cfg)
        out += [torch.zeros((batch, *h_n_d[:2]), device=device), torch.zeros((batch, *h_n_d), device=device)]
    return out


def cfg_shape(cfg: SiteConfig) -> tuple[int, int, int]:
    """``(H, N, Dh)`` of a site (recorded by the pass)."""
    if cfg.heads <= 0:
        raise ValueError(f"rettention site {cfg.name}: no recorded shape (rewrite again with this version)")
    return cfg.heads, cfg.layout.spec.n, cfg.head_dim


class StepDriver:
    """Drives a step program (``StepProgram`` or a loaded ``.pt2``'s ``module()``): keeps the
    state tensors between calls; ``fn(x, t, step)`` fits ``sample_euler``."""

    def __init__(self, program: Callable, n_outputs: int, state: list[torch.Tensor]) -> None:
        self.program, self.n_outputs, self.state = program, n_outputs, list(state)

    def __call__(self, *inputs, step: int):
        res = self.program(*inputs, torch.tensor(step, dtype=torch.int64), *self.state)
        outs, self.state = res[:self.n_outputs], list(res[self.n_outputs:])
        return outs[0] if self.n_outputs == 1 else outs

    def stepper(self) -> Callable:
        return lambda x, t, step: self(x, t, step=step)


def export_step_program(gm: nn.Module, example_inputs: tuple) -> Any:
    """``torch.export`` of ``StepProgram(gm)`` at the example inputs' shapes."""
    batch = int(example_inputs[0].shape[0])
    prog = StepProgram(gm, len(example_inputs))
    args = (*example_inputs, torch.tensor(0, dtype=torch.int64), *initial_state(gm, batch))
    return torch.export.export(prog, args)


def state_module(gm: nn.Module) -> RettentionState:
    """The ``RettentionState`` of a rewritten GraphModule."""
    mod = getattr(gm, MODULE_NAME, None)
    if not isinstance(mod, RettentionState):
        raise ValueError("the module has no rettention sites (run the rettention pass first)")
    return mod


@torch.no_grad()
def sample_euler(fn: Callable[[torch.Tensor, torch.Tensor, int], torch.Tensor], x: torch.Tensor,
                 steps: int) -> torch.Tensor:
    """Euler steps of ``dx/dt = fn(x, t, step)`` from ``t = 1`` to ``0`` (``models_zoo.eval.sample``)."""
    n = x.shape[0]
    ts = torch.linspace(1.0, 0.0, steps + 1)
    for i in range(steps):
        t = ts[i].expand(n).contiguous()
        x = x + (ts[i + 1] - ts[i]) * fn(x, t, i)
    return x


def torch_stepper(gm: nn.Module, request: Any = 0) -> Callable:
    """``fn(x, t, step)`` for ``sample_euler`` over a rewritten GraphModule."""
    st = state_module(gm)
    st.reset(request)

    def fn(x, t, step):
        st.set_step(step, request)
        return gm(x, t)

    return fn


def onnx_stepper(runner, input_names: tuple[str, str] = ("x", "t"), request: Any = 0, *,
                 variant: str = "rettention", schedule: Schedule | None = None) -> Callable:
    """``fn(x, t, step)`` for ``sample_euler`` over ``RettentionRunner`` (a DiT-like model
    with inputs ``(x, t)`` and one output).

    ``variant="naive"`` (needs the sites' ``schedule``, ``backends.ort.rettention.site_configs``):
    the plain band-masked attention ``softmax_M(S) V`` at sparse steps, without the
    correction, made from the same graph by feeding each sparse step ``rho = 1 - lam * k``
    (the step adds ``lam * k``) and ``R = 0`` in place of the carried state."""
    if variant not in ("rettention", "naive"):
        raise ValueError(f"unknown variant {variant!r} (rettention or naive)")
    if variant == "naive" and schedule is None:
        raise ValueError("the naive variant needs the sites' schedule")
    runner.reset(request)

    def fn(x, t, step):
        if variant == "naive":
            phase, kk = schedule.phase(step)
            if phase == SPARSE:
                state = runner._state.setdefault(request, {})
                for s in range(runner.sites):
                    rho_in, res_in, _, _ = ort_rt.state_names(s)
                    if rho_in in state:
                        state[rho_in] = np.full_like(state[rho_in], 1.0 - schedule.lam * kk)
                        state[res_in] = np.zeros_like(state[res_in])
        out = runner({input_names[0]: x.numpy(), input_names[1]: t.numpy()}, step, request=request)
        return torch.from_numpy(next(iter(out.values())))

    return fn
