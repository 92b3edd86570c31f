"""``backends/shiftadd_cpu.py`` (the CPU kernel that reads the bit planes in the reduction)
against the reference decode ``x @ dequantize(W)^T`` of ``backends/triton/shiftadd.py``,
in both formulations (per-row block sums; row groups with the scales folded into the
activations), eager and compiled, to float32 rounding of a K-term sum."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from backends.shiftadd_cpu import chunked_linear, packed_linear, packed_linear_eager

EPS32 = float(np.finfo(np.float32).eps)


def _case(n: int, k: int, block: int, group: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    planes = torch.randint(-2**31, 2**31 - 1, (3, k // 32, n), dtype=torch.int32, generator=g)
    alpha = torch.rand(3, k // block, -(-n // group), generator=g) * 0.1
    x = torch.randn(2, k, generator=g)
    return x, planes, alpha


def _reference(x, planes, alpha, block, group) -> torch.Tensor:
    """float64 ``x @ W^T`` with ``W`` decoded from the bits and scales."""
    q, kw, n = planes.shape
    shifts = torch.arange(32, dtype=torch.int32)
    bits = ((planes[:, :, None, :] >> shifts[None, None, :, None]) & 1).reshape(q, kw * 32, n).double()
    a = alpha.double().repeat_interleave(block, 1).repeat_interleave(group, 2)[:, :, :n]
    wt = ((2 * bits - 1) * a).sum(0)  # [K, N]
    return x.double() @ wt, x.double().abs() @ wt.abs()


@pytest.mark.parametrize("n,k,block,group", [(48, 128, 64, 1), (64, 96, 32, 1), (256, 64, 8, 128), (32, 64, 8, 16)])
def test_eager_equals_reference_decode(n, k, block, group):
    """Both formulations and the chunked large-batch path equal x @ dequantize(W)^T within K x eps x (|x| @ |W|^T)."""
    x, planes, alpha = _case(n, k, block, group)
    ref, mag = _reference(x, planes, alpha, block, group)
    for fn in (packed_linear_eager, chunked_linear):
        got = fn(x, planes, alpha, block, group).double()
        assert torch.all((got - ref).abs() <= 2 * k * EPS32 * mag), (fn.__name__, float((got - ref).abs().max()))


@pytest.mark.slow
def test_compiled_equals_reference_decode():
    """The Inductor-compiled kernel (per-row blocks of 64) equals the reference decode to K x eps."""
    x, planes, alpha = _case(64, 256, 64, 1, seed=3)
    ref, mag = _reference(x, planes, alpha, 64, 1)
    got = packed_linear(x, planes, alpha, 64, 1).double()
    assert torch.all((got - ref).abs() <= 2 * 256 * EPS32 * mag)
