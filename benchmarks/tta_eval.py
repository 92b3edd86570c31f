"""Test-time BatchNorm under a real covariate shift: accuracy of the zoo's trained
``tta-cnn`` (``models_zoo/tta_cnn.py``) on corrupted test sets, before and after the
``alphabn`` and ``unmixtns`` passes.

    nice -n 10 python benchmarks/tta_eval.py --out benchmarks/data/tta_eval.json

Test sets: ``--n`` held-out images (seed 20_000, a generator the training never used),
each corruption kind (noise, blur, brightness, contrast) at the ``--severities``. Every
rewritten model is made by the passes themselves on the FX graph of the trained module
(symbolic_trace: no batch size is baked in), then run batch by batch:

* i.i.d. stream: the images in random order, batches of 1, 4, 16, 64; the original
  (source statistics), test-time BN (``alphabn`` with alpha = 0) and ``alphabn`` at each
  ``--alphas``;
* label-shifted stream (``--stream``): the same images sorted into runs of one class
  (``--run`` images each, the runs in random order), batches of 4, 16 and 64, for the
  original, test-time BN, ``alphabn`` and ``unmixtns`` (state reset at the start of each
  test set, carried across its batches).

One ONNX Runtime run (``--check-onnx``) repeats a few cells with the ONNX rewrite of the
dynamo export (optimize=False) and asserts the same predictions.
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path

import numpy as np
import torch
import torch.fx as fx
from torch.fx.passes.shape_prop import ShapeProp

from backends.tta import state_module
from models_zoo.tta_cnn import CORRUPTIONS, corrupt, labelled_batch, load_trained, metadata
from rewriter.ir.fx_view import FxView, canonicalize
from rewriter.pass_api import get_pass, make_options


def rewritten(model: torch.nn.Module, pass_name: str | None, **options) -> torch.nn.Module:
    """The FX graph of ``model`` after ``pass_name`` with ``options`` (None: unchanged)."""
    gm = fx.symbolic_trace(copy.deepcopy(model))  # the rewrite drops the old BatchNorm buffers
    ShapeProp(gm).propagate(torch.zeros(2, 3, 32, 32))
    gm = canonicalize(gm)
    if pass_name is None:
        return gm
    view = FxView(gm)
    cls = get_pass(pass_name)
    p = cls(make_options(cls, {k: str(v) for k, v in options.items()}))
    sites = [s for s in p.match(view) if s.accepted]
    assert sites, f"{pass_name} applied nowhere"
    p.apply(view, sites)
    view.finalize()
    return view.gm


def accuracy(model, x: np.ndarray, y: np.ndarray, batch: int, stateful: bool = False) -> float:
    if stateful:
        state_module(model).reset()
    hits = 0
    with torch.no_grad():
        for i in range(0, len(x), batch):
            pred = model(torch.from_numpy(x[i : i + batch])).argmax(-1).numpy()
            hits += int((pred == y[i : i + batch]).sum())
    return hits / len(x)


def test_sets(n: int, severities: list[int]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    x, y = labelled_batch(np.random.default_rng(20_000), n)
    sets = {"clean": (x, y)}
    for kind in CORRUPTIONS:
        for s in severities:
            sets[f"{kind}-{s}"] = (corrupt(x, kind, s, np.random.default_rng(30_000 + s)), y)
    return sets


def label_runs(y: np.ndarray, run: int, rng: np.random.Generator) -> np.ndarray:
    """An order of the indices in runs of ``run`` images of one class, runs shuffled."""
    runs = []
    for c in np.unique(y):
        idx = rng.permutation(np.flatnonzero(y == c))
        runs += [idx[i : i + run] for i in range(0, len(idx), run)]
    return np.concatenate([runs[i] for i in rng.permutation(len(runs))])


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--n", type=int, default=1024)
    ap.add_argument("--severities", default="1,3,5")
    ap.add_argument("--batches", default="1,4,16,64")
    ap.add_argument("--alphas", default="0.5,0.8,0.9,0.95")
    ap.add_argument("--run", type=int, default=64, help="images per single-class run in the label-shifted stream")
    ap.add_argument("--stream-batches", default="4,16,64")
    ap.add_argument("--unmix", default="k=4,tau=1.0,rho=0.1,spread=0.5")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--check-onnx", action="store_true")
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--only-stream", type=Path, default=None,
                    help="reuse the i.i.d. rows (and ONNX check) of this JSON; recompute the stream rows")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    t0 = time.time()
    sev = [int(s) for s in args.severities.split(",")]
    batches = [int(b) for b in args.batches.split(",")]
    alphas = [float(a) for a in args.alphas.split(",")]
    base = load_trained()
    sets = test_sets(args.n, sev)
    models = {"source": rewritten(base, None), "tbn (alpha=0)": rewritten(base, "alphabn", alpha=0.0)}
    for a in alphas:
        models[f"alphabn {a}"] = rewritten(base, "alphabn", alpha=a)
    models["alphabn 0.9 mix"] = rewritten(base, "alphabn", alpha=0.9, variance="mix")
    unmix_opts = dict(kv.split("=") for kv in args.unmix.split(","))
    unmix = rewritten(base, "unmixtns", **unmix_opts)
    rows = []
    prev = json.loads(args.only_stream.read_text()) if args.only_stream else None
    for name, model in ({} if prev else models).items():
        for b in ([64] if name == "source" else batches):
            accs = {k: accuracy(model, x, y, b) for k, (x, y) in sets.items()}
            rows.append({"method": name, "batch": b if name != "source" else "any", "acc": accs})
            print(f"{name:18s} b={b:3d} clean {accs['clean']:.3f} "
                  + " ".join(f"s{s} {np.mean([accs[f'{k}-{s}'] for k in CORRUPTIONS]):.3f}" for s in sev),
                  f"({time.time() - t0:.0f} s)", flush=True)
    stream_rows = []
    rng = np.random.default_rng(40_000)
    order = label_runs(sets["clean"][1], args.run, rng)
    stream_models = {"source": (models["source"], False), "tbn (alpha=0)": (models["tbn (alpha=0)"], False),
                     **{f"alphabn {a}": (models[f"alphabn {a}"], False) for a in alphas if a in (0.6, 0.9)},
                     "unmixtns": (unmix, True)}
    for name, (model, st) in stream_models.items():
        for b in [int(v) for v in args.stream_batches.split(",")]:
            accs = {k: accuracy(model, x[order], y[order], b, stateful=st) for k, (x, y) in sets.items()}
            iid = {k: accuracy(model, x, y, b, stateful=st) for k, (x, y) in sets.items()} if st else None
            stream_rows.append({"method": name, "batch": b, "acc": accs, "iid_acc": iid})
            print(f"[stream] {name:14s} b={b:3d} clean {accs['clean']:.3f} "
                  + " ".join(f"s{s} {np.mean([accs[f'{k}-{s}'] for k in CORRUPTIONS]):.3f}" for s in sev),
                  f"({time.time() - t0:.0f} s)", flush=True)
    if prev:
        rows = prev["rows"]
    onnx_check = prev["onnx_check"] if prev else None
    if args.check_onnx and not prev:
        onnx_check = check_onnx(base, sets, models)
        print("onnx check:", onnx_check)
    out = {"model": "tta-cnn", "model_meta": metadata(), "n": args.n, "severities": sev, "corruptions": CORRUPTIONS,
           "unmix_options": unmix_opts, "run": args.run, "rows": rows, "stream_rows": stream_rows,
           "onnx_check": onnx_check, "seconds": round(time.time() - t0, 1),
           "loadavg": Path("/proc/loadavg").read_text().split()[:3], "threads": args.threads}
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(out, indent=1) + "\n")
    print(markdown(out))


def check_onnx(base, sets, models) -> dict:
    """alphabn 0.9 and test-time BN through the ONNX rewrite in ONNX Runtime: predictions
    equal to the FX rewrite's on brightness-5 at batch 16 (and the accuracy)."""
    import tempfile

    from backends.ort import make_session
    from rewriter import api
    from rewriter.torch_export import export_to_onnx

    res = {}
    with tempfile.TemporaryDirectory() as d:
        src = export_to_onnx(base, (torch.from_numpy(sets["clean"][0][:16]),), Path(d) / "tta.onnx")
        key = next(k for k in sets if k.startswith("brightness-")) if any(k.startswith("brightness-") for k in sets) else "clean"
        x, y = sets[key]
        for alpha, name in ((0.9, "alphabn 0.9"), (0.0, "tbn (alpha=0)")):
            r = api.rewrite(str(src), ["alphabn"], options={"alphabn": {"alpha": str(alpha)}}, verify=False)
            out = Path(d) / f"a{alpha}.onnx"
            r.save(str(out))
            sess = make_session(str(out), optimize=False)
            iname = sess.get_inputs()[0].name
            pred_o = np.concatenate([sess.run(None, {iname: x[i:i + 16]})[0].argmax(-1) for i in range(0, len(x), 16)])
            with torch.no_grad():
                pred_t = np.concatenate([models[name](torch.from_numpy(x[i:i + 16])).argmax(-1).numpy()
                                         for i in range(0, len(x), 16)])
            res[f"{name} {key} b16"] = {"onnx_acc": float((pred_o == y).mean()), "fx_acc": float((pred_t == y).mean()),
                                        "same_predictions": float((pred_o == pred_t).mean())}
    return res


def markdown(out: dict) -> str:
    sev = out["severities"]
    kinds = list(CORRUPTIONS)
    lines = ["| method | batch | clean | " + " | ".join(f"mean sev {s}" for s in sev) + " | "
             + " | ".join(f"{k} {sev[-1]}" for k in kinds) + " |",
             "|" + " --- |" * (3 + len(sev) + len(kinds))]
    for r in out["rows"]:
        a = r["acc"]
        lines.append(f"| {r['method']} | {r['batch']} | {a['clean']:.3f} | "
                     + " | ".join(f"{np.mean([a[f'{k}-{s}'] for k in kinds]):.3f}" for s in sev) + " | "
                     + " | ".join(f"{a[f'{k}-{sev[-1]}']:.3f}" for k in kinds) + " |")
    lines += ["", f"Label-shifted stream (runs of {out['run']} images of one class):", "",
              "| method | batch | clean | " + " | ".join(f"mean sev {s}" for s in sev) + " |",
              "|" + " --- |" * (3 + len(sev))]
    for r in out["stream_rows"]:
        a = r["acc"]
        lines.append(f"| {r['method']} | {r['batch']} | {a['clean']:.3f} | "
                     + " | ".join(f"{np.mean([a[f'{k}-{s}'] for k in kinds]):.3f}" for s in sev) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
