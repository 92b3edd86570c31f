"""torch's own weight-only low-bit CPU kernels at batch 1 (not a test): what a maintained
kernel reading a uniform 8- or 4-bit grid gives on this CPU, beside fp32 ``F.linear``.

torchao (0.18, the PyPI wheel) ships no x86 CPU low-bit kernel of its own (its compiled
libraries are CUDA ones); on x86 its int4 / int8 weight-only paths call these two aten ops:
``_weight_int8pack_mm`` (int8, one scale per output row) and
``_weight_int4pack_mm_for_cpu`` (uint4 in groups of 128 along K, a scale and a zero per
group). Both hold a uniform grid, so neither can hold the shift-add format's levels
``sum_k +-alpha_k``; they are timed here as the bound a library kernel sets on this CPU.
Interleaved calls, median of 30; the relative error is against the fp32 product.

    python benchmarks/torch_lowbit_cpu.py 1    # threads
"""

import statistics
import sys
import time

import torch

torch.manual_seed(0)
torch.set_num_threads(int(sys.argv[1]))
N = K = 4096
w = torch.randn(N, K)
x = torch.randn(1, K)
# int8 per-channel
s8 = w.abs().amax(1) / 127
w8 = torch.round(w / s8[:, None]).to(torch.int8)
# int4 groupwise (group 128), asymmetric uint4 packed for CPU
g = 128
wg = w.reshape(N, K // g, g)
lo, hi = wg.amin(-1), wg.amax(-1)
scale = (hi - lo) / 15
zero = lo + 8 * scale  # torch's int4 mm: w = (q - 8) * scale + zero
q = torch.clamp(torch.round((wg - lo[..., None]) / scale[..., None]), 0, 15).to(torch.int32).reshape(N, K)
packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1)
sz = torch.stack([scale, zero], -1).transpose(0, 1).contiguous()  # [K/g, N, 2]
def f32(): return torch.nn.functional.linear(x, w)
def i8(): return torch.ops.aten._weight_int8pack_mm(x, w8, s8)
def i4(): return torch.ops.aten._weight_int4pack_mm_for_cpu(x, packed, g, sz)
ref = f32()
for name, f in (("int8", i8), ("int4", i4)):
    err = (f() - ref).abs().max() / ref.abs().max()
    print(name, "rel err vs fp32", float(err))
ts = {k: [] for k in ("f32", "int8", "int4")}
for _ in range(30):
    for k, f in (("f32", f32), ("int8", i8), ("int4", i4)):
        t0 = time.perf_counter(); f(); ts[k].append(time.perf_counter() - t0)
med = {k: statistics.median(v) * 1e3 for k, v in ts.items()}
print(f"threads {sys.argv[1]}", {k: round(v, 2) for k, v in med.items()}, "speedup", {k: round(med['f32'] / v, 2) for k, v in med.items()}, open('/proc/loadavg').read().split()[:3])
