"""Re-ttention Triton kernels on a GPU (not a test): correctness against the CPU kernels,
then latency against dense SDPA at N = 4096 and 16384 (B=1, H=16, Dh=64, fp16 and fp32),
with ``triton.testing.do_bench`` (median ms). Prints one JSON document. ``sparse`` /
``refresh`` go through the ops, which run FlexAttention on CUDA (``kernel_for``);
``sparse_triton`` launches the hand Triton kernel directly.

    python benchmarks/rettention_gpu.py [--tokens 4096 16384]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from backends.rettention_spec import BlockLayout, MaskSpec, auto_block  # noqa: E402
from backends.triton import rettention as kern  # noqa: E402


def rel(a, b) -> float:
    a, b = a.double(), b.double()
    return float((a - b).abs().max() / a.abs().max())


def correctness() -> dict:
    out = {}
    torch.manual_seed(0)
    for spec in (MaskSpec.band(1000, 0.03125), MaskSpec.window2d(1024, 0.03125)):
        lay = BlockLayout(spec, auto_block(spec))
        for dtype in (torch.float32, torch.float16):
            q, k, v = (torch.randn(2, 4, spec.n, 64) for _ in range(3))
            want = kern.cpu_refresh(q, k, v, 0.125, lay)
            qd, kd, vd = (t.cuda().to(dtype) for t in (q, k, v))
            got = torch.ops.rewriter.rettention_refresh(qd, kd, vd, 0.125, *kern.spec_args(spec), lay.block)
            ws = kern.cpu_sparse(q, k, v, want[1], want[2], 0.08, 0.125, lay)
            gs = kern.sparse(qd, kd, vd, got[1], got[2], 0.08, 0.125, lay)
            key = f"{spec.kind}-{dtype}".replace("torch.", "")
            out[key] = {"o_full": rel(want[0], got[0].cpu()), "rho": rel(want[1], got[1].cpu()),
                        "R": rel(want[2], got[2].cpu()), "sparse": rel(ws, gs.cpu())}
    return out


def timing(tokens: list[int]) -> dict:
    from triton.testing import do_bench

    out = {}
    for n in tokens:
        spec = MaskSpec.band(n, 0.03125)
        for block in (64, 128):
            lay = BlockLayout(spec, block)
            for dtype in (torch.float16, torch.float32):
                q, k, v = (torch.randn(1, 16, n, 64, device="cuda", dtype=dtype) for _ in range(3))
                o, rho, res = kern.refresh(q, k, v, 0.125, lay)
                ms = {
                    "sdpa_dense": do_bench(lambda: F.scaled_dot_product_attention(q, k, v)),
                    "triton_dense": do_bench(lambda: kern._launch(q, k, v, 0.125, lay, masked=False, epilogue=0)),
                    "sparse": do_bench(lambda: kern.sparse(q, k, v, rho, res, 0.04, 0.125, lay)),
                    "sparse_triton": do_bench(lambda: kern.triton_sparse(q, k, v, rho, res, 0.04, 0.125, lay)),
                    "refresh": do_bench(lambda: kern.refresh(q, k, v, 0.125, lay)),
                }
                key = f"N{n}-block{block}-{dtype}".replace("torch.", "")
                out[key] = {"median_ms": ms, "sdpa_over_sparse": ms["sdpa_dense"] / ms["sparse"],
                            "triton_dense_over_sparse": ms["triton_dense"] / ms["sparse"],
                            "sdpa_over_sparse_triton": ms["sdpa_dense"] / ms["sparse_triton"],
                            "window_keys": lay.width}
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, nargs="*", default=[4096, 16384])
    a = ap.parse_args()
    result = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "correctness": correctness()}
    print(json.dumps(result), flush=True)
    result["timing"] = timing(a.tokens)
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
