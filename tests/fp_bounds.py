"""Tolerances of the kernel tests, derived from the arithmetic instead of from a run that passed.

Standard first-order rounding-error analysis (Higham, "Accuracy and Stability of Numerical
Algorithms", ch. 3): with unit roundoff ``u`` (float32: ``2^-24``), a sum or dot product of
``k`` terms computed in any order has ``|fl(sum) - sum| <= k * u * sum(|terms|)`` (``gamma_k``
to first order), whatever the blocking, the thread count or the SIMD width; an ``exp`` / ``log``
/ ``rsqrt`` of the libraries we use is good to 1 ulp (``2u`` relative, counted as 2u).

The bounds are worst cases over all summation orders, so they hold on every machine and under
any load, and they stay far below the size of a real bug (a wrong mask, a missing rescale or a
dropped block moves the result by 1e-2 or more; each test also checks that).
"""

from __future__ import annotations

import numpy as np

U32 = 2.0 ** -24  # float32 unit roundoff
U16 = 2.0 ** -11  # float16
UBF16 = 2.0 ** -8  # bfloat16


def dot_rel_bound(x, w, want, *, bias=None, extra_terms: int = 0, u: float = U32) -> float:
    """``max|fl(x @ w + b) - (x @ w + b)| / max|x @ w + b|`` <= ``(k + extra) u max(|x| @ |w| + |b|) / max|want|``.

    ``k`` = the reduction length; ``extra_terms`` counts further roundings of each output
    (a bias add: 1; building the weight in float32 by ``q`` additions: q).
    """
    k = np.shape(x)[-1]
    mag = np.abs(np.asarray(x, np.float64)) @ np.abs(np.asarray(w, np.float64))
    if bias is not None:
        mag = mag + np.abs(np.asarray(bias, np.float64))
    return (k + extra_terms) * u * float(mag.max()) / float(np.abs(want).max())


def _lse(s: np.ndarray) -> np.ndarray:
    m = s.max(-1, keepdims=True)
    return (m + np.log(np.exp(s - m).sum(-1, keepdims=True)))[..., 0]


def attention_bounds(q, k, v, scale: float, mask: np.ndarray, *, blocks: int = 1) -> dict[str, np.ndarray]:
    """Per-element absolute error bounds of a float32 masked/full softmax-attention and of
    Re-ttention's ``rho``, from the float64 values of the inputs.

    Per query row ``i`` over its key set ``J`` (``n_J`` keys), with ``S1 = scale * max_j
    sum_d |q_id k_jd|``:

    * scores ``s_ij = scale * q_i . k_j`` (``D`` products + the scale): ``e_s = (D + 1) u S1``
    * ``lse = m + log sum_J exp(s - m)``: ``e_lse = e_s + (n_J + 4 + |lse|) u`` (the sum,
      ``exp``, ``log``, the final add)
    * ``p_j = exp(s_j - lse)`` (or ``softmax``): relative ``e_p = e_s + e_lse + (|s - lse| + 2) u``;
      an online (blocked) softmax rescales the running sum and accumulator once per key block:
      ``+ 3 * blocks * u``
    * ``o = sum_J p_j v_j``: ``|do| <= (n_J u + e_p) * sum_J p_j |v_j|``
    * ``rho = exp(lse_M - lse)``: relative ``e_lse_M + e_lse + (|lse_M - lse| + 2) u``

    Returns float64 arrays: ``o_full, o_m, rho`` (reference values), ``pav_full, pav_m``
    (``sum_J p_j |v_j|``) and the bounds ``d_full, d_m, d_rho`` (absolute).
    """
    q, k, v = (np.asarray(t, np.float64) for t in (q, k, v))
    d = q.shape[-1]
    mag = scale * np.einsum("bhnd,bhmd->bhnm", np.abs(q), np.abs(k))
    s = scale * np.einsum("bhnd,bhmd->bhnm", q, k)
    u = U32
    out = {}
    for name, m in (("full", np.ones_like(mask, bool)), ("m", mask)):
        sm = np.where(m, s, -np.inf)
        nj = m.sum(-1)  # keys per row
        e_s = (d + 1) * u * np.where(m, mag, 0.0).max(-1)
        lse = _lse(sm)
        e_lse = e_s + (nj + 4 + np.abs(lse)) * u
        spread = np.where(m, np.abs(s - lse[..., None]), 0.0).max(-1)
        e_p = e_s + e_lse + (spread + 2 + 3 * blocks) * u
        p = np.where(m, np.exp(sm - lse[..., None]), 0.0)
        out[f"o_{name}"] = p @ v
        pav = p @ np.abs(v)
        out[f"pav_{name}"] = pav
        out[f"d_{name}"] = (nj * u + e_p)[..., None] * pav
        out[f"lse_{name}"], out[f"e_lse_{name}"] = lse, e_lse
    out["rho"] = np.exp(out["lse_m"] - out["lse_full"])
    e_rho = out["e_lse_m"] + out["e_lse_full"] + (np.abs(out["lse_m"] - out["lse_full"]) + 2) * u
    out["d_rho"] = e_rho * out["rho"]
    return out


def rel_tol(bound: np.ndarray, ref: np.ndarray) -> float:
    """A ``max|a - b| / max|a|`` tolerance from a per-element absolute bound."""
    return float(np.max(bound) / np.abs(ref).max())


def rms_norm_rel_bound(h, *, compressed: bool, u: float = U32) -> float:
    """Relative bound of a float32 (C)RMSNorm row ``y = h * rsqrt(ss / n' + eps) (* w)``.

    ``ss = sum h^2`` (``n`` terms: ``n u sum h^2``); CRMS adds ``(sum h)^2``, whose error is
    ``2 |sum h| * n u sum|h|`` (+ its own rounding). ``y`` takes half of ``ss``'s relative
    error (square root) plus 5 roundings (the divide, ``+ eps``, ``rsqrt`` (2u), ``* h``,
    ``* w``: 6u counted).
    """
    h = np.asarray(h, np.float64)
    n = h.shape[-1]
    sq = (h * h).sum(-1)
    ss, d_ss = sq.copy(), n * u * sq
    if compressed:
        s1, a1 = h.sum(-1), np.abs(h).sum(-1)
        ss = ss + s1 * s1
        d_ss = d_ss + 2 * np.abs(s1) * n * u * a1 + 2 * u * s1 * s1
    return float((0.5 * d_ss / ss).max() + 6 * u)


def window_refresh_bounds(q, k, v, scale: float, mask: np.ndarray) -> dict[str, np.ndarray]:
    """Absolute error bounds of the refresh computed from the full pass and one pass over the
    window scores (``backends.triton.rettention.window_refresh``, the ORT ``_window_refresh``)::

        rho = sum_M p_j,   R = O_full - sum_M p_j v_j,   p_j = exp(s_j - lse)  (torch), or
        rho = p_j* sum_M exp(s_j - s_j*),  R = O_full - p_j* sum_M exp(s_j - s_j*) v_j   (ORT)

    Each in-mask probability carries, relative: the score errors (``e_s`` for ``s_j`` and
    for the shift ``lse`` or ``s_j*``, plus ``p_j*``'s own: 3 ``e_s`` in all), the full
    LSE's ``e_lse``, the exps' arguments' rounding (``(|s - lse| + |s - s_j*| + 4) u``) and
    the products (``2 u``); the sums add ``n_M u``. ``R``: ``O_full``'s bound, the window
    product's ``(n_M u + e_p) sum_M p |v|`` and the subtraction's ``u |R| + u |O_full|``.
    Returns ``rho, r`` (float64 references) and ``d_rho, d_r``."""
    b = attention_bounds(q, k, v, scale, mask)
    q, k, v = (np.asarray(t, np.float64) for t in (q, k, v))
    d = q.shape[-1]
    u = U32
    s = scale * np.einsum("bhnd,bhmd->bhnm", q, k)
    mag = scale * np.einsum("bhnd,bhmd->bhnm", np.abs(q), np.abs(k))
    e_s = (d + 1) * u * mag.max(-1)
    nm = mask.sum(-1)
    sm = np.where(mask, s, -np.inf)
    smax = sm.max(-1, keepdims=True)
    spread = np.where(mask, np.abs(s - b["lse_full"][..., None]) + np.abs(s - smax), 0.0).max(-1)
    e_p = 3 * e_s + b["e_lse_full"] + (spread + 6) * u
    rho = b["rho"]
    r = b["o_full"] - rho[..., None] * b["o_m"]
    d_rho = (e_p + nm * u) * rho
    d_r = b["d_full"] + ((nm * u + e_p) * rho)[..., None] * b["pav_m"] + u * (np.abs(r) + np.abs(b["o_full"]))
    return {"rho": rho, "r": r, "d_rho": d_rho, "d_r": d_r, "o_full": b["o_full"], "d_full": b["d_full"],
            "o_m": b["o_m"]}
