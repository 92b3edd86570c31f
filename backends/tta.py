"""Torch side of test-time BatchNorm: the ``rewriter::alpha_batch_norm`` op, the UnMix-TNS
state module, and float64 references of both formulas (the tests' ground truth).

Notation (per channel ``c``; statistics of a tensor ``x`` of rank ``r >= 3`` are over the
batch and spatial axes ``(0, 2, ..., r - 1)``, of a rank-2 ``[N, C]`` tensor over axis 0;
variances are biased, as BatchNorm's normalization uses them)::

    alpha-BN    mu  = a mu_s + (1 - a) mu_b
                var = a var_s + (1 - a) var_b + form * a (1 - a) (mu_s - mu_b)^2
                y   = (x - mu) * gamma / sqrt(var + eps) + beta

``form = 0`` mixes the variances; ``form = 1`` is the variance of the two-component mixture,
``a (var_s + (mu_s - mu)^2) + (1 - a)(var_b + (mu_b - mu)^2)``, which simplifies to the line
above because ``mu_s - mu = (1 - a)(mu_s - mu_b)`` and ``mu_b - mu = a (mu_b - mu_s)``.
``a = 1`` is the frozen BatchNorm, ``a = 0`` test-time BatchNorm (batch statistics).

UnMix-TNS (``unmix_reference``; the derivation is in ``passes/unmixtns.py``): K components
``(m_k, v_k)`` per layer, instance statistics ``(mu_i, var_i)`` over the spatial axes,
soft assignment ``w_ik = softmax_k(-d_ik / tau)`` with
``d_ik = mean_c (mu_ic - m_kc)^2 / (var_s_c + eps)``, the update
``m_k += (rho / N) sum_i w_ik (mu_i - m_k)`` and the same for the raw second moment
``s_k = v_k + m_k^2`` towards ``var_i + mu_i^2``, then each instance normalized with the
mixture of the updated components, ``mu~_i = sum_k w_ik m_k``,
``var~_i = sum_k w_ik s_k - mu~_i^2``.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

# -- the alpha-BN op ---------------------------------------------------------------------------
_LIB = torch.library.Library("rewriter", "FRAGMENT")
_LIB.define("alpha_batch_norm(Tensor x, Tensor weight, Tensor bias, Tensor mean, Tensor var, Tensor alpha, "
            "Tensor eps, Tensor? extra_bias, int form) -> Tensor")


def _stat_axes(rank: int) -> list[int]:
    return [0] if rank == 2 else [0, *range(2, rank)]


def _per_channel(t: torch.Tensor, rank: int) -> torch.Tensor:
    return t.reshape(1, -1, *([1] * (rank - 2)))


def alpha_batch_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, mean: torch.Tensor,
                     var: torch.Tensor, alpha: torch.Tensor, eps: torch.Tensor, extra_bias: torch.Tensor | None = None,
                     form: int = 1) -> torch.Tensor:
    """alpha-BN in plain torch ops (float32 statistics for lower-precision inputs)."""
    r = x.dim()
    xf = x.float() if x.dtype in (torch.float16, torch.bfloat16) else x
    axes = _stat_axes(r)
    mu_b = xf.mean(dim=axes, keepdim=True)
    var_b = (xf - mu_b).square().mean(dim=axes, keepdim=True)
    a = alpha.to(xf.dtype).reshape(())
    mu_s, var_s = _per_channel(mean.to(xf.dtype), r), _per_channel(var.to(xf.dtype), r)
    mu = a * mu_s + (1 - a) * mu_b
    v = a * var_s + (1 - a) * var_b
    if form:
        v = v + a * (1 - a) * (mu_s - mu_b).square()
    k = _per_channel(weight.to(xf.dtype), r) / torch.sqrt(v + eps.to(xf.dtype).reshape(()))
    y = (xf - mu) * k + _per_channel(bias.to(xf.dtype), r)
    if extra_bias is not None:
        y = y + _per_channel(extra_bias.to(xf.dtype), r)
    return y.to(x.dtype)


# CompositeImplicitAutograd: one node in the graph, decomposed (and differentiable) when run
_LIB.impl("alpha_batch_norm", alpha_batch_norm, "CompositeImplicitAutograd")


def alpha_batch_norm_op():
    """``torch.ops.rewriter.alpha_batch_norm.default``."""
    return torch.ops.rewriter.alpha_batch_norm.default


def alpha_reference(x: np.ndarray, gamma, beta, mean, var, alpha: float, eps: float, form: int = 1) -> np.ndarray:
    """alpha-BN in float64 numpy, straight from the formula."""
    x = np.asarray(x, dtype=np.float64)
    r = x.ndim
    axes = tuple(_stat_axes(r))
    shape = (1, -1) + (1,) * (r - 2)
    g, b, ms, vs = (np.asarray(t, dtype=np.float64).reshape(shape) for t in (gamma, beta, mean, var))
    mb = x.mean(axis=axes, keepdims=True)
    vb = ((x - mb) ** 2).mean(axis=axes, keepdims=True)
    mu = alpha * ms + (1 - alpha) * mb
    if form:
        v = alpha * (vs + (ms - mu) ** 2) + (1 - alpha) * (vb + (mb - mu) ** 2)  # variance of the mixture
    else:
        v = alpha * vs + (1 - alpha) * vb
    return (x - mu) / np.sqrt(v + eps) * g + b


# -- UnMix-TNS ---------------------------------------------------------------------------------
def init_components(mean: np.ndarray, var: np.ndarray, k: int, spread: float) -> tuple[np.ndarray, np.ndarray]:
    """``K`` components ``[K, C]``: means ``mu_s + spread * z_k * sqrt(var_s)`` with ``z_k``
    evenly spaced in ``[-1, 1]`` (0 for ``K = 1``), variances ``var_s``."""
    z = np.linspace(-1.0, 1.0, k) if k > 1 else np.zeros(1)
    m = np.asarray(mean, np.float64)[None, :] + spread * z[:, None] * np.sqrt(np.asarray(var, np.float64))[None, :]
    return m, np.broadcast_to(np.asarray(var, np.float64), m.shape).copy()


def unmix_step(x: torch.Tensor, comp_mean: torch.Tensor, comp_var: torch.Tensor, src_var: torch.Tensor,
               weight: torch.Tensor, bias: torch.Tensor, eps: float, tau: float, rho: float
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One UnMix-TNS call: ``(y, new_comp_mean, new_comp_var)`` (works in any float dtype;
    float64 inputs give the reference)."""
    r = x.dim()
    n, c = x.shape[0], x.shape[1]
    dt = torch.float64 if x.dtype == torch.float64 else torch.float32
    xf = x.to(dt)
    sp = list(range(2, r))
    mu_i = xf.mean(dim=sp).reshape(n, c)  # [N, C]
    sq_i = xf.square().mean(dim=sp).reshape(n, c)  # [N, C] raw second moment
    m, v, vs = comp_mean.to(dt), comp_var.to(dt), src_var.to(dt)
    d = ((mu_i[:, None, :] - m[None]) ** 2 / (vs + eps)[None, None, :]).mean(-1)  # [N, K]
    w = torch.softmax(-d / tau, dim=1)  # [N, K]
    s = v + m * m
    m_new = m + (rho / n) * (w.T @ mu_i - w.sum(0)[:, None] * m)
    s_new = s + (rho / n) * (w.T @ sq_i - w.sum(0)[:, None] * s)
    v_new = torch.clamp(s_new - m_new * m_new, min=0.0)
    mu_t = w @ m_new  # [N, C]
    var_t = torch.clamp(w @ (v_new + m_new * m_new) - mu_t * mu_t, min=0.0)
    shape = (n, c) + (1,) * (r - 2)
    k = weight.to(dt).reshape(1, c) / torch.sqrt(var_t + eps)
    y = (xf - mu_t.reshape(shape)) * k.reshape(shape) + bias.to(dt).reshape((1, c) + (1,) * (r - 2))
    return y.to(x.dtype), m_new.to(comp_mean.dtype), v_new.to(comp_var.dtype)


class UnmixTnsState(nn.Module):
    """The UnMix-TNS components of every rewritten BatchNorm, as buffers, and the calls.

    ``forward(x, site=i)`` normalizes ``x`` and updates site ``i``'s components in place
    (no gradient flows into the state). ``reset()`` restores the initial components."""

    def __init__(self) -> None:
        super().__init__()
        self.sites: list[dict] = []

    def add_site(self, name: str, weight, bias, mean, var, eps: float, k: int, spread: float, tau: float,
                 rho: float, dtype: torch.dtype = torch.float32) -> int:
        i = len(self.sites)
        m0, v0 = init_components(mean, var, k, spread)
        for key, arr in (("weight", weight), ("bias", bias), ("src_var", var), ("init_mean", m0), ("init_var", v0),
                         ("mean", m0), ("var", v0)):
            self.register_buffer(f"s{i}_{key}", torch.as_tensor(np.asarray(arr, np.float64), dtype=dtype).clone())
        self.sites.append({"name": name, "eps": float(eps), "tau": float(tau), "rho": float(rho), "k": int(k)})
        return i

    def reset(self) -> None:
        with torch.no_grad():
            for i in range(len(self.sites)):
                getattr(self, f"s{i}_mean").copy_(getattr(self, f"s{i}_init_mean"))
                getattr(self, f"s{i}_var").copy_(getattr(self, f"s{i}_init_var"))

    def components(self, site: int) -> tuple[torch.Tensor, torch.Tensor]:
        return getattr(self, f"s{site}_mean"), getattr(self, f"s{site}_var")

    def forward(self, x: torch.Tensor, site: int = 0) -> torch.Tensor:
        cfg = self.sites[site]
        m, v = self.components(site)
        y, m_new, v_new = unmix_step(x, m.detach(), v.detach(), getattr(self, f"s{site}_src_var"),
                                     getattr(self, f"s{site}_weight"), getattr(self, f"s{site}_bias"),
                                     cfg["eps"], cfg["tau"], cfg["rho"])
        with torch.no_grad():
            m.copy_(m_new)
            v.copy_(v_new)
        return y


MODULE_NAME = "unmixtns"


def state_module(gm: nn.Module) -> UnmixTnsState:
    """The ``UnmixTnsState`` of a rewritten GraphModule (``KeyError`` when it has none)."""
    st = getattr(gm, MODULE_NAME, None)
    if not isinstance(st, UnmixTnsState):
        raise KeyError("the module has no UnMix-TNS state (not rewritten by unmixtns)")
    return st
