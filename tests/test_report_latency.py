"""Latency reports: rows labelled by model, per-op-type time as shares of the profiled total
next to the wall-clock p50, with the note that profiling adds overhead (terminal, JSON, HTML)."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import onnx
import pytest
from onnx import helper
from rich.console import Console

from rewriter.run import bench
from rewriter.report import latency_tables
from rewriter.report_schema import validate
from tests.conftest import bn_inits, bn_node, init, make_model


def test_op_type_rows_give_shares_of_each_total():
    """Shares are op time / that model's profiled total; None for a model not profiled."""
    rows = bench.op_type_rows({"Conv": 3.0, "Relu": 1.0}, {"Conv": 1.0, "FusedConv": 1.0})
    by = {r["op"]: r for r in rows}
    assert by["Conv"]["before_share"] == 0.75 and by["Relu"]["before_share"] == 0.25
    assert by["Conv"]["after_share"] == 0.5 and by["Relu"]["after_share"] == 0.0
    assert sum(r["before_share"] for r in rows) == pytest.approx(1.0)
    assert all(r["after_share"] is None for r in bench.op_type_rows({"Conv": 2.0}, None))
    sec = {"before": {"label": "a", "p50_ms": 1.0}, "after": {"label": "b", "p50_ms": 0.5}}
    bench.attach_op_types(sec, {"Conv": 3.0, "Relu": 1.0}, {"Conv": 1.0})
    assert sec["before"]["profiled_ms"] == 4.0 and sec["after"]["profiled_ms"] == 1.0 and len(sec["op_types"]) == 2


def _lat():
    lat = {"engine": "onnxruntime", "device": "cpu", "providers": ["CPUExecutionProvider"], "runs": 5, "inner": 1,
           "before": {"label": "original", "p50_ms": 0.087, "p90_ms": 0.1, "samples": 5},
           "after": {"label": "rewritten", "p50_ms": 0.05, "p90_ms": 0.06, "samples": 5}, "speedup": 1.7}
    bench.attach_op_types(lat, {"Conv": 0.3, "BatchNormalization": 0.07}, {"Conv": 0.2})
    return lat


def test_terminal_tables_label_rows_and_show_shares():
    """Rows read "original" / "rewritten" (never "before: before"); op types in % with the note."""
    con = Console(record=True, width=120)
    for t in latency_tables(_lat()):
        con.print(t)
    text = con.export_text()
    assert "original" in text and "rewritten" in text and "before: before" not in text and "after: after" not in text
    assert "81.1" in text and "18.9" in text and "100.0" in text  # 0.3 / 0.37, 0.07 / 0.37, 0.2 / 0.2
    assert "0.3700 ms profiled vs 0.0870 ms p50" in " ".join(text.split())
    assert "profiling adds overhead" in " ".join(text.split()).lower()


def test_html_bars_are_shares_with_the_note():
    """The HTML op-type bars are labelled in % of the profiled total, with the overhead note."""
    from rewriter.html import _latency

    page = _latency(_lat())
    assert 'id="latency-ops"' in page and "81.1%" in page and "100.0%" in page and 'id="profile-note"' in page
    assert "0.3700 ms profiled vs 0.0870 ms p50" in page and ">original<" in page


def test_cli_bench_report_labels_and_shares(tmp_path):
    """`rewrite --bench -v`: JSON rows labelled original/rewritten, shares sum to 1 per model,
    profiled totals beside the p50, the document validates; the terminal's full tables never say
    "before: before"."""
    rng = np.random.default_rng(0)
    m = make_model([helper.make_node("Gemm", ["x", "W"], ["h"], transB=1, name="g"), bn_node("bn", "h", "y")],
                   [("x", [2, 4])], [("y", [2, 3])], [init("W", rng.standard_normal((3, 4)))] + bn_inits("bn", 3, rng))
    onnx.save(m, tmp_path / "m.onnx")
    p = subprocess.run([sys.executable, "-m", "rewriter.cli", "m.onnx", "--passes", "foldnorm", "--bench", "--runs", "5",
                        "--warmup", "1", "--json", "r.json", "--html", "r.html", "-v"], cwd=tmp_path, capture_output=True,
                       text=True, timeout=600, env={**__import__("os").environ, "COLUMNS": "120"})
    assert p.returncode == 0, p.stderr
    doc = json.loads((tmp_path / "r.json").read_text())
    validate(doc)
    lat = doc["latency"]
    assert (lat["before"]["label"], lat["after"]["label"]) == ("original", "rewritten")
    for side in ("before", "after"):
        assert lat[side]["profiled_ms"] > 0
        assert sum(r[f"{side}_share"] for r in lat["op_types"]) == pytest.approx(1.0)
    assert "before: before" not in p.stdout and "original" in p.stdout and "%" in p.stdout
    assert 'id="profile-note"' in (tmp_path / "r.html").read_text()
