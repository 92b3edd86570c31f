"""Latency measurement (rewriter.run.bench): interleaving, statistics, profiling, per-pass rows, CLI.

No test asserts a timing: only structure, and ratios computed from synthetic samples."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from rewriter.run import bench
from rewriter.cli import main
from tests._report_models import conv_bn


def test_measure_interleaves_abba():
    """Targets are called interleaved, alternating order each run (A B, B A, ...), not one after the other."""
    calls = []
    ts = [bench.Target(name, "onnxruntime", (lambda n=name: calls.append(n))) for name in "AB"]
    results, inner = bench.measure(ts, runs=4, warmup=0, min_sample_ms=0.0)
    assert inner == 1
    timed = calls[-8:]
    assert timed == ["A", "B", "B", "A", "A", "B", "B", "A"]
    assert [r["samples"] for r in results] == [4, 4]
    assert set(results[0]) >= {"p50_ms", "p90_ms", "mean_ms", "min_ms", "samples", "ratio_to_first"}


def test_stats_percentiles():
    """stats() reports p50/p90 of the samples (numpy percentile semantics)."""
    s = bench.stats([1.0, 2.0, 3.0, 4.0, 5.0])
    assert s["p50_ms"] == 3.0 and s["p90_ms"] == pytest.approx(4.6) and s["min_ms"] == 1.0 and s["samples"] == 5


def test_per_pass_rows_split_the_cumulative_speedup():
    """Each pass's speedup is its cumulative speedup over the previous prefix's."""
    rows = bench.per_pass_rows(["a", "b"], [{"p50_ms": 2.0, "p90_ms": 2.0, "ratio_to_first": 2.0},
                                            {"p50_ms": 1.0, "p90_ms": 1.0, "ratio_to_first": 4.0}])
    assert [r["speedup"] for r in rows] == [2.0, 2.0]
    assert [r["cumulative_speedup"] for r in rows] == [2.0, 4.0]


def test_profile_reports_op_types(tmp_path):
    """ORT profiling yields per-op-type kernel time for the model's ops (non-negative)."""
    path = conv_bn(tmp_path / "m.onnx")
    t = bench.onnx_target("m", str(path), {"x": np.zeros((1, 3, 8, 8), np.float32)})
    prof = bench.profile_op_types(t, runs=3)
    assert prof and all(v >= 0 for v in prof.values())
    assert any("Conv" in op for op in prof)


def test_torch_target_runs_a_graph_module():
    """A GraphModule is timed with torch (engine 'torch', backend torch-eager, op types from the torch profiler)."""
    gm = torch.fx.symbolic_trace(torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.ReLU()))
    t = bench.torch_target("gm", gm, [torch.zeros(2, 4)])
    sec = bench.latency_section(t, bench.torch_target("gm2", gm, [torch.zeros(2, 4)]), runs=3, warmup=1)
    assert sec["engine"] == "torch" and sec["backend"] == "torch-eager" and sec["speedup"] > 0
    assert any(r["op"].startswith("aten::") and r["before_ms"] > 0 for r in sec["op_types"])


def test_cli_bench_per_pass(tmp_path):
    """`rewrite bench M --passes P,Q --per-pass` reports one per-pass row per pass."""
    path = conv_bn(tmp_path / "m.onnx")
    j = tmp_path / "b.json"
    rc = main(["bench", str(path), "--passes", "foldnorm,foldnorm", "--per-pass", "--runs", "3", "--warmup", "1",
               "--no-profile", "--json", str(j), "-q"])
    # the second foldnorm finds nothing left, but bench only times: it still reports both prefixes
    assert rc == 0
    lat = json.loads(j.read_text())["latency"]
    assert [r["pass"] for r in lat["per_pass"]] == ["foldnorm", "foldnorm"]


@pytest.mark.parametrize("args", [
    ["bench", "{m}", "--against", "{m}", "--passes", "foldnorm"],
    ["bench", "{m}", "--per-pass"],
    ["bench", "{m}", "--runs", "0"],
    ["bench", "{m}", "--against", "missing.onnx"],
])
def test_cli_bench_bad_input(args, tmp_path, capsys):
    """Contradictory or invalid bench options exit 2 with one line."""
    path = conv_bn(tmp_path / "m.onnx")
    assert main([a.replace("{m}", str(path)) for a in args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1
