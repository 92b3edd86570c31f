"""Quality of each Re-ttention mask choice on the trained zoo DiT (not a test).

The trained ``dit-trained`` (adaLN, 256 image tokens on a 16 x 16 grid, no text) is
rewritten (torch path) with each mask (``band``, ``window2d``, ``auto``, which reads the
16 x 16 grid from the patch embedding) at a few densities, and sampled with 20 Euler steps
(default schedule: 5 dense, refresh every 5) for ``--seeds`` seeds x batch 8; the final
samples are compared with dense sampling of the original with the same seeds (PSNR / SSIM,
``models_zoo.eval``), for Re-ttention and for naive sparse attention (the same mask with no
correction). Token density and block density of each layout are printed beside them.

    python benchmarks/rettention_masks.py --seeds 8 --steps 20 [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import rewriter  # noqa: E402
from models_zoo.dit import _example_inputs, load_trained_dit  # noqa: E402
from models_zoo.eval import psnr, sample, ssim  # noqa: E402
from passes.rettention_runtime import sample_euler, state_module, torch_stepper  # noqa: E402

CHOICES = [("band", 0.03125), ("window2d", 0.03125), ("auto", 0.03125), ("band", 0.0625), ("window2d", 0.0625),
           ("band", 0.125), ("window2d", 0.125)]


def measure(seeds: int, steps: int, conditioning: str = "adaln") -> list[dict]:
    model = load_trained_dit(conditioning)
    cfg = model.cfg
    dense = [sample(model, seed=s, steps=steps) for s in range(seeds)]
    rows = []
    for mask, density in CHOICES:
        res = rewriter.rewrite(model, ["rettention"], example_inputs=_example_inputs(cfg, batch=8),
                               options={"rettention": {"mask": mask, "density": density}})
        gm = res.model
        st = state_module(gm)
        lay = st.sites[0].layout
        row = {"mask": mask, "density": density, "spec": lay.spec.describe(),
               "token_density": lay.spec.density(), "block_density": lay.block_density(), "block": lay.block,
               "reason": res.records[0].sites[0].reason}
        for variant in ("rettention", "naive"):
            st.set_variant(variant)
            ps, ss = [], []
            for s in range(seeds):
                x = torch.randn(8, cfg.channels, cfg.image_size, cfg.image_size,
                                generator=torch.Generator().manual_seed(s))
                got = sample_euler(torch_stepper(gm), x, steps)
                ps.append(psnr(dense[s], got))
                ss.append(ssim(dense[s], got))
            row[variant] = {"psnr": float(np.mean(ps)), "ssim": float(np.mean(ss)), "psnr_min": float(np.min(ps))}
        rows.append(row)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seeds", type=int, default=8)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--json", default="")
    a = ap.parse_args()
    torch.set_num_threads(1)
    t0 = time.time()
    rows = measure(a.seeds, a.steps)
    print("| mask | density option | mask built | token density | block density (block) | Re-ttention PSNR / SSIM "
          "| naive sparse PSNR / SSIM |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| `{r['mask']}` | {r['density']} | {r['spec']} | {100 * r['token_density']:.2f} % | "
              f"{100 * r['block_density']:.1f} % ({r['block']}) | {r['rettention']['psnr']:.2f} dB / "
              f"{r['rettention']['ssim']:.4f} | {r['naive']['psnr']:.2f} dB / {r['naive']['ssim']:.4f} |")
    print(f"wall {time.time() - t0:.0f} s, load {open('/proc/loadavg').read().split()[:3]}")
    if a.json:
        Path(a.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
