"""``map_rows``: blockwise float64 folding equals the whole-array float64 computation, on
one thread or several, for C- and Fortran-ordered inputs, and keeps the memory order."""

from __future__ import annotations

import numpy as np
import pytest

from rewriter.ir import view as view_mod
from rewriter.ir.view import map_rows


@pytest.mark.parametrize("threads", [False, True])
@pytest.mark.parametrize("transposed", [False, True])
@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_map_rows_equals_whole_array_float64(monkeypatch, threads, transposed, dtype):
    if threads:
        monkeypatch.setattr(view_mod, "_THREAD_ELEMS", 1 << 10)
        monkeypatch.setattr(view_mod.os, "cpu_count", lambda: 4)
    rng = np.random.default_rng(0)
    a = rng.standard_normal((300, 257)).astype(dtype)
    a = a.T if transposed else a
    gamma = rng.standard_normal(a.shape[1])
    beta = rng.standard_normal(a.shape[1])
    bias = np.zeros(a.shape[0])

    def fold(block, rows):
        bias[rows] += block @ beta
        block *= gamma[None, :]
        return block[:, :-1] - block[:, -1:]

    got = map_rows(a, fold, a.shape[1] - 1, a.dtype)
    w = a.astype(np.float64) * gamma[None, :]
    want = (w[:, :-1] - w[:, -1:]).astype(a.dtype)
    assert np.array_equal(got, want)
    np.testing.assert_allclose(bias, a.astype(np.float64) @ beta, rtol=1e-12, atol=1e-12)
    assert got.flags.f_contiguous == transposed and got.dtype == a.dtype
