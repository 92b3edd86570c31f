"""Shift-and-add weight quantizers (ShiftAddLLM's "Lat" format, DenseShift), the packed
format both backends read, and the exact bit allocation.

See ``docs/passes/shiftadd.md``. All math in float64.

BCQ with block scales (``quantize_bcq``)
    ``W ~ sum_{k<q} alpha_k (.) B_k``, ``B_k in {-1, +1}^{N x K}``; ``alpha_k`` is constant
    over a *block*: 8 consecutive input columns x a group of ``group_rows`` output rows
    (all rows by default), shape ``[q, ceil(K/8), ceil(N/G)]``. Each alpha is a signed sum
    of ``T`` powers of two, greedily: ``r_0 = alpha``, ``s_t = sign(r_{t-1})``,
    ``p_t`` the exponent of the power of two nearest to ``|r_{t-1}|`` (threshold
    ``1.5 * 2^p``, the linear-distance midpoint), ``r_t = r_{t-1} - s_t 2^{p_t}``. The signs
    are kept (the reference kernel drops them: alpha = 0.75 would run as 1.25).

    Fitting a block (``fit_bcq``, alternating refinement): greedy init ``b_k = sign(r)``,
    ``alpha_k = mean|r|``; then ``rounds`` x [least squares ``(B^T B) alpha = B^T w``;
    ``|alpha|`` sorted descending (signs moved into B); additive power-of-two rounding;
    ``B`` <- the exact nearest of the ``2^q`` levels ``sum_k +-alpha_k`` by binary search
    over the sorted levels]; the best iterate is kept.

    Output error compensation (GPTQ / OBS, ``compensate=True``) with the calibration
    Hessian ``H = X^T X / n + damp * mean(diag H) * I``, ``U = chol(H^-1)`` (upper): the
    8-column blocks are visited in activation order (summed ``diag H``, descending); at a
    block's start its alphas are fitted to the *compensated* weights; then per column ``i``
    ``q_i`` = nearest level, ``e = (w_i - q_i) / U_ii``, ``W[:, later] -= e U[i, later]``.

DenseShift (``quantize_denseshift``)
    Zero-free ``w = sigma_n * s * 2^e`` with ``s in {-1, +1}`` and ``e in [0, 2^(b-1) - 1]``
    (b bits = 1 sign bit + b-1 exponent bits); ``sigma_n`` is a per-row scale (a signed
    sum of ``T`` powers of two, grid-searched on the H-weighted row error). The code of
    ``|w|`` is ``e = clip(floor(log2(|w| / (1.5 sigma))) + 1, 0, E)``, which puts the rounding
    threshold at the MSE-optimal ``1.5 * 2^e``. The same GPTQ compensation applies.

Packed format (``Packed``)
    ``planes``: uint32 ``[q, ceil(K/32), N]``; bit ``t`` of word ``w`` of plane ``k`` holds
    column ``32 w + t`` of row ``n`` (BCQ: 1 means ``+1``; DenseShift: plane 0 is the sign,
    1 meaning ``+``, planes ``1..b-1`` the exponent bits, LSB first).
    ``exps`` / ``signs``: int8 ``[T, q, ceil(K/8), ceil(N/G)]`` (DenseShift:
    ``[T, 1, 1, N]``), ``alpha = sum_t signs_t * 2^exps_t`` with ``signs in {-1, 0, +1}``
    (0: no term) and ``exps in [-126, 127]`` (normal floats only; smaller terms are
    dropped). ``dense()`` is the reference ``sum_k alpha_k B_k``.

Bit allocation (``allocate_bits``)
    Each layer ``i`` is quantized at every candidate width ``b`` and scored by its output
    error on the calibration data ``C_{i,b} = tr(dW H dW^T)``; an exact dynamic program
    over the layers minimises ``sum_i C_{i,b_i}`` subject to
    ``sum_i b_i n_i <= B * sum_i n_i`` (``n_i``: weights of layer i).
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Callable, Sequence

import numpy as np
import torch

log = logging.getLogger(__name__)

Progress = Callable[[str], None]

BLOCK_COLS = 8  # input columns per scale block
WORD = 32  # bits per packed word
MIN_EXP, MAX_EXP = -126, 127  # normal float32 powers of two


# --------------------------------------------------------------------------- format


@dataclasses.dataclass
class Packed:
    """A quantized ``[N, K]`` weight in the deployable format (see the module docstring)."""

    mode: str  # "bcq" or "denseshift"
    n_out: int
    n_in: int
    planes: np.ndarray  # uint32 [q, ceil(K/32), N]
    exps: np.ndarray  # int8 [T, qa, Kb, Ng]
    signs: np.ndarray  # int8 [T, qa, Kb, Ng]
    group_rows: int  # rows per scale group (DenseShift: 1)
    row_scale: np.ndarray | None = None  # float32 [N] powers of two: W = diag(row_scale) sum_k alpha_k B_k
    block_cols: int = BLOCK_COLS  # input columns per scale block (BCQ)

    @property
    def bits(self) -> int:
        return int(self.planes.shape[0])

    @property
    def nbytes(self) -> int:
        """Bytes of the packed planes and scale terms (what the file stores)."""
        rows = 0 if self.row_scale is None else self.row_scale.size * 4
        return int(self.planes.nbytes + self.exps.nbytes + self.signs.nbytes + rows)

    @property
    def bits_per_weight(self) -> float:
        """All-in bits per weight: planes (with their K padding) and scale terms."""
        return 8.0 * self.nbytes / (self.n_out * self.n_in)

    def alpha(self) -> np.ndarray:
        """Scales ``sum_t s_t 2^{p_t}``, float64 ``[qa, Kb, Ng]``."""
        return (self.signs.astype(np.float64) * np.ldexp(1.0, self.exps.astype(np.int64))).sum(0)

    def bits_array(self) -> np.ndarray:
        """Unpacked bits, uint8 ``[q, K, N]``."""
        q, kw, n = self.planes.shape
        shifts = np.arange(WORD, dtype=np.uint32)[None, None, :, None]
        bits = (self.planes[:, :, None, :] >> shifts) & np.uint32(1)
        return bits.reshape(q, kw * WORD, n)[:, : self.n_in].astype(np.uint8)

    def dense(self) -> np.ndarray:
        """The reference weight ``[N, K]`` (float64), row scale included."""
        w = self._dense()
        return w if self.row_scale is None else w * self.row_scale.astype(np.float64)[:, None]

    def _dense(self) -> np.ndarray:
        bits = self.bits_array().astype(np.float64)  # [q, K, N]
        a = self.alpha()
        if self.mode == "bcq":
            full = np.repeat(np.repeat(a, self.block_cols, axis=1), self.group_rows, axis=2)
            full = full[:, : self.n_in, : self.n_out]  # [q, K, N]
            return ((2 * bits - 1) * full).sum(0).T
        sign = 2 * bits[0] - 1
        e = sum((2.0**j) * bits[j + 1] for j in range(self.bits - 1)) if self.bits > 1 else 0.0
        sigma = a.reshape(-1)[None, : self.n_out]
        return (sigma * sign * np.exp2(e)).T


def pack_bits(bits: np.ndarray) -> np.ndarray:
    """uint8 ``[q, K, N]`` (0/1) -> uint32 ``[q, ceil(K/32), N]``, column 32w+t in bit t."""
    q, k, n = bits.shape
    kw = -(-k // WORD)
    padded = np.zeros((q, kw * WORD, n), dtype=np.uint32)
    padded[:, :k] = bits
    padded = padded.reshape(q, kw, WORD, n)
    shifts = np.arange(WORD, dtype=np.uint32)[None, None, :, None]
    return np.bitwise_or.reduce(padded << shifts, axis=2).astype(np.uint32)


def apot(alpha: np.ndarray, terms: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Greedy additive power-of-two rounding with signs kept.

    Returns ``(value, exps int8 [T, ...], signs int8 [T, ...])`` with
    ``value = sum_t signs_t 2^exps_t``. Terms below ``2^-126`` are dropped (sign 0)."""
    r = np.asarray(alpha, dtype=np.float64).copy()
    exps = np.zeros((terms, *r.shape), dtype=np.int8)
    signs = np.zeros((terms, *r.shape), dtype=np.int8)
    value = np.zeros_like(r)
    for t in range(terms):
        mag = np.abs(r)
        ok = mag >= 2.0 ** (MIN_EXP - 0.5)
        with np.errstate(divide="ignore"):
            _, e2 = np.frexp(np.where(ok, mag, 1.0))  # mag = m * 2^e2, m in [0.5, 1)
        p = e2.astype(np.int64) - 1  # 2^p <= mag < 2^(p+1)
        p = np.where(mag >= 1.5 * np.ldexp(1.0, p), p + 1, p)  # nearest in linear distance
        p = np.clip(p, MIN_EXP, MAX_EXP)
        s = np.where(ok, np.sign(r), 0.0)
        term = s * np.ldexp(1.0, p)
        exps[t] = np.where(ok, p, 0)
        signs[t] = s
        value += term
        r = r - term
    return value, exps, signs


def apot_value(alpha: np.ndarray, terms: int) -> np.ndarray:
    return apot(alpha, terms)[0]


# --------------------------------------------------------------------------- BCQ core


def _sign(x: torch.Tensor) -> torch.Tensor:
    return torch.where(x >= 0, 1.0, -1.0).to(x.dtype)


def _levels(alpha: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """All ``2^q`` levels ``sum_k s_k alpha_k`` per group, sorted: ``(levels, codes)``.

    ``alpha`` ``[G, q]``; code bit k set means ``s_k = +1``."""
    q = alpha.shape[-1]
    codes = torch.arange(2**q)
    s = ((codes[:, None] >> torch.arange(q)) & 1).to(alpha.dtype) * 2 - 1  # [L, q]
    lv = alpha @ s.T  # [G, L]
    lv, order = lv.sort(dim=-1)
    return lv, codes[order]


def nearest_codes(values: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
    """Exact nearest level by binary search: ``values`` ``[G, m]``, ``alpha`` ``[G, q]`` ->
    codes ``[G, m]`` (int64; bit k set means ``B_k = +1``)."""
    lv, codes = _levels(alpha)
    mid = (lv[:, 1:] + lv[:, :-1]) / 2
    idx = torch.searchsorted(mid.contiguous(), values.contiguous())
    return codes.gather(1, idx)


def codes_to_signs(codes: torch.Tensor, q: int) -> torch.Tensor:
    """codes ``[..., m]`` -> signs ``[..., m, q]`` in {-1, +1} (float64)."""
    return ((codes[..., None] >> torch.arange(q)) & 1).to(torch.float64) * 2 - 1


def _apot_t(alpha: torch.Tensor, terms: int) -> torch.Tensor:
    return torch.from_numpy(apot_value(alpha.numpy(), terms))


def fit_bcq(values: torch.Tensor, q: int, terms: int, rounds: int,
            weights: torch.Tensor | None = None, outlier_init: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Alternating BCQ fit of each row of ``values`` ``[G, m]``: ``(alpha [G, q] >= 0,
    sorted descending, power-of-two sums; codes [G, m])``. ``weights`` (``[m]`` or
    ``[G, m]``, >= 0): the squared error of each value is weighted (the scales' least
    squares; the nearest level of a value does not depend on its weight).

    Two starts, the better kept per row: the greedy residual fit, and (``outlier_init``)
    one whose top level is the row's largest magnitude. Alternating refinement from the
    greedy start stays in the optimum that clips a lone large weight (real models' outlier
    weights) to a level fitted to the bulk; its error there can exceed that of all other
    values together, and the second start reaches the optimum that codes it."""
    v = values.to(torch.float64)
    g, m = v.shape
    wt = None if weights is None else weights.to(torch.float64).expand(g, m)
    r = v.clone()
    alpha = torch.zeros(g, q, dtype=torch.float64)
    for k in range(q):  # greedy init
        b = _sign(r)
        a = r.abs().mean(-1) if wt is None else (r.abs() * wt).sum(-1) / wt.sum(-1).clamp_min(1e-300)
        alpha[:, k] = a
        r = r - a[:, None] * b
    if outlier_init and q >= 2:
        # a_1 = a_2 = (top - t) / 2 and the greedy a_1..a_{q-2} (sum t) after them: the
        # top level sum(a) is the largest magnitude, the rest stay at the bulk's scale
        top = v.abs().amax(-1)
        rest = alpha[:, : q - 2]
        half = ((top - rest.sum(-1)) / 2).clamp_min(0.0)[:, None]
        alpha = torch.cat([alpha, torch.cat([half, half, rest], dim=1)])
        v = torch.cat([v, v])
        wt = None if wt is None else torch.cat([wt, wt])
    best_alpha, best_err = None, None
    eye = torch.eye(q, dtype=torch.float64)
    signs = None
    for it in range(rounds + 1):
        if it > 0:  # least squares for alpha given the signs
            sw = signs if wt is None else signs * wt[:, :, None]
            btb = sw.transpose(1, 2) @ signs
            btv = (sw.transpose(1, 2) @ v[:, :, None])[..., 0]
            scale = btb.diagonal(dim1=1, dim2=2).mean(-1).clamp_min(1.0)[:, None, None]
            alpha = torch.linalg.solve(btb + 1e-9 * scale * eye, btv)
        alpha = _apot_t(alpha.abs(), terms)  # the levels do not depend on the signs
        alpha = alpha.sort(dim=-1, descending=True).values
        codes = nearest_codes(v, alpha)
        signs = codes_to_signs(codes, q)
        err = ((signs @ alpha[:, :, None])[..., 0] - v).square()
        err = (err if wt is None else err * wt).sum(-1)
        if best_err is None:
            best_alpha, best_codes, best_err = alpha, codes, err
        else:
            better = err < best_err
            best_alpha = torch.where(better[:, None], alpha, best_alpha)
            best_codes = torch.where(better[:, None], codes, best_codes)
            best_err = torch.where(better, err, best_err)
            if not better.any():
                break
    if best_alpha.shape[0] > g:  # two starts: keep the better fit of each row
        pick = best_err[g:] < best_err[:g]
        best_alpha = torch.where(pick[:, None], best_alpha[g:], best_alpha[:g])
        best_codes = torch.where(pick[:, None], best_codes[g:], best_codes[:g])
    return best_alpha, best_codes


# --------------------------------------------------------------------------- Hessian


def hessian(x: np.ndarray) -> np.ndarray:
    """``H = X^T X / n`` of activations ``[..., K]`` (float64)."""
    x2 = np.asarray(x, dtype=np.float64).reshape(-1, x.shape[-1])
    return x2.T @ x2 / max(len(x2), 1)


def _prepare(w: np.ndarray, h: np.ndarray | None):
    """Float64 torch copies; dead inputs (diag H = 0) get H_ii = 1 and a zero weight column."""
    w = torch.tensor(w, dtype=torch.float64)
    k = w.shape[1]
    h = torch.eye(k, dtype=torch.float64) if h is None else torch.tensor(h, dtype=torch.float64).clone()
    dead = h.diagonal() == 0
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    return w, h


def _chol_inv_upper(h: torch.Tensor, damp: float) -> torch.Tensor:
    """Upper Cholesky factor of ``(H + damp * mean(diag H) I)^-1``."""
    k = h.shape[0]
    hd = h + damp * h.diagonal().mean() * torch.eye(k, dtype=h.dtype)
    for _ in range(6):
        try:
            lo = torch.linalg.cholesky(hd)
            hinv = torch.cholesky_inverse(lo)
            return torch.linalg.cholesky(hinv, upper=True)
        except RuntimeError:  # pragma: no cover - ill-conditioned H
            hd = hd + hd.diagonal().mean() * 0.1 * torch.eye(k, dtype=h.dtype)
    raise RuntimeError("the calibration Hessian is not positive definite")


def weighted_error(w: np.ndarray, q: np.ndarray, h: np.ndarray | None) -> float:
    """``tr((W - Q) H (W - Q)^T)`` (H = I when None): the output error on the calibration data."""
    d = np.asarray(w, np.float64) - np.asarray(q, np.float64)
    if h is None:
        return float((d * d).sum())
    return float(np.einsum("nk,kl,nl->", d, h, d))


# --------------------------------------------------------------------------- quantizers


def row_scales(w: np.ndarray) -> np.ndarray:
    """The power of two nearest (in log) to each row's RMS (1 for a zero row), float32 ``[N]``."""
    rms = np.sqrt(np.mean(np.square(np.asarray(w, np.float64)), axis=1))
    e = np.where(rms > 0, np.round(np.log2(np.where(rms > 0, rms, 1.0))), 0.0)
    return np.ldexp(np.float32(1.0), np.clip(e, MIN_EXP, MAX_EXP).astype(np.int32)).astype(np.float32)


def quantize_bcq(w: np.ndarray, h: np.ndarray | None = None, *, bits: int = 3, terms: int = 3,
                 group_rows: int = 128, rounds: int = 8, act_order: bool = True,
                 compensate: bool = True, damp: float = 0.01, row_scale: bool = False,
                 static_scales: bool = True, weighted_scales: bool = True, block_cols: int = BLOCK_COLS,
                 progress: Progress | None = None) -> Packed:
    """BCQ with ``block_cols``-column x row-group power-of-two-sum scales, GPTQ-compensated
    (see the module docstring). ``w`` ``[N, K]``, ``h`` ``[K, K]`` or None (identity).
    ``block_cols=64, group_rows=1`` is the layout ORT's ``MatMulNBits`` runs (one scale per
    row and 64-column block, ``backends/ort/shiftadd.py``).
    ``row_scale``: rows are first divided by a power of two near their RMS (kept in
    ``Packed.row_scale``), so that a block scale shared by rows of very different
    magnitude (real models' outlier channels) does not leave the small rows coarse."""
    if row_scale:
        rs = row_scales(w)
        p = quantize_bcq(np.asarray(w, np.float64) / rs[:, None], h, bits=bits, terms=terms,
                         group_rows=group_rows, rounds=rounds, act_order=act_order, compensate=compensate,
                         damp=damp, row_scale=False, static_scales=static_scales,
                         weighted_scales=weighted_scales, block_cols=block_cols, progress=progress)
        p.row_scale = rs
        return p
    n, k = w.shape
    q = int(bits)
    g = group_rows if 0 < group_rows < n else n
    bc = int(block_cols)
    ng, kb = -(-n // g), -(-k // bc)
    wt, ht = _prepare(w, h)
    blocks = [list(range(j * bc, min((j + 1) * bc, k))) for j in range(kb)]
    if act_order:
        diag = ht.diagonal()
        blocks = sorted(blocks, key=lambda cols: -float(diag[cols].sum()))
    perm = [c for cols in blocks for c in cols]
    wp = wt[:, perm].clone()
    w0p = wt[:, perm]
    u = _chol_inv_upper(ht[perm][:, perm], damp) if compensate else None
    pad = ng * g - n
    codes = torch.zeros(n, k, dtype=torch.int64)  # in permuted column order
    alpha_b = torch.zeros(kb, ng, q, dtype=torch.float64)  # per original block index
    pos = 0
    for bi, cols in enumerate(blocks):
        width = len(cols)
        # static scales: alphas fitted to the block's original weights, so compensation can
        # only move codes; fitted to the compensated weights, a block scale shared by many
        # rows follows the rows the compensation inflates and the loop can run away
        blk = (w0p if static_scales else wp)[:, pos : pos + width]
        grp = torch.cat([blk, blk.new_zeros(pad, width)]) if pad else blk
        grp = grp.reshape(ng, g, width)
        # weighted_scales: each column's squared error weighted by its input's mean square
        # (diag H), so a block holding an outlier input feature fits that column's levels
        cw = ht.diagonal()[perm[pos : pos + width]] if weighted_scales else None

        def fit(values: torch.Tensor, rows: int) -> torch.Tensor:  # groups of ``rows`` x width values
            return fit_bcq(values, q, terms, rounds, None if cw is None else cw.repeat(rows))[0]

        if pad:  # padded rows must not pull the fit: refit the last group on its real rows
            alpha = fit(grp[:-1].reshape(ng - 1, -1), g) if ng > 1 else None
            last = fit(blk[(ng - 1) * g :].reshape(1, -1), n - (ng - 1) * g)
            alpha = last if alpha is None else torch.cat([alpha, last])
        else:
            alpha = fit(grp.reshape(ng, -1), g)
        alpha_b[cols[0] // bc] = alpha
        lv, lcodes = _levels(alpha)
        mid = ((lv[:, 1:] + lv[:, :-1]) / 2).contiguous()
        errs = blk.new_zeros(n, width)
        for j in range(width):
            i = pos + j
            col = wp[:, i]
            cg = torch.cat([col, col.new_zeros(pad)]) if pad else col
            idx = torch.searchsorted(mid, cg.reshape(ng, g).contiguous())
            codes[:, i] = lcodes.gather(1, idx).reshape(-1)[:n]
            qv = lv.gather(1, idx).reshape(-1)[:n]
            if u is not None:
                errs[:, j] = (col - qv) / u[i, i]
                wp[:, i + 1 : pos + width] -= errs[:, j : j + 1] * u[i, i + 1 : pos + width][None, :]
        if u is not None and pos + width < k:  # lazy update of the columns after the block
            wp[:, pos + width :] -= errs @ u[pos : pos + width, pos + width :]
        pos += width
        if progress is not None and (bi + 1) % 16 == 0:
            progress(f"bcq: block {bi + 1}/{kb}")
    inv = torch.empty(k, dtype=torch.int64)
    inv[torch.tensor(perm)] = torch.arange(k)
    codes = codes[:, inv]  # original column order
    bits_arr = ((codes[None] >> torch.arange(q)[:, None, None]) & 1).numpy().astype(np.uint8)  # [q, N, K]
    alpha_np = alpha_b.permute(2, 0, 1).numpy()  # [q, Kb, Ng]
    _, exps, signs = apot(alpha_np, terms)
    return Packed("bcq", n, k, pack_bits(bits_arr.transpose(0, 2, 1)), exps, signs, g, block_cols=bc)


def quantize_denseshift(w: np.ndarray, h: np.ndarray | None = None, *, bits: int = 3, terms: int = 3,
                        act_order: bool = True, compensate: bool = True, damp: float = 0.01,
                        grid: int = 32, progress: Progress | None = None) -> Packed:
    """DenseShift: ``w = sigma_n * sign * 2^e``, no zero, per-row ``sigma`` (module docstring)."""
    n, k = w.shape
    if bits < 2:
        raise ValueError("DenseShift needs at least 2 bits (1 sign bit + exponent bits)")
    top = 2 ** (bits - 1) - 1
    wt, ht = _prepare(w, h)

    def code(x: torch.Tensor, sigma: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        ratio = x.abs() / (1.5 * sigma)
        e = torch.floor(torch.log2(ratio.clamp_min(1e-300))) + 1
        e = e.clamp(0, top)
        return e, sigma * _sign(x) * torch.exp2(e)

    # per-row scale: grid over sigma in (max|w| / 2^top) * 2^(-j/8), by H-weighted row error
    mx = wt.abs().amax(1).clamp_min(1e-30)
    best_sigma, best_err = None, None
    for j in range(grid):
        sigma = torch.from_numpy(apot_value((mx / 2.0**top * 2.0 ** (-j / 8)).numpy(), terms))
        sigma = torch.where(sigma > 0, sigma, mx)
        _, qv = code(wt, sigma[:, None])
        d = wt - qv
        err = ((d @ ht) * d).sum(1)
        if best_err is None:
            best_sigma, best_err = sigma, err
        else:
            better = err < best_err
            best_sigma, best_err = torch.where(better, sigma, best_sigma), torch.where(better, err, best_err)
    sigma = best_sigma
    perm = torch.argsort(ht.diagonal(), descending=True) if act_order else torch.arange(k)
    wp = wt[:, perm].clone()
    u = _chol_inv_upper(ht[perm][:, perm], damp) if compensate else None
    ecode = torch.zeros(n, k, dtype=torch.int64)
    sbit = torch.zeros(n, k, dtype=torch.int64)
    for i in range(k):
        col = wp[:, i]
        e, qv = code(col, sigma)
        ecode[:, i], sbit[:, i] = e.to(torch.int64), (col >= 0).to(torch.int64)
        if u is not None and i + 1 < k:
            err = (col - qv) / u[i, i]
            wp[:, i + 1 :] -= err[:, None] * u[i, i + 1 :][None, :]
        if progress is not None and (i + 1) % 128 == 0:
            progress(f"denseshift: column {i + 1}/{k}")
    inv = torch.argsort(perm)
    ecode, sbit = ecode[:, inv], sbit[:, inv]
    planes = [sbit] + [(ecode >> j) & 1 for j in range(bits - 1)]
    bits_arr = torch.stack(planes).numpy().astype(np.uint8)  # [b, N, K]
    _, exps, signs = apot(sigma.numpy().reshape(1, 1, n), terms)
    return Packed("denseshift", n, k, pack_bits(bits_arr.transpose(0, 2, 1)), exps, signs, 1)


def quantize(w: np.ndarray, h: np.ndarray | None = None, *, mode: str = "bcq", **kw) -> Packed:
    """``quantize_bcq`` or ``quantize_denseshift`` by ``mode``, on one torch thread (the
    work is many small ops, which extra threads only slow down)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        if mode == "bcq":
            return quantize_bcq(w, h, **kw)
        if mode == "denseshift":
            kw.pop("group_rows", None)
            kw.pop("rounds", None)
            kw.pop("row_scale", None)
            kw.pop("static_scales", None)
            kw.pop("weighted_scales", None)
            kw.pop("block_cols", None)
            return quantize_denseshift(w, h, **kw)
        raise ValueError(f"unknown shiftadd mode {mode!r}")
    finally:
        torch.set_num_threads(threads)


# --------------------------------------------------------------------------- baselines


def rtn(w: np.ndarray, bits: int, group: int = 128) -> np.ndarray:
    """Round-to-nearest uniform asymmetric quantization, per row and per ``group`` input
    columns (min/max range): the baseline. Returns the dequantized weight."""
    w = np.asarray(w, dtype=np.float64)
    n, k = w.shape
    out = np.empty_like(w)
    levels = 2**bits - 1
    for c0 in range(0, k, group):
        blk = w[:, c0 : c0 + group]
        lo, hi = blk.min(1, keepdims=True), blk.max(1, keepdims=True)
        scale = np.where(hi > lo, (hi - lo) / levels, 1.0)
        zero = np.round(-lo / scale)
        qv = np.clip(np.round(blk / scale) + zero, 0, levels)
        out[:, c0 : c0 + group] = (qv - zero) * scale
    return out


def rtn_bits(bits: int, group: int = 128, n_in: int | None = None) -> float:
    """Bits per weight of ``rtn`` / ``gptq_uniform`` all-in: the codes, one fp16 scale and
    one ``bits``-wide zero point per row and group of ``group`` input columns (GPTQ's
    packing; a last partial group costs a whole one)."""
    n_in = group if n_in is None else n_in
    return bits + -(-n_in // group) * (16 + bits) / n_in


def gptq_uniform(w: np.ndarray, h: np.ndarray | None, bits: int, group: int = 128,
                 damp: float = 0.01, block: int = 128) -> np.ndarray:
    """GPTQ with the ``rtn`` grid (per row, ``group`` input columns, asymmetric min/max,
    the group's range taken from the *compensated* weights at the group's first column),
    columns in natural order, lazy blocks of ``block``: the uniform baseline at the same
    bits/weight as ``rtn``. Returns the dequantized weight."""
    wt, ht = _prepare(w, h)
    n, k = wt.shape
    u = _chol_inv_upper(ht, damp)
    levels = 2**bits - 1
    q = torch.zeros_like(wt)
    scale = zero = None
    for b0 in range(0, k, block):
        b1 = min(b0 + block, k)
        errs = wt.new_zeros(n, b1 - b0)
        for i in range(b0, b1):
            if i % group == 0:
                g = wt[:, i : i + group]
                lo, hi = g.min(1).values.clamp(max=0), g.max(1).values.clamp(min=0)
                scale = torch.where(hi > lo, (hi - lo) / levels, torch.ones_like(hi))
                zero = torch.round(-lo / scale)
            col = wt[:, i]
            qv = (torch.clamp(torch.round(col / scale) + zero, 0, levels) - zero) * scale
            q[:, i] = qv
            e = (col - qv) / u[i, i]
            errs[:, i - b0] = e
            wt[:, i + 1 : b1] -= e[:, None] * u[i, i + 1 : b1][None, :]
        if b1 < k:
            wt[:, b1:] -= errs @ u[b0:b1, b1:]
    return q.numpy()


# --------------------------------------------------------------------------- bit allocation


def allocate_bits(errors: Sequence[dict[int, float]], sizes: Sequence[int], budget: float,
                  max_units: int = 200_000) -> list[int]:
    """Exact DP: choose ``b_i`` from ``errors[i]`` (width -> error) minimising
    ``sum errors[i][b_i]`` with ``sum b_i * sizes[i] <= budget * sum(sizes)``.

    Sizes are counted in units of their gcd (rounded up when that would exceed
    ``max_units`` states, which keeps the budget met)."""
    sizes = [int(s) for s in sizes]
    unit = 0
    for s in sizes:
        unit = math.gcd(unit, s)
    total = sum(sizes)
    widths_all = sorted({b for e in errors for b in e})
    if total // unit * max(widths_all) > max_units:
        unit = -(-total * max(widths_all) // max_units)
    units = [-(-s // unit) for s in sizes]
    cap = int(math.floor(budget * total / unit + 1e-9))
    inf = float("inf")
    # dp[c] = (best error, choices) using capacity exactly c
    dp: dict[int, tuple[float, tuple[int, ...]]] = {0: (0.0, ())}
    for i, err in enumerate(errors):
        nxt: dict[int, tuple[float, tuple[int, ...]]] = {}
        for c, (e, ch) in dp.items():
            for b, eb in err.items():
                c2 = c + b * units[i]
                if c2 > cap:
                    continue
                cand = (e + eb, ch + (b,))
                if cand[0] < nxt.get(c2, (inf,))[0]:
                    nxt[c2] = cand
        dp = nxt
        if not dp:
            raise ValueError(f"bit budget {budget} is below the smallest width")
    return list(min(dp.values(), key=lambda t: t[0])[1])
