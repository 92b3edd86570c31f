"""Re-ttention attention kernels: Triton (block-sparse flash attention with fused
epilogues) and plain torch (CPU), registered as torch custom ops.

With ``S = scale * Q K^T`` per (batch, head), ``LSE(x) = log sum exp x`` over keys and the
static mask ``M`` (``backends/rettention_spec.py``)::

    refresh:  O_full = softmax(S) V,   O_M = softmax_M(S) V
              rho    = exp(LSE_M(S) - LSE(S))         (= Z_M / Z_full, fp32, never from N x N)
              R      = O_full - rho * O_M             (the out-of-mask part, before to_out)
              CPU: (O_full, LSE) from one pass over the full scores, then rho = sum_W P_W and
              R = O_full - P_W V_W from one pass over the window scores (``window_refresh``)
              returns (O_full, rho, R)
    sparse:   O = (rho + lam * k) * softmax_M(S) V + R   (``coef = lam * k`` is a scalar)

The sparse kernels do sparse work: query block ``b`` reads only the key blocks
``b - c .. b + c`` of its window (torch: gathered with ``index_select``; Triton: the loop
bounds of the key loop) and applies the mask inside the window, so a step costs
``O(N * W * Dh)``; ``W = (2c + 1) * Bq``.

Ops (``torch.ops.rewriter``):

* ``rettention_refresh(q, k, v, scale, kind, n, half, grid_w, radius, text, frames, tradius, block) -> (o, rho, R)``
* ``rettention_sparse(q, k, v, rho, R, coef, scale, kind, n, half, grid_w, radius, text, frames, tradius, block) -> o``

``q, k, v``: ``[B, H, N, Dh]``; ``rho``: ``[B, H, N]`` fp32; ``R``: ``[B, H, N, Dh]`` fp32;
``kind`` 0 = band, 1 = window2d, 2 = joint (``MaskSpec.to_args``). The ops are opaque to ``torch.compile`` / ``torch.export``
(registered fakes); each call runs FlexAttention (``backends/flex_rettention.py``), the
Triton kernels or the CPU block kernels, chosen by ``kernel_for`` (see there). ``triton_refresh`` /
``triton_sparse`` launch the kernels directly (tests run them under ``TRITON_INTERPRET=1``).
``reference_*`` are the formulas computed densely under the mask (tests only).
"""

from __future__ import annotations

import logging
import os

import torch
from torch.library import custom_op, register_fake

from backends import flex_rettention as flex
from backends.rettention_blocks import masked_blocks, window_refresh
from backends.rettention_spec import KINDS, BlockLayout, MaskSpec
from backends.triton import cdiv, lazy_kernel, load, next_power_of_2

log = logging.getLogger(__name__)


def spec_of(*args: int) -> MaskSpec:
    """The mask from its op arguments (``MaskSpec.from_args``)."""
    return MaskSpec.from_args(*args)


def spec_args(spec: MaskSpec) -> tuple[int, ...]:
    """``(kind, n, half, grid_w, radius, text, frames, tradius)``: the mask as op arguments."""
    return spec.to_args()


# -- references (dense under the mask; tests) ----------------------------------------------
def reference_refresh(q, k, v, scale: float, spec: MaskSpec):
    """``(O_full, rho, R)`` computed densely in float64 from the formulas."""
    q, k, v = q.double(), k.double(), v.double()
    s = scale * q @ k.transpose(-1, -2)
    m = torch.as_tensor(spec.dense(), device=s.device)
    lse = torch.logsumexp(s, -1)
    sm = s.masked_fill(~m, float("-inf"))
    lse_m = torch.logsumexp(sm, -1)
    o_full = torch.softmax(s, -1) @ v
    o_m = torch.softmax(sm, -1) @ v
    rho = torch.exp(lse_m - lse)
    return o_full, rho, o_full - rho[..., None] * o_m


def reference_sparse(q, k, v, rho, res, coef: float, scale: float, spec: MaskSpec):
    """``(rho + coef) * softmax_M(S) V + R`` computed densely in float64."""
    q, k, v = q.double(), k.double(), v.double()
    s = scale * q @ k.transpose(-1, -2)
    m = torch.as_tensor(spec.dense(), device=s.device)
    o_m = torch.softmax(s.masked_fill(~m, float("-inf")), -1) @ v
    return (rho.double() + coef)[..., None] * o_m + res.double()


# -- CPU kernels (block-sparse, plain torch) -------------------------------------------------
def cpu_refresh(q, k, v, scale: float, layout: BlockLayout):
    """``(O_full, rho, R)``; ``O_full`` in q's dtype, ``rho`` and ``R`` in fp32. The full
    scores are read once (``LSE``, then ``O_full``); the mask part is ``window_refresh``."""
    qf, kf, vf = q.float(), k.float(), v.float()
    s = torch.matmul(qf, kf.transpose(-1, -2)).mul_(scale)
    lse = torch.logsumexp(s, -1)
    o_full = torch.matmul(s.sub_(lse[..., None]).exp_(), vf)
    del s
    if getattr(layout, "prefix", 0):  # dense prefix rows, computed apart by masked_blocks
        o_m, lse_m = masked_blocks(q, k, v, scale, layout, with_lse=True)
        rho = torch.exp(lse_m - lse)
        return o_full.to(q.dtype), rho, o_full - rho[..., None] * o_m
    rho, res = window_refresh(q, k, v, scale, layout, o_full, lse)
    return o_full.to(q.dtype), rho, res


def cpu_sparse(q, k, v, rho, res, coef: float, scale: float, layout: BlockLayout):
    """``(rho + coef) * O_M + R`` in q's dtype."""
    o_m, _ = masked_blocks(q, k, v, scale, layout, with_lse=False)
    return torch.addcmul(res.float(), (rho.float() + coef)[..., None], o_m).to(q.dtype)


# -- Triton kernels ----------------------------------------------------------------------------
@lazy_kernel
def _kernel(triton, tl):
    """The Triton kernel, defined on first use (None without triton)."""

    @triton.jit
    def attn_fwd(Q, K, V, O, LSE, RHO, RES, OFULL, LSEFULL,
                  sqb, sqh, sqn, skb, skh, skn, svb, svh, svn, sob, soh, son,
                  H, N, D, scale, coef, half, grid_w, radius, c_blocks,
                  text, hw, tradius, KV_NUM, KV_IDX, nbk,
                  MASKED: tl.constexpr, KIND: tl.constexpr, EPILOGUE: tl.constexpr,
                  BLOCK: tl.constexpr, BLOCK_D: tl.constexpr):
        """One query block of one (batch, head): online softmax over the key blocks of its
        window (MASKED) or of the whole sequence; the dots run in the input dtype (fp32
        inputs: TF32 on NVIDIA GPUs) with fp32 accumulation. EPILOGUE 0: write O and LSE; 1 (sparse):
        O = (rho + coef) * O_M + R; 2 (refresh): rho = exp(LSE_M - LSE_full),
        R = O_full - rho * O_M (written to RHO, RES). KIND 2 (joint): the key blocks are
        read from the layout's lists (KV_NUM [nb], KV_IDX [nb, nbk])."""
        pid_m = tl.program_id(0)
        pid_bh = tl.program_id(1)
        b = pid_bh // H
        h = pid_bh % H
        offs_m = pid_m * BLOCK + tl.arange(0, BLOCK)
        offs_d = tl.arange(0, BLOCK_D)
        m_ok = offs_m < N
        d_ok = offs_d < D
        q = tl.load(Q + b * sqb + h * sqh + offs_m[:, None] * sqn + offs_d[None, :],
                    mask=m_ok[:, None] & d_ok[None, :], other=0.0)
        m_i = tl.full([BLOCK], -1.0e30, tl.float32)
        l_i = tl.zeros([BLOCK], tl.float32)
        acc = tl.zeros([BLOCK, BLOCK_D], tl.float32)
        if MASKED:
            if KIND == 2:
                lo = 0
                hi = tl.load(KV_NUM + pid_m)
            else:
                lo = tl.maximum(pid_m - c_blocks, 0)
                hi = tl.minimum(pid_m + c_blocks + 1, tl.cdiv(N, BLOCK))
        else:
            lo = 0
            hi = tl.cdiv(N, BLOCK)
        for jj in range(lo, hi):
            if MASKED and KIND == 2:
                kb = tl.load(KV_IDX + pid_m * nbk + jj)
            else:
                kb = jj
            offs_n = kb * BLOCK + tl.arange(0, BLOCK)
            n_ok = offs_n < N
            kt = tl.load(K + b * skb + h * skh + offs_n[None, :] * skn + offs_d[:, None],
                         mask=n_ok[None, :] & d_ok[:, None], other=0.0)
            s = tl.dot(q, kt) * scale
            ok = n_ok[None, :]
            if MASKED:
                if KIND == 0:
                    dist = offs_m[:, None] - offs_n[None, :]
                    ok = ok & (dist <= half) & (dist >= -half)
                elif KIND == 1:
                    dr = offs_m[:, None] // grid_w - offs_n[None, :] // grid_w
                    dc = offs_m[:, None] % grid_w - offs_n[None, :] % grid_w
                    ok = ok & (dr <= radius) & (dr >= -radius) & (dc <= radius) & (dc >= -radius)
                else:  # joint: text rows / columns dense, else the in-frame window in near frames
                    vi = tl.maximum(offs_m - text, 0)
                    vj = tl.maximum(offs_n - text, 0)
                    pi = vi % hw
                    pj = vj % hw
                    dr = pi[:, None] // grid_w - pj[None, :] // grid_w
                    dc = pi[:, None] % grid_w - pj[None, :] % grid_w
                    df = vi[:, None] // hw - vj[None, :] // hw
                    near = (dr <= radius) & (dr >= -radius) & (dc <= radius) & (dc >= -radius)
                    near = near & ((tradius < 0) | ((df <= tradius) & (df >= -tradius)))
                    dense = (offs_m[:, None] < text) | (offs_n[None, :] < text)
                    ok = ok & (dense | near)
            s = tl.where(ok, s, -1.0e30)
            m_new = tl.maximum(m_i, tl.max(s, 1))
            alpha = tl.exp(m_i - m_new)
            p = tl.exp(s - m_new[:, None])
            p = tl.where(ok, p, 0.0)
            l_i = l_i * alpha + tl.sum(p, 1)
            v = tl.load(V + b * svb + h * svh + offs_n[:, None] * svn + offs_d[None, :],
                        mask=n_ok[:, None] & d_ok[None, :], other=0.0)
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
            m_i = m_new
        l_safe = tl.where(l_i > 0, l_i, 1.0)
        o = acc / l_safe[:, None]
        lse = m_i + tl.log(l_safe)
        row = pid_bh * N + offs_m  # rho / LSE: [B, H, N] contiguous
        od = b * sob + h * soh + offs_m[:, None] * son + offs_d[None, :]
        rd = pid_bh * N * D + offs_m[:, None] * D + offs_d[None, :]  # R, O_full: contiguous
        omask = m_ok[:, None] & d_ok[None, :]
        if EPILOGUE == 0:
            tl.store(O + od, o.to(O.dtype.element_ty), mask=omask)
            tl.store(LSE + row, lse, mask=m_ok)
        elif EPILOGUE == 1:
            rho = tl.load(RHO + row, mask=m_ok, other=0.0)
            r = tl.load(RES + rd, mask=omask, other=0.0)
            out = (rho + coef)[:, None] * o + r
            tl.store(O + od, out.to(O.dtype.element_ty), mask=omask)
        else:
            lse_full = tl.load(LSEFULL + row, mask=m_ok, other=0.0)
            o_full = tl.load(OFULL + rd, mask=omask, other=0.0)
            rho = tl.exp(lse - lse_full)
            tl.store(RHO + row, rho, mask=m_ok)
            tl.store(RES + rd, o_full - rho[:, None] * o, mask=omask)

    return attn_fwd


def _grid_and_block(q, layout: BlockLayout):
    b_, h_, n, d = q.shape
    block = max(16, layout.block)
    return (cdiv(n, block), b_ * h_), block, max(16, next_power_of_2(d))


def _launch(q, k, v, scale, layout: BlockLayout, *, masked: bool, epilogue: int, rho=None, res=None,
            o_full=None, lse_full=None, coef: float = 0.0, o=None, wrap=lambda f: f):
    kernel = _kernel()
    if kernel is None:
        raise RuntimeError("triton is not installed")
    b_, h_, n, d = q.shape
    grid, block, block_d = _grid_and_block(q, layout)
    if block != layout.block:
        layout = BlockLayout(layout.spec, block)
    spec = layout.spec
    lse = torch.empty((b_, h_, n), device=q.device, dtype=torch.float32)
    if o is None:
        o = torch.empty_like(q)
    dummy = lse
    if spec.structured:
        kv_num = kv_idx = torch.zeros(1, dtype=torch.int32, device=q.device)
    else:
        kv_num, kv_idx = (torch.as_tensor(a, device=q.device) for a in layout.block_lists())
    wrap(kernel)[grid](
        q, k, v, o, lse,
        rho if rho is not None else dummy, res if res is not None else dummy,
        o_full if o_full is not None else dummy, lse_full if lse_full is not None else dummy,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2), o.stride(0), o.stride(1), o.stride(2),
        h_, n, d, float(scale), float(coef), spec.half, max(spec.grid_w, 1), spec.radius, layout.c,
        spec.text, max(spec.grid_h * spec.grid_w, 1), spec.tradius, kv_num, kv_idx, layout.nb,
        MASKED=masked, KIND=KINDS.index(spec.kind), EPILOGUE=epilogue, BLOCK=block, BLOCK_D=block_d)
    return o, lse


def triton_refresh(q, k, v, scale: float, layout: BlockLayout, wrap=lambda f: f):
    """Launch the Triton kernels directly: ``(O_full, rho, R)``."""
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    o_full, lse_full = _launch(q, k, v, scale, layout, masked=False, epilogue=0, wrap=wrap)
    o32 = o_full.float().contiguous()
    rho = torch.empty_like(lse_full)
    res = torch.empty_like(o32)
    _launch(q, k, v, scale, layout, masked=True, epilogue=2, rho=rho, res=res, o_full=o32,
            lse_full=lse_full, o=torch.empty_like(q), wrap=wrap)
    return o_full, rho, res


def triton_sparse(q, k, v, rho, res, coef: float, scale: float, layout: BlockLayout, wrap=lambda f: f):
    """Launch the Triton kernel directly: ``(rho + coef) * O_M + R``."""
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    o, _ = _launch(q, k, v, scale, layout, masked=True, epilogue=1, rho=rho.float().contiguous(),
                   res=res.float().contiguous(), coef=coef, wrap=wrap)
    return o


# -- torch custom ops -------------------------------------------------------------------------
# Which kernel runs a call (``kernel_for``). Measured on the 2-core CPU (N = 4096, 16 x 64,
# band 3.125 %, fp32, interleaved, benchmarks/flex_rettention_bench.py): the compiled
# FlexAttention sparse step is several times faster than the block kernel above, which
# stays for small sequences (where one flex compilation per shape, tens of seconds on
# this machine, would not pay off) and as the fallback below the torch floor. CUDA: flex
# (the hand Triton sparse step was measured slower than dense SDPA on an H200);
# ``REWRITER_RETTENTION_KERNEL=triton|flex|blocks`` forces one.
FLEX_MIN_TOKENS = 1024
KERNEL_ENV = "REWRITER_RETTENTION_KERNEL"


def kernel_for(q: torch.Tensor, n: int) -> str:
    """``"flex"``, ``"triton"`` or ``"blocks"`` (the CPU block kernel) for a call on ``q``."""
    forced = os.environ.get(KERNEL_ENV, "")
    cuda = q.device.type == "cuda"
    if forced == "triton" and cuda and load() is not None:
        return "triton"
    if forced == "blocks" and not cuda:
        return "blocks"
    if flex.available() and (forced == "flex" or cuda or n >= FLEX_MIN_TOKENS):
        return "flex"
    return "triton" if cuda else "blocks"


_DEFINED = False


def _define() -> None:
    """Opaque custom ops with registered fakes: ``torch.compile`` and ``torch.export`` keep
    them as calls (no graph break, and no Triton reached while tracing on CPU); the kernel
    is chosen per call at run time by ``kernel_for``."""
    global _DEFINED
    if _DEFINED:
        return
    def layout_of(kind, n, half, grid_w, radius, text, frames, tradius, block):
        return BlockLayout(spec_of(kind, n, half, grid_w, radius, text, frames, tradius), block)

    @custom_op("rewriter::rettention_refresh", mutates_args=())
    def refresh_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, kind: int, n: int,
                   half: int, grid_w: int, radius: int, text: int, frames: int, tradius: int,
                   block: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        layout = layout_of(kind, n, half, grid_w, radius, text, frames, tradius, block)
        which = kernel_for(q, n)
        if which == "flex":
            o, rho, res = flex.refresh(q, k, v, scale, layout)
            return o.contiguous(), rho.contiguous(), res.contiguous()
        if which == "triton":
            return triton_refresh(q, k, v, scale, layout)
        return cpu_refresh(q, k, v, scale, layout)

    @register_fake("rewriter::rettention_refresh")
    def _refresh_fake(q, k, v, scale, kind, n, half, grid_w, radius, text, frames, tradius, block):
        b_, h_, n_, d = q.shape
        return (q.new_empty(q.shape), q.new_empty((b_, h_, n_), dtype=torch.float32),
                q.new_empty((b_, h_, n_, d), dtype=torch.float32))

    @custom_op("rewriter::rettention_sparse", mutates_args=())
    def sparse_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, rho: torch.Tensor, res: torch.Tensor,
                  coef: float, scale: float, kind: int, n: int, half: int, grid_w: int, radius: int,
                  text: int, frames: int, tradius: int, block: int) -> torch.Tensor:
        layout = layout_of(kind, n, half, grid_w, radius, text, frames, tradius, block)
        which = kernel_for(q, n)
        if which == "flex":
            return flex.sparse(q, k, v, rho, res, coef, scale, layout).contiguous()
        if which == "triton":
            return triton_sparse(q, k, v, rho, res, coef, scale, layout)
        return cpu_sparse(q, k, v, rho, res, coef, scale, layout)

    @register_fake("rewriter::rettention_sparse")
    def _sparse_fake(q, k, v, rho, res, coef, scale, kind, n, half, grid_w, radius, text, frames, tradius, block):
        return q.new_empty(q.shape)

    _DEFINED = True


_define()


def refresh(q, k, v, scale: float, layout: BlockLayout):
    """``torch.ops.rewriter.rettention_refresh`` for ``layout``: ``(O_full, rho, R)``."""
    return torch.ops.rewriter.rettention_refresh(q, k, v, float(scale), *spec_args(layout.spec), layout.block)


def sparse(q, k, v, rho, res, coef: float, scale: float, layout: BlockLayout):
    """``torch.ops.rewriter.rettention_sparse`` for ``layout``."""
    return torch.ops.rewriter.rettention_sparse(q, k, v, rho, res, float(coef), float(scale),
                                                *spec_args(layout.spec), layout.block)
