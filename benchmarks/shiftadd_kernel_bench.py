"""ShiftAddLinear Triton kernel vs fp16 ``torch.matmul`` at batch 1 (needs a CUDA GPU; not a test).

Shapes (out x in): 4096 x 4096 and 11008 x 4096 (LLaMA-7B attention / MLP), 3-bit BCQ with
8-column x 128-row blocks and 3 power-of-two terms per scale. The packed tensors are random
(timing does not depend on the values); the kernel's output is checked against the
dequantized fp32 reference first. CUDA-event timing, median of ``--runs`` after warm-up.

    .venv/bin/python benchmarks/shiftadd_kernel_bench.py [--bits 3] [--runs 200]
"""

from __future__ import annotations

import argparse

import numpy as np
import torch

from backends.triton.shiftadd import as_tensors, dequantize, triton_shiftadd_linear
from passes.shiftadd_quant import Packed, pack_bits


def random_packed(n: int, k: int, q: int, g: int, seed: int = 0) -> Packed:
    rng = np.random.default_rng(seed)
    bits = rng.integers(0, 2, size=(q, k, n), dtype=np.uint8)
    shape = (3, q, -(-k // 8), -(-n // g))
    exps = (-4 - rng.integers(0, 4, size=shape) - 3 * np.arange(3)[:, None, None, None]).astype(np.int8)
    signs = rng.choice(np.array([-1, 1], dtype=np.int8), size=shape)
    return Packed("bcq", n, k, pack_bits(bits), exps, signs, g)


def time_ms(fn, runs: int) -> float:
    for _ in range(10):
        fn()
    torch.cuda.synchronize()
    out = []
    for _ in range(runs):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        torch.cuda.synchronize()
        out.append(a.elapsed_time(b))
    return float(np.median(out))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--bits", type=int, default=3)
    ap.add_argument("--group-rows", type=int, default=128)
    ap.add_argument("--runs", type=int, default=200)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("needs a CUDA GPU")
    print(f"{torch.cuda.get_device_name()}, {args.bits} bits, batch 1")
    for n, k in ((4096, 4096), (11008, 4096)):
        p = random_packed(n, k, args.bits, args.group_rows)
        planes, exps, signs = (t.cuda() for t in as_tensors(p))
        x = torch.randn(1, k, device="cuda", dtype=torch.float16)
        wt = dequantize(planes, exps, signs, k, p.group_rows, 0)  # fp32 [K, N]
        y = triton_shiftadd_linear(x, planes, exps, signs, None, p.group_rows, 0)
        ref = (x.float() @ wt).half()
        err = float((y.float() - ref.float()).abs().max() / ref.float().abs().max())
        w16 = wt.T.contiguous().half()
        t_sa = time_ms(lambda: triton_shiftadd_linear(x, planes, exps, signs, None, p.group_rows, 0), args.runs)
        t_mm = time_ms(lambda: torch.matmul(x, w16.T), args.runs)
        packed = p.nbytes
        print(f"{n} x {k}: shiftadd {t_sa * 1e3:8.1f} us, fp16 matmul {t_mm * 1e3:8.1f} us, "
              f"speedup {t_mm / t_sa:5.2f}, weights {packed / 2**20:.1f} MiB vs {n * k * 2 / 2**20:.1f} MiB, "
              f"max rel err vs reference {err:.1e}")


if __name__ == "__main__":
    main()
