"""Train the ``gpt-trained`` zoo model: a byte-level TinyGPT on CPython stdlib source.

Reproduce the committed weights (from the repository root)::

    .venv/bin/python -m models_zoo.train_gpt --threads 1

This reads the committed splits ``models_zoo/data/pystdlib_{train,val}.txt.xz``
(``--rebuild-corpus`` first regenerates them from the running interpreter's standard
library; the committed files were built from CPython 3.11.7) and writes
``models_zoo/weights/gpt_trained.safetensors`` plus ``gpt_trained.json`` (config,
metrics, wall time, command). Everything is seeded; with the same thread count and torch
build the run is bit-for-bit repeatable.
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

import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from models_zoo.corpus import build_corpus, load_split
from models_zoo.eval import perplexity
from models_zoo.gpt import GPTConfig, GPT_META, GPT_WEIGHTS, TinyGPT, num_params


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=1200)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--min-lr", type=float, default=1e-4)
    p.add_argument("--warmup", type=int, default=100)
    p.add_argument("--weight-decay", type=float, default=0.1)
    p.add_argument("--d-model", type=int, default=GPTConfig.d_model)
    p.add_argument("--n-layer", type=int, default=GPTConfig.n_layer)
    p.add_argument("--n-head", type=int, default=GPTConfig.n_head)
    p.add_argument("--context", type=int, default=GPTConfig.context)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    p.add_argument("--eval-every", type=int, default=400)
    p.add_argument("--rebuild-corpus", action="store_true", help="regenerate data/ from this Python's stdlib")
    p.add_argument("--out", type=Path, default=GPT_WEIGHTS)
    p.add_argument("--meta", type=Path, default=GPT_META)
    return p.parse_args(argv)


def _display(value):
    """JSON-friendly argument value; paths relative to the repository root when inside it."""
    if not isinstance(value, Path):
        return value
    root = Path(__file__).resolve().parent.parent
    try:
        return value.resolve().relative_to(root).as_posix()
    except ValueError:
        return str(value)


def lr_at(step: int, args: argparse.Namespace) -> float:
    """Linear warm-up, then cosine decay to ``min_lr``."""
    if step < args.warmup:
        return args.lr * (step + 1) / args.warmup
    frac = (step - args.warmup) / max(1, args.steps - args.warmup)
    return args.min_lr + 0.5 * (args.lr - args.min_lr) * (1 + math.cos(math.pi * frac))


def main(argv=None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    if args.rebuild_corpus:
        print("corpus:", build_corpus(), flush=True)
    train = load_split("train").to(torch.int64)

    cfg = GPTConfig(d_model=args.d_model, n_layer=args.n_layer, n_head=args.n_head, context=args.context)
    model = TinyGPT(cfg)
    n_params = num_params(model)
    print(f"TinyGPT {cfg} with {n_params} parameters; {train.numel()} train tokens", flush=True)

    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": args.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=args.lr,
        betas=(0.9, 0.95),
    )
    gen = torch.Generator().manual_seed(args.seed)
    offsets_within = torch.arange(cfg.context + 1)
    history = []
    t0 = time.perf_counter()
    for step in range(args.steps):
        starts = torch.randint(0, train.numel() - cfg.context - 1, (args.batch, 1), generator=gen)
        chunk = train[starts + offsets_within]
        x, y = chunk[:, :-1], chunk[:, 1:]
        for group in opt.param_groups:
            group["lr"] = lr_at(step, args)
        model.train()
        loss = F.cross_entropy(model(x).reshape(-1, cfg.vocab_size), y.reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if step % 50 == 0:
            print(f"step {step:5d} loss {loss.item():.4f} lr {lr_at(step, args):.2e} "
                  f"{time.perf_counter() - t0:7.1f}s", flush=True)
        if (step + 1) % args.eval_every == 0 or step + 1 == args.steps:
            model.eval()
            ppl = perplexity(model, "val")
            history.append({"step": step + 1, "val_ppl": ppl, "seconds": time.perf_counter() - t0})
            print(f"step {step + 1:5d} val perplexity {ppl:.3f}", flush=True)
    train_seconds = time.perf_counter() - t0

    model.eval()
    metrics = {
        "val_perplexity": perplexity(model, "val"),
        "train_perplexity": perplexity(model, "train"),
        "uniform_perplexity": float(cfg.vocab_size),
    }
    print("final:", metrics, flush=True)

    args.out.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(args.out))
    meta = {
        "model": "TinyGPT",
        "config": dataclasses.asdict(cfg),
        "parameters": n_params,
        "tokenizer": "byte-level UTF-8, vocab 256 (models_zoo.corpus.encode/decode)",
        "data": "CPython 3.11 stdlib source (PSF License v2), models_zoo/data/pystdlib_*.txt.xz",
        "metrics": metrics,
        "eval": "models_zoo.eval.perplexity(model, split) defaults",
        "history": history,
        "train": {
            "command": "python -m models_zoo.train_gpt " + " ".join(argv if argv is not None else sys.argv[1:]),
            "args": {k: _display(v) for k, v in vars(args).items()},
            "tokens_seen": args.steps * args.batch * cfg.context,
            "wall_seconds": round(train_seconds, 1),
            "threads": args.threads,
            "torch": torch.__version__,
            "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
        },
    }
    args.meta.write_text(json.dumps(meta, indent=2) + "\n")
    print(f"wrote {args.out} and {args.meta} ({train_seconds:.0f}s training)", flush=True)


if __name__ == "__main__":
    main()
