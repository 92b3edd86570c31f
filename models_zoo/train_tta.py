"""Train the zoo's ``tta-cnn`` (``models_zoo/tta_cnn.py``) on fresh procedural images.

    python -m models_zoo.train_tta --threads 1

AdamW (lr 3e-3, weight decay 1e-4), cosine decay, batches of 64 drawn fresh each step
from a seeded generator; BatchNorm momentum 0.1 (PyTorch's default). Writes the weights
(safetensors) and a JSON record (config, losses, clean held-out accuracy, wall time).
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file

from models_zoo.tta_cnn import TTA_META, TTA_WEIGHTS, TtaCnn, labelled_batch


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--steps", type=int, default=1500)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--out", type=Path, default=TTA_WEIGHTS)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    rng = np.random.default_rng(args.seed)
    model = TtaCnn()
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * s / args.steps)))
    losses = []
    t0 = time.time()
    model.train()
    for step in range(args.steps):
        x, y = labelled_batch(rng, args.batch)
        loss = torch.nn.functional.cross_entropy(model(torch.from_numpy(x)), torch.from_numpy(y))
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        losses.append(float(loss))
        if step % 100 == 0:
            print(f"step {step} loss {np.mean(losses[-100:]):.4f} ({time.time() - t0:.0f} s)", flush=True)
    wall = time.time() - t0
    model.eval()
    xt, yt = labelled_batch(np.random.default_rng(10_000 + args.seed), 2048)
    with torch.no_grad():
        acc = float((model(torch.from_numpy(xt)).argmax(-1).numpy() == yt).mean())
    print(f"clean held-out accuracy {acc:.4f}; {wall:.0f} s")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(args.out))
    meta = {"model": "TtaCnn", "params": sum(p.numel() for p in model.parameters()),
            "train": {"steps": args.steps, "batch": args.batch, "lr": args.lr, "seed": args.seed,
                      "threads": torch.get_num_threads(), "wall_s": round(wall, 1),
                      "loss_every_100": [round(float(np.mean(losses[i:i + 100])), 4)
                                         for i in range(0, len(losses), 100)]},
            "clean_accuracy_heldout_2048": acc}
    meta_path = TTA_META if args.out == TTA_WEIGHTS else args.out.with_suffix(".json")
    meta_path.write_text(json.dumps(meta, indent=1) + "\n")


if __name__ == "__main__":
    main()
