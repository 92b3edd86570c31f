"""The static parts of Re-ttention shared by every backend: the mask, the step schedule
and the block layout of the sparse kernels (``docs/passes/rettention.md``).

Mask ``M`` over the flattened token order, shared by heads, layers, batch and steps:

* ``band`` (the paper's): ``M_ij = 1`` iff ``|i - j| <= h``, ``h = floor(floor(N * density) / 2)``,
  clipped at the ends.
* ``window2d``: tokens on a ``gh x gw`` grid (raster order); ``M_ij = 1`` iff
  ``|row_i - row_j| <= r`` and ``|col_i - col_j| <= r``, ``(2r + 1)^2 ~= N * density``.

Schedule for the 0-based denoising step ``t``: ``t < warmup``: dense (state passed
through); ``(t - warmup) % period == 0``: refresh; otherwise sparse with
``k = (t - warmup) % period - 1``.

Block layout. Queries are cut into blocks of ``Bq`` tokens (``nb = ceil(N / Bq)``), keys
into blocks of the same size. Every key a query of block ``b`` may attend to lies within
``C`` tokens of the block (``C = h`` for the band, ``r * gw + r`` for the 2-D window), so
it lies in key blocks ``b - c .. b + c`` with ``c = ceil(C / Bq)``: a window of
``nw = 2c + 1`` blocks (``W = nw * Bq`` keys). ``block_index[b, j] = clip(b + j - c)``
gathers those blocks; ``block_bias[b, r, col]`` is ``0`` where query ``b * Bq + r`` may
attend to window key ``col`` and ``-1e30`` elsewhere (the mask, the ends, the padding and
the clipped duplicate blocks). Work per sparse step: ``O(N * W * Dh)`` instead of
``O(N^2 * Dh)``.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Literal

import numpy as np

NEG = -1.0e30  # additive bias of a masked score (finite: a fully masked padded row stays finite)

DENSE, REFRESH, SPARSE = 0, 1, 2
PHASES = {DENSE: "dense", REFRESH: "refresh", SPARSE: "sparse"}


@dataclasses.dataclass(frozen=True)
class Schedule:
    """When to run dense, refresh and sparse steps (the paper's PixArt defaults)."""

    warmup: int = 5
    period: int = 5
    lam: float = 0.04

    def phase(self, step: int) -> tuple[int, int]:
        """``(phase, k)`` of denoising step ``step`` (``k`` counts sparse steps since the
        last refresh, from 0; -1 outside sparse steps)."""
        if step < self.warmup:
            return DENSE, -1
        m = (step - self.warmup) % self.period
        return (REFRESH, -1) if m == 0 else (SPARSE, m - 1)


@dataclasses.dataclass(frozen=True)
class MaskSpec:
    """The static sparse-attention mask over ``n`` tokens."""

    kind: Literal["band", "window2d"]
    n: int
    half: int = 0  # band: half width h
    grid_h: int = 0  # window2d: the token grid
    grid_w: int = 0
    radius: int = 0  # window2d: r

    @staticmethod
    def band(n: int, density: float) -> MaskSpec:
        """The paper's band: ``h = floor(floor(n * density) / 2)``."""
        return MaskSpec("band", n, half=int(math.floor(n * density)) // 2)

    @staticmethod
    def window2d(n: int, density: float, grid: tuple[int, int] | None = None) -> MaskSpec:
        """A ``(2r+1) x (2r+1)`` local window on the token grid, ``(2r+1)^2 ~= n * density``."""
        if grid is None:
            side = math.isqrt(n)
            if side * side != n:
                raise ValueError(f"{n} tokens are not a square grid: give the grid explicitly")
            grid = (side, side)
        gh, gw = grid
        if gh * gw != n:
            raise ValueError(f"grid {gh}x{gw} does not hold {n} tokens")
        r = max(0, round((math.sqrt(n * density) - 1) / 2))
        return MaskSpec("window2d", n, grid_h=gh, grid_w=gw, radius=r)

    @property
    def halo(self) -> int:
        """Max ``|i - j|`` over the mask (in flattened order)."""
        return self.half if self.kind == "band" else self.radius * self.grid_w + self.radius

    def allowed(self, i: np.ndarray, j: np.ndarray) -> np.ndarray:
        """Whether query ``i`` may attend to key ``j`` (broadcasting int arrays)."""
        valid = (j >= 0) & (j < self.n)
        if self.kind == "band":
            return valid & (np.abs(i - j) <= self.half)
        w = self.grid_w
        return valid & (np.abs(i // w - j // w) <= self.radius) & (np.abs(i % w - j % w) <= self.radius)

    def dense(self) -> np.ndarray:
        """The mask as an ``[n, n]`` bool matrix (tests, references)."""
        idx = np.arange(self.n)
        return self.allowed(idx[:, None], idx[None, :])

    def density(self) -> float:
        return float(self.dense().mean()) if self.n <= 8192 else float("nan")

    def describe(self) -> str:
        if self.kind == "band":
            return f"band |i-j| <= {self.half} over {self.n} tokens"
        return f"{2 * self.radius + 1}x{2 * self.radius + 1} window on a {self.grid_h}x{self.grid_w} grid"


def auto_block(spec: MaskSpec) -> int:
    """Query/key block size: the halo rounded up to a power of two, within [16, 128]."""
    halo = max(spec.halo, 1)
    return int(min(128, max(16, 1 << (halo - 1).bit_length())))


@dataclasses.dataclass(frozen=True)
class BlockLayout:
    """How a sparse kernel tiles ``spec`` with blocks of ``block`` tokens (module doc)."""

    spec: MaskSpec
    block: int

    @property
    def nb(self) -> int:
        return -(-self.spec.n // self.block)

    @property
    def padded(self) -> int:
        return self.nb * self.block

    @property
    def c(self) -> int:
        return min(-(-self.spec.halo // self.block), self.nb - 1)

    @property
    def nw(self) -> int:
        return 2 * self.c + 1

    @property
    def width(self) -> int:
        return self.nw * self.block

    def block_index(self) -> np.ndarray:
        """``[nb, nw]`` int64: the key blocks of each query block (clipped at the ends)."""
        b = np.arange(self.nb)[:, None] + np.arange(self.nw)[None, :] - self.c
        return np.clip(b, 0, self.nb - 1).astype(np.int64)

    def block_bias(self, dtype=np.float32) -> np.ndarray:
        """``[nb, block, W]`` additive bias: 0 where attended, ``NEG`` elsewhere."""
        bq = self.block
        b = np.arange(self.nb)[:, None, None]
        r = np.arange(bq)[None, :, None]
        col = np.arange(self.width)[None, None, :]
        kb = b + col // bq - self.c
        i = b * bq + r
        j = kb * bq + col % bq
        ok = (kb >= 0) & (kb < self.nb) & self.spec.allowed(i, j)
        return np.where(ok, 0.0, NEG).astype(dtype)

    def key_block_range(self, b: int) -> tuple[int, int]:
        """Key blocks ``[lo, hi)`` a query block needs (Triton loop bounds)."""
        return max(0, b - self.c), min(self.nb, b + self.c + 1)
