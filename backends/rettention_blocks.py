"""The CPU block kernel of Re-ttention's masked attention (plain torch, layer 1,
docs/architecture.md): each query block reads only its window of key blocks. Shared by the
FlexAttention path (``backends/flex_rettention.py``, for ``LSE_M`` on CPU) and the kernels of
``backends/triton/rettention.py``."""

from __future__ import annotations

import torch

from backends.rettention_spec import BlockLayout

_LAYOUT_CACHE: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}


def _layout_tensors(layout: BlockLayout, device) -> tuple[torch.Tensor, torch.Tensor]:
    key = (layout, str(device))
    if key not in _LAYOUT_CACHE:
        _LAYOUT_CACHE[key] = (torch.as_tensor(layout.block_index().reshape(-1), device=device),
                              torch.as_tensor(layout.block_bias(), device=device))
    return _LAYOUT_CACHE[key]


def masked_blocks(q, k, v, scale: float, layout: BlockLayout, *, with_lse: bool):
    """``(softmax_M(S) V, LSE_M(S) or None)`` in fp32, reading only each query block's
    window of key blocks: ``[B, H, nb, Bq, D] @ [B, H, nb, D, W]``."""
    b_, h_, n, d = q.shape
    bq, nb, npad = layout.block, layout.nb, layout.padded
    idx, bias = _layout_tensors(layout, q.device)
    qf, kf, vf = q.float(), k.float(), v.float()
    if npad != n:
        pad = (0, 0, 0, npad - n)
        qf, kf, vf = (torch.nn.functional.pad(t, pad) for t in (qf, kf, vf))
    qb = qf.reshape(b_, h_, nb, bq, d)
    kw = kf.reshape(b_, h_, nb, bq, d).index_select(2, idx).reshape(b_, h_, nb, layout.width, d)
    vw = vf.reshape(b_, h_, nb, bq, d).index_select(2, idx).reshape(b_, h_, nb, layout.width, d)
    s = torch.matmul(qb, kw.transpose(-1, -2)).mul_(scale).add_(bias)
    if with_lse:
        lse = torch.logsumexp(s, -1)
        p = torch.exp(s - lse[..., None])
    else:
        lse, p = None, torch.softmax(s, -1)
    o = torch.matmul(p, vw).reshape(b_, h_, npad, d)[:, :, :n]
    lse = None if lse is None else lse.reshape(b_, h_, npad)[:, :, :n]
    if layout.prefix:  # joint masks: the rows of the text query blocks are dense rows
        o, lse = _with_prefix(qf[:, :, :n], kf[:, :, :n], vf[:, :, :n], scale, layout, o, lse)
    return o, lse


def _with_prefix(qf, kf, vf, scale: float, layout: BlockLayout, o, lse):
    """Replace the first ``layout.prefix`` rows of the blocked result by dense rows under
    ``prefix_bias`` (``backends/rettention_spec.py``)."""
    key = ("prefix", layout, str(qf.device))
    if key not in _LAYOUT_CACHE:
        _LAYOUT_CACHE[key] = torch.as_tensor(layout.prefix_bias(), device=qf.device)
    p = layout.prefix
    s = torch.matmul(qf[:, :, :p], kf.transpose(-1, -2)).mul_(scale).add_(_LAYOUT_CACHE[key])
    lse_p = torch.logsumexp(s, -1)
    o_p = torch.matmul(torch.exp(s - lse_p[..., None]), vf)
    o = torch.cat([o_p, o[:, :, p:]], 2)
    return o, (None if lse is None else torch.cat([lse_p, lse[:, :, p:]], 2))


_WINDOW_CHUNK_BYTES = 4 << 20  # window scores per chunk of heads in window_refresh


def window_refresh(q, k, v, scale: float, layout: BlockLayout, o_full, lse):
    """``(rho, R)`` of the refresh from the dense pass's ``O_full`` and ``LSE`` and one pass
    over each query block's window scores ``S_W`` (fp32)::

        P_W = exp(S_W - LSE)      (the dense probabilities of the window's keys; 0 off the mask)
        rho = sum_W P_W           (= Z_M / Z)
        R   = O_full - P_W V_W    (= O_full - rho * O_M)

    No in-mask LSE, no normalisation of ``O_M`` and no ``rho * O_M`` product: one ``exp``
    and one row sum over the ``N x W`` window scores besides the two block products. For
    layouts whose every row is covered by its query block's window (no dense prefix rows)."""
    b_, h_, n, d = q.shape
    bq, nb, npad = layout.block, layout.nb, layout.padded
    idx, bias = _layout_tensors(layout, q.device)
    qf, kf, vf, lf = q.float() * scale, k.float(), v.float(), lse.float()
    if npad != n:
        pad = (0, 0, 0, npad - n)
        qf, kf, vf = (torch.nn.functional.pad(t, pad) for t in (qf, kf, vf))
        lf = torch.nn.functional.pad(lf, (0, npad - n))
    bh = b_ * h_
    qb = qf.reshape(bh, nb, bq, d)
    kb, vb, lb = kf.reshape(bh, nb, bq, d), vf.reshape(bh, nb, bq, d), lf.reshape(bh, nb, bq, 1)
    rho = torch.empty((bh, nb, bq), dtype=torch.float32, device=q.device)
    pv = torch.empty((bh, nb, bq, d), dtype=torch.float32, device=q.device)
    # a few heads at a time: the [nb, Bq, W] window scores of a chunk stay in cache between
    # the product, the exp, the row sum and the second product
    step = max(1, _WINDOW_CHUNK_BYTES // (nb * bq * layout.width * 4))
    for h0 in range(0, bh, step):
        sl = slice(h0, h0 + step)
        kw = kb[sl].index_select(1, idx).reshape(-1, nb, layout.width, d)
        vw = vb[sl].index_select(1, idx).reshape(-1, nb, layout.width, d)
        p = torch.matmul(qb[sl], kw.transpose(-1, -2)).add_(bias).sub_(lb[sl]).exp_()
        torch.sum(p, -1, out=rho[sl])
        torch.matmul(p, vw, out=pv[sl])
    rho = rho.reshape(b_, h_, npad)[:, :, :n]
    pv = pv.reshape(b_, h_, npad, d)[:, :, :n]
    return rho.contiguous(), o_full.float() - pv
