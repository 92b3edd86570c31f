"""shiftadd benchmark (not a test): quality, memory and ORT CPU latency on the trained zoo GPT.

Quality: validation perplexity (``models_zoo.eval.perplexity``, 64 fixed windows) of

* fp32;
* round-to-nearest uniform quantization (per row, groups of 128 input columns, min/max
  scale and zero point: ``passes.shiftadd_quant.rtn``) at the same widths; at 2.5 bits it
  uses the per-layer widths shiftadd's DP chose;
* ``shiftadd`` (BCQ, 8-column x all-rows power-of-two-sum scales, GPTQ compensation with the
  Hessian of ``--calib-windows`` train windows) at 4, 3 and 2.5 (mixed 2/3/4) bits: the
  rewritten torch.fx GraphModule itself (``torch.ops.rewriter.shiftadd_linear``, CPU kernel);
* optionally (``--denseshift``) the DenseShift mode at 3 and 4 bits.

The 24 linears of the 4 blocks are quantized; embeddings and the head stay fp32 (the
pass's default). Memory: packed planes + scale terms of those layers against their fp16
size. Latency: ORT CPU (full optimizations) of the exported GPT before / after
``shiftadd`` at 3 bits, interleaved ABBA, paired-median speedup.

    .venv/bin/python benchmarks/shiftadd_quality.py [--calib-windows 64] [--runs 30] [--json F]
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import time

import numpy as np
import torch

import models_zoo
import rewriter
from models_zoo.corpus import load_split
from models_zoo.eval import perplexity
from passes import shiftadd_quant as sq
from passes.shiftadd import ShiftAdd
from rewriter.ir.fx_view import FxView, capture
from rewriter.pass_api import Context

log = logging.getLogger("shiftadd_quality")


class _Wrapped(torch.nn.Module):
    """A rewritten GraphModule with the ``cfg`` that ``perplexity`` reads."""

    def __init__(self, gm, cfg):
        super().__init__()
        self.gm, self.cfg = gm, cfg

    def forward(self, ids):
        return self.gm(ids)


def calib_ids(n: int, context: int, seed: int = 0) -> np.ndarray:
    data = load_split("train").to(torch.int64)
    rng = np.random.default_rng(seed)
    starts = rng.integers(0, len(data) - context - 1, size=n)
    return np.stack([data[s : s + context].numpy() for s in starts])


def run_shiftadd(model, example, calib, **options):
    """Rewrite the FX graph; returns (GraphModule, pass object)."""
    view = FxView(capture(model, example), example)
    p = ShiftAdd(ShiftAdd.Options(**options), Context(calib=calib))
    res = rewriter.rewrite(view, [p], example_inputs=example)
    assert res.passed, res.verification
    return res.model, p, {n.name: n.raw[0].args[1].target.rsplit(".", 1)[0]
                          for n in view.nodes() if n.op == "linear"}


def rtn_model(model, widths: dict[str, int]):
    m = copy.deepcopy(model)
    mods = dict(m.named_modules())
    for name, b in widths.items():
        lin = mods[name]
        lin.weight.data = torch.from_numpy(sq.rtn(lin.weight.detach().double().numpy(), b)).float()
    return m


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--calib-windows", type=int, default=64)
    ap.add_argument("--runs", type=int, default=30)
    ap.add_argument("--denseshift", action="store_true")
    ap.add_argument("--no-latency", action="store_true")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    torch.manual_seed(0)
    model, example = models_zoo.build("gpt-trained")
    cfg = model.cfg
    calib = {"ids": calib_ids(args.calib_windows, cfg.context)}
    # batch of the example inputs: the exported graph is specialised to it
    batch = example[0].shape[0]
    rows = [{"method": "fp32", "bits": 32, "ppl": perplexity(model, "val")}]
    memory = []
    settings = [("shiftadd", 4.0, "bcq"), ("shiftadd", 3.0, "bcq"), ("shiftadd", 2.5, "bcq")]
    if args.denseshift:
        settings += [("denseshift", 4.0, "denseshift"), ("denseshift", 3.0, "denseshift")]
    for label, bits, mode in settings:
        t0 = time.perf_counter()
        gm, p, modname = run_shiftadd(model, example, calib, bits=bits, mode=mode)
        secs = time.perf_counter() - t0
        ppl = perplexity(_Wrapped(gm, cfg), "val", batch=batch)
        widths = {modname[layer["site"]]: layer["bits"] for layer in p.layers}
        packed = sum(layer["bytes"] for layer in p.layers)
        fp16 = sum(layer["fp16_bytes"] for layer in p.layers)
        memory.append({"method": label, "bits": bits, "packed_bytes": packed, "fp16_bytes": fp16,
                       "reduction": 1 - packed / fp16})
        rows.append({"method": label, "bits": bits, "ppl": ppl, "seconds": secs,
                     "widths": [layer["bits"] for layer in p.layers]})
        if mode == "bcq":
            rows.append({"method": "rtn-g128", "bits": bits, "ppl": perplexity(rtn_model(model, widths), "val"),
                         "widths": [layer["bits"] for layer in p.layers]})
        print(f"{label:10s} {bits:4.1f} bits: ppl {ppl:8.3f} ({secs:.0f} s); "
              f"rtn {rows[-1]['ppl'] if mode == 'bcq' else float('nan'):8.3f}", flush=True)
    print("\nvalidation perplexity (byte-level, 64 windows of 128)")
    print(f"{'method':12s} {'bits':>5s} {'ppl':>9s}")
    for r in rows:
        print(f"{r['method']:12s} {r['bits']:5.1f} {r['ppl']:9.3f}")
    print("\nmemory of the quantized layers (planes + scale terms) vs fp16")
    for m in memory:
        print(f"{m['method']:12s} {m['bits']:4.1f} bits: {m['packed_bytes']} B vs {m['fp16_bytes']} B "
              f"(-{100 * m['reduction']:.1f}%)")
    out = {"perplexity": rows, "memory": memory}
    if not args.no_latency:
        from rewriter.run.bench import latency_section, onnx_target

        res = rewriter.rewrite(model, ["shiftadd"], example_inputs=example, ir_kind="onnx", calib=calib)
        feeds = {"ids": example[0].numpy()}
        before = onnx_target("original", rewriter.api.as_view(model, example_inputs=example, ir_kind="onnx").to_proto(),
                             feeds)
        after = onnx_target("shiftadd-3", res.view.to_proto(), feeds)
        lat = latency_section(before, after, runs=args.runs, profile=False, inputs=feeds)
        out["latency"] = lat
        print(f"\nORT CPU latency, batch {batch} x {cfg.context} tokens: original p50 {lat['before']['p50_ms']:.2f} ms, "
              f"shiftadd-3 p50 {lat['after']['p50_ms']:.2f} ms, speedup {lat['speedup']:.3f}")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(out, fh, indent=2, default=float)


if __name__ == "__main__":
    main()
