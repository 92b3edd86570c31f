"""Re-ttention per phase on diffusers ``PixArtTransformer2DModel`` (not a test).

The model of issue 22: 4 layers, 16 heads x 64, random weights (seed 0), patch 2, 4 latent
channels, 16 caption tokens of width 64, no additional conditions; ``--sample 64`` gives
N = 1024 tokens, ``--sample 128`` N = 4096.

    python benchmarks/pixart_phases.py export --sample 128 --out pixart128.onnx
        # TorchScript exporter, opset 18, static batch 1; then time it per phase:
    rewrite pixart128.onnx --passes rettention --bench --threads 1 --runs 5 --warmup 1 --no-profile -v
    python benchmarks/pixart_phases.py torch --sample 64 --runs 3
        # the torch path: rewriter.rewrite(module, ["rettention"]), Result.bench(compiled=True), 1 thread
    python benchmarks/pixart_phases.py check pixart128.onnx pixart128.r.onnx --phase refresh --runs 5
        # the independent check: plain ORT sessions of both files (1 thread, graph optimizations
        # on), the state threaded by hand (dense step 0 -> refresh -> sparse), ABBA, medians

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


def check(original: str, rewritten: str, phases: list[str], runs: int, first: str) -> dict:
    """Time the original file against the given phases of the rewritten one, without the
    bench module: ORT sessions made here (1 thread, full graph optimizations, no spinning),
    states threaded by hand, one warm-up call each, then ABBA-interleaved samples."""
    import numpy as np
    import onnxruntime as ort

    def session(path):
        o = ort.SessionOptions()
        o.intra_op_num_threads = 1
        o.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        o.log_severity_level = 3
        o.add_session_config_entry("session.intra_op.allow_spinning", "0")
        return ort.InferenceSession(path, o, providers=["CPUExecutionProvider"])

    if first == "original":
        a = session(original)
        b = session(rewritten)
    else:
        b = session(rewritten)
        a = session(original)
    rng = np.random.default_rng(0)
    shapes = {i.name: i.shape for i in a.get_inputs()}
    feeds = {"x": rng.standard_normal(shapes["x"]).astype(np.float32), "t": np.array([500], np.int64),
             "ctx": rng.standard_normal(shapes["ctx"]).astype(np.float32)}
    args = {i.name: i for i in list(b.get_inputs()) + list(b.get_overridable_initializers())}
    state = {n: np.zeros([1 if isinstance(d, str) else int(d) for d in i.shape], np.float32) for n, i in args.items()
             if n.startswith("rettention_") and n != "rettention_step"}
    outs = [o.name for o in b.get_outputs()]
    step_of = {"dense": 0, "refresh": 5, "sparse": 6}  # the pass's default schedule: warmup 5, period 5
    phase_feeds = {}
    for name in ("dense", "refresh", "sparse"):
        f = {**feeds, **state, "rettention_step": np.asarray(step_of[name], np.int64)}
        phase_feeds[name] = f
        vals = dict(zip(outs, b.run(outs, f)))
        state = {k: vals[k + "_out"] for k in state}
    targets = [lambda: a.run(None, feeds)] + [lambda f=phase_feeds[p]: b.run(outs, f) for p in phases]
    for t in targets:  # warm-up
        t()
    samples = [[] for _ in targets]
    order = list(range(len(targets)))
    for r in range(runs):
        for i in (order if r % 2 == 0 else order[::-1]):
            t0 = time.perf_counter()
            targets[i]()
            samples[i].append((time.perf_counter() - t0) * 1e3)
    s = [np.asarray(x) for x in samples]
    return {"tokens": int(np.prod(shapes["x"][2:])) // 4, "first_session": first, "runs": runs,
            "original_ms": float(np.median(s[0])),
            "phases": [{"phase": p, "p50_ms": float(np.median(s[k + 1])),
                        "paired_speedup": float(np.median(s[0] / s[k + 1])),
                        "p50_ratio": float(np.median(s[0]) / np.median(s[k + 1]))} for k, p in enumerate(phases)],
            "load": open("/proc/loadavg").read().split()[:3]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("what", choices=["export", "torch", "check"])
    ap.add_argument("files", nargs="*", help="check: the original and the rewritten ONNX file")
    ap.add_argument("--phase", action="append", choices=["dense", "refresh", "sparse"],
                    help="check: a phase to time (repeat; default all three)")
    ap.add_argument("--first", choices=["original", "rewritten"], default="original",
                    help="check: which file's session is created first")
    ap.add_argument("--sample", type=int, default=128, help="latent side: N = (sample / 2)^2 tokens")
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--out", default=None, help="export: the ONNX file")
    ap.add_argument("--runs", type=int, default=3, help="torch, check: timed samples per target")
    a = ap.parse_args()
    warnings.filterwarnings("ignore")
    if a.what == "check":
        if len(a.files) != 2:
            ap.error("check takes the original and the rewritten ONNX file")
        print(json.dumps(check(*a.files, a.phase or ["dense", "refresh", "sparse"], a.runs, a.first), indent=1))
        return
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
