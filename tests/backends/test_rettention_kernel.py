"""Re-ttention kernels: the block-sparse CPU custom ops against a NumPy reference of the
formulas, the sparse step's independence from keys outside the window, the block layout,
and the Triton kernels (Triton interpreter, in a subprocess) against the CPU kernels."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from backends.rettention_spec import BlockLayout, MaskSpec, Schedule, auto_block
from backends.triton import rettention as kern
from tests.fp_bounds import U16, U32, attention_bounds, rel_tol

ROOT = Path(__file__).resolve().parents[2]


def np_reference(q, k, v, scale, mask):
    """NumPy float64: (O_full, O_M, rho = Z_M / Z_full) from the explicit N x N scores."""
    s = scale * np.einsum("bhnd,bhmd->bhnm", q.astype(np.float64), k.astype(np.float64))
    e = np.exp(s - s.max(-1, keepdims=True))
    z = e.sum(-1)
    em = np.where(mask, e, 0.0)
    zm = em.sum(-1)
    o_full = np.einsum("bhnm,bhmd->bhnd", e / z[..., None], v.astype(np.float64))
    o_m = np.einsum("bhnm,bhmd->bhnd", em / zm[..., None], v.astype(np.float64))
    return o_full, o_m, zm / z


def rel(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / np.abs(a).max())


SPECS = [MaskSpec.band(100, 0.1), MaskSpec.band(256, 0.03125), MaskSpec.window2d(64, 0.15),
         MaskSpec.window2d(48, 0.2, grid=(6, 8))]


def kernel_tolerances(q, k, v, scale, spec, coef, *, blocks=1):
    """max|a-b|/max|a| tolerances of (O_full, rho, R, sparse output) for the float32 kernels,
    from the rounding-error bounds of tests/fp_bounds.py (worst case over summation orders,
    so independent of threads, SIMD width and blocking)."""
    u = U32
    b = attention_bounds(q, k, v, scale, spec.dense(), blocks=blocks)
    om, rho = b["o_m"], b["rho"][..., None]
    r = b["o_full"] - rho * om
    # R = O_full - rho * O_M: the three inputs' errors + a multiply and a subtract (2 roundings)
    d_r = b["d_full"] + b["d_rho"][..., None] * np.abs(om) + rho * b["d_m"] + 2 * u * (np.abs(b["o_full"]) + rho * np.abs(om))
    # (rho + c) * O_M + R from the kernel's rho and R: their errors + O_M's + 3 roundings (add, fma)
    out = (rho + coef) * om + r
    d_out = d_r + b["d_rho"][..., None] * np.abs(om) + (rho + coef) * b["d_m"] + 3 * u * (np.abs(out) + (rho + coef) * np.abs(om))
    return {"o": rel_tol(b["d_full"], b["o_full"]), "rho": rel_tol(b["d_rho"], b["rho"]),
            "r": rel_tol(d_r, r), "sparse": rel_tol(d_out, out)}


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.describe())
def test_cpu_kernels_match_numpy_formulas(spec):
    """refresh -> (O_full, rho = Z_M/Z, R = O_full - rho O_M); sparse -> (rho + c) O_M + R."""
    rng = np.random.default_rng(0)
    q, k, v = (rng.standard_normal((2, 3, spec.n, 8)).astype(np.float32) for _ in range(3))
    scale = 8 ** -0.5
    layout = BlockLayout(spec, auto_block(spec))
    o_full, o_m, rho = np_reference(q, k, v, scale, spec.dense())
    tol = kernel_tolerances(q, k, v, scale, spec, 0.08)
    # the bounds stay far below what a wrong kernel does (>= 1e-2, asserted at the end)
    assert max(tol.values()) < 1e-3, tol
    got_o, got_rho, got_r = kern.refresh(*map(torch.from_numpy, (q, k, v)), scale, layout)
    assert got_rho.dtype == torch.float32 and got_r.dtype == torch.float32
    assert rel(o_full, got_o) <= tol["o"]
    assert rel(rho, got_rho) <= tol["rho"]
    assert rel(o_full - rho[..., None] * o_m, got_r) <= tol["r"]
    out = kern.sparse(*map(torch.from_numpy, (q, k, v)), got_rho, got_r, 0.08, scale, layout)
    assert rel((rho + 0.08)[..., None] * o_m + (o_full - rho[..., None] * o_m), out) <= tol["sparse"]
    # rho < 1 and the correction is not a no-op: the sparse output differs from plain O_M
    assert rho.max() < 1 and rel(o_m, out) > 1e-2


def test_tolerances_catch_a_wrong_mask():
    """The derived tolerances fail a kernel that reads one key too many per row (band h+1)."""
    spec = SPECS[0]
    wide = MaskSpec("band", spec.n, half=spec.half + 1)
    rng = np.random.default_rng(0)
    q, k, v = (rng.standard_normal((2, 3, spec.n, 8)).astype(np.float32) for _ in range(3))
    scale = 8 ** -0.5
    _, o_m, rho = np_reference(q, k, v, scale, spec.dense())
    _, o_m_wide, rho_wide = np_reference(q, k, v, scale, wide.dense())
    tol = kernel_tolerances(q, k, v, scale, spec, 0.08)
    assert rel(rho, rho_wide) > 10 * tol["rho"] and rel(o_m, o_m_wide) > 10 * tol["sparse"]


def test_band_mask_follows_the_paper():
    """M_ij = 1 iff |i - j| <= floor(floor(N * density) / 2), clipped at the ends."""
    spec = MaskSpec.band(4096, 0.03125)
    assert spec.half == 64
    m = MaskSpec.band(10, 0.5).dense()  # floor(5 / 2) = 2
    assert m[0].tolist() == [1, 1, 1, 0, 0, 0, 0, 0, 0, 0]
    assert m[5].tolist() == [0, 0, 0, 1, 1, 1, 1, 1, 0, 0]


def test_block_layout_covers_the_mask_exactly():
    """The gathered windows plus the block bias reproduce the dense mask, nothing more."""
    for spec in SPECS:
        lay = BlockLayout(spec, auto_block(spec))
        idx, bias = lay.block_index(), lay.block_bias()
        got = np.zeros((lay.padded, lay.padded), bool)
        for b in range(lay.nb):
            for col in range(lay.width):
                j = idx[b, col // lay.block] * lay.block + col % lay.block
                rows = b * lay.block + np.arange(lay.block)
                got[rows, j] |= bias[b, :, col] == 0
        assert np.array_equal(got[: spec.n, : spec.n], spec.dense())
        assert not got[: spec.n, spec.n:].any()


def test_sparse_step_ignores_keys_outside_the_window():
    """Changing keys and values outside every query block's window leaves the sparse output."""
    spec = MaskSpec.band(128, 0.0625)  # h = 4, block 16: query block 0 reads blocks 0..1
    lay = BlockLayout(spec, 16)
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 2, 128, 8) for _ in range(3))
    rho, res = torch.rand(1, 2, 128), torch.randn(1, 2, 128, 8)
    o1 = kern.sparse(q, k, v, rho, res, 0.0, 0.3, lay)
    k2, v2 = k.clone(), v.clone()
    k2[:, :, 64:] = 1e3
    v2[:, :, 64:] = -1e3
    o2 = kern.sparse(q, k2, v2, rho, res, 0.0, 0.3, lay)
    assert torch.equal(o1[:, :, :32], o2[:, :, :32])  # blocks 0, 1 never read keys >= 48
    assert not torch.allclose(o1[:, :, 60:], o2[:, :, 60:])


def test_schedule_phases():
    """warmup dense steps, then refresh every period steps, sparse k = 0, 1, ... in between."""
    s = Schedule(warmup=2, period=3, lam=0.04)
    assert [s.phase(t) for t in range(8)] == [(0, -1), (0, -1), (1, -1), (2, 0), (2, 1), (1, -1), (2, 0), (2, 1)]


def test_fp16_inputs_keep_fp32_state():
    """Half-precision q/k/v: output in fp16, rho and R in fp32 and close to the fp32 result."""
    spec = MaskSpec.band(64, 0.25)
    lay = BlockLayout(spec, 16)
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 2, 64, 16) for _ in range(3))
    o, rho, r = kern.refresh(q.half(), k.half(), v.half(), 0.25, lay)
    o32, rho32, _ = kern.refresh(q, k, v, 0.25, lay)
    assert o.dtype == torch.float16 and rho.dtype == torch.float32 and r.dtype == torch.float32
    # What fp16 changes: q, k, v rounded (u16 each), O rounded once more. A score moves by
    # <= 2 u16 S1 (S1 = scale * max sum_d |q_d k_d|), each lse by as much, so rho by a factor
    # exp(+-4 u16 S1) and each p_j by exp(+-4 u16 S1): |dO| <= (4 S1 + 1) u16 sum_j p_j |v_j|
    # + u16 |O|; the float32 arithmetic of both runs adds 2 x kernel_tolerances' bounds.
    s1 = 0.25 * float(torch.einsum("bhnd,bhmd->bhnm", q.abs(), k.abs()).max())
    b = attention_bounds(q.numpy(), k.numpy(), v.numpy(), 0.25, spec.dense())
    f32 = kernel_tolerances(q.numpy(), k.numpy(), v.numpy(), 0.25, spec, 0.0)
    tol_rho = 4 * U16 * s1 + 2 * f32["rho"]
    tol_o = rel_tol((4 * s1 + 1) * U16 * b["pav_full"] + U16 * np.abs(b["o_full"]), b["o_full"]) + 2 * f32["o"]
    assert tol_rho < 0.05 and tol_o < 0.05
    assert rel(rho32, rho) <= tol_rho and rel(o32, o.float()) <= tol_o


_SCRIPT = textwrap.dedent('''
    import json, os, torch
    assert os.environ["TRITON_INTERPRET"] == "1"
    from backends.rettention_spec import BlockLayout, MaskSpec
    from backends.triton import rettention as kern
    from tests.backends.test_rettention_kernel import kernel_tolerances
    torch.manual_seed(0)
    out = {}
    for spec in (MaskSpec.band(40, 0.2), MaskSpec.window2d(36, 0.25)):
        lay = BlockLayout(spec, 16)
        q, k, v = (torch.randn(1, 2, spec.n, 16) for _ in range(3))
        # |triton - cpu| <= bound(cpu) + bound(triton); the Triton kernel's online softmax
        # rescales once per key block (at most ceil(n / 16) of them)
        args = (q.numpy(), k.numpy(), v.numpy(), 0.25, spec, 0.08)
        t1, tb = kernel_tolerances(*args), kernel_tolerances(*args, blocks=-(-spec.n // 16))
        tol = {key: t1[key] + tb[key] for key in t1}
        want = kern.cpu_refresh(q, k, v, 0.25, lay)
        got = kern.triton_refresh(q, k, v, 0.25, lay)
        for name, a, b in zip(("o", "rho", "r"), want, got):
            out[f"{spec.kind}-refresh-{name}"] = [float((a - b).abs().max() / a.abs().max()), tol[name]]
        ws = kern.cpu_sparse(q, k, v, want[1], want[2], 0.08, 0.25, lay)
        gs = kern.triton_sparse(q, k, v, want[1], want[2], 0.08, 0.25, lay)
        out[f"{spec.kind}-sparse"] = [float((ws - gs).abs().max() / ws.abs().max()), tol["sparse"]]
    print(json.dumps(out))
''')


@pytest.mark.slow
def test_triton_kernels_match_cpu_under_interpreter():
    """Triton refresh (dense + masked with the rho/R epilogue) and sparse equal the CPU kernels."""
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=str(ROOT))
    proc = subprocess.run([sys.executable, "-c", _SCRIPT], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads(proc.stdout.strip().splitlines()[-1])
    assert len(results) == 8
    bad = {k: v for k, v in results.items() if not (v[0] <= v[1] < 1e-3)}
    assert not bad, bad
