"""RMSNorm / CRMSNorm kernels: the CPU custom ops against the closed form, and the Triton
kernels (run by the Triton interpreter in a subprocess) against the CPU kernels."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import torch

from backends.triton.crms_norm import crms_norm, crms_norm_op, reference, rms_norm

ROOT = Path(__file__).resolve().parents[2]


def test_crms_is_rms_of_the_uncompressed_vector():
    """crms_norm(x[:d-1]) == RMSNorm(x)[:d-1] for a zero-mean x (the identity crms relies on)."""
    x = torch.randn(5, 16, dtype=torch.float64)
    x = x - x.mean(-1, keepdim=True)
    want = torch.nn.functional.rms_norm(x, [16], eps=1e-5)[:, :15]
    got = crms_norm(x[:, :15], None, 1e-5)
    assert torch.allclose(got, want, atol=1e-12)
    assert not torch.allclose(rms_norm(x[:, :15], None, 1e-5), want, atol=1e-3)  # the plain RMS differs


def test_custom_ops_cpu_kernels_and_fused_add():
    """The registered ops run their CPU kernel; the fused variants return (norm(x+r), x+r)."""
    x, r, w = torch.randn(3, 7, 12), torch.randn(3, 7, 12), torch.randn(12)
    crms_norm_op()  # the ops are defined on first use
    y = torch.ops.rewriter.rms_norm(x, w, 1e-6)
    assert torch.allclose(y, torch.nn.functional.rms_norm(x, [12], w, 1e-6), atol=1e-6)
    y2, h = torch.ops.rewriter.crms_norm_add(x, r, w, 1e-6)
    assert torch.equal(h, x + r)
    assert torch.allclose(y2, torch.ops.rewriter.crms_norm(x + r, w, 1e-6), atol=1e-6)


_SCRIPT = textwrap.dedent('''
    import json, os, torch
    assert os.environ["TRITON_INTERPRET"] == "1"
    from backends.triton.crms_norm import reference, triton_crms_norm, triton_rms_norm
    from tests.fp_bounds import U16, U32, UBF16, rms_norm_rel_bound
    torch.manual_seed(0)
    out = {}
    # Both sides compute in float32 (each within rms_norm_rel_bound of the exact value), then
    # convert to the output dtype: torch rounds to nearest (u_out), the Triton interpreter may
    # truncate (2 u_out): 3 u_out between them. With a residual, h = x + r converts the same
    # way (<= 1 ulp apart, 2 u_out relative), which moves y by <= 2 * 2 u_out more.
    for dtype, u_out in ((torch.float32, U32), (torch.float16, U16), (torch.bfloat16, UBF16)):
        for n in (31,):
            x = torch.randn(4, n).to(dtype)
            r = torch.randn(4, n).to(dtype)
            w = (torch.randn(n) + 1).to(dtype)
            for name, fn, comp in (("rms", triton_rms_norm, False), ("crms", triton_crms_norm, True)):
                for weight in (None, w):
                    for res in (None, r):
                        y, h = fn(x, weight, 1e-5, residual=res)
                        ry, rh = reference(x, weight, 1e-5, compressed=comp, residual=res)
                        hin = (x if res is None else x + res).float().numpy()
                        tol = 2 * rms_norm_rel_bound(hin, compressed=comp) + (3 + 4 * (res is not None)) * u_out
                        err = float((y.float() - ry.float()).abs().max() / ry.float().abs().max())
                        key = f"{name}-{dtype}-{n}-{weight is not None}-{res is not None}"
                        out[key] = [err, tol, y.dtype == dtype]
                        if res is not None:  # x + r: exact in float32, then one conversion each
                            out[key + "-h"] = [float((h.float() - rh.float()).abs().max() / rh.float().abs().max()),
                                               2 * u_out, True]
    print(json.dumps(out))
''')


def test_triton_kernels_match_cpu_under_interpreter():
    """Triton RMSNorm/CRMSNorm (fp32/fp16/bf16, weight, fused residual) equal the CPU kernel."""
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=str(ROOT))
    proc = subprocess.run([sys.executable, "-c", _SCRIPT], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads(proc.stdout.strip().splitlines()[-1])
    assert len(results) == 3 * 2 * 2 * 2 + 3 * 2 * 2
    bad = {k: v for k, v in results.items() if not (v[0] <= v[1] and v[2])}
    assert not bad, bad


def test_reference_accumulates_in_float32():
    """fp16 inputs are normalized with float32 statistics (no overflow of sum(x^2))."""
    x = torch.full((1, 64), 300.0, dtype=torch.float16)  # x^2 sums overflow fp16
    y, _ = reference(x, None, 1e-5, compressed=False)
    assert torch.isfinite(y).all() and torch.allclose(y.float(), torch.ones(1, 64), atol=1e-3)
