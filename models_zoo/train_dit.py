"""Train the ``dit-trained`` / ``dit-trained-additive`` zoo models on procedural shapes.

Reproduce the committed weights (from the repository root)::

    .venv/bin/python -m models_zoo.train_dit --conditioning adaln --threads 1
    .venv/bin/python -m models_zoo.train_dit --conditioning additive --threads 1

Data is drawn afresh every step from ``models_zoo.shapes.make_batch`` with a seeded
numpy generator (no data set on disk). The objective is rectified-flow velocity
prediction: ``x_t = (1 - t) x0 + t e``, target ``e - x0``, ``t`` uniform in ``[0, 1]``
(``--t-dist logitnormal`` for SD3's logit-normal).

Schedule: cosine cycles with warm restarts (default 1000 steps at peak lr 2e-3, then 800
at 1.5e-3, batch 32). Each cycle starts a fresh AdamW and fresh data/noise streams
seeded ``seed + cycle``, so a run can be cut between cycles and resumed exactly with
``--init <weights after cycle k-1> --start-cycle k`` (the committed weights were made
that way: cycle 0, then cycle 1 resumed from its output).

After training the script draws the reference samples (Euler, 25 steps, seed 0),
measures their palette error and the attention entropy along the sampling trajectory,
and writes ``models_zoo/weights/dit_trained[_additive].safetensors``, a
``*_ref.safetensors`` with the reference samples, a ``.json`` of config, metrics and
timing per cycle, and a ``*_samples.png`` grid. Everything is seeded; with the same
thread count and torch build the run is bit-for-bit repeatable.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from models_zoo.dit import DiTConfig, TinyDiT, num_params, weight_paths
from models_zoo.eval import attention_entropy, attention_maps, palette_error, sample, save_png_grid
from models_zoo.shapes import make_batch
from models_zoo.train_gpt import _display

REF_SEED = 0
REF_STEPS = 25
REF_N = 8


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--conditioning", choices=("adaln", "additive"), default="adaln")
    p.add_argument("--steps", type=int, nargs="+", default=[1000, 800], help="steps of each cosine cycle")
    p.add_argument("--lr", type=float, nargs="+", default=[2e-3, 1.5e-3], help="peak lr of each cycle")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--min-lr", type=float, default=2e-5)
    p.add_argument("--warmup", type=int, default=100)
    p.add_argument("--t-dist", choices=("uniform", "logitnormal"), default="uniform")
    p.add_argument("--d-model", type=int, default=DiTConfig.d_model)
    p.add_argument("--n-layer", type=int, default=DiTConfig.n_layer)
    p.add_argument("--n-head", type=int, default=DiTConfig.n_head)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    p.add_argument("--log-every", type=int, default=50)
    p.add_argument("--out-dir", type=Path, default=None, help="default: models_zoo/weights")
    p.add_argument(
        "--init", type=Path, default=None,
        help="resume: safetensors weights at the end of cycle START_CYCLE - 1 of this same command",
    )
    p.add_argument("--start-cycle", type=int, default=0)
    args = p.parse_args(argv)
    if len(args.steps) != len(args.lr):
        p.error("--steps and --lr need one value per cycle")
    return args


def lr_at(step: int, steps: int, peak: float, args: argparse.Namespace) -> float:
    """Linear warm-up to ``peak``, then cosine decay to ``min_lr`` at ``steps``."""
    if step < args.warmup:
        return peak * (step + 1) / args.warmup
    frac = (step - args.warmup) / max(1, steps - args.warmup)
    return args.min_lr + 0.5 * (peak - args.min_lr) * (1 + math.cos(math.pi * frac))


@torch.no_grad()
def trajectory_attention_entropy(model: TinyDiT, trajectory) -> dict:
    """Attention entropy (nats) over the sampler's steps: mean, and at three fixed steps."""
    per_step = [attention_entropy(attention_maps(model, x, t))[0] for x, t in trajectory]
    n = len(trajectory)
    picks = sorted({0, n // 2, min(n - 1, int(0.9 * n))})
    return {
        "attention_entropy_mean": float(np.mean(per_step)),
        "attention_entropy_at_step": {
            str(i): {"t": float(trajectory[i][1][0]), "entropy": per_step[i]} for i in picks
        },
        "log_num_tokens": math.log(model.cfg.num_tokens),
    }


def train_cycle(model: TinyDiT, cycle: int, args: argparse.Namespace) -> dict:
    """One cosine cycle with a fresh AdamW and data/noise streams seeded ``seed + cycle``."""
    steps, peak = args.steps[cycle], args.lr[cycle]
    rng = np.random.default_rng(args.seed + cycle)
    gen = torch.Generator().manual_seed(args.seed + cycle)
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.01}, {"params": no_decay, "weight_decay": 0.0}],
        lr=peak,
        betas=(0.9, 0.99),
    )
    history = []
    t0 = time.perf_counter()
    running = None
    model.train()
    for step in range(steps):
        x0 = torch.from_numpy(make_batch(rng, args.batch, model.cfg.image_size))
        noise = torch.randn(x0.shape, generator=gen)
        if args.t_dist == "uniform":
            t = torch.rand(args.batch, generator=gen)
        else:
            t = torch.sigmoid(torch.randn(args.batch, generator=gen))  # logit-normal(0, 1)
        tb = t[:, None, None, None]
        xt = (1 - tb) * x0 + tb * noise
        loss = (model(xt, t) - (noise - x0)).pow(2).mean()
        lr = lr_at(step, steps, peak, args)
        for group in opt.param_groups:
            group["lr"] = lr
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        running = loss.item() if running is None else 0.98 * running + 0.02 * loss.item()
        if step % args.log_every == 0 or step + 1 == steps:
            elapsed = time.perf_counter() - t0
            history.append({"step": step, "loss_avg": round(running, 5), "seconds": round(elapsed, 1)})
            print(f"cycle {cycle} step {step:5d} loss {loss.item():.4f} (avg {running:.4f}) lr {lr:.2e} "
                  f"{elapsed:7.1f}s", flush=True)
    model.eval()
    return {
        "cycle": cycle,
        "steps": steps,
        "peak_lr": peak,
        "images_seen": steps * args.batch,
        "final_loss_avg": round(running, 5),
        "wall_seconds": round(time.perf_counter() - t0, 1),
        "threads": args.threads,
        "history": history,
    }


def main(argv=None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    cfg = DiTConfig(d_model=args.d_model, n_layer=args.n_layer, n_head=args.n_head, conditioning=args.conditioning)
    model = TinyDiT(cfg)
    n_params = num_params(model)
    print(f"TinyDiT {cfg} with {n_params} parameters", flush=True)

    weights, meta_path = weight_paths(args.conditioning)
    if args.out_dir is not None:
        weights, meta_path = args.out_dir / weights.name, args.out_dir / meta_path.name
    cycles = []
    if args.init is not None:
        model.load_state_dict(load_file(str(args.init)), strict=True)
        init_meta = args.init.with_suffix(".json")
        if init_meta.exists():  # keep the record of the earlier cycles
            cycles = json.loads(init_meta.read_text())["train"].get("cycles", [])[: args.start_cycle]
    for cycle in range(args.start_cycle, len(args.steps)):
        cycles.append(train_cycle(model, cycle, args))
    train_seconds = sum(c["wall_seconds"] for c in cycles)
    gen = torch.Generator().manual_seed(args.seed)

    final = model.eval()
    samples, trajectory = sample(final, REF_SEED, REF_STEPS, n=REF_N, return_trajectory=True)
    many = sample(final, 1, REF_STEPS, n=32)
    metrics = {
        "palette_error_samples": palette_error(torch.cat([samples, many])),
        "palette_error_noise": palette_error(torch.randn(64, 3, cfg.image_size, cfg.image_size, generator=gen)),
        "sample_std": samples.std().item(),
        **trajectory_attention_entropy(final, trajectory),
    }
    print("final:", json.dumps(metrics, indent=1), flush=True)

    weights.parent.mkdir(parents=True, exist_ok=True)
    stem = weights.with_suffix("")
    save_file({k: v.contiguous() for k, v in final.state_dict().items()}, str(weights))
    save_file({"samples": samples.contiguous()}, f"{stem}_ref.safetensors")
    save_png_grid(torch.cat([samples, many[:24]]), f"{stem}_samples.png", nrow=8, scale=3)
    meta = {
        "model": "TinyDiT",
        "config": dataclasses.asdict(cfg),
        "parameters": n_params,
        "objective": f"rectified flow, velocity target noise - x0, {args.t_dist} t",
        "data": "models_zoo.shapes.make_batch (procedural, numpy only), fresh batch each step",
        "reference_samples": {"seed": REF_SEED, "steps": REF_STEPS, "n": REF_N, "sampler": "Euler"},
        "metrics": metrics,
        "train": {
            "command": "python -m models_zoo.train_dit " + " ".join(argv if argv is not None else sys.argv[1:]),
            "args": {k: _display(v) for k, v in vars(args).items()},
            "images_seen": sum(c["images_seen"] for c in cycles),
            "wall_seconds": round(train_seconds, 1),
            "cycles": cycles,
            "threads": args.threads,
            "torch": torch.__version__,
            "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
        },
    }
    meta_path.write_text(json.dumps(meta, indent=2) + "\n")
    print(f"wrote {weights}, {meta_path} ({train_seconds:.0f}s training)", flush=True)


if __name__ == "__main__":
    main()
