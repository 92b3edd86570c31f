"""Re-ttention on FlexAttention (backends/flex_rettention.py): its block mask against the
dense mask, its refresh and sparse steps against the CPU block kernel and the NumPy
formulas, the CPU block kernel itself against NumPy, and the ops' kernel choice.

Tolerance (fp32 against fp32, ``eps = 2^-23``): each output is a softmax-weighted sum over
at most ``n`` keys of values whose scores are dot products of length ``Dh``; the standard
summation bound gives a relative error <= ``(n + Dh) * eps`` per kernel, so two kernels
differ by at most ``2 * (n + Dh) * eps``; a factor 2 more covers ``exp``/``log`` and the
division (each a few ulp): ``TOL = 4 * (n + Dh) * eps``."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from backends import flex_rettention as flex
from backends.rettention_spec import BlockLayout, MaskSpec, auto_block
from backends.triton import rettention as kern

EPS32 = float(np.finfo(np.float32).eps)
pytestmark = pytest.mark.skipif(not flex.available(), reason=f"torch < {flex.TORCH_FLOOR}")


def tol(n: int, d: int) -> float:
    return 4 * (n + d) * EPS32


def rel(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / np.abs(a).max())


def np_formulas(q, k, v, scale, mask):
    """NumPy float64: (O_full, O_M, rho = Z_M / Z_full) from the explicit N x N scores."""
    s = scale * np.einsum("bhnd,bhmd->bhnm", q.astype(np.float64), k.astype(np.float64))
    e = np.exp(s - s.max(-1, keepdims=True))
    em = np.where(mask, e, 0.0)
    o_full = np.einsum("bhnm,bhmd->bhnd", e / e.sum(-1)[..., None], v.astype(np.float64))
    o_m = np.einsum("bhnm,bhmd->bhnd", em / em.sum(-1)[..., None], v.astype(np.float64))
    return o_full, o_m, em.sum(-1) / e.sum(-1)


@pytest.mark.parametrize("spec,block", [(MaskSpec.band(100, 0.1), 16), (MaskSpec.band(4096, 0.03125), 64),
                                        (MaskSpec.window2d(48, 0.2, grid=(6, 8)), 16)],
                         ids=lambda x: x.describe() if isinstance(x, MaskSpec) else str(x))
def test_block_lists_cover_the_mask_exactly(spec, block):
    """Partial + full key blocks hold every allowed pair; full blocks hold only allowed pairs."""
    layout = BlockLayout(spec, block)
    kv_num, kv_idx, full_num, full_idx = flex.block_lists(layout)
    n, nb = spec.n, layout.nb
    cover = np.zeros((nb * block, nb * block), bool)
    for b in range(nb):
        rows = slice(b * block, (b + 1) * block)
        for kb in kv_idx[b, :kv_num[b]]:
            cover[rows, kb * block:(kb + 1) * block] = True
        for kb in full_idx[b, :full_num[b]]:
            cols = slice(kb * block, (kb + 1) * block)
            i = np.arange(b * block, (b + 1) * block)
            j = np.arange(kb * block, (kb + 1) * block)
            allowed = spec.allowed(i[:, None], j[None, :])[i < n]
            assert allowed.all(), f"full block ({b}, {kb}) holds a masked pair"
            cover[rows, cols] = True
    dense = spec.dense()
    assert (cover[:n, :n] | ~dense).all(), "an allowed pair lies in no visited block"
    if spec.n == 4096:  # the acceptance shape: 3 blocks of 64 per query block, ~21x less work than dense
        assert flex.visited_keys(layout) <= 3 * block
        assert n / flex.visited_keys(layout) > 21


@pytest.mark.slow
def test_flex_matches_cpu_kernel_and_formulas():
    """Flex refresh (O_full, rho, R) and sparse step equal the CPU block kernel and the NumPy
    formulas within 4 (n + Dh) eps, for a band with n not a multiple of the block and a 2-D window."""
    rng = np.random.default_rng(0)
    for spec, d in [(MaskSpec.band(100, 0.1), 16), (MaskSpec.window2d(48, 0.2, grid=(6, 8)), 16)]:
        layout = BlockLayout(spec, auto_block(spec))
        q, k, v = (rng.standard_normal((2, 3, spec.n, d)).astype(np.float32) for _ in range(3))
        tq, tk, tv = map(torch.from_numpy, (q, k, v))
        scale = d ** -0.5
        o_full, o_m, rho = np_formulas(q, k, v, scale, spec.dense())
        f_o, f_rho, f_r = flex.refresh(tq, tk, tv, scale, layout)
        c_o, c_rho, c_r = kern.cpu_refresh(tq, tk, tv, scale, layout)
        t = tol(spec.n, d)
        for want, got, cpu in [(o_full, f_o, c_o), (rho, f_rho, c_rho), (o_full - rho[..., None] * o_m, f_r, c_r)]:
            assert rel(want, got) <= t
            assert rel(cpu, got) <= t
        f_s = flex.sparse(tq, tk, tv, f_rho, f_r, 0.08, scale, layout)
        c_s = kern.cpu_sparse(tq, tk, tv, f_rho, f_r, 0.08, scale, layout)
        assert rel(c_s, f_s) <= t
        assert rel((rho + 0.08)[..., None] * o_m + (o_full - rho[..., None] * o_m), f_s) <= t
        assert rel(o_m, f_s.numpy()) > 1e-3  # the correction is not a no-op


@pytest.mark.parametrize("spec", [MaskSpec.band(100, 0.1), MaskSpec.window2d(48, 0.2, grid=(6, 8))],
                         ids=lambda s: s.describe())
def test_cpu_block_kernel_matches_numpy(spec):
    """The hand CPU block kernels (cpu_refresh / cpu_sparse, called directly) equal the NumPy formulas."""
    rng = np.random.default_rng(1)
    d = 8
    q, k, v = (rng.standard_normal((2, 3, spec.n, d)).astype(np.float32) for _ in range(3))
    layout = BlockLayout(spec, auto_block(spec))
    scale = d ** -0.5
    o_full, o_m, rho = np_formulas(q, k, v, scale, spec.dense())
    got_o, got_rho, got_r = kern.cpu_refresh(*map(torch.from_numpy, (q, k, v)), scale, layout)
    t = tol(spec.n, d)
    assert rel(o_full, got_o) <= t and rel(rho, got_rho) <= t
    assert rel(o_full - rho[..., None] * o_m, got_r) <= t
    out = kern.cpu_sparse(*map(torch.from_numpy, (q, k, v)), got_rho, got_r, 0.08, scale, layout)
    assert rel((rho + 0.08)[..., None] * o_m + (o_full - rho[..., None] * o_m), out) <= t


def test_kernel_choice(monkeypatch):
    """Small CPU sequences run the block kernel, long ones flex; the environment forces one."""
    monkeypatch.delenv(kern.KERNEL_ENV, raising=False)
    x = torch.empty(1)
    assert kern.kernel_for(x, 256) == "blocks"
    assert kern.kernel_for(x, kern.FLEX_MIN_TOKENS) == "flex"
    monkeypatch.setenv(kern.KERNEL_ENV, "blocks")
    assert kern.kernel_for(x, 4096) == "blocks"
    monkeypatch.setenv(kern.KERNEL_ENV, "flex")
    assert kern.kernel_for(x, 64) == "flex"


def test_ops_have_fakes_and_stay_opaque_under_compile():
    """torch.compile of a function calling both Re-ttention ops: 0 graph breaks, and the ops
    run through their fakes while tracing (output shapes and dtypes of the real kernels)."""
    spec = MaskSpec.band(64, 0.25)
    layout = BlockLayout(spec, auto_block(spec))
    q, k, v = (torch.randn(1, 2, 64, 8) for _ in range(3))

    def f(q, k, v):
        o, rho, res = kern.refresh(q, k, v, 0.35, layout)
        return o + kern.sparse(q, k, v, rho, res, 0.04, 0.35, layout)

    ex = torch._dynamo.explain(f)(q, k, v)
    assert ex.graph_break_count == 0 and ex.graph_count == 1
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode() as mode:
        fq, fk, fv = (mode.from_tensor(t) for t in (q, k, v))
        o, rho, res = kern.refresh(fq, fk, fv, 0.35, layout)
    assert o.shape == q.shape and rho.shape == (1, 2, 64) and rho.dtype == torch.float32 and res.shape == q.shape


@pytest.mark.slow
def test_compiled_program_builds_block_mask_on_first_call(monkeypatch):
    """A compiled program whose first call builds the flex block mask inside the sparse op
    (the op then runs under AOTAutograd's aliasing checker) runs and equals eager."""
    monkeypatch.setenv(kern.KERNEL_ENV, "flex")
    n, h, d = 128, 1, 16
    spec = MaskSpec.band(n, 0.125)
    layout = BlockLayout(spec, auto_block(spec))
    flex._block_mask.cache_clear()  # the first compiled call must build it

    class Sparse(torch.nn.Module):
        def forward(self, q, k, v, rho, res):
            return kern.sparse(q * 1.0, k, v, rho, res, 0.04, 0.25, layout) + 1.0

    g = torch.Generator().manual_seed(0)
    q, k, v, res = (torch.randn(1, h, n, d, generator=g) for _ in range(4))
    rho = torch.rand(1, h, n, generator=g)
    with torch.no_grad():
        got = torch.compile(Sparse())(q, k, v, rho, res)
    want = Sparse()(q, k, v, rho, res)
    # the same kernel on the same inputs, eager and from the compiled program: equal bits
    # except the two elementwise ops around it, which Inductor may fuse (one rounding each)
    assert torch.allclose(got, want, rtol=2 * torch.finfo(torch.float32).eps, atol=0)
