"""Latency of stateful (Re-ttention) models: every phase timed on the states of the steps
before it, the schedule weighed by the pass's own phase counts, the phases named in the
terminal table, the JSON and the HTML. No test asserts a timing."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import rewriter
from backends.ort.rettention import STEP_INPUT, state_names
from backends.rettention_spec import PHASES, Schedule
from passes.rettention import Rettention
from rewriter.run import bench
from rewriter.cli import main
from rewriter.pass_api import make_options
from rewriter.report import latency_line, latency_tables
from rewriter.report_schema import validate
from rewriter.torch_export import export_to_onnx
from tests.passes.test_rettention import OPTS, SCHEDULE, N, D, TinyAttention, rewrite_onnx

PHASE_NAMES = ["dense", "refresh", "sparse"]


@pytest.fixture(scope="module")
def onnx_result(tmp_path_factory):
    _, res = rewrite_onnx(tmp_path_factory.mktemp("ph"), TinyAttention())
    return res


def _text(tables) -> str:
    from rich.console import Console

    con = Console(width=200, record=True)
    for t in tables:
        con.print(t)
    return con.export_text()


def test_onnx_report_names_every_phase(onnx_result, tmp_path):
    """Result.bench() on a Re-ttention ONNX model times dense, refresh and sparse steps, names
    them in the JSON, the terminal table and the HTML, and its speedup is the schedule's."""
    sec = onnx_result.bench(runs=2, warmup=1, profile=True)
    assert [r["phase"] for r in sec["phases"]] == PHASE_NAMES
    assert [r["step"] for r in sec["phases"]] == [0, SCHEDULE.warmup, SCHEDULE.warmup + 1]
    assert sec["speedup"] == sec["schedule"]["speedup"] and sec["profiled_phase"] == "sparse"
    assert "schedule" in sec["after"]["label"] and "profiled_ms" in sec["phases"][2]
    validate(onnx_result.report)
    text = _text(latency_tables(sec))
    for phase in PHASE_NAMES:
        assert f"{phase} step" in text
    assert "schedule (20 steps: 3 dense, 5 refresh, 12 sparse" in text and "(sparse step)" in text
    assert "20 steps: 3 dense, 5 refresh, 12 sparse" in latency_line(sec)
    page = onnx_result.html(tmp_path / "r.html").read_text()
    assert 'id="latency-phases"' in page and all(f"<td>{p} step</td>" in page for p in PHASE_NAMES)


@pytest.mark.parametrize("warmup,period,steps", [(5, 5, 20), (3, 4, 20), (0, 1, 7), (2, 3, 11)])
def test_schedule_weights_are_the_pass_schedule(warmup, period, steps):
    """The phase counts are those of the pass's own schedule (Rettention.schedule().phase per
    step), and the schedule's speedup is steps / sum(count / phase speedup) of the rows."""
    p = Rettention(make_options(Rettention, {"warmup": str(warmup), "period": str(period)}), None)
    sch = p.schedule()
    expect = {name: 0 for name in PHASES.values()}
    for t in range(steps):
        expect[PHASES[sch.phase(t)[0]]] += 1
    assert bench.schedule_counts(sch, steps) == expect
    calls = []
    before = bench.Target("orig", "onnxruntime", lambda: calls.append("o"))
    phases = {name: bench.Target(name, "onnxruntime", (lambda n=name: calls.append(n)), phase=name, step=s)
              for name, s in (("dense", 0), ("refresh", warmup), ("sparse", warmup + 1))
              if expect[name] or name == "refresh"}
    sec = bench.stateful_section(before, sch, phases, steps=steps, runs=3, warmup=0, min_sample_ms=0.0)
    assert sec["schedule"]["counts"] == expect
    inv = sum(r["count"] / r["speedup"] for r in sec["phases"])
    assert sec["speedup"] == pytest.approx(steps / inv)
    assert set(calls) == {"o", *phases}  # every phase was timed in the interleaved loop


def test_onnx_states_are_threaded(onnx_result):
    """The refresh is fed the dense step's state outputs and the sparse step the refresh's
    rho and residual (non-zero), as a sampling loop would feed them."""
    sch, targets = bench.phase_targets("r", onnx_result.view, onnx_result.feeds)
    assert sch == SCHEDULE and list(targets) == PHASE_NAMES
    rho_in, res_in, rho_out, res_out = state_names(0)
    d, r, s = (targets[p] for p in PHASE_NAMES)
    assert int(d.feeds[STEP_INPUT]) == 0 and not d.feeds[rho_in].any()
    outs = dict(zip([o.name for o in _outputs(d)], d.call()))
    np.testing.assert_array_equal(r.feeds[rho_in], outs[rho_out])
    outs = dict(zip([o.name for o in _outputs(r)], r.call()))
    assert int(r.feeds[STEP_INPUT]) == SCHEDULE.warmup and outs[rho_out].min() > 0
    np.testing.assert_array_equal(s.feeds[rho_in], outs[rho_out])
    np.testing.assert_array_equal(s.feeds[res_in], outs[res_out])
    assert s.state_from == f"refresh step {SCHEDULE.warmup}" and int(s.feeds[STEP_INPUT]) == SCHEDULE.warmup + 1


def _outputs(t):
    import onnx

    from rewriter.run.bench import _session

    return _session(t.model if isinstance(t.model, onnx.ModelProto) else t.model, None).get_outputs()


def test_torch_states_are_threaded():
    """FX: the sparse-step target returns what a hand-driven loop returns at that step after
    a refresh, and it reads the state the refresh stored (zeroing it changes the output)."""
    m = TinyAttention()
    x = torch.randn(2, N, D)
    res = rewriter.rewrite(m, ["rettention"], example_inputs=(x,), options={"rettention": OPTS})
    sch, targets = bench.phase_targets("r", res.view, {"x": x.numpy()})
    assert list(targets) == PHASE_NAMES and targets["sparse"].state_from.startswith("refresh")
    got = targets["sparse"].call()
    gm = res.view.gm
    gm.rettention.reset()
    with torch.inference_mode():
        for t in range(sch.warmup + 2):
            gm.rettention.set_step(t)
            want = gm(x)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    with torch.inference_mode():
        for rho, r in gm.rettention._state.values():  # without the refresh's state the step differs
            rho.zero_()
            r.zero_()
    assert (targets["sparse"].call() - got).abs().max() > 1e-3


def test_cli_bench_steps(tmp_path):
    """`rewrite bench M --passes rettention --steps 10` weighs the phases over 10 steps and
    writes a bench document that validates."""
    path, _ = rewrite_onnx(tmp_path, TinyAttention())
    j = tmp_path / "b.json"
    sets = [a for k, v in OPTS.items() for a in ("--set", f"rettention.{k}={v}")]
    rc = main(["bench", str(path), "--passes", "rettention", *sets, "--steps", "10", "--runs", "2", "--warmup", "1",
               "--no-profile", "--json", str(j), "-q", "--shape", f"x=2,{N},{D}"])
    assert rc == 0
    doc = json.loads(j.read_text())
    validate(doc)
    sch = doc["latency"]["schedule"]
    assert sch["steps"] == 10 and sch["counts"] == {"dense": 3, "refresh": 2, "sparse": 5}


class _WideAttention(torch.nn.Module):
    """TinyAttention between two linears whose weights (> 64 KiB) the loader maps from the file."""

    def __init__(self):
        super().__init__()
        self.pre, self.attn, self.post = torch.nn.Linear(D, 1100), TinyAttention(), torch.nn.Linear(1100, D)
        self.down = torch.nn.Linear(1100, D)

    def forward(self, x):
        return self.post(torch.relu(self.pre(self.attn(x)))) + self.down(self.pre(x))


def test_onnx_phases_of_a_file_with_mapped_weights(tmp_path, monkeypatch):
    """A Re-ttention model rewritten from a file whose large weights the loader maps (references
    into the file) is timed per phase from any working directory: the phase session gets the
    weights inline, not as external data ORT cannot resolve."""
    path = export_to_onnx(_WideAttention().eval(), (torch.randn(2, N, D),), tmp_path / "wide.onnx", opset=18)
    res = rewriter.rewrite(str(path), ["rettention"], options={"rettention": OPTS})
    assert res.passed and res.records[0].applied
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    sec = res.bench(runs=1, warmup=0, profile=False)
    assert [r["phase"] for r in sec["phases"]] == PHASE_NAMES
