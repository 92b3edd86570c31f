"""``ShiftAddLinear``: ``y = x @ W^T + b`` with ``W`` in the packed shift-add format of
``passes/shiftadd_quant.py``, as a torch custom op with a Triton kernel and a plain-torch
CPU kernel.

Format (``Packed``): bit planes ``planes`` int32 ``[q, ceil(K/32), N]`` (the uint32 words
reinterpreted; bit ``t`` of word ``w`` is column ``32 w + t``), scale terms ``exps`` /
``signs`` int8 ``[T, qa, Kb, Ng]``, ``alpha = sum_t signs_t 2^exps_t``.

* BCQ (``mode`` 0): ``W[n, c] = sum_k alpha[k, c // 8, n // G] (2 bit_k[c, n] - 1)``.
* DenseShift (``mode`` 1): ``W[n, c] = sigma[n] (2 bit_0 - 1) 2^(sum_j 2^j bit_{j+1})``
  with ``sigma = alpha[0, 0, n]``.

Both kernels compute exactly that dense ``sum_k alpha_k B_k`` (the reference) in float32
and multiply; powers of two are built from their exponent bits (``(p + 127) << 23``), so
scales are exact, and zero terms (sign 0) contribute nothing.

Triton kernel: a program owns a ``BLOCK_M x BLOCK_N`` output tile and walks ``K`` one
32-bit word (32 input columns) at a time: it unpacks the ``q`` words of each output
column to +-1 in registers, scales them by the decoded alphas (one per 8 columns and row
group), and accumulates ``x_tile @ W_tile``: a broadcast multiply-add for decode-sized
batches (``M <= 8``, batch-1 generation) and ``tl.dot`` on the dequantized tile for larger
batches (IEEE float32, no TF32).

Op: ``torch.ops.rewriter.shiftadd_linear(x, planes, exps, signs, bias?, group_rows,
mode)``; CUDA tensors launch the Triton kernel, CPU tensors run ``cpu_linear``: the
lookup-table kernel of ``backends/shiftadd_lut.py`` for BCQ up to ``OP_MAX_TOKENS`` tokens where the CPU has
AVX-512, else ``dequantize`` + matmul (the op's body branches on the device, so
``torch.compile`` on CPU traces the plain-torch kernel and on CUDA the Triton one).
``triton_shiftadd_linear`` launches the kernel directly (tests: ``TRITON_INTERPRET=1``).
"""

from __future__ import annotations

import logging

import numpy as np
import torch

from backends import shiftadd_lut
from backends.triton import cdiv, lazy_kernel, load, next_power_of_2

log = logging.getLogger(__name__)


BLOCK_COLS = 8
WORD = 32
MODES = {"bcq": 0, "denseshift": 1}


def as_tensors(packed) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``Packed`` -> ``(planes int32, exps int8, signs int8)`` torch tensors (same bits)."""
    planes = torch.from_numpy(np.ascontiguousarray(packed.planes).view(np.int32).copy())
    return planes, torch.from_numpy(packed.exps.copy()), torch.from_numpy(packed.signs.copy())


def _pow2(exps: torch.Tensor) -> torch.Tensor:
    """``2^e`` for int8 exponents in [-126, 127], exact (built from the float32 bits)."""
    return ((exps.to(torch.int32) + 127) << 23).view(torch.float32)


def alpha(exps: torch.Tensor, signs: torch.Tensor) -> torch.Tensor:
    """Scales ``sum_t signs_t 2^exps_t`` (float32, ``[qa, Kb, Ng]``)."""
    return (signs.to(torch.float32) * _pow2(exps)).sum(0)


def unpack(planes: torch.Tensor, n_in: int) -> torch.Tensor:
    """Bits ``[q, K, N]`` (int32 0/1) of the int32 planes ``[q, Kw, N]``."""
    q, kw, n = planes.shape
    shifts = torch.arange(WORD, dtype=torch.int32, device=planes.device)[None, None, :, None]
    bits = (planes[:, :, None, :] >> shifts) & 1
    return bits.reshape(q, kw * WORD, n)[:, :n_in]


def dequantize(planes: torch.Tensor, exps: torch.Tensor, signs: torch.Tensor, n_in: int,
               group_rows: int, mode: int) -> torch.Tensor:
    """The dense ``W^T`` ``[K, N]`` (float32) the packed tensors encode: the reference."""
    n = planes.shape[-1]
    bits = unpack(planes, n_in).to(torch.float32)
    a = alpha(exps, signs)
    if mode == 0:
        full = a.repeat_interleave(BLOCK_COLS, 1).repeat_interleave(group_rows, 2)[:, :n_in, :n]
        return ((2 * bits - 1) * full).sum(0)
    e = torch.zeros_like(bits[0])
    for j in range(1, bits.shape[0]):
        e = e + bits[j] * float(2 ** (j - 1))
    return a.reshape(-1)[None, :n] * (2 * bits[0] - 1) * torch.exp2(e)


CHUNK_WORDS = 8  # CPU kernel: input columns decoded per step = 32 * CHUNK_WORDS
# The op's CPU kernel runs the LUT kernel up to this many tokens. Its alternative here is
# ``reference``, whose decode costs the same at any batch, not ``F.linear``: the LUT kernel
# stays faster up to 128-256 tokens (benchmarks/shiftadd_op_tokens.py: at 128 tokens 1.5-3.2x
# on 384 x 384 to 4096 x 4096 layers, at 1 and 2 threads; at 512 slower in most runs).
OP_MAX_TOKENS = 128


def reference(x: torch.Tensor, planes: torch.Tensor, exps: torch.Tensor, signs: torch.Tensor,
              bias: torch.Tensor | None, group_rows: int, mode: int) -> torch.Tensor:
    """The plain-torch kernel: dequantize in float32, then ``x @ W^T + b`` (float32
    accumulation, result in ``x``'s dtype). BCQ weights are decoded ``32 * CHUNK_WORDS``
    input columns at a time (chunks align with the 8-column scale blocks), so the transient
    memory is a slice of the layer, not several dense copies of it."""
    k = x.shape[-1]
    xf = x.to(torch.float32)
    step = WORD * CHUNK_WORDS
    if mode != 0 or k <= step:
        y = xf @ dequantize(planes, exps, signs, k, group_rows, mode)
    else:
        y = None
        for w0 in range(0, planes.shape[1], CHUNK_WORDS):
            c0 = w0 * WORD
            c1 = min(c0 + step, k)
            wt = dequantize(planes[:, w0 : w0 + CHUNK_WORDS], exps[:, :, c0 // BLOCK_COLS : -(-c1 // BLOCK_COLS)],
                            signs[:, :, c0 // BLOCK_COLS : -(-c1 // BLOCK_COLS)], c1 - c0, group_rows, mode)
            part = xf[..., c0:c1] @ wt
            y = part if y is None else y + part
    if bias is not None:
        y = y + bias.to(torch.float32)
    return y.to(x.dtype)


def cpu_linear(x: torch.Tensor, planes: torch.Tensor, exps: torch.Tensor, signs: torch.Tensor,
               bias: torch.Tensor | None, group_rows: int, mode: int) -> torch.Tensor:
    """The op's CPU kernel: BCQ (``mode`` 0) with float32 / float16 / bfloat16 ``x`` of at
    most ``OP_MAX_TOKENS`` tokens runs the lookup-table kernel of
    ``backends/shiftadd_lut.py`` (float32 arithmetic, reads the packed bits, no dense
    weight) where this machine has it; everything else, and tracing under
    ``torch.compile``, runs ``reference``."""
    k = x.shape[-1]
    if (mode == 0 and x.dtype in (torch.float32, torch.float16, torch.bfloat16) and x.dim() >= 1
            and not torch.compiler.is_compiling()):
        x2 = x.reshape(-1, k)
        a = shiftadd_lut.scales(exps, signs) if x2.shape[0] <= OP_MAX_TOKENS else None
        if a is not None and shiftadd_lut.supports(x2, planes, a, BLOCK_COLS, group_rows, OP_MAX_TOKENS):
            y = shiftadd_lut.lut_linear(x2, planes, a, BLOCK_COLS, group_rows)
            if bias is not None:
                y = y + bias.to(torch.float32)
            return y.to(x.dtype).reshape(*x.shape[:-1], planes.shape[-1])
    return reference(x, planes, exps, signs, bias, group_rows, mode)


@lazy_kernel
def _kernel(triton, tl):
    """The Triton kernel, defined on first use (None without triton)."""

    @triton.jit
    def shiftadd_kernel(X, P, E, S, B, Y, M, N, K, KW, KB, NG, G, stride_xm, stride_ym,
                         Q: tl.constexpr, T: tl.constexpr, MODE: tl.constexpr, HAS_BIAS: tl.constexpr,
                         USE_DOT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
        pid_m = tl.program_id(0)
        pid_n = tl.program_id(1)
        rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        rt = tl.arange(0, 32)
        m_ok = rm < M
        n_ok = rn < N
        if MODE == 0:
            grp = rn // G
        else:
            grp = rn
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        for w in range(0, KW):
            kk = w * 32 + rt
            k_ok = kk < K
            xk = tl.load(X + rm[:, None] * stride_xm + kk[None, :], mask=m_ok[:, None] & k_ok[None, :],
                         other=0.0).to(tl.float32)
            tile_ok = k_ok[:, None] & n_ok[None, :]
            wt = tl.zeros([32, BLOCK_N], dtype=tl.float32)
            if MODE == 0:
                kb = kk // 8
                for k in tl.static_range(Q):
                    word = tl.load(P + (k * KW + w) * N + rn, mask=n_ok, other=0)
                    bit = (word[None, :] >> rt[:, None]) & 1
                    a = tl.zeros([32, BLOCK_N], dtype=tl.float32)
                    for t in tl.static_range(T):
                        off = ((t * Q + k) * KB + kb[:, None]) * NG + grp[None, :]
                        e = tl.load(E + off, mask=tile_ok, other=0).to(tl.int32)
                        s = tl.load(S + off, mask=tile_ok, other=0).to(tl.float32)
                        a += s * ((e + 127) << 23).to(tl.float32, bitcast=True)
                    wt += a * (2 * bit - 1).to(tl.float32)
            else:
                word = tl.load(P + w * N + rn, mask=n_ok, other=0)
                sgn = (2 * ((word[None, :] >> rt[:, None]) & 1) - 1).to(tl.float32)
                ex = tl.zeros([32, BLOCK_N], dtype=tl.int32)
                for j in tl.static_range(1, Q):
                    wj = tl.load(P + (j * KW + w) * N + rn, mask=n_ok, other=0)
                    ex += ((wj[None, :] >> rt[:, None]) & 1) << (j - 1)
                sig = tl.zeros([BLOCK_N], dtype=tl.float32)
                for t in tl.static_range(T):
                    e = tl.load(E + t * NG + grp, mask=n_ok, other=0).to(tl.int32)
                    s = tl.load(S + t * NG + grp, mask=n_ok, other=0).to(tl.float32)
                    sig += s * ((e + 127) << 23).to(tl.float32, bitcast=True)
                wt = sig[None, :] * sgn * ((ex + 127) << 23).to(tl.float32, bitcast=True)
            wt = tl.where(tile_ok, wt, 0.0)
            if USE_DOT:
                acc += tl.dot(xk, wt, input_precision="ieee")
            else:
                acc += tl.sum(xk[:, :, None] * wt[None, :, :], axis=1)
        if HAS_BIAS:
            acc += tl.load(B + rn, mask=n_ok, other=0.0).to(tl.float32)[None, :]
        tl.store(Y + rm[:, None] * stride_ym + rn[None, :], acc.to(Y.dtype.element_ty),
                 mask=m_ok[:, None] & n_ok[None, :])

    return shiftadd_kernel


def _launch(x: torch.Tensor, planes: torch.Tensor, exps: torch.Tensor, signs: torch.Tensor,
            bias: torch.Tensor | None, group_rows: int, mode: int, wrap=lambda k: k) -> torch.Tensor:
    kernel = _kernel()
    if kernel is None:
        raise RuntimeError("triton is not installed")
    k = x.shape[-1]
    q, kw, n = planes.shape
    t, _, kb, ng = exps.shape
    x2 = x.reshape(-1, k).contiguous()
    m = x2.shape[0]
    y = torch.empty(m, n, dtype=x.dtype, device=x.device)
    use_dot = m > 8
    block_m = 32 if use_dot else max(1, next_power_of_2(m))
    block_n = 64
    grid = (cdiv(m, block_m), cdiv(n, block_n))
    wrap(kernel)[grid](
        x2, planes.contiguous(), exps.contiguous(), signs.contiguous(),
        bias if bias is not None else x2, y, m, n, k, kw, kb, ng, max(int(group_rows), 1),
        x2.stride(0), y.stride(0), Q=q, T=t, MODE=mode, HAS_BIAS=bias is not None, USE_DOT=use_dot,
        BLOCK_M=block_m, BLOCK_N=block_n)
    return y.reshape(*x.shape[:-1], n)


def triton_shiftadd_linear(x, planes, exps, signs, bias=None, group_rows: int = 1, mode: int = 0):
    """Launch the Triton kernel directly (no dispatch)."""
    return _launch(x, planes, exps, signs, bias, group_rows, mode)


# -- torch custom op ----------------------------------------------------------------------
_OPS: dict[str, object] = {}


def _define() -> None:
    if _OPS:
        return
    # Triton-backed ops: importing them loads the Inductor (seconds), so only on first use
    from torch.library import triton_op, wrap_triton

    @triton_op("rewriter::shiftadd_linear", mutates_args=())
    def op(x: torch.Tensor, planes: torch.Tensor, exps: torch.Tensor, signs: torch.Tensor,
           bias: torch.Tensor | None, group_rows: int, mode: int) -> torch.Tensor:
        # The body is also what torch.compile traces (triton_op decomposes into it): off
        # CUDA it is the plain-torch kernel, so compiling on CPU never reaches Triton.
        if x.device.type != "cuda" or load() is None:
            return cpu_linear(x, planes, exps, signs, bias, group_rows, mode)
        return _launch(x, planes, exps, signs, bias, group_rows, mode, wrap=wrap_triton)

    @op.register_kernel("cpu")
    def _cpu(x, planes, exps, signs, bias, group_rows, mode):
        return cpu_linear(x, planes, exps, signs, bias, group_rows, mode)

    _OPS["shiftadd_linear"] = op



def shiftadd_linear_op():
    """``torch.ops.rewriter.shiftadd_linear.default``."""
    _define()
    return torch.ops.rewriter.shiftadd_linear.default


def shiftadd_linear(x, planes, exps, signs, bias=None, group_rows: int = 1, mode: int = 0):
    return shiftadd_linear_op()(x, planes, exps, signs, bias, group_rows, mode)
