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
