"""Compiled lowering of rewritten torch models (rewriter/compile.py): the project's ops
trace under torch.compile without graph breaks in every Re-ttention phase, compiled
outputs equal eager ones, a saved .pt2 of a Re-ttention model runs 20 steps (dense,
refresh, sparse) from an explicit step input, and the torch latency report's keys."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import rewriter
from models_zoo.dit import DiTConfig, TinyDiT
from passes.rettention_runtime import StepDriver, initial_state, state_module
from rewriter.compile import compile_module, graph_breaks, load_program
from rewriter.report_schema import validate

OPTS = {"rettention": {"warmup": 2, "period": 3, "density": 0.25, "lam": 0.05}}
# fp32, same kernels, another op order (Inductor fuses and reorders reductions of length
# <= d_model = 32 inside a 1-block model): 32 * 2^-23 per reduction, x 64 for the ~16
# chained ops of the block, embedding and head (the error grows at most linearly with depth)
EPS32 = float(np.finfo(np.float32).eps)
COMPILED_TOL = 64 * 32 * EPS32


def tiny_dit():
    torch.manual_seed(0)
    cfg = DiTConfig(image_size=8, d_model=32, n_layer=1, n_head=2, conditioning="additive")
    m = TinyDiT(cfg).eval()
    with torch.no_grad():  # the zero-initialized output layer would make every output 0
        for p in m.parameters():
            p.normal_(0.0, 0.2, generator=torch.Generator().manual_seed(p.numel()))
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    return m, (x, torch.full((2,), 0.5))


def rewritten(passes=("crms", "rettention")):
    m, ex = tiny_dit()
    res = rewriter.rewrite(m, list(passes), example_inputs=ex, options={k: v for k, v in OPTS.items() if k in passes})
    assert all(r.applied for r in res.records)
    return res, ex


def rel(a, b) -> float:
    return float((a.double() - b.double()).abs().max() / a.double().abs().max())


@pytest.mark.slow
def test_every_phase_traces_without_graph_breaks():
    """crms_norm + rettention (dense, refresh, sparse steps): Dynamo sees one graph, 0 breaks."""
    res, ex = rewritten()
    gm = res.model
    ops = {str(n.target) for n in gm.graph.nodes if n.op == "call_function"}
    assert any("crms_norm" in o for o in ops)
    st = state_module(gm)
    st.reset()
    for step in (0, 2, 3):  # dense, refresh, sparse
        st.set_step(step)
        if step == 3:
            with torch.no_grad():  # the sparse step needs the refresh state: run steps 0..2 eagerly
                for t in range(3):
                    st.set_step(t)
                    gm(*ex)
            st.set_step(3)
        counts = graph_breaks(gm, ex)
        assert counts["graph_breaks"] == 0 and counts["graphs"] == 1, counts
    # Result.compile records the same count in the report
    st.reset()
    st.set_step(0)
    res.compile()
    assert res.report["compile"]["graph_breaks"] == 0


def test_shiftadd_op_traces_without_graph_breaks():
    """A shiftadd_linear model traces under Dynamo with 0 graph breaks and no Triton on CPU."""
    m, ex = tiny_dit()
    res = rewriter.rewrite(m, ["shiftadd"], example_inputs=ex, verify=False)
    gm = res.model
    assert any("shiftadd_linear" in str(n.target) for n in gm.graph.nodes)
    counts = graph_breaks(gm, ex)
    assert counts["graph_breaks"] == 0, counts


@pytest.mark.slow
def test_compiled_rettention_model_matches_eager_every_phase():
    """Inductor (C++) runs the crms + rettention model; steps 0..11 (dense, refresh, sparse
    k = 0, 1) equal eager within 64 * 32 eps, and the loop compiles one graph per phase (+1
    for the refresh after the state exists), not one per step value."""
    from torch._dynamo.utils import counters

    res, ex = rewritten()
    gm, st = res.model, state_module(res.model)
    st.reset()
    want = []
    steps = 12
    with torch.no_grad():
        for t in range(steps):
            st.set_step(t)
            want.append(gm(*ex))
    st.reset()
    torch._dynamo.reset()
    counters.clear()
    cg = compile_module(gm)
    with torch.no_grad():
        for t in range(steps):
            st.set_step(t)
            got = cg(*ex)
            assert rel(want[t], got) <= COMPILED_TOL, (t, rel(want[t], got))
    # dense, first refresh, sparse, refresh with the state present: 4 graphs for 12 steps
    # (a step held as a static int would compile 12, past Dynamo's recompile limit of 8)
    assert counters["stats"]["unique_graphs"] <= 4, dict(counters["stats"])
    torch._dynamo.reset()


@pytest.mark.slow
def test_saved_pt2_runs_twenty_steps_from_the_step_input(tmp_path):
    """Result.save writes the step program; the loaded .pt2 drives 20 steps (dense, refresh,
    sparse) equal to the stateful eager model step by step, and sparse steps differ from dense."""
    res, ex = rewritten(("rettention",))
    gm, st = res.model, state_module(res.model)
    path = res.save(tmp_path / "dit.pt2")
    prog = load_program(path).module()
    drv = StepDriver(prog, 1, initial_state(gm, ex[0].shape[0]))
    st.reset()
    errs, phases, outs = [], [], []
    with torch.no_grad():
        for t in range(20):
            st.set_step(t)
            want = gm(*ex)
            outs.append(drv(*ex, step=t))
            errs.append(rel(want, outs[-1]))
            phases.append(st.sites[0].schedule.phase(t)[0])
    assert set(phases) == {0, 1, 2}  # every phase ran
    assert max(errs) <= 1e-6, errs
    # same inputs every step: step 4 (sparse, k = 1) adds lam * O_M, so it is not the dense output
    assert rel(outs[0], outs[4]) > 1e-4


def test_torch_bench_keys(tmp_path):
    """Torch latency section: ORT's keys (before/after p50, speedup), backend torch-eager, and
    per-op-type rows from the torch profiler that name the rewritten op."""
    from rewriter.run import bench as B

    res, ex = rewritten(("crms",))
    m, _ = tiny_dit()
    sec = B.latency_section(B.torch_target("before", m, ex), B.torch_target("after", res.model, ex),
                            runs=3, warmup=1, min_sample_ms=0.1)
    assert sec["backend"] == "torch-eager" and sec["engine"] == "torch"
    assert sec["before"]["p50_ms"] > 0 and sec["after"]["p50_ms"] > 0 and sec["speedup"] > 0
    ops = {r["op"] for r in sec["op_types"]}
    assert any("crms_norm" in o for o in ops) and any("layer_norm" in o for o in ops)
    validate({"schema": "rewriter.bench/1", "model": "m", "against": None, "latency": sec})


@pytest.mark.slow
def test_cli_bench_compile_reports_both_backends(tmp_path):
    """`rewrite bench M.pt2 --passes crms --compile --json`: latency (torch-inductor, compile
    seconds apart) and latency_eager (torch-eager), both with the documented keys."""
    from rewriter.cli import main

    m, ex = tiny_dit()
    torch.export.save(torch.export.export(m, ex), str(tmp_path / "m.pt2"))
    out = tmp_path / "b.json"
    rc = main(["bench", str(tmp_path / "m.pt2"), "--passes", "crms", "--runs", "3", "--warmup", "1", "--compile",
               "--json", str(out), "-q"])
    assert rc == 0
    doc = json.loads(out.read_text())
    validate(doc)
    assert doc["latency"]["backend"] == "torch-inductor" and doc["latency_eager"]["backend"] == "torch-eager"
    assert doc["latency"]["compile_s"]["before"] > 0 and doc["latency"]["compile_s"]["after"] > 0
    for sec in (doc["latency"], doc["latency_eager"]):
        assert sec["before"]["p50_ms"] > 0 and sec["after"]["p50_ms"] > 0 and sec["speedup"] > 0
        assert sec["op_types"]
