"""Re-ttention on FlexAttention (``torch.nn.attention.flex_attention``): the refresh and
sparse steps of ``backends/triton/rettention.py`` computed by PyTorch's own block-sparse
attention, compiled by Inductor (C++ on CPU, Triton on CUDA).

With ``S = scale * Q K^T``, ``LSE(x) = log sum exp x`` over keys and the static mask ``M``::

    refresh:  (O_full, LSE)   = SDPA flash (CPU) or flex(q, k, v)     one pass, no N x N
              (O_M,    LSE_M) = flex(q, k, v, block_mask=M, LSE)      (CUDA; CPU: rho and R
                              straight from LSE and the window scores, ``window_refresh``)
              rho = exp(LSE_M - LSE)        (= Z_M / Z_full, fp32)
              R   = O_full - rho * O_M      (fp32)
    sparse:   O = (rho + coef) * flex(q, k, v, block_mask=M) + R   (elementwise epilogue)

Block mask. Built from the project's ``BlockLayout`` (``backends/rettention_spec.py``)
with ``BlockMask.from_kv_blocks``, not by evaluating the mask over ``N x N``: query block
``b`` lists the key blocks of its window that hold at least one allowed pair, split into
*full* blocks (every pair allowed: no ``mask_mod`` call) and *partial* ones (the
``mask_mod`` decides per element). It is built once per (layout, device) and cached. The
work of a sparse step is then ``(visited key blocks) * block`` keys per query instead of
``N`` (band, ``N = 4096``, density 3.125 %, block 64: 3 blocks of 64 = 192 keys, ~21x).

Compilation. FlexAttention is only fast compiled (eager it is a dense reference). Outside
a ``torch.compile`` trace the calls go through one cached ``torch.compile(flex_attention,
dynamic=False)``; inside a trace ``flex_attention`` is called directly and Inductor lowers
it. On CPU, Inductor's C++ flex template cannot take fused epilogues (torch 2.13 raises
"Unsupported for `epilogue_nodes` in CppFlexAttentionTemplate"), so a graph holding the
flex call and its epilogue must be compiled with ``compile_options()``
(``epilogue_fusion=False`` on CPU).

Torch version floor: 2.6 (the compiled CPU flex template; ``BlockMask.from_kv_blocks``
and ``return_lse`` are 2.5). ``available()`` says whether this torch has it; the LSE is
requested with ``return_aux=AuxRequest(lse=True)`` where present (2.9+), else ``return_lse``.
"""

from __future__ import annotations

import functools
import logging

import numpy as np
import torch
from torch.nn.attention import flex_attention as fa

from backends.rettention_blocks import masked_blocks, window_refresh
from backends.rettention_spec import BlockLayout, MaskSpec

log = logging.getLogger(__name__)

TORCH_FLOOR = (2, 6)


def _version() -> tuple[int, int]:
    major, minor = torch.__version__.split("+")[0].split(".")[:2]
    return int(major), int(minor)


def available() -> bool:
    """Whether this torch has compiled FlexAttention on CPU and CUDA (>= ``TORCH_FLOOR``)."""
    if _version() < TORCH_FLOOR:
        return False
    return True


def compile_options(device: str | torch.device = "cpu") -> dict:
    """Inductor options for a graph that holds a flex call (see the module doc)."""
    return {"epilogue_fusion": False} if torch.device(device).type == "cpu" else {}


# -- the block mask ----------------------------------------------------------------------------
def mask_mod_of(spec: MaskSpec):
    """``mask_mod(b, h, q_idx, kv_idx)`` of ``spec`` (indices past ``n`` are masked)."""
    n, half, gw, r = spec.n, spec.half, max(spec.grid_w, 1), spec.radius
    if spec.kind == "joint":
        t, hw, tr = spec.text, spec.grid_h * gw, spec.tradius

        def joint(b, h, q_idx, kv_idx):
            vi, vj = (q_idx - t).clamp(min=0), (kv_idx - t).clamp(min=0)
            pi, pj = vi % hw, vj % hw
            near = ((pi // gw - pj // gw).abs() <= r) & ((pi % gw - pj % gw).abs() <= r)
            if tr >= 0:
                near = near & ((vi // hw - vj // hw).abs() <= tr)
            return ((q_idx < t) | (kv_idx < t) | near) & (kv_idx < n)

        return joint
    if spec.kind == "band":
        def band(b, h, q_idx, kv_idx):
            return ((q_idx - kv_idx).abs() <= half) & (kv_idx < n)

        return band

    def window2d(b, h, q_idx, kv_idx):
        dr = (q_idx // gw - kv_idx // gw).abs()
        dc = (q_idx % gw - kv_idx % gw).abs()
        return (dr <= r) & (dc <= r) & (kv_idx < n)

    return window2d


def block_lists(layout: BlockLayout) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """``(kv_num, kv_idx, full_num, full_idx)`` int32 (``[nb]``, ``[nb, nb]``): per query
    block, the partial and the full key blocks of its window (module doc)."""
    bq, nb, n, spec = layout.block, layout.nb, layout.spec.n, layout.spec
    kv_num = np.zeros(nb, np.int32)
    full_num = np.zeros(nb, np.int32)
    kv_idx = np.zeros((nb, nb), np.int32)
    full_idx = np.zeros((nb, nb), np.int32)
    r = np.arange(bq)
    lists = layout.key_blocks()
    for b in range(nb):
        i = b * bq + r
        qi_ok = i < n
        for kb in lists[b]:
            j = kb * bq + r
            ok = spec.allowed(i[:, None], j[None, :])
            if not ok.any():
                continue
            if ok[qi_ok].all() and (j < n).all():
                full_idx[b, full_num[b]] = kb
                full_num[b] += 1
            else:
                kv_idx[b, kv_num[b]] = kb
                kv_num[b] += 1
    return kv_num, kv_idx, full_num, full_idx


@functools.lru_cache(maxsize=64)
def _block_mask(layout: BlockLayout, device: str):
    kv_num, kv_idx, full_num, full_idx = block_lists(layout)

    def t(a):
        return torch.as_tensor(a, device=device)[None, None]  # [B=1, H=1, ...] broadcast

    # compute_q_blocks=False: the transposed (query-block) lists serve only the backward pass,
    # which the Re-ttention ops do not have, and building them runs ``vmap``, which fails
    # inside the custom op when it is first called from a compiled program ("Cannot access
    # storage of BatchedTensorImpl": the op runs under AOTAutograd's aliasing checker)
    bm = fa.BlockMask.from_kv_blocks(t(kv_num), t(kv_idx), t(full_num), t(full_idx), BLOCK_SIZE=layout.block,
                                  mask_mod=mask_mod_of(layout.spec), seq_lengths=(layout.spec.n, layout.spec.n),
                                  compute_q_blocks=False)
    log.debug("flex block mask for %s, block %d: %d partial + %d full key blocks", layout.spec.describe(),
              layout.block, int(kv_num.sum()), int(full_num.sum()))
    return bm


def block_mask(layout: BlockLayout, device: str | torch.device = "cpu"):
    """The cached ``BlockMask`` of ``layout`` on ``device`` (built once per layout and device)."""
    return _block_mask(layout, str(torch.device(device)))


def visited_keys(layout: BlockLayout) -> float:
    """Mean keys a query block reads (the work of a sparse step per query row)."""
    kv_num, _, full_num, _ = block_lists(layout)
    return float((kv_num + full_num).mean() * layout.block)


# -- the calls ---------------------------------------------------------------------------------
@functools.lru_cache(maxsize=1)
def _compiled_flex():
    return torch.compile(fa.flex_attention, dynamic=False)


def _flex_lse(q, k, v, scale: float, bm):
    """``(O, LSE)`` (LSE fp32, natural log) of flex attention under ``bm`` (None: dense)."""
    fn = fa.flex_attention if torch.compiler.is_compiling() else _compiled_flex()
    if hasattr(fa, "AuxRequest"):
        o, aux = fn(q, k, v, block_mask=bm, scale=scale, return_aux=fa.AuxRequest(lse=True))
        return o, aux.lse
    return fn(q, k, v, block_mask=bm, scale=scale, return_lse=True)


def _flex(q, k, v, scale: float, bm):
    fn = fa.flex_attention if torch.compiler.is_compiling() else _compiled_flex()
    return fn(q, k, v, block_mask=bm, scale=scale)


def masked(q, k, v, scale: float, layout: BlockLayout, *, with_lse: bool = False):
    """``softmax_M(S) V`` (q's dtype) and, with ``with_lse``, ``LSE_M(S)`` (fp32)."""
    bm = block_mask(layout, q.device)
    if with_lse:
        return _flex_lse(q, k, v, float(scale), bm)
    return _flex(q, k, v, float(scale), bm), None


def full_lse(q, k, v, scale: float):
    """``(O_full, LSE)`` of dense attention in one pass, without the N x N scores: on CPU
    the flash kernel behind SDPA (``aten._scaled_dot_product_flash_attention_for_cpu``
    returns the LSE), elsewhere flex with no mask."""
    if q.device.type == "cpu":
        o, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, False, scale=float(scale))
        return o, lse
    return _flex_lse(q, k, v, float(scale), None)


def refresh(q, k, v, scale: float, layout: BlockLayout):
    """``(O_full, rho, R)``: ``O_full`` in q's dtype, ``rho`` ``[B, H, N]`` and ``R`` fp32.

    CPU: ``(O_full, LSE)`` from the SDPA flash kernel (one pass over the full scores, the
    dense step's kernel), then ``rho`` and ``R`` from one pass over the window scores with
    that ``LSE`` (``backends.rettention_blocks.window_refresh``, ``O(N * W * Dh)``; Inductor's
    C++ flex template has no LSE output, torch 2.13); CUDA: both LSEs from flex."""
    o_full, lse = full_lse(q, k, v, scale)
    if q.device.type == "cpu" and not getattr(layout, "prefix", 0):
        rho, res = window_refresh(q, k, v, float(scale), layout, o_full, lse)
        return o_full, rho, res
    if q.device.type == "cpu":  # dense prefix rows: the block kernel computes them apart
        o_m, lse_m = masked_blocks(q, k, v, float(scale), layout, with_lse=True)
    else:
        o_m, lse_m = masked(q, k, v, scale, layout, with_lse=True)
    rho = torch.exp(lse_m.float() - lse.float())
    res = o_full.float() - rho[..., None] * o_m.float()
    return o_full, rho, res


def sparse(q, k, v, rho, res, coef: float, scale: float, layout: BlockLayout):
    """``(rho + coef) * softmax_M(S) V + R`` in q's dtype (``coef`` a float or 0-d tensor)."""
    o_m, _ = masked(q, k, v, scale, layout)
    return torch.addcmul(res.float(), (rho.float() + coef)[..., None], o_m.float()).to(q.dtype)
