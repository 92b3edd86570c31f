"""``backends/shiftadd_lut.py`` (the lookup-table CPU kernel in C, AVX-512) against the
reference decode ``x @ dequantize(W)^T`` in float64, its use by the torch op and by
``backends/shiftadd_cpu.py``, the fallback where it is unavailable, and its compile cache.

Tolerance from the arithmetic: each output is a chain of at most ``3`` (table of 4 signed
terms) ``+ block_cols / 4`` (lookups of one scale block) ``+ 1`` (scale fma) ``+ q Kb``
(blocks and planes) float32 roundings, so ``|y - ref| <= 1.01 depth eps32
sum_k sum_c |alpha_k[c, n]| |x_c|``."""

from __future__ import annotations

import os
import shutil
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch

from backends import shiftadd_lut
from backends.shiftadd_cpu import packed_linear
from backends.triton.shiftadd import (BLOCK_COLS, OP_MAX_TOKENS, alpha as alpha_of, dequantize, reference,
                                      shiftadd_linear)

EPS32 = float(np.finfo(np.float32).eps)

needs_kernel = pytest.mark.skipif(
    not shiftadd_lut.cpu_supported() or shutil.which(shiftadd_lut.COMPILER) is None,
    reason="the LUT kernel needs an x86 CPU with AVX-512 (avx512f/bw/vl) and gcc")


@pytest.fixture
def fresh_cache(tmp_path, monkeypatch):
    """A private kernel cache and a process state that has not tried to load the kernel."""
    monkeypatch.setenv("REWRITER_CACHE", str(tmp_path))
    shiftadd_lut.reset()
    yield tmp_path
    shiftadd_lut.reset()


def _case(m, n, k, q, block, group, seed=0):
    g = torch.Generator().manual_seed(seed)
    planes = torch.randint(-2**31, 2**31 - 1, (q, -(-k // 32), n), dtype=torch.int32, generator=g)
    alpha = torch.rand(q, -(-k // block), -(-n // group), generator=g) * 0.1 + 0.01
    x = torch.randn(m, k, generator=g)
    return x, planes, alpha


def _reference(x, planes, alpha, block, group):
    """float64 ``x @ W^T`` decoded from the bits, and ``sum_k |alpha_k| |x|`` per output."""
    q, kw, n = planes.shape
    k = x.shape[1]
    shifts = torch.arange(32, dtype=torch.int32)
    bits = ((planes[:, :, None, :] >> shifts[None, None, :, None]) & 1).reshape(q, kw * 32, n)[:, :k].double()
    a = alpha.double().repeat_interleave(block, 1).repeat_interleave(group, 2)[:, :k, :n]
    return x.double() @ ((2 * bits - 1) * a).sum(0), x.double().abs() @ a.abs().sum(0)


def _bound(mag, k, q, block):
    depth = 3 + block // 4 + 1 + q * -(-k // block)
    return 1.01 * depth * EPS32 * mag


@needs_kernel
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("m,n,k,q,block,group", [
    (1, 4096 // 16, 256, 3, 64, 1),  # the layer bench's layout
    (1, 77, 96, 1, 64, 1),  # N not a multiple of 16, K a multiple of 32 but not of the block
    (2, 300, 200, 2, 8, 128),  # K not a multiple of 32, the op's 8-column blocks, 128-row groups
    (3, 64, 72, 4, 8, 16),  # 16-row groups
    (4, 50, 100, 3, 8, 3),  # groups neither 1 nor a multiple of 16 (gathered scales)
    (1, 33, 4, 2, 4, 1),  # a single nibble
    (2, 40, 96, 2, 32, 1),  # one block per word
    (1, 20, 50, 2, 12, 1),  # blocks that straddle words at varying nibbles
])
def test_lut_equals_reference_decode(m, n, k, q, block, group, threads):
    """The LUT kernel equals x @ dequantize(W)^T within the float32 rounding of its sum chain."""
    x, planes, alpha = _case(m, n, k, q, block, group)
    ref, mag = _reference(x, planes, alpha, block, group)
    got = shiftadd_lut.lut_linear(x, planes, alpha, block, group, threads=threads).double()
    assert got.shape == (m, n)
    err = (got - ref).abs()
    assert torch.all(err <= _bound(mag, k, q, block)), float(err.max())


@needs_kernel
def test_lut_padding_bits_ignored():
    """Plane bits beyond K (padding of the last word) do not change the result."""
    x, planes, alpha = _case(2, 40, 70, 2, 8, 1)
    flipped = planes.clone()
    flipped[:, -1] ^= ~((1 << (70 - 64)) - 1)  # every bit at column >= 70
    a = shiftadd_lut.lut_linear(x, planes, alpha, 8, 1)
    b = shiftadd_lut.lut_linear(x, flipped, alpha, 8, 1)
    assert torch.equal(a, b)


def _op_case(m, k=200, n=300, group=128, seed=1):
    g = torch.Generator().manual_seed(seed)
    planes = torch.randint(-2**31, 2**31 - 1, (3, -(-k // 32), n), dtype=torch.int32, generator=g)
    kb, ng = -(-k // BLOCK_COLS), -(-n // group)
    exps = torch.randint(-9, -1, (3, 3, kb, ng), dtype=torch.int8, generator=g)
    signs = torch.randint(-1, 2, (3, 3, kb, ng), dtype=torch.int8, generator=g)
    return torch.randn(m, k, generator=g), planes, exps, signs, torch.randn(n, generator=g)


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_op_takes_lut_path_and_matches_reference(dtype):
    """rewriter::shiftadd_linear on CPU runs the LUT kernel (counter) and equals the plain-torch reference."""
    x, planes, exps, signs, bias = _op_case(2)
    x = x.to(dtype)
    before = shiftadd_lut.CALLS["lut"]
    got = shiftadd_linear(x, planes, exps, signs, bias, 128, 0)
    assert shiftadd_lut.CALLS["lut"] == before + 1
    assert got.dtype == dtype
    ref = reference(x, planes, exps, signs, bias, 128, 0)
    w = dequantize(planes, exps, signs, x.shape[1], 128, 0).double()
    a = alpha_of(exps, signs).double().abs().repeat_interleave(BLOCK_COLS, 1).repeat_interleave(128, 2)
    mag = x.double().abs() @ a.sum(0)[: x.shape[1], : w.shape[1]]
    # the LUT chain's rounding, the reference's (q-term decode, K-term matmul), and one
    # rounding of each side to dtype at the end (one unit of dtype apart at most)
    k = x.shape[1]
    tol = (_bound(mag, k, 3, BLOCK_COLS) + 1.01 * (k + 3) * EPS32 * mag
           + float(torch.finfo(dtype).eps) * ref.double().abs())
    assert torch.all((got.double() - ref.double()).abs() <= tol)


@needs_kernel
def test_op_runs_lut_past_packed_linear_cap():
    """The op's alternative is the reference decode, not F.linear, so its cap is OP_MAX_TOKENS,
    above shiftadd_lut.MAX_TOKENS: a batch between the two runs the LUT kernel and matches."""
    assert OP_MAX_TOKENS > shiftadd_lut.MAX_TOKENS
    x, planes, exps, signs, bias = _op_case(OP_MAX_TOKENS)
    before = shiftadd_lut.CALLS["lut"]
    got = shiftadd_linear(x, planes, exps, signs, bias, 128, 0)
    assert shiftadd_lut.CALLS["lut"] == before + 1
    ref = reference(x, planes, exps, signs, bias, 128, 0)
    a = alpha_of(exps, signs).double().abs().repeat_interleave(BLOCK_COLS, 1).repeat_interleave(128, 2)
    k, n = x.shape[1], planes.shape[-1]
    mag = x.double().abs() @ a.sum(0)[:k, :n]
    tol = _bound(mag, k, 3, BLOCK_COLS) + 1.01 * (k + 3) * EPS32 * mag + EPS32 * ref.double().abs()
    assert torch.all((got.double() - ref.double()).abs() <= tol)


@needs_kernel
def test_op_large_batch_and_denseshift_use_reference():
    """Above OP_MAX_TOKENS tokens, and for DenseShift (mode 1), the op does not call the LUT kernel."""
    x, planes, exps, signs, bias = _op_case(OP_MAX_TOKENS + 1)
    before = shiftadd_lut.CALLS["lut"]
    got = shiftadd_linear(x, planes, exps, signs, bias, 128, 0)
    assert torch.equal(got, reference(x, planes, exps, signs, bias, 128, 0))
    n = planes.shape[-1]
    g = torch.Generator().manual_seed(2)
    e1 = torch.randint(-6, 0, (2, 1, 1, n), dtype=torch.int8, generator=g)
    s1 = torch.randint(-1, 2, (2, 1, 1, n), dtype=torch.int8, generator=g)
    got = shiftadd_linear(x[:1], planes, e1, s1, bias, 1, 1)
    assert torch.equal(got, reference(x[:1], planes, e1, s1, bias, 1, 1))
    assert shiftadd_lut.CALLS["lut"] == before


@needs_kernel
def test_packed_linear_takes_lut_path():
    """backends/shiftadd_cpu.packed_linear runs the LUT kernel at one token (no compilation) and matches the decode."""
    x, planes, alpha = _case(1, 96, 128, 3, 64, 1)
    before = shiftadd_lut.CALLS["lut"]
    got = packed_linear(x, planes, alpha, 64, 1).double()
    assert shiftadd_lut.CALLS["lut"] == before + 1
    ref, mag = _reference(x, planes, alpha, 64, 1)
    assert torch.all((got - ref).abs() <= _bound(mag, 128, 3, 64))


def test_fallback_when_unavailable(monkeypatch):
    """With the kernel unavailable the op runs the reference: same result, no error, no LUT call."""
    monkeypatch.setitem(shiftadd_lut._STATE, "lib", None)
    x, planes, exps, signs, bias = _op_case(1)
    before = shiftadd_lut.CALLS["lut"]
    got = shiftadd_linear(x, planes, exps, signs, bias, 128, 0)
    assert torch.equal(got, reference(x, planes, exps, signs, bias, 128, 0))
    assert shiftadd_lut.CALLS["lut"] == before
    assert not shiftadd_lut.supports(x, planes, alpha_of(exps, signs), BLOCK_COLS, 128)


@needs_kernel
def test_compile_cache_reused(fresh_cache):
    """A second load in a fresh state reuses the cached library: no recompilation, same file and mtime."""
    compiles = shiftadd_lut.CALLS["compiles"]
    assert shiftadd_lut.available()
    path = shiftadd_lut.library_path()
    assert path.parent == fresh_cache / "kernels" and path.exists()
    assert shiftadd_lut.CALLS["compiles"] == compiles + 1
    mtime = path.stat().st_mtime_ns
    shiftadd_lut.reset()
    assert shiftadd_lut.available()
    assert shiftadd_lut.CALLS["compiles"] == compiles + 1
    assert path.stat().st_mtime_ns == mtime
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temporary left


def test_broken_compiler_falls_back(fresh_cache, monkeypatch):
    """A compiler that does not exist leaves the kernel unavailable and the op on its reference, without error."""
    monkeypatch.setattr(shiftadd_lut, "COMPILER", "/nonexistent/gcc")
    assert shiftadd_lut.library() is None
    assert not any((fresh_cache / "kernels").glob("*")) if (fresh_cache / "kernels").exists() else True
    x, planes, exps, signs, bias = _op_case(1)
    assert torch.equal(shiftadd_linear(x, planes, exps, signs, bias, 128, 0),
                       reference(x, planes, exps, signs, bias, 128, 0))


@needs_kernel
def test_concurrent_calls_agree():
    """Calls from several Python threads at once (ctypes releases the GIL) give the single-thread result."""
    x, planes, alpha = _case(1, 1000, 512, 3, 64, 1, seed=5)
    want = shiftadd_lut.lut_linear(x, planes, alpha, 64, 1, threads=1)
    with ThreadPoolExecutor(4) as ex:
        outs = list(ex.map(lambda _: shiftadd_lut.lut_linear(x, planes, alpha, 64, 1, threads=2), range(16)))
    assert all(torch.equal(o, want) for o in outs)


@needs_kernel
def test_forked_child_runs_pooled_calls():
    """After a 2-thread call, a forked child (no pool workers) still runs 2-thread calls and gets the same result."""
    x, planes, alpha = _case(1, 1000, 256, 3, 64, 1, seed=6)
    want = shiftadd_lut.lut_linear(x, planes, alpha, 64, 1, threads=2)
    pid = os.fork()
    if pid == 0:  # the child: exit status 0 only if the results agree
        ok = all(torch.equal(shiftadd_lut.lut_linear(x, planes, alpha, 64, 1, threads=2), want) for _ in range(3))
        os._exit(0 if ok else 1)
    _, status = os.waitpid(pid, 0)
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0


@needs_kernel
def test_openmp_team_is_torchs_runtime():
    """The default build runs its threads as an OpenMP team on the libgomp torch loaded (one
    OpenMP runtime in the process, not a second one beside torch's)."""
    assert shiftadd_lut.thread_mode() == "openmp"
    maps = open("/proc/self/maps").read()
    gomp = {line.split()[-1] for line in maps.splitlines() if "libgomp" in line}
    assert len(gomp) == 1 and "torch" in next(iter(gomp)), gomp


@needs_kernel
@pytest.mark.parametrize("flags", ["FLAGS", "POOL_FLAGS"])
def test_both_builds_agree_across_threads(fresh_cache, monkeypatch, flags):
    """The OpenMP build and the pool build (where OpenMP is missing) give the 1-thread result
    at 2 threads, back to back over shapes of different chunk counts, and from several
    Python threads at once."""
    monkeypatch.setattr(shiftadd_lut, "FLAGS", getattr(shiftadd_lut, flags))
    assert shiftadd_lut.thread_mode() == ("openmp" if flags == "FLAGS" else "pool")
    cases = [_case(2, n, 96, 2, 32, 1, seed=n) for n in (100, 1000, 16)]
    wants = [shiftadd_lut.lut_linear(x, p, a, 32, 1, threads=1) for x, p, a in cases]
    for i in range(60):
        x, p, a = cases[i % 3]
        assert torch.equal(shiftadd_lut.lut_linear(x, p, a, 32, 1, threads=2), wants[i % 3]), i
    x, p, a = cases[1]
    with ThreadPoolExecutor(3) as ex:
        outs = list(ex.map(lambda _: shiftadd_lut.lut_linear(x, p, a, 32, 1, threads=2), range(9)))
    assert all(torch.equal(o, wants[1]) for o in outs)


@needs_kernel
def test_scales_equal_alpha():
    """The C scales equal backends.triton.shiftadd.alpha bit for bit (zero terms, the whole exponent range in use)."""
    g = torch.Generator().manual_seed(7)
    exps = torch.randint(-126, 128, (3, 2, 40, 5), dtype=torch.int8, generator=g)
    signs = torch.randint(-1, 2, (3, 2, 40, 5), dtype=torch.int8, generator=g)
    got = shiftadd_lut.scales(exps, signs)
    want = alpha_of(exps, signs)
    assert got.shape == want.shape and torch.equal(got.view(torch.int32), want.view(torch.int32))


@needs_kernel
def test_pooled_calls_back_to_back():
    """Back-to-back 2-thread calls of alternating shapes (different chunk counts) each give the 1-thread result."""
    cases = [_case(1, n, 64, 2, 32, 1, seed=n) for n in (100, 1000, 16)]
    wants = [shiftadd_lut.lut_linear(x, p, a, 32, 1, threads=1) for x, p, a in cases]
    for i in range(300):
        x, p, a = cases[i % 3]
        assert torch.equal(shiftadd_lut.lut_linear(x, p, a, 32, 1, threads=2), wants[i % 3]), i
