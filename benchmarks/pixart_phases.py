"""Re-ttention per phase on diffusers ``PixArtTransformer2DModel`` (not a test).

The model of issue 22: 4 layers, 16 heads x 64, random weights (seed 0), patch 2, 4 latent
channels, 16 caption tokens of width 64, no additional conditions; ``--sample 64`` gives
N = 1024 tokens, ``--sample 128`` N = 4096.

    python benchmarks/pixart_phases.py export --sample 128 --out pixart128.onnx
        # TorchScript exporter, opset 18, static batch 1; then time it per phase:
    rewrite pixart128.onnx --passes rettention --bench --threads 1 --runs 5 --warmup 1 --no-profile -v
    python benchmarks/pixart_phases.py torch --sample 64 --runs 3
        # the torch path: rewriter.rewrite(module, ["rettention"]), Result.bench(compiled=True), 1 thread

Both print / write the ``latency`` section of ``rewriter.run.bench``: the original interleaved with
the dense, refresh and sparse steps (each fed the states of the steps before it) and the
20-step schedule they make up.
"""

from __future__ import annotations

import argparse
import json
import time
import warnings

import torch


def pixart(sample: int, layers: int = 4):
    """``(wrapper module, example inputs)``: ``forward(x, t, ctx)`` -> the denoiser output."""
    from diffusers import PixArtTransformer2DModel

    torch.manual_seed(0)
    m = PixArtTransformer2DModel(num_attention_heads=16, attention_head_dim=64, in_channels=4, out_channels=8,
                                 num_layers=layers, sample_size=sample, patch_size=2, cross_attention_dim=1024,
                                 caption_channels=64, use_additional_conditions=False,
                                 norm_type="ada_norm_single").eval()

    class Denoiser(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.m = m

        def forward(self, x, t, ctx):
            return self.m(x, encoder_hidden_states=ctx, timestep=t,
                          added_cond_kwargs={"resolution": None, "aspect_ratio": None}, return_dict=False)[0]

    return Denoiser(), (torch.randn(1, 4, sample, sample), torch.tensor([500]), torch.randn(1, 16, 64))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("what", choices=["export", "torch"])
    ap.add_argument("--sample", type=int, default=128, help="latent side: N = (sample / 2)^2 tokens")
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--out", default=None, help="export: the ONNX file")
    ap.add_argument("--runs", type=int, default=3, help="torch: timed samples per target")
    a = ap.parse_args()
    warnings.filterwarnings("ignore")
    module, args = pixart(a.sample, a.layers)
    if a.what == "export":
        with torch.no_grad():
            torch.onnx.export(module, args, a.out or f"pixart{a.sample}.onnx", input_names=["x", "t", "ctx"],
                              output_names=["out"], opset_version=18, dynamo=False)
        return
    import rewriter

    torch.set_num_threads(1)
    t0 = time.time()
    res = rewriter.rewrite(module, ["rettention"], example_inputs=args)
    print(f"rewritten in {time.time() - t0:.0f} s: " + ", ".join(f"{p['name']} {p['applied']} applied, "
                                                               f"{len(p['declined'])} declined"
                                                               for p in res.report["passes"]))
    lat = res.bench(runs=a.runs, warmup=1, profile=False, compiled=True)
    print(json.dumps({"tokens": (a.sample // 2) ** 2, "backend": lat["backend"], "before_ms": lat["before"]["p50_ms"],
                      "phases": [{k: r[k] for k in ("phase", "p50_ms", "speedup")} for r in lat["phases"]],
                      "schedule": lat["schedule"], "load": open("/proc/loadavg").read().split()[:3]}, indent=1))


if __name__ == "__main__":
    main()
