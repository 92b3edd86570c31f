"""The headline job, end to end: the trained zoo DiT rewritten with ``crms,rettention``.

    python -m models_zoo.demo [--out DIR] [--html demo-report.html] [--seeds 0,1] [--steps 25] [--runs 30]

1. Export ``dit-trained-additive`` (the DiT whose residual writers all end in a Linear,
   so LayerNorm -> CRMSNorm applies) to ONNX, batch 8.
2. ``rewriter.rewrite(onnx, ["crms", "rettention"])``: every pass verified in ONNX Runtime
   (optimizations off). The default step of a Re-ttention model is dense, so this checks
   the dense step against the original at the exact-pass tolerance (1e-5).
3. The sparse schedule: ``passes.rettention.check_steps`` runs the rewritten model through
   dense, refresh and sparse steps and compares every site's output (and its carried
   state) with the float64 formula; then the same seeds are sampled (rectified-flow Euler,
   ``models_zoo.eval.sample``'s sampler) by the original model (dense), by the rewritten
   model (Re-ttention) and by the rewritten model with the residual correction removed
   (naive band-masked attention), with PSNR / SSIM of each against dense.
4. The graph diff and latency (``Result.diff()``, ``Result.bench()``: the original against
   the dense, refresh and sparse steps and the sampling schedule they make up), the
   terminal summary, the JSON document and the HTML page with the three sample grids side
   by side (``Result.html(path, images=...)``).
5. Where the rewrite pays: the same architecture with random weights at 256, 1024 and 4096
   tokens, timed the same way (``scaling_section``): a latency-against-tokens figure on the
   page and one sentence at the end of the terminal report.

``run_demo`` does the work and returns the ``Result`` and the images; ``main`` prints.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rich.console import Console

from backends.ort.rettention import RettentionRunner, site_configs
from backends.ort.session import make_session
from models_zoo.dit import TinyDiT, _example_inputs, load_trained_dit
from models_zoo.eval import png_grid, psnr, ssim
from passes.rettention import check_steps
from passes.rettention_runtime import onnx_stepper, sample_euler
import rewriter
from rewriter.report import render_summary
from rewriter.torch_export import export_to_onnx

log = logging.getLogger(__name__)

ZOO_NAME = "dit-trained-additive"
PASSES = ["crms", "rettention"]
BATCH = 8  # images per seed (the exported model's batch)
EXACT_TOL = 1e-5  # the exact passes' tolerance: the dense step must meet it
VARIANTS = (("dense", "dense (original model)"), ("rettention", "Re-ttention (rewritten model)"),
            ("naive", "naive sparse (band mask, no correction)"))


def _sample(fn, seed: int, steps: int, cfg) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)  # the noise of models_zoo.eval.sample(seed)
    x = torch.randn(BATCH, cfg.channels, cfg.image_size, cfg.image_size, generator=gen)
    return sample_euler(fn, x, steps)


def sample_variants(original_onnx: Any, rewritten, cfg, *, seeds: list[int], steps: int,
                    threads: int | None = None) -> dict[str, torch.Tensor]:
    """``{variant: images [len(seeds) * BATCH, C, H, W]}`` for dense (``original_onnx`` in
    ORT), Re-ttention and naive sparse (the rewritten ``onnx_ir.Model`` through
    ``RettentionRunner``), the same seeds for all three."""
    dense = make_session(original_onnx, optimize=True, threads=threads)

    def dense_fn(x, t, step):
        return torch.from_numpy(dense.run(None, {"x": x.numpy(), "t": t.numpy()})[0])

    runner = RettentionRunner(rewritten, optimize=True, threads=threads)
    schedule = site_configs(rewritten)[0].schedule
    out: dict[str, list[torch.Tensor]] = {name: [] for name, _ in VARIANTS}
    for seed in seeds:
        out["dense"].append(_sample(dense_fn, seed, steps, cfg))
        out["rettention"].append(_sample(onnx_stepper(runner), seed, steps, cfg))
        out["naive"].append(_sample(onnx_stepper(runner, variant="naive", schedule=schedule), seed, steps, cfg))
    return {k: torch.cat(v) for k, v in out.items()}


def samples_section(images: dict[str, torch.Tensor], *, seeds: list[int], steps: int, schedule) -> dict[str, Any]:
    """The report's ``samples`` section: per variant the mean (and worst) PSNR / SSIM over
    the seeds against dense sampling."""
    variants = []
    ref = images["dense"]
    for name, label in VARIANTS:
        if name == "dense":
            variants.append({"name": name, "label": label, "psnr": None, "ssim": None})
            continue
        ps, ss = [], []
        for i in range(len(seeds)):
            sl = slice(i * BATCH, (i + 1) * BATCH)
            p = psnr(ref[sl], images[name][sl])
            ps.append(p if math.isfinite(p) else 999.0)
            ss.append(ssim(ref[sl], images[name][sl]))
        variants.append({"name": name, "label": label, "psnr": float(np.mean(ps)), "ssim": float(np.mean(ss)),
                         "psnr_min": float(np.min(ps)), "ssim_min": float(np.min(ss))})
    return {"description": (f"Rectified-flow Euler sampling; Re-ttention schedule: dense steps 0-{schedule.warmup - 1}, "
                            f"a refresh every {schedule.period} steps, sparse steps between (lam {schedule.lam})."),
            "reference": "dense", "steps": steps, "seeds": list(seeds), "images_per_seed": BATCH,
            "variants": variants}


SCALING_TOKENS = (256, 1024, 4096)  # the latency-against-tokens figure


def scaling_section(cfg, out_dir: Path, *, tokens=SCALING_TOKENS, runs: int = 5, say=lambda m: None) -> dict[str, Any]:
    """The report's ``scaling`` section: the same architecture as ``cfg`` with random weights
    at each token count (image side ``patch * sqrt(N)``, batch 1), exported, rewritten with
    ``PASSES`` and timed per phase by ``Result.bench`` (``rewriter.run.bench``: the original
    against the dense, refresh and sparse steps, interleaved); per ``N`` the original's ms
    per step, the sparse step's and the schedule's mean step with their speedups, and the
    sentence saying where the rewrite starts to pay (``pays_from``)."""
    rows = []
    for n in tokens:
        side = cfg.patch * math.isqrt(n)
        c = dataclasses.replace(cfg, image_size=side)
        say(f"latency against tokens: N = {n} (random weights)")
        torch.manual_seed(0)
        model = TinyDiT(c).eval()
        x = torch.randn(1, c.channels, side, side)
        t = torch.full((1,), 0.5)
        path = export_to_onnx(model, (x, t), out_dir / f"dit-random-{n}.onnx")
        res = rewriter.rewrite(str(path), PASSES, inputs={"x": x.numpy(), "t": t.numpy()}, source=str(path))
        if not res.passed:
            raise RuntimeError(f"N = {n}: the rewrite failed verification")
        lat = res.bench(runs=runs, warmup=1, profile=False)
        ph = {r["phase"]: r for r in lat["phases"]}
        rows.append({"tokens": n, "before_ms": lat["before"]["p50_ms"], "sparse_ms": ph["sparse"]["p50_ms"],
                     "schedule_ms": lat["after"]["p50_ms"], "sparse_speedup": ph["sparse"]["speedup"],
                     "refresh_speedup": ph["refresh"]["speedup"], "dense_speedup": ph["dense"]["speedup"],
                     "schedule_speedup": lat["speedup"]})
    steps = lat["schedule"]["steps"]
    return {"description": f"{cfg.n_layer} layers, {cfg.n_head} heads x {cfg.d_model // cfg.n_head}, random weights, "
                           f"batch 1; ONNX Runtime; {steps}-step schedule", "steps": steps,
            "rows": rows, "pays_from": pays_from(rows, steps)}


def pays_from(rows: list[dict[str, Any]], steps: int) -> str:
    """One sentence: from how many tokens the schedule is faster than the original."""
    def words(r):
        return f"{r['schedule_speedup']:.2f}x at {r['tokens']} (sparse step {r['sparse_speedup']:.2f}x)"

    pays = [r["schedule_speedup"] > 1.0 for r in rows]
    detail = "; ".join(words(r) for r in rows)
    if all(pays):
        return f"The rewrite pays at every size measured, from {rows[0]['tokens']} tokens: {detail}."
    if not any(pays):
        return f"The rewrite does not pay up to {rows[-1]['tokens']} tokens on this machine: {detail}."
    k = pays.index(True)
    if k > 0 and all(pays[k:]):
        a, b = rows[k - 1], rows[k]
        # the crossing of speedup 1, linear in log N between the two sizes around it
        fa, fb = a["schedule_speedup"] - 1.0, b["schedule_speedup"] - 1.0
        la, lb = math.log(a["tokens"]), math.log(b["tokens"])
        cross = math.exp(la + (lb - la) * (-fa) / (fb - fa)) if fb != fa else b["tokens"]
        return (f"The rewrite starts to pay at about {cross:,.0f} tokens ({steps}-step schedule "
                f"faster than the original from there): {detail}.")
    return f"The rewrite pays at some sizes only: {detail}."


def run_demo(out_dir: str | Path, *, seeds: list[int] = (0, 1), steps: int = 25, runs: int = 30,
             check_steps_n: int = 8, html: str | Path | None = None, progress=None, scaling: bool = True,
             scaling_runs: int = 5, scaling_tokens: tuple[int, ...] = SCALING_TOKENS) -> dict[str, Any]:
    """Run the headline job into ``out_dir``; returns ``{result, images (PNG bytes per variant),
    samples (image tensors per variant), check (per-step formula check), timings}``."""
    say = progress or (lambda msg: None)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}
    t0 = time.perf_counter()

    say(f"exporting {ZOO_NAME} to ONNX")
    model = load_trained_dit("additive")
    example = _example_inputs(model.cfg, batch=BATCH)
    onnx_path = export_to_onnx(model, example, out / "dit-additive.onnx")
    timings["export_s"] = time.perf_counter() - t0

    say("rewriting with crms,rettention and verifying")
    t = time.perf_counter()
    feeds = {"x": example[0].numpy(), "t": example[1].numpy()}
    result = rewriter.rewrite(str(onnx_path), PASSES, inputs=feeds, source=str(onnx_path))
    timings["rewrite_s"] = time.perf_counter() - t
    if not result.passed:
        return {"result": result, "images": None, "samples": None, "check": None, "timings": timings}

    say("checking refresh and sparse steps against the float64 formula")
    t = time.perf_counter()
    tol = rewriter.all_passes()["rettention"].Options().budget  # the pass's error budget
    records = check_steps(result.view, feeds, check_steps_n)
    check = {"steps": records, "tolerance": tol,
             "passed": all(r["max_rel_error"] <= tol for r in records),
             "dense_step_max_rel_error": result.verification.get("max_rel_error"),
             "dense_step_exact": (result.verification.get("max_rel_error") or 0.0) <= EXACT_TOL}
    timings["check_steps_s"] = time.perf_counter() - t

    say(f"sampling seeds {list(seeds)}: dense, Re-ttention, naive sparse ({steps} steps each)")
    t = time.perf_counter()
    images = sample_variants(str(onnx_path), result.view.model, model.cfg, seeds=list(seeds), steps=steps)
    result.report["samples"] = samples_section(images, seeds=list(seeds), steps=steps,
                                               schedule=site_configs(result.view.model)[0].schedule)
    result.report["samples"]["step_check"] = {k: check[k] for k in ("passed", "tolerance", "steps")}
    timings["sampling_s"] = time.perf_counter() - t

    say("graph diff and latency per phase")
    t = time.perf_counter()
    result.diff()
    result.bench(runs=runs, warmup=3)
    timings["diff_bench_s"] = time.perf_counter() - t
    if scaling:
        t = time.perf_counter()
        result.report["scaling"] = scaling_section(model.cfg, out, tokens=scaling_tokens, runs=scaling_runs, say=say)
        timings["scaling_s"] = time.perf_counter() - t
    result.save(out / "dit-additive.crms+rettention.onnx")

    pngs = {name: png_grid(images[name], nrow=4, scale=3, pad=3) for name, _ in VARIANTS}
    for name, data in pngs.items():
        (out / f"samples-{name}.png").write_bytes(data)
    if html is not None:
        result.html(html, images=pngs)
    timings["total_s"] = time.perf_counter() - t0
    return {"result": result, "images": pngs, "samples": images, "check": check, "timings": timings}


def print_report(run: dict[str, Any], out: Path, html: Path, con) -> None:
    """The demo's terminal report: the run summary (``rewriter.report.render_summary``), one
    line each for the per-step check, the samples and the latency against tokens, the paths,
    where the full tables are, and last the sentence on where the rewrite pays. Writes
    ``out / report.json``."""
    result = run["result"]
    render_summary(result.report, con)
    if not result.passed:
        con.print("[red]verification failed; nothing written[/]")
        return
    chk = run["check"]
    worst: dict[str, float] = {}
    for r in chk["steps"]:
        worst[r["phase"]] = max(worst.get(r["phase"], 0.0), r["max_rel_error"])
    con.print(f"every site vs its float64 formula, steps 0-{len(chk['steps']) - 1}: "
              + ", ".join(f"{k} {v:.1e}" for k, v in worst.items())
              + f" ({'within' if chk['passed'] else 'ABOVE'} {chk['tolerance']:g}); dense step vs original "
              f"{chk['dense_step_max_rel_error']:.1e} ({'within' if chk['dense_step_exact'] else 'ABOVE'} the exact "
              f"tolerance {EXACT_TOL:g})", soft_wrap=True, highlight=False)
    s = result.report["samples"]
    con.print(f"samples vs dense sampling (seeds {s['seeds']}, {s['images_per_seed']} images each, {s['steps']} steps): "
              + "; ".join(f"{v['label']}: PSNR {v['psnr']:.2f} dB, SSIM {v['ssim']:.3f} (worst seed {v['psnr_min']:.2f} dB)"
                          for v in s["variants"] if v["psnr"] is not None), soft_wrap=True, highlight=False)
    (out / "report.json").write_text(json.dumps(result.report, indent=2, default=str))
    tm = run["timings"]
    con.print(f"wrote [bold]{result.report['output']}[/], {out / 'report.json'}, {out}/samples-*.png", soft_wrap=True)
    con.print(f"report [bold]{Path(html).resolve()}[/]  ({tm['total_s']:.1f} s: " + ", ".join(
        f"{k[:-2]} {v:.1f}" for k, v in tm.items() if k != "total_s") + ")", soft_wrap=True)
    con.print("more: every table (sites, op counts, nodes, numerics, per-phase latency, per-step check) is in "
              f"{out / 'report.json'} and the HTML report", soft_wrap=True, highlight=False)
    sc = result.report.get("scaling")
    if sc:
        con.print("latency against tokens (" + sc["description"] + "): " + ", ".join(
            f"N={r['tokens']} {r['before_ms']:.1f} -> {r['schedule_ms']:.1f} ms/step" for r in sc["rows"]),
            soft_wrap=True, highlight=False)
        con.print(f"[bold]{sc['pays_from']}[/]", soft_wrap=True, highlight=False)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="demo-out", help="directory for the models, samples and JSON")
    ap.add_argument("--html", default="demo-report.html", help="the HTML report")
    ap.add_argument("--seeds", default="0,1", help="comma-separated sampler seeds (8 images each)")
    ap.add_argument("--steps", type=int, default=25, help="sampler steps")
    ap.add_argument("--runs", type=int, default=30, help="timed samples per model")
    ap.add_argument("--scaling-runs", type=int, default=5, help="timed samples per model of the latency-against-tokens "
                    "figure (0: leave it out)")
    a = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    for noisy in ("torch", "onnxscript", "onnx_ir"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    con, err = Console(), Console(stderr=True)
    seeds = [int(s) for s in a.seeds.split(",") if s.strip()]
    con.rule(f"[bold]rewrite {ZOO_NAME} (ONNX) --passes {','.join(PASSES)}")
    with err.status("starting...") as status:
        run = run_demo(a.out, seeds=seeds, steps=a.steps, runs=a.runs, html=a.html,
                       progress=lambda m: status.update(m + "..."), scaling=a.scaling_runs > 0,
                       scaling_runs=max(a.scaling_runs, 1))
    result = run["result"]
    print_report(run, Path(a.out), Path(a.html), con)
    if not result.passed:
        return 1
    chk = run["check"]
    ok = chk["passed"] and chk["dense_step_exact"]
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
