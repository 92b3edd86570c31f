"""Re-ttention measurements (not tests).

``attention``: ORT CPU (full graph optimizations), attention alone, ``B=1, H=16, Dh=64``
and ``N`` tokens: the exported SDPA model (dense) against the rewritten model at a sparse
step (and at a refresh step), timed interleaved, medians. ``quality``: final samples of the
trained zoo DiT under Re-ttention, naive sparse attention and residual-only against dense
sampling with the same seeds (PSNR / SSIM). ``e2e``: wall time of whole sampling loops,
dense vs Re-ttention (ORT).

    python benchmarks/rettention_bench.py attention --tokens 4096 --reps 20 [--threads T] [--no-spin]
    python benchmarks/rettention_bench.py quality --seeds 8 --steps 20
    python benchmarks/rettention_bench.py e2e --steps 20
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import rewriter  # noqa: E402
from backends.ort.rettention import STEP_INPUT, RettentionRunner, state_names  # noqa: E402
from backends.ort.session import make_session  # noqa: E402
from rewriter.torch_export import export_to_onnx  # noqa: E402

log = logging.getLogger("rettention_bench")


class _SDPA(nn.Module):
    def forward(self, q, k, v):
        return F.scaled_dot_product_attention(q, k, v)


def _session(model, threads: int = 0, spin: bool = True):
    """An ORT CPU session with every graph optimization on; ``threads`` intra-op threads (0:
    ORT's default, one per physical core) and ``spin=False`` for idle worker threads that block
    instead of spinning (the setting for a machine shared with other work)."""
    if threads == 0 and spin:
        return make_session(model, optimize=True)
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.log_severity_level = 3
    if threads:
        opts.intra_op_num_threads = threads
    if not spin:
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    data = model.SerializeToString() if hasattr(model, "SerializeToString") else str(model)
    return ort.InferenceSession(data, opts, providers=["CPUExecutionProvider"])


def attention(tokens: int, heads: int = 16, head_dim: int = 64, reps: int = 20, density: float = 0.03125,
              block: int = 0, threads: int = 0, spin: bool = True) -> dict:
    """Dense vs sparse-step (and refresh-step) latency of one attention op in ORT CPU: the
    three runs interleaved ``reps`` times, medians (and minima) in ms."""
    tmp = Path(tempfile.mkdtemp(prefix="rettention-bench-"))
    ex = tuple(torch.randn(1, heads, tokens, head_dim) for _ in range(3))
    path = export_to_onnx(_SDPA(), ex, tmp / "sdpa.onnx", opset=18, input_names=["q", "k", "v"])
    res = rewriter.rewrite(str(path), ["rettention"], verify=False,
                           options={"rettention": {"density": str(density), "block": str(block)}})
    assert res.records[0].applied, res.records[0].declined
    dense = _session(str(path), threads, spin)
    sparse = _session(res.view.to_proto(), threads, spin)
    feeds = {n: t.numpy() for n, t in zip("qkv", ex)}
    rho_in, res_in, _, _ = state_names(0)
    state = {rho_in: np.zeros((1, heads, tokens), np.float32), res_in: np.zeros((1, heads, tokens, head_dim), np.float32)}
    refresh_feeds = {**feeds, **state, STEP_INPUT: np.asarray(5, np.int64)}
    out = sparse.run(None, refresh_feeds)
    state = {rho_in: out[1], res_in: out[2]}
    sparse_feeds = {**feeds, **state, STEP_INPUT: np.asarray(6, np.int64)}
    runs = {"dense": (dense, feeds), "sparse": (sparse, sparse_feeds), "refresh": (sparse, refresh_feeds)}
    for s, f in runs.values():
        s.run(None, f)
    times: dict[str, list[float]] = {k: [] for k in runs}
    for _ in range(reps):
        for name, (s, f) in runs.items():
            t0 = time.perf_counter()
            s.run(None, f)
            times[name].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) * 1e3 for k, v in times.items()}
    low = {k: min(v) * 1e3 for k, v in times.items()}
    return {"tokens": tokens, "heads": heads, "head_dim": head_dim, "density": density, "reps": reps,
            "threads": threads or "default", "spin": spin,
            "site": res.records[0].sites[0].reason, "median_ms": med, "min_ms": low,
            "dense_over_sparse": med["dense"] / med["sparse"], "refresh_over_dense": med["refresh"] / med["dense"]}


# -- DiT -----------------------------------------------------------------------------------------
def _rewrite_dit(model, ir_kind: str, steps_opts: dict):
    from models_zoo.dit import _example_inputs

    ex = _example_inputs(model.cfg, batch=8)
    return rewriter.rewrite(model, ["rettention"], example_inputs=ex, ir_kind=ir_kind,
                            options={"rettention": steps_opts})


def quality(seeds: int = 8, steps: int = 20, conditioning: str = "adaln", opts: dict | None = None) -> dict:
    """PSNR / SSIM of final samples vs dense sampling (same seeds) for three variants (FX)."""
    from models_zoo.dit import load_trained_dit
    from models_zoo.eval import psnr, sample, ssim
    from passes.rettention_runtime import sample_euler, state_module, torch_stepper

    model = load_trained_dit(conditioning)
    opts = dict(opts or {})
    res = _rewrite_dit(model, "torch", opts)
    gm = res.model
    st = state_module(gm)
    out: dict = {"seeds": seeds, "steps": steps, "options": opts, "site": res.records[0].sites[0].reason}
    dense = [sample(model, seed=s, steps=steps) for s in range(seeds)]
    for variant in ("rettention", "naive", "residual"):
        st.set_variant(variant)
        ps, ss = [], []
        for s in range(seeds):
            gen = torch.Generator().manual_seed(s)
            cfg = model.cfg
            x = torch.randn(8, cfg.channels, cfg.image_size, cfg.image_size, generator=gen)
            got = sample_euler(torch_stepper(gm), x, steps)
            ps.append(psnr(dense[s], got))
            ss.append(ssim(dense[s], got))
        out[variant] = {"psnr": float(np.mean(ps)), "ssim": float(np.mean(ss)), "psnr_min": float(np.min(ps))}
    return out


def e2e(steps: int = 20, conditioning: str = "adaln", reps: int = 3, image_size: int | None = None) -> dict:
    """Wall time of a whole Euler sampling loop, dense vs Re-ttention, in ORT CPU."""
    from models_zoo.dit import DiTConfig, TinyDiT, load_trained_dit
    from passes.rettention_runtime import onnx_stepper, sample_euler

    if image_size is None:
        model = load_trained_dit(conditioning)
    else:
        torch.manual_seed(0)
        model = TinyDiT(DiTConfig(image_size=image_size, conditioning=conditioning)).eval()
    res = _rewrite_dit(model, "onnx", {})
    tmp = Path(tempfile.mkdtemp(prefix="rettention-e2e-"))
    from models_zoo.dit import _example_inputs

    path = export_to_onnx(model, _example_inputs(model.cfg, batch=8), tmp / "dit.onnx", opset=18)
    dense = make_session(str(path), optimize=True)
    runner = RettentionRunner(res.view.model, optimize=True)
    cfg = model.cfg
    x0 = torch.randn(8, cfg.channels, cfg.image_size, cfg.image_size, generator=torch.Generator().manual_seed(0))

    def dense_fn(x, t, step):
        return torch.from_numpy(dense.run(None, {"x": x.numpy(), "t": t.numpy()})[0])

    fns = {"dense": dense_fn, "rettention": None}
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(reps):
        for name in fns:
            fn = dense_fn if name == "dense" else onnx_stepper(runner)
            t0 = time.perf_counter()
            sample_euler(fn, x0, steps)
            times[name].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) for k, v in times.items()}
    return {"tokens": cfg.num_tokens, "steps": steps, "median_s": med, "dense_over_rettention": med["dense"] / med["rettention"]}


def main() -> None:
    logging.basicConfig(level=logging.INFO)
    ap = argparse.ArgumentParser()
    ap.add_argument("what", choices=["attention", "quality", "e2e"])
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--threads", type=int, default=0, help="ORT intra-op threads (0: ORT's default)")
    ap.add_argument("--no-spin", action="store_true", help="ORT worker threads block instead of spinning")
    ap.add_argument("--block", type=int, default=0)
    ap.add_argument("--seeds", type=int, default=8)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--image-size", type=int, default=None)
    ap.add_argument("--conditioning", default="adaln")
    ap.add_argument("--set", action="append", default=[], help="rettention option KEY=VALUE")
    a = ap.parse_args()
    opts = dict(s.split("=", 1) for s in a.set)
    if a.what == "attention":
        result = attention(a.tokens, reps=a.reps, block=a.block, threads=a.threads, spin=not a.no_spin)
    elif a.what == "quality":
        result = quality(a.seeds, a.steps, a.conditioning, opts)
    else:
        result = e2e(a.steps, a.conditioning, a.reps, a.image_size)
    json.dump(result, sys.stdout, indent=1)
    sys.stdout.write("\n")


if __name__ == "__main__":
    main()
