"""`make demo`'s headline job (models_zoo.demo), shortened: the trained DiT rewritten with
crms,rettention, verified, sampled three ways, and the HTML page rendered by headless Chromium."""

from __future__ import annotations

import re
import subprocess

import pytest
import torch

from models_zoo.demo import BATCH, EXACT_TOL, pays_from, print_report, run_demo
from rewriter.report_schema import validate
from tests.test_html import _browser, _png_pixels

SEEDS, STEPS = [0], 20  # default schedule: steps 0-4 dense, refresh at 5, 10, 15, sparse between


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    # the latency-against-tokens figure at two small sizes (make demo: 256, 1024, 4096)
    run = run_demo(out, seeds=SEEDS, steps=STEPS, runs=3, check_steps_n=7, html=out / "demo-report.html",
                   scaling_runs=2, scaling_tokens=(64, 256))
    run["out"] = out
    return run


def test_headline_job_applies_and_verifies(demo):
    """Both passes apply, the dense step matches the original at the exact tolerance, every
    refresh/sparse site matches its float64 formula, and the report validates."""
    res = demo["result"]
    assert res.passed
    assert {p["name"]: p["applied"] > 0 for p in res.report["passes"]} == {"crms": True, "rettention": True}
    assert res.verification["max_rel_error"] <= EXACT_TOL and demo["check"]["dense_step_exact"]
    chk = demo["check"]
    assert [r["phase"] for r in chk["steps"]] == ["dense"] * 5 + ["refresh", "sparse"]
    assert chk["passed"] and max(r["max_rel_error"] for r in chk["steps"]) <= chk["tolerance"]
    ops = res.report["diff"]["op_counts"]["after"]
    assert ops.get("LayerNormalization", 0) == 0 and ops.get("Softmax", 0) == 0
    assert res.report["diff"]["nodes"]["added"] and "speedup" in res.report["latency"]
    lat = res.report["latency"]  # timed per phase, the speedup the 20-step schedule's
    assert [r["phase"] for r in lat["phases"]] == ["dense", "refresh", "sparse"]
    assert lat["schedule"]["counts"] == {"dense": 5, "refresh": 3, "sparse": 12} and lat["speedup"] == lat["schedule"]["speedup"]
    assert [r["tokens"] for r in res.report["scaling"]["rows"]] == [64, 256]
    validate(res.report)
    assert (demo["out"] / "dit-additive.crms+rettention.onnx").is_file()


def test_samples_dense_reference_and_the_correction_matters(demo):
    """The dense grid is the zoo sampler's output (ORT vs torch eager, > 40 dB), and the
    residual correction is what keeps Re-ttention close to dense: it beats the naive band
    mask by more than 3 dB PSNR and 0.1 SSIM on the same seeds."""
    import models_zoo
    from models_zoo.dit import load_trained_dit
    from models_zoo.eval import psnr

    s = demo["result"].report["samples"]
    assert s["steps"] == STEPS and s["seeds"] == SEEDS and s["images_per_seed"] == BATCH
    v = {x["name"]: x for x in s["variants"]}
    assert v["dense"]["psnr"] is None
    assert v["rettention"]["psnr"] > v["naive"]["psnr"] + 3.0
    assert v["rettention"]["ssim"] > v["naive"]["ssim"] + 0.1
    assert v["rettention"]["psnr"] < 200  # not identical: the sparse steps did change the samples
    eager = models_zoo.eval.sample(load_trained_dit("additive"), seed=SEEDS[0], steps=STEPS, n=BATCH)
    assert psnr(eager, demo["samples"]["dense"]) > 40
    assert psnr(eager, demo["samples"]["naive"]) < 30  # the same check can fail


def test_page_holds_grids_graphs_and_latency(demo):
    """The page is self-contained: three PNG data URIs with PSNR/SSIM captions, the two
    graphs, the latency chart with its phases, the latency-against-tokens figure with the
    sentence on where the rewrite pays, and the per-step check."""
    text = (demo["out"] / "demo-report.html").read_text()
    assert len(re.findall(r'<img src="data:image/png;base64,', text)) == 3
    for ident in ('id="samples-dense"', 'id="samples-rettention"', 'id="samples-naive"', 'id="graph-before"',
                  'id="graph-after"', 'id="latency-summary"', 'id="step-check"', 'id="latency-phases"',
                  'id="latency-tokens"', 'id="pays-from"'):
        assert ident in text
    assert text.count("PSNR ") >= 2 and "SSIM " in text
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//""", text)


def test_headless_chromium_renders_the_demo_page(demo, tmp_path):
    """Headless Chromium loads the page offline; the screenshot is not blank and its top
    part (the three sample grids) is full of colour."""
    browser = _browser()
    if browser is None:
        pytest.skip("no headless Chromium on PATH (make setup installs chromium-headless-shell from Debian)")
    page = demo["out"] / "demo-report.html"
    shot = tmp_path / "shot.png"
    subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                    "--disable-background-networking", "--disable-component-update", "--disable-sync",
                    "--disable-dev-shm-usage", f"--user-data-dir={tmp_path / 'profile'}", f"--screenshot={shot}",
                    "--window-size=1400,2400", page.as_uri()], capture_output=True, timeout=120)
    w, h, ch, rows = _png_pixels(shot.read_bytes())
    assert (w, h) == (1400, 2400)
    sample = [tuple(r[x * ch:x * ch + 3]) for r in rows[::8] for x in range(0, w, 8)]
    assert sum(1 for p in sample if p != (255, 255, 255)) / len(sample) > 0.05
    grids = [tuple(r[x * ch:x * ch + 3]) for r in rows[150:650:2] for x in range(0, w, 2)]
    assert len(set(grids)) > 500  # decoded sample images, not empty boxes


def test_png_grid_round_trips():
    """png_grid writes a PNG whose pixels are the images' (scaled, padded) values."""
    from models_zoo.eval import png_grid

    img = torch.tensor([[-1.0, 1.0], [0.0, 1.0]]).expand(3, 2, 2)[None].clone()
    w, h, ch, rows = _png_pixels(png_grid(img, nrow=1, scale=1, pad=1))
    assert (w, h, ch) == (4, 4, 3)
    assert [tuple(rows[1][3:6]), tuple(rows[1][6:9]), tuple(rows[2][3:6])] == [(0, 0, 0), (255, 255, 255),
                                                                                (128, 128, 128)]


def test_terminal_report_is_short_and_ends_with_where_it_pays(demo):
    """The demo's terminal report is a summary under 60 lines: the passes with applied and
    declined counts, the numerics, the latency line with the phases, the paths, where the
    full tables are, and last the one sentence on where the rewrite pays."""
    from rich.console import Console

    con = Console(width=120, record=True)
    print_report(demo, demo["out"], demo["out"] / "demo-report.html", con)
    lines = [ln for ln in con.export_text().splitlines() if ln.strip()]
    assert len(lines) < 60, len(lines)
    text = "\n".join(lines)
    for needle in ("pass crms", "pass rettention", "site(s) applied", "declined", "numerics", "latency (",
                   "sparse", "refresh", "wrote", "report", "more:", "latency against tokens"):
        assert needle in text, needle
    assert lines[-1] == demo["result"].report["scaling"]["pays_from"]
    assert "┃" not in text  # no full table


@pytest.mark.parametrize("speedups,needle", [((0.9, 1.2, 1.5), "starts to pay at about"),
                                            ((1.1, 1.2, 1.5), "pays at every size"),
                                            ((0.8, 0.9, 0.95), "does not pay up to 4096")])
def test_pays_from_sentence(speedups, needle):
    """The sentence names the crossing of speedup 1 (between the sizes around it), or says
    that the rewrite pays everywhere or nowhere measured."""
    rows = [{"tokens": n, "schedule_speedup": s, "sparse_speedup": s + 0.1} for n, s in zip((256, 1024, 4096), speedups)]
    text = pays_from(rows, 20)
    assert needle in text and text.count("x at ") == 3
    if "about" in text:
        cross = int(text.split("about ")[1].split(" ")[0].replace(",", ""))
        assert 256 < cross < 1024
