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
4. The graph diff and latency (``Result.diff()``, ``Result.bench()``), the terminal report,
   the JSON document and the HTML page with the three sample grids side by side
   (``Result.html(path, images=...)``).

``run_demo`` does the work and returns the ``Result`` and the images; ``main`` prints.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rich.console import Console
from rich.table import Table

from backends.ort.rettention import RettentionRunner, STEP_INPUT, site_configs
from backends.ort.session import make_session
from models_zoo.dit import _example_inputs, load_trained_dit
from models_zoo.eval import png_grid, psnr, ssim
from passes.rettention import check_steps
from passes.rettention_runtime import onnx_stepper, sample_euler
import rewriter
from rewriter import api
from rewriter.report import render, render_extras
from rewriter.run import bench as B
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


def sparse_step_latency(result, feeds: dict[str, np.ndarray], *, runs: int) -> dict[str, Any]:
    """The ``latency`` section for a Re-ttention model: the original (dense attention)
    against the rewritten model at a sparse step (its state filled by a refresh step),
    interleaved, through ``rewriter.api.latency`` (``Result.bench`` would time the default
    step, which is dense)."""
    schedule = site_configs(result.view.model)[0].schedule
    runner = RettentionRunner(result.view.model, optimize=False)
    runner(feeds, schedule.warmup)  # the first refresh step fills rho and R
    sparse = {**feeds, **runner._state[0], STEP_INPUT: np.asarray(schedule.warmup + 1, dtype=np.int64)}
    before = B.target_for("original", result.original, feeds)  # short labels: the page's chart has 150 px for them
    after = B.onnx_target(f"step {schedule.warmup + 1} (sparse)", result.view.to_proto(), sparse)
    return api.latency(before, after, feeds, runs=runs, warmup=3)


def run_demo(out_dir: str | Path, *, seeds: list[int] = (0, 1), steps: int = 25, runs: int = 30,
             check_steps_n: int = 8, html: str | Path | None = None, progress=None) -> dict[str, Any]:
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

    say("graph diff and latency")
    t = time.perf_counter()
    result.diff()
    result.report["latency"] = sparse_step_latency(result, feeds, runs=runs)
    timings["diff_bench_s"] = time.perf_counter() - t
    result.save(out / "dit-additive.crms+rettention.onnx")

    pngs = {name: png_grid(images[name], nrow=4, scale=3, pad=3) for name, _ in VARIANTS}
    for name, data in pngs.items():
        (out / f"samples-{name}.png").write_bytes(data)
    if html is not None:
        result.html(html, images=pngs)
    timings["total_s"] = time.perf_counter() - t0
    return {"result": result, "images": pngs, "samples": images, "check": check, "timings": timings}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="demo-out", help="directory for the models, samples and JSON")
    ap.add_argument("--html", default="demo-report.html", help="the HTML report")
    ap.add_argument("--seeds", default="0,1", help="comma-separated sampler seeds (8 images each)")
    ap.add_argument("--steps", type=int, default=25, help="sampler steps")
    ap.add_argument("--runs", type=int, default=30, help="timed samples per model")
    a = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    for noisy in ("torch", "onnxscript", "onnx_ir"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    con, err = Console(), Console(stderr=True)
    seeds = [int(s) for s in a.seeds.split(",") if s.strip()]
    con.rule(f"[bold]rewrite {ZOO_NAME} (ONNX) --passes {','.join(PASSES)}")
    with err.status("starting...") as status:
        run = run_demo(a.out, seeds=seeds, steps=a.steps, runs=a.runs, html=a.html,
                       progress=lambda m: status.update(m + "..."))
    result = run["result"]
    render(result.report, con)
    render_extras(result.report, con)
    if not result.passed:
        con.print("[red]verification failed; nothing written[/]")
        return 1
    chk = run["check"]
    t = Table(title="sparse schedule: every site vs the float64 formula (check_steps)")
    for col in ("step", "phase", "max rel err"):
        t.add_column(col, justify="right" if col != "phase" else "left")
    for r in chk["steps"]:
        t.add_row(str(r["step"]), r["phase"], f"{r['max_rel_error']:.2e}")
    con.print(t)
    con.print(f"dense step vs original: max rel err {chk['dense_step_max_rel_error']:.2e} "
              f"({'within' if chk['dense_step_exact'] else 'ABOVE'} the exact tolerance {EXACT_TOL:g}); "
              f"refresh/sparse steps {'within' if chk['passed'] else 'ABOVE'} {chk['tolerance']:g}")
    s = result.report["samples"]
    t = Table(title=f"samples vs dense sampling (seeds {s['seeds']}, {s['images_per_seed']} images each, "
                    f"{s['steps']} steps)")
    for col in ("variant", "PSNR dB", "SSIM", "worst-seed PSNR"):
        t.add_column(col, justify="left" if col == "variant" else "right")
    for v in s["variants"]:
        if v["psnr"] is None:
            t.add_row(v["label"], "reference", "", "")
        else:
            t.add_row(v["label"], f"{v['psnr']:.2f}", f"{v['ssim']:.3f}", f"{v['psnr_min']:.2f}")
    con.print(t)
    out = Path(a.out)
    (out / "report.json").write_text(json.dumps(result.report, indent=2, default=str))
    tm = run["timings"]
    con.print(f"wrote [bold]{result.report['output']}[/], {out / 'report.json'}, {out}/samples-*.png")
    con.print(f"report [bold]{Path(a.html).resolve()}[/]  ({tm['total_s']:.1f} s: " + ", ".join(
        f"{k[:-2]} {v:.1f}" for k, v in tm.items() if k != "total_s") + ")")
    ok = chk["passed"] and chk["dense_step_exact"]
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
