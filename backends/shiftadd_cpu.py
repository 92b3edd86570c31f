"""CPU kernels for the packed shift-add linear that read the bit planes in the reduction
(no dense copy of the weight).

Format: the torch op's (``backends/triton/shiftadd.py``): planes int32 ``[q, ceil(K/32), N]``
(bit ``t`` of word ``w`` is column ``32 w + t``; 1 means ``+1``), ``alpha`` float32
``[q, Kb, Ng]`` (one per ``block_cols`` input columns and ``group_rows`` output rows).
With ``P[m, k, b, n] = sum_{c in block b} x[m, c] bit_k[c, n]`` and
``S[m, b] = sum_{c in b} x[m, c]``::

    y[m, n] = sum_k sum_b alpha[k, b, n // G] (2 P[m, k, b, n] - S[m, b])

so the weight is touched as bits (``q / 8`` bytes per weight); the scales come in once per
block. ``packed_linear`` runs, in this order of preference:

* the lookup-table kernel of ``backends/shiftadd_lut.py`` (C with AVX-512, compiled on
  first use) for ``M <= shiftadd_lut.MAX_TOKENS`` where the CPU and a compiler allow it:
  per token and 4 input columns a table of the 16 signed sums ``2 P - S``, indexed by 4
  bits of a plane, 16 output rows per ``vpermps``;
* ``compiled_linear``: the same arithmetic written in torch ops (``packed_linear_eager``,
  one masked add per weight and plane) compiled by Inductor for single tokens
  (``MAX_TOKENS``), the chunked dequantize + matmul above.

Measured (``benchmarks/shiftadd_layer_bench.py``, README "Memory at run time"), 4096 x
4096 at batch 1: the lookup-table kernel 6.1x faster than ``F.linear`` at 1 thread and
3.1x at 2, with no dense weight (call peak RSS 0.04 MiB); it is bound by its vector
operations (about 0.07 cycles per weight for 3 planes), not by the 0.56 bytes per weight
it reads. The Inductor masked sum runs at about ``F.linear``'s time; the
lookup-table formulation written in torch ops compiles to scalar indirect loads and runs
about 8x slower than ``F.linear``.
"""

from __future__ import annotations

import functools

import torch

from backends import shiftadd_lut

WORD = 32
MAX_TOKENS = 1  # larger batches: dequantize in chunks + matmul (compiled at 8 tokens: 20x slower)


def packed_linear_eager(x: torch.Tensor, planes: torch.Tensor, alpha: torch.Tensor, block_cols: int,
                        group_rows: int) -> torch.Tensor:
    """``x @ W^T`` for ``x`` float32 ``[M, K]`` (the formulation above, uncompiled). ``K`` a
    multiple of ``block_cols`` and of 32 (callers pad)."""
    q, kw, n = planes.shape
    m, k = x.shape
    kb = k // block_cols
    if group_rows > 1 and n % group_rows == 0:
        return _row_groups(x, planes, alpha, block_cols, group_rows)
    shifts = torch.arange(WORD, dtype=torch.int32, device=planes.device)
    bits = (planes[:, :, None, :] >> shifts[None, None, :, None]) & 1  # [q, Kw, 32, N]
    xb = x.reshape(m, 1, kw, WORD, 1)
    p = (bits.to(x.dtype)[None] * xb).reshape(m, q, kb, block_cols, n).sum(3)  # [M, q, Kb, N]
    s = x.reshape(m, kb, block_cols).sum(-1)  # [M, Kb]
    a = alpha[:, :, :, None].expand(q, kb, alpha.shape[2], group_rows).reshape(q, kb, -1)[:, :, :n]
    return ((2 * p - s[:, None, :, None]) * a[None]).sum((1, 2))


def _row_groups(x: torch.Tensor, planes: torch.Tensor, alpha: torch.Tensor, block_cols: int,
                group_rows: int) -> torch.Tensor:
    """Row groups (``G > 1``): the scales go into the activations first,
    ``xa[m, k, c, g] = x[m, c] alpha[k, c // block_cols, g]`` (``q K N / G`` values), then
    ``y[m, n] = sum_k sum_c +-xa[m, k, c, n // G]`` by the bit of ``(k, c, n)``."""
    q, kw, n = planes.shape
    m, k = x.shape
    ng = n // group_rows
    a = alpha.repeat_interleave(block_cols, 1)[:, :k]  # [q, K, Ng]
    xa = x[:, None, :, None] * a[None]  # [M, q, K, Ng]
    shifts = torch.arange(WORD, dtype=torch.int32, device=planes.device)
    bits = (planes.reshape(q, kw, 1, ng, group_rows) >> shifts[None, None, :, None, None]) & 1  # [q, Kw, 32, Ng, G]
    xa5 = xa.reshape(m, q, kw, WORD, ng, 1)
    return torch.where(bits[None] != 0, xa5, -xa5).sum((1, 2, 3)).reshape(m, n)


@functools.lru_cache(maxsize=None)
def _compiled():
    return torch.compile(packed_linear_eager, dynamic=False)


CHUNK = 256  # input columns decoded per step on the large-batch path


def chunked_linear(x: torch.Tensor, planes: torch.Tensor, alpha: torch.Tensor, block_cols: int,
                   group_rows: int) -> torch.Tensor:
    """Large batches: decode ``CHUNK`` input columns at a time to float32 and matmul (the
    transient is ``CHUNK x N`` floats, not the layer)."""
    q, kw, n = planes.shape
    k = x.shape[1]
    shifts = torch.arange(WORD, dtype=torch.int32, device=planes.device)
    y = None
    for c0 in range(0, k, CHUNK):
        c1 = min(c0 + CHUNK, k)
        bits = (planes[:, c0 // WORD : -(-c1 // WORD), None, :] >> shifts[None, None, :, None]) & 1
        bits = bits.reshape(q, -1, n)[:, : c1 - c0].to(torch.float32)
        a = alpha[:, c0 // block_cols : -(-c1 // block_cols)].repeat_interleave(block_cols, 1)
        a = a[:, (c0 % block_cols) : (c0 % block_cols) + c1 - c0].repeat_interleave(group_rows, 2)[:, :, :n]
        part = x[:, c0:c1] @ ((2 * bits - 1) * a).sum(0)
        y = part if y is None else y + part
    return y


@functools.lru_cache(maxsize=None)
def _compiled_chunked():
    return torch.compile(chunked_linear, dynamic=False)


def compiled_linear(x: torch.Tensor, planes: torch.Tensor, alpha: torch.Tensor, block_cols: int,
                    group_rows: int) -> torch.Tensor:
    """The torch-ops kernels: compiled (one compilation per shape and block layout) for ``M
    <= MAX_TOKENS``, ``chunked_linear`` (compiled: each chunk's decode one fused loop) above
    it."""
    if x.shape[0] > MAX_TOKENS:
        return _compiled_chunked()(x, planes, alpha, block_cols, group_rows)
    return _compiled()(x, planes, alpha, block_cols, group_rows)


def packed_linear(x: torch.Tensor, planes: torch.Tensor, alpha: torch.Tensor, block_cols: int,
                  group_rows: int) -> torch.Tensor:
    """The lookup-table kernel (``backends/shiftadd_lut.py``) where the CPU has it and the
    batch is at most its ``MAX_TOKENS``; else ``compiled_linear``."""
    if shiftadd_lut.supports(x, planes, alpha, block_cols, group_rows):
        return shiftadd_lut.lut_linear(x, planes, alpha, block_cols, group_rows)
    return compiled_linear(x, planes, alpha, block_cols, group_rows)
