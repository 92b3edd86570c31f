"""The DiT rewritten with ``crms,rettention`` as torch, eager against torch.compile (not a test).

``quality``: the trained ``dit-trained-additive``; final samples of the rectified-flow Euler
sampler (``steps`` steps, batch 8 per seed) against dense sampling of the original with
the same seeds: PSNR / SSIM, eager and compiled (the two should agree within noise).
``e2e``: a random-weight DiT of the same family at ``--image-size 64`` (1024 tokens):
wall time of whole 20-step sampling loops, compiled original vs compiled rewritten,
interleaved ``reps`` times; compile (first loop) timed apart.

    nice -n 10 python benchmarks/compiled_dit_bench.py quality --seeds 8 --steps 20
    nice -n 10 python benchmarks/compiled_dit_bench.py e2e --image-size 64 --steps 20 --reps 3 [--threads 1]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import rewriter  # noqa: E402
from models_zoo.dit import DiTConfig, TinyDiT, _example_inputs, load_trained_dit  # noqa: E402
from passes.rettention_runtime import sample_euler, state_module  # noqa: E402
from rewriter.compile import compile_module  # noqa: E402


def _rewrite(model, batch: int):
    ex = _example_inputs(model.cfg, batch=batch)
    res = rewriter.rewrite(model, ["crms", "rettention"], example_inputs=ex, ir_kind="torch")
    assert all(r.applied for r in res.records), [r.declined for r in res.records]
    return res.model


def _stepper(gm, fn):
    st = state_module(gm)
    st.reset()

    def step(x, t, i):
        st.set_step(i)
        return fn(x, t)

    return step


def quality(seeds: int, steps: int) -> dict:
    from models_zoo.eval import psnr, sample, ssim

    model = load_trained_dit("additive")
    gm = _rewrite(model, 8)
    compiled = compile_module(gm)
    cfg = model.cfg
    out: dict = {"seeds": seeds, "steps": steps}
    dense = [sample(model, seed=s, steps=steps) for s in range(seeds)]
    for name, fn in (("eager", gm), ("compiled", compiled)):
        ps, ss = [], []
        for s in range(seeds):
            x = torch.randn(8, cfg.channels, cfg.image_size, cfg.image_size, generator=torch.Generator().manual_seed(s))
            got = sample_euler(_stepper(gm, fn), x, steps)
            ps.append(psnr(dense[s], got))
            ss.append(ssim(dense[s], got))
        out[name] = {"psnr": float(np.mean(ps)), "ssim": float(np.mean(ss)), "psnr_per_seed": [float(p) for p in ps]}
    out["psnr_diff_compiled_minus_eager"] = out["compiled"]["psnr"] - out["eager"]["psnr"]
    return out


def e2e(image_size: int, steps: int, reps: int, batch: int) -> dict:
    torch.manual_seed(0)
    model = TinyDiT(DiTConfig(image_size=image_size, conditioning="additive")).eval()
    gm = _rewrite(model, batch)
    cfg = model.cfg
    x0 = torch.randn(batch, cfg.channels, cfg.image_size, cfg.image_size, generator=torch.Generator().manual_seed(0))
    orig_c = compile_module(model)
    new_c = compile_module(gm)
    loops = {"original_compiled": lambda: sample_euler(lambda x, t, i: orig_c(x, t), x0, steps),
             "rewritten_compiled": lambda: sample_euler(_stepper(gm, new_c), x0, steps)}
    first = {}
    for name, fn in loops.items():  # compiles every phase
        t0 = time.perf_counter()
        fn()
        first[name] = time.perf_counter() - t0
    times: dict[str, list[float]] = {k: [] for k in loops}
    load0 = os.getloadavg()[0]
    names = list(loops)
    for r in range(reps):
        for name in (names if r % 2 == 0 else names[::-1]):
            t0 = time.perf_counter()
            loops[name]()
            times[name].append(time.perf_counter() - t0)
    ratios = [a / b for a, b in zip(times["original_compiled"], times["rewritten_compiled"])]
    return {"tokens": cfg.num_tokens, "batch": batch, "steps": steps, "reps": reps,
            "first_loop_s (compiles)": first, "median_s": {k: statistics.median(v) for k, v in times.items()},
            "speedup": statistics.median(ratios), "loadavg_1m": [load0, os.getloadavg()[0]],
            "threads": torch.get_num_threads()}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("what", choices=["quality", "e2e"])
    ap.add_argument("--seeds", type=int, default=8)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--image-size", type=int, default=64)
    ap.add_argument("--threads", type=int, default=0,
                    help="torch threads (0: torch's default; 1 on a loaded machine, where OpenMP "
                         "barriers of 2 threads wait on descheduled peers)")
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    with torch.inference_mode():
        res = quality(a.seeds, a.steps) if a.what == "quality" else e2e(a.image_size, a.steps, a.reps, a.batch)
    json.dump(res, sys.stdout, indent=1)
    sys.stdout.write("\n")


if __name__ == "__main__":
    main()
