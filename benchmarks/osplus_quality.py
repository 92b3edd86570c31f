"""osplus quality benchmark (not a test): activation quantization error on the trained zoo GPT.

Model: ``gpt-trained`` (byte-level, 4 x 160, ctx 128), captured with torch.export. The
pre-norm outputs (the inputs of q/k/v and fc_in; not the final norm) are fake-quantized
per tensor (asymmetric min-max over each batch, ``bits`` bits) while the model runs;
weights stay in float. Calibration: 8 windows of the *train* split (``--calib`` data);
evaluation: validation perplexity over 64 evenly spaced windows (the scheme of
``models_zoo.eval.perplexity``).

Prints, per bit width: the float perplexity, the perplexity with quantized activations
before and after ``osplus`` (whose search uses the same bit width), the per-site relative
fake-quant output error before -> after, and the largest/median channel ratio.

    .venv/bin/python benchmarks/osplus_quality.py [--bits 8 6 4]
"""

from __future__ import annotations

import argparse
import math

import torch
import torch.fx as fx
import torch.nn.functional as F

import rewriter
from models_zoo.corpus import load_split
from models_zoo.gpt import load_trained_gpt
from rewriter.ir.fx_view import capture

aten = torch.ops.aten
_NORMS = (aten.layer_norm.default, aten.rms_norm.default)


def _fake_quant(x: torch.Tensor, bits: int) -> torch.Tensor:
    lo, hi = torch.clamp(x.min(), max=0), torch.clamp(x.max(), min=0)
    step = (hi - lo) / (2**bits - 1)
    zp = torch.round(-lo / step)
    return (torch.clamp(torch.round(x / step) + zp, 0, 2**bits - 1) - zp) * step


class _Quantized(fx.Interpreter):
    """Runs a GraphModule with the outputs of its pre-norms fake-quantized."""

    def __init__(self, gm: fx.GraphModule, bits: int | None):
        super().__init__(gm)
        norms = [n for n in gm.graph.nodes if n.op == "call_function" and n.target in _NORMS]
        self.targets = set(norms[:-1])  # every norm but the final one
        self.bits = bits

    def run_node(self, n):
        out = super().run_node(n)
        if self.bits is not None and n in self.targets:
            out = _fake_quant(out, self.bits)
        return out


def _windows(split: str, n: int, context: int) -> torch.Tensor:
    data = load_split(split).to(torch.int64)
    starts = torch.linspace(0, data.numel() - context - 1, n).round().to(torch.int64)
    return data[starts[:, None] + torch.arange(context + 1)]


@torch.no_grad()
def perplexity(gm: fx.GraphModule, bits: int | None, windows: torch.Tensor, batch: int) -> float:
    run = _Quantized(gm, bits)
    total, count = 0.0, 0
    for i in range(0, len(windows), batch):
        chunk = windows[i : i + batch]
        logits = run.run(chunk[:, :-1])
        total += F.cross_entropy(logits.reshape(-1, logits.shape[-1]).double(), chunk[:, 1:].reshape(-1),
                                 reduction="sum").item()
        count += chunk[:, 1:].numel()
    return math.exp(total / count)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--bits", type=int, nargs="+", default=[8, 6, 4])
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--windows", type=int, default=64)
    args = ap.parse_args()
    torch.manual_seed(0)
    model = load_trained_gpt()
    ctx = model.cfg.context
    calib = _windows("train", args.batch, ctx)[:, :-1].contiguous()
    val = _windows("val", args.windows, ctx)
    gm = capture(model, (calib,))
    print(f"gpt-trained: float val perplexity {perplexity(gm, None, val, args.batch):.4f}")
    for bits in args.bits:
        res = rewriter.rewrite(model, ["osplus"], example_inputs=(calib,), ir_kind="torch",
                               calib={"ids": calib.numpy()}, options={"osplus": {"bits": bits}})
        assert res.passed, res.verification
        before = perplexity(gm, bits, val, args.batch)
        after = perplexity(res.model, bits, val, args.batch)
        print(f"A{bits} (per-tensor, pre-norm outputs): val perplexity {before:.4f} -> {after:.4f} with osplus "
              f"(max rel output change of the rewrite {res.verification['max_rel_error']:.2e})")
        for s in res.records[0].applied:
            figures = s.reason.split("; ", 1)[1].rsplit("; calibration", 1)[0]
            print(f"    {s.site}: {figures}")


if __name__ == "__main__":
    main()
