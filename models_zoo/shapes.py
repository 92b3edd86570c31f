"""Procedural training images for the zoo DiT: flat-coloured shapes on a flat background.

Each ``32 x 32`` RGB image has a background colour and one to three shapes (disc,
square, upward triangle) painted in order, each in a palette colour different from
the background, with random centre and size and hard edges. Pixels are exactly
palette colours, which makes ``models_zoo.eval.palette_error`` a meaningful structure
score for samples. Generated with numpy only, from a ``numpy.random.Generator``, so a
seed fixes the whole data stream; values are returned in ``[-1, 1]``, ``float32``,
layout ``[N, 3, H, W]``.
"""

from __future__ import annotations

import numpy as np

__all__ = ["PALETTE", "SHAPES", "make_batch"]

# Flat colours, RGB in [0, 1].
PALETTE = np.array(
    [
        [0.90, 0.10, 0.10],  # red
        [0.10, 0.70, 0.20],  # green
        [0.15, 0.30, 0.90],  # blue
        [0.95, 0.85, 0.10],  # yellow
        [0.95, 0.95, 0.95],  # white
        [0.05, 0.05, 0.08],  # black
        [0.60, 0.20, 0.80],  # purple
        [1.00, 0.55, 0.10],  # orange
    ],
    dtype=np.float32,
)
SHAPES = ("disc", "square", "triangle")


def make_batch(
    rng: np.random.Generator, n: int, size: int = 32, max_shapes: int = 3
) -> np.ndarray:
    """``n`` images ``[n, 3, size, size]`` in ``[-1, 1]`` drawn from ``rng``."""
    k = len(PALETTE)
    yy, xx = np.meshgrid(np.arange(size) + 0.5, np.arange(size) + 0.5, indexing="ij")
    yy, xx = yy[None], xx[None]  # [1, H, W]
    bg = rng.integers(0, k, n)
    canvas = np.broadcast_to(PALETTE[bg][:, :, None, None], (n, 3, size, size)).copy()
    count = rng.integers(1, max_shapes + 1, n)
    for slot in range(max_shapes):
        kind = rng.integers(0, len(SHAPES), n)
        colour = (bg + rng.integers(1, k, n)) % k  # never the background colour
        cx = rng.uniform(0.2 * size, 0.8 * size, n)[:, None, None]
        cy = rng.uniform(0.2 * size, 0.8 * size, n)[:, None, None]
        r = rng.uniform(0.12 * size, 0.3 * size, n)[:, None, None]
        dx, dy = xx - cx, yy - cy
        disc = dx**2 + dy**2 <= r**2
        square = (np.abs(dx) <= 0.8 * r) & (np.abs(dy) <= 0.8 * r)
        # Upward triangle: apex at (cx, cy - r), base at y = cy + 0.8 r, half-width r.
        depth = (dy + r) / (1.8 * r)
        triangle = (depth >= 0) & (depth <= 1) & (np.abs(dx) <= depth * r)
        mask = np.where(kind[:, None, None] == 0, disc, np.where(kind[:, None, None] == 1, square, triangle))
        mask &= (slot < count)[:, None, None]
        canvas = np.where(mask[:, None], PALETTE[colour][:, :, None, None], canvas)
    return (canvas * 2.0 - 1.0).astype(np.float32)
