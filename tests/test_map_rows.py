"""``map_rows``: blockwise float64 folding equals the whole-array float64 computation, on
one thread or several, for C- and Fortran-ordered inputs, and keeps the memory order."""

from __future__ import annotations

import numpy as np
import pytest

from rewriter.ir import view as view_mod
from rewriter.ir.view import map_rows, scale_linear


def _split_across_threads(monkeypatch, workers: int) -> None:
    """Make small arrays take map_rows' threaded path, with ``workers`` threads."""
    monkeypatch.setattr(view_mod, "_THREAD_ELEMS", 1 << 10)
    monkeypatch.setattr(view_mod.os, "cpu_count", lambda: workers)


@pytest.mark.parametrize("threads", [False, True])
@pytest.mark.parametrize("transposed", [False, True])
@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_map_rows_equals_whole_array_float64(monkeypatch, threads, transposed, dtype):
    if threads:
        _split_across_threads(monkeypatch, 4)
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


@pytest.mark.parametrize("threads", [False, True])
@pytest.mark.parametrize("transposed", [False, True])
def test_scale_linear_equals_float64_formula(monkeypatch, threads, transposed):
    """diag(o) W diag(i) in W's dtype and layout, and W @ c in float64, whichever way W is
    stored and however many threads run."""
    if threads:
        _split_across_threads(monkeypatch, 3)
    rng = np.random.default_rng(1)
    stored = rng.standard_normal((190, 230)).astype(np.float32)
    w = stored.T if transposed else stored  # [out, in]
    o, i, c = (rng.standard_normal(n) for n in (w.shape[0], w.shape[1], w.shape[1]))
    got, shift = scale_linear(w, out_scale=o, in_scale=i, in_shift=c)
    w64 = w.astype(np.float64)
    assert np.array_equal(got, (o[:, None] * w64 * i[None, :]).astype(np.float32))
    assert got.flags.f_contiguous == transposed
    np.testing.assert_allclose(shift, w64 @ c, rtol=1e-12, atol=1e-12)
    again, shift2 = scale_linear(w, out_scale=o, in_scale=i, in_shift=c)
    assert np.array_equal(shift, shift2)  # deterministic
    only, none = scale_linear(w, out_scale=o)
    assert none is None and np.array_equal(only, (o[:, None] * w64).astype(np.float32))


@pytest.mark.parametrize("threads", [False, True])
@pytest.mark.parametrize("transposed", [False, True])
def test_scale_linear_drop_last_input(monkeypatch, threads, transposed):
    """crms' reader fold: (W diag(i))[:, :-1] - (W diag(i))[:, -1:] and W @ c, either layout."""
    if threads:
        _split_across_threads(monkeypatch, 3)
    rng = np.random.default_rng(2)
    stored = rng.standard_normal((210, 170)).astype(np.float32)
    w = stored.T if transposed else stored  # [out, in]
    i, c = rng.standard_normal(w.shape[1]), rng.standard_normal(w.shape[1])
    got, shift = scale_linear(w, in_scale=i, in_shift=c, drop_last_input=True)
    w64 = w.astype(np.float64) * i[None, :]
    assert got.shape == (w.shape[0], w.shape[1] - 1) and got.flags.f_contiguous == transposed
    assert np.array_equal(got, (w64[:, :-1] - w64[:, -1:]).astype(np.float32))
    np.testing.assert_allclose(shift, w.astype(np.float64) @ c, rtol=1e-12, atol=1e-12)
    plain, none = scale_linear(w, drop_last_input=True)
    w64 = w.astype(np.float64)
    assert none is None and np.array_equal(plain, (w64[:, :-1] - w64[:, -1:]).astype(np.float32))
