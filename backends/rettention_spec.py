"""The static parts of Re-ttention shared by every backend: the mask, the step schedule
and the block layout of the sparse kernels (``docs/passes/rettention.md``).

Mask ``M`` over the flattened token order, shared by heads, layers, batch and steps:

* ``band`` (the paper's): ``M_ij = 1`` iff ``|i - j| <= h``, ``h = floor(floor(N * density) / 2)``,
  clipped at the ends.
* ``window2d``: tokens on a ``gh x gw`` grid (raster order); ``M_ij = 1`` iff
  ``|row_i - row_j| <= r`` and ``|col_i - col_j| <= r``, ``(2r + 1)^2 ~= N * density``.
* ``joint`` (the paper's video / joint text+image mask): tokens laid out as
  ``[T text | F frames x gh x gw]`` (``TokenLayout``). Text rows and text columns are dense
  (``M_ij = 1`` if ``i < T`` or ``j < T``); a video token attends to the ``(2r+1) x (2r+1)``
  window around its position inside its own frame and at the same position in the frames
  ``|f_i - f_j| <= tf`` (``tf = -1``: every frame, the paper's CogVideoX setting);
  ``(2r + 1)^2 ~= gh * gw * density`` (the density of one frame's window, as in the paper).

Schedule for the 0-based denoising step ``t``: ``t < warmup``: dense (state passed
through); ``(t - warmup) % period == 0``: refresh; otherwise sparse with
``k = (t - warmup) % period - 1``.

Block layout (band, window2d). Queries are cut into blocks of ``Bq`` tokens (``nb = ceil(N / Bq)``), keys
into blocks of the same size. Every key a query of block ``b`` may attend to lies within
``C`` tokens of the block (``C = h`` for the band, ``r * gw + r`` for the 2-D window), so
it lies in key blocks ``b - c .. b + c`` with ``c = ceil(C / Bq)``: a window of
``nw = 2c + 1`` blocks (``W = nw * Bq`` keys). ``block_index[b, j] = clip(b + j - c)``
gathers those blocks; ``block_bias[b, r, col]`` is ``0`` where query ``b * Bq + r`` may
attend to window key ``col`` and ``-1e30`` elsewhere (the mask, the ends, the padding and
the clipped duplicate blocks). Work per sparse step: ``O(N * W * Dh)`` instead of
``O(N^2 * Dh)``.

Block layout (joint). The key blocks a query block needs are no longer a diagonal band
(text columns, other frames), so the layout lists them: ``key_blocks()`` gives, per query
block, the key blocks holding at least one allowed pair; ``block_index`` pads each list to
the longest one (``nw``) by repeating its last block, and ``block_bias`` masks the repeats.
The text rows are dense, so the query blocks ``0 .. pb - 1`` (``pb = ceil(T / Bq)``, the
*dense prefix* of ``P = min(pb * Bq, N)`` rows) are computed as dense rows under
``prefix_bias()`` ``[P, N]`` by every kernel that works on fixed-width windows (ORT, the
CPU block kernel), and their rows of the blocked result are replaced; FlexAttention and
Triton read the per-block lists (``block_lists``) and need no prefix. Block density (the
share of (query block, key block) pairs a sparse step visits) is reported beside the token
density (``BlockLayout.block_density``).
"""

from __future__ import annotations

import dataclasses
import functools
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

    kind: Literal["band", "window2d", "joint"]
    n: int
    half: int = 0  # band: half width h
    grid_h: int = 0  # window2d / joint: the token grid (of one frame)
    grid_w: int = 0
    radius: int = 0  # window2d / joint: r
    text: int = 0  # joint: T text tokens first (dense rows and columns)
    frames: int = 1  # joint: F frames of grid_h x grid_w after the text
    tradius: int = -1  # joint: frames |f_i - f_j| <= tradius (-1: every frame)

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

    @staticmethod
    def joint(layout: TokenLayout, density: float, tradius: int = -1) -> MaskSpec:
        """The paper's video / joint mask over ``layout`` (module doc): ``(2r+1)^2 ~=
        gh * gw * density`` inside each frame, frames within ``tradius`` (-1: all)."""
        r = max(0, round((math.sqrt(layout.grid_h * layout.grid_w * density) - 1) / 2))
        return MaskSpec("joint", layout.n, grid_h=layout.grid_h, grid_w=layout.grid_w, radius=r, text=layout.text,
                        frames=layout.frames, tradius=tradius)

    def __post_init__(self) -> None:
        if self.kind == "joint" and self.text + self.frames * self.grid_h * self.grid_w != self.n:
            raise ValueError(f"{self.text} text + {self.frames} x {self.grid_h}x{self.grid_w} tokens "
                             f"is not {self.n}")

    @property
    def structured(self) -> bool:
        """Whether the allowed keys of a query block form a band of blocks (band, window2d);
        a ``joint`` mask needs the listed layout (module doc)."""
        return self.kind != "joint"

    @property
    def halo(self) -> int:
        """Max ``|i - j|`` over the mask (in flattened order)."""
        if self.kind == "band":
            return self.half
        if self.kind == "window2d":
            return self.radius * self.grid_w + self.radius
        return self.n - 1

    def allowed(self, i: np.ndarray, j: np.ndarray) -> np.ndarray:
        """Whether query ``i`` may attend to key ``j`` (broadcasting int arrays)."""
        valid = (j >= 0) & (j < self.n)
        if self.kind == "band":
            return valid & (np.abs(i - j) <= self.half)
        w, r = self.grid_w, self.radius
        if self.kind == "window2d":
            return valid & (np.abs(i // w - j // w) <= r) & (np.abs(i % w - j % w) <= r)
        hw, t = self.grid_h * w, self.text
        vi, vj = i - t, j - t
        fi, fj, pi, pj = vi // hw, vj // hw, vi % hw, vj % hw
        near = (np.abs(pi // w - pj // w) <= r) & (np.abs(pi % w - pj % w) <= r)
        if self.tradius >= 0:
            near = near & (np.abs(fi - fj) <= self.tradius)
        return valid & ((i < t) | (j < t) | near)

    def dense(self) -> np.ndarray:
        """The mask as an ``[n, n]`` bool matrix (tests, references)."""
        idx = np.arange(self.n)
        return self.allowed(idx[:, None], idx[None, :])

    def density(self) -> float:
        """Share of allowed (query, key) pairs, counted per axis (``O(N)``)."""
        def reach(size: int, r: int) -> int:  # sum over positions of the clipped window length
            p = np.arange(size)
            return int((np.minimum(r, p) + np.minimum(r, size - 1 - p) + 1).sum())

        if self.kind == "band":
            return reach(self.n, self.half) / float(self.n) ** 2
        if self.kind == "window2d":
            return reach(self.grid_h, self.radius) * reach(self.grid_w, self.radius) / float(self.n) ** 2
        if self.kind == "joint":
            frames = self.frames ** 2 if self.tradius < 0 else reach(self.frames, self.tradius)
            video = frames * reach(self.grid_h, self.radius) * reach(self.grid_w, self.radius)
            t = self.text
            return (t * self.n + (self.n - t) * t + video) / float(self.n) ** 2
        raise ValueError(f"unknown mask kind {self.kind!r}")

    def describe(self) -> str:
        if self.kind == "band":
            return f"band |i-j| <= {self.half} over {self.n} tokens"
        win = f"{2 * self.radius + 1}x{2 * self.radius + 1} window"
        if self.kind == "window2d":
            return f"{win} on a {self.grid_h}x{self.grid_w} grid"
        frames = "every frame" if self.tradius < 0 or self.tradius >= self.frames - 1 else \
            f"frames within +-{self.tradius}"
        return (f"joint: {self.text} text tokens dense + {self.frames} frame(s) x {self.grid_h}x{self.grid_w}, "
                f"{win} in {frames}")

    def to_args(self) -> tuple[int, ...]:
        """The mask as 8 ints ``(kind, n, half, grid_w, radius, text, frames, tradius)``
        (the arguments of the torch custom ops; ``from_args`` inverts it)."""
        return (KINDS.index(self.kind), self.n, self.half, self.grid_w, self.radius, self.text, self.frames,
                self.tradius)

    @staticmethod
    def from_args(kind: int, n: int, half: int, grid_w: int, radius: int, text: int = 0, frames: int = 1,
                  tradius: int = -1) -> MaskSpec:
        name = KINDS[kind]
        if name == "band":
            return MaskSpec("band", n, half=half)
        gw = max(grid_w, 1)
        if name == "window2d":
            return MaskSpec("window2d", n, grid_h=n // gw, grid_w=gw, radius=radius)
        return MaskSpec("joint", n, grid_h=(n - text) // (frames * gw), grid_w=gw, radius=radius, text=text,
                        frames=frames, tradius=tradius)


KINDS = ("band", "window2d", "joint")


@dataclasses.dataclass(frozen=True)
class TokenLayout:
    """How a sequence of ``n`` tokens is laid out: ``text`` tokens first, then ``frames``
    frames of ``grid_h x grid_w`` patches in raster order."""

    text: int = 0
    frames: int = 1
    grid_h: int = 0
    grid_w: int = 0

    @property
    def n(self) -> int:
        return self.text + self.frames * self.grid_h * self.grid_w

    @staticmethod
    def parse(text: str) -> TokenLayout:
        """``"T+FxHxW"``, ``"T+HxW"``, ``"FxHxW"`` or ``"HxW"`` (e.g. ``226+13x30x45``)."""
        src = text.strip().lower().replace(" ", "")
        t = 0
        if "+" in src:
            head, src = src.split("+", 1)
            try:
                t = int(head)
            except ValueError:
                raise ValueError(f"layout={text!r}: expected T+FxHxW") from None
        try:
            dims = [int(x) for x in src.split("x")]
        except ValueError:
            raise ValueError(f"layout={text!r}: expected T+FxHxW, FxHxW or HxW") from None
        if len(dims) == 2:
            dims = [1, *dims]
        if len(dims) != 3 or min(dims) < 1 or t < 0:
            raise ValueError(f"layout={text!r}: expected T+FxHxW, FxHxW or HxW with positive sizes")
        return TokenLayout(t, *dims)

    def describe(self) -> str:
        grid = f"{self.grid_h}x{self.grid_w}" if self.frames == 1 else f"{self.frames}x{self.grid_h}x{self.grid_w}"
        return f"{self.text}+{grid}" if self.text else grid


def _dilate(grid: np.ndarray, axis: int, r: int) -> np.ndarray:
    """Boolean dilation of ``grid`` by ``r`` cells each way along ``axis`` (clipped)."""
    out = grid.copy()
    n = grid.shape[axis]
    for d in range(1, min(r, n - 1) + 1):
        src = [slice(None)] * grid.ndim
        dst = [slice(None)] * grid.ndim
        src[axis], dst[axis] = slice(0, n - d), slice(d, n)
        out[tuple(dst)] |= grid[tuple(src)]
        out[tuple(src)] |= grid[tuple(dst)]
    return out


def auto_block(spec: MaskSpec) -> int:
    """Query/key block size: the halo rounded up to a power of two, within [16, 128]
    (joint: the in-frame halo ``r * gw + r``)."""
    halo = max(spec.halo if spec.structured else spec.radius * spec.grid_w + spec.radius, 1)
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
        """Band layouts: the window reaches ``c`` key blocks on each side (listed: ``nb - 1``)."""
        if not self.spec.structured:
            return self.nb - 1
        return min(-(-self.spec.halo // self.block), self.nb - 1)

    @property
    def prefix(self) -> int:
        """Rows of the dense prefix (joint: the query blocks that hold text rows; else 0)."""
        if self.spec.structured or self.spec.text == 0:
            return 0
        return min(-(-self.spec.text // self.block) * self.block, self.spec.n)

    @property
    def prefix_blocks(self) -> int:
        return -(-self.prefix // self.block)

    @property
    def nw(self) -> int:
        if self.spec.structured:
            return 2 * self.c + 1
        lens = [len(x) for x in self._lists[self.prefix_blocks:]]
        return max(lens) if lens else 1

    @property
    def width(self) -> int:
        return self.nw * self.block

    @functools.cached_property
    def _lists(self) -> list[np.ndarray]:
        """Per query block, the sorted key blocks holding at least one allowed pair."""
        bq, nb, spec = self.block, self.nb, self.spec
        out = []
        j = np.arange(self.padded)
        for b in range(nb):
            if spec.structured:
                lo, hi = self.key_block_range(b)
                cand = np.arange(lo, hi)
                i = b * bq + np.arange(bq)
                ok = spec.allowed(i[:, None], j[None, lo * bq:hi * bq]) & (i < spec.n)[:, None]
                hit = ok.reshape(bq, hi - lo, bq).any(axis=(0, 2))
                out.append(cand[hit])
                continue
            out.append(self._joint_blocks(b))
        return out

    def _joint_blocks(self, b: int) -> np.ndarray:
        """The key blocks of query block ``b`` under a joint mask: every block when it holds a
        text row; else the text blocks and the blocks of the query tokens' windows, found by
        dilating their (frame, row, col) positions on the ``F x H x W`` grid (``O(N)`` per block)."""
        spec, bq = self.spec, self.block
        t, f, h, w, r = spec.text, spec.frames, spec.grid_h, spec.grid_w, spec.radius
        lo, hi = b * bq, min((b + 1) * bq, spec.n)
        if lo < t:
            return np.arange(self.nb)
        grid = np.zeros((f, h, w), bool)
        grid.reshape(-1)[lo - t:hi - t] = True
        for axis, rad in ((1, r), (2, r)):
            grid = _dilate(grid, axis, rad)
        if spec.tradius < 0 or spec.tradius >= f - 1:
            grid = np.broadcast_to(grid.any(axis=0, keepdims=True), grid.shape)
        else:
            grid = _dilate(grid, 0, spec.tradius)
        keys = t + np.flatnonzero(grid.reshape(-1))
        text_blocks = np.arange(-(-t // bq))
        return np.union1d(text_blocks, keys // bq).astype(np.int64)

    def key_blocks(self) -> list[np.ndarray]:
        """Per query block, the key blocks a sparse kernel visits (those with an allowed pair)."""
        return list(self._lists)

    def block_lists(self) -> tuple[np.ndarray, np.ndarray]:
        """``(kv_num [nb], kv_idx [nb, nb])`` int32: the visited key blocks of each query
        block, padded with zeros (the lists FlexAttention and Triton read)."""
        nb = self.nb
        num = np.zeros(nb, np.int32)
        idx = np.zeros((nb, nb), np.int32)
        for b, lst in enumerate(self._lists):
            num[b] = len(lst)
            idx[b, :len(lst)] = lst
        return num, idx

    def block_density(self) -> float:
        """Share of (query block, key block) pairs a sparse step visits."""
        return float(sum(len(x) for x in self._lists)) / float(self.nb) ** 2

    def block_index(self) -> np.ndarray:
        """``[nb, nw]`` int64: the key blocks of each query block (band: clipped at the ends;
        joint: the listed blocks, padded by repeating the last one)."""
        if self.spec.structured:
            b = np.arange(self.nb)[:, None] + np.arange(self.nw)[None, :] - self.c
            return np.clip(b, 0, self.nb - 1).astype(np.int64)
        nw = self.nw
        out = np.zeros((self.nb, nw), np.int64)
        for b, lst in enumerate(self._lists):
            lst = lst[:nw] if len(lst) else np.zeros(1, np.int64)  # prefix blocks: overwritten rows
            out[b, :len(lst)] = lst
            out[b, len(lst):] = lst[-1]
        return out

    def _valid_cols(self) -> np.ndarray:
        """``[nb, nw]`` bool: the window slot holds a listed block (not a repeat)."""
        lens = np.array([min(len(x), self.nw) for x in self._lists])
        return np.arange(self.nw)[None, :] < lens[:, None]

    def block_bias(self, dtype=np.float32) -> np.ndarray:
        """``[nb, block, W]`` additive bias: 0 where attended, ``NEG`` elsewhere."""
        bq = self.block
        b = np.arange(self.nb)[:, None, None]
        r = np.arange(bq)[None, :, None]
        col = np.arange(self.width)[None, None, :]
        i = b * bq + r
        if self.spec.structured:
            kb = b + col // bq - self.c
            j = kb * bq + col % bq
            ok = (kb >= 0) & (kb < self.nb) & self.spec.allowed(i, j)
        else:
            idx = self.block_index()
            kb = idx[:, None, :].repeat(bq, axis=2)  # [nb, 1, W]: the block of each window column
            j = kb * bq + col % bq
            valid = self._valid_cols()[:, None, :].repeat(bq, axis=2)
            ok = valid & self.spec.allowed(i, j)
        return np.where(ok, 0.0, NEG).astype(dtype)

    def prefix_bias(self, dtype=np.float32) -> np.ndarray:
        """``[P, n]`` additive bias of the dense prefix rows (0 where attended, ``NEG`` elsewhere)."""
        i = np.arange(self.prefix)[:, None]
        j = np.arange(self.spec.n)[None, :]
        return np.where(self.spec.allowed(i, j), 0.0, NEG).astype(dtype)

    def key_block_range(self, b: int) -> tuple[int, int]:
        """Key blocks ``[lo, hi)`` a query block needs (band layouts: Triton loop bounds)."""
        return max(0, b - self.c), min(self.nb, b + self.c + 1)

    def describe(self) -> str:
        """``3 of 64 key blocks per query block (block density 4.7 %)`` (the mean count)."""
        mean = float(np.mean([len(x) for x in self._lists]))
        return f"{mean:.3g} of {self.nb} key blocks per query block (block density {100 * self.block_density():.3g} %)"
