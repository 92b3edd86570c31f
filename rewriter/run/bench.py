"""Latency: time models before and after a rewrite, interleaved, in one process.

Method (the ``latency`` section of the JSON document):

- **Engines.** ONNX models run in ONNX Runtime with *full* graph optimizations (what users
  run; verification keeps them off), on the CUDA execution provider when present, else CPU.
  Thread spinning is off so that one session's idle workers cannot steal the cores of the
  session being timed. Torch models (``.pt2``, GraphModule) run under ``inference_mode``;
  on a GPU they are timed with CUDA events.
- **Samples.** After ``warmup`` calls of each model, each model is called ``runs`` times,
  interleaved in ABBA order (A B B A A B ...), so drift in the machine's state (frequency,
  cache, other load) hits both equally and neither always runs right after the other. A
  sample is the mean of ``inner`` back-to-back calls, with ``inner`` chosen so a sample
  lasts at least ``min_sample_ms`` (timer resolution and Python overhead stop mattering).
- **Numbers.** p50 and p90 per model in milliseconds per call. ``speedup`` (> 1: the
  rewrite is faster) is the median over the runs of before/after of the two samples taken
  back to back: a load burst slows both samples of a pair, so it cancels, where the ratio
  of the two p50s (also reported, ``p50_ratio``) moves with it.
- **Per op type.** A separate profiling session per ONNX model (profiling costs time, so it
  never runs during the timed loop) gives each op type's kernel time per call; for torch
  models the torch profiler does the same (self CPU time per op name, ``aten::*``,
  ``rewriter::*``, Inductor's compiled kernels as one entry per graph).
- **Torch backends.** ``backend`` is ``torch-eager`` or ``torch-inductor`` (the module under
  ``torch.compile``, Inductor: C++ on CPU, Triton on CUDA). Compilation happens in the
  first call, which is timed apart (``compile_s``), before the warm-up calls and the timed
  loop; ``onnxruntime`` for ORT.
- **Per pass.** ``per_pass`` times the original and the model after each prefix of the
  pass list in the same interleaved loop; pass k's speedup is p50(k-1) / p50(k).
- **Stateful models (Re-ttention).** A model whose sites follow a denoising schedule
  (``backends/rettention_spec.py``: ONNX ``rettention_step`` and state inputs, FX
  ``gm.rettention.set_step``) costs a different amount per step. Each phase is timed as its
  own target in the same interleaved loop: the dense step (step 0, zero state), the refresh
  (step ``warmup``, fed the state the dense step put out) and the sparse step (step
  ``warmup + 1``, fed the rho and residual the refresh computed), so every step runs on the
  real states of the steps before it. ``phases`` holds each one's p50 and paired speedup;
  ``schedule`` weighs them by the phase counts of ``steps`` denoising steps (default 20):
  its speedup is ``steps / sum_phase(count / speedup)``, the paired ratios of the phases
  combined as the schedule spends its time. ``speedup`` (the key CI reads) is the
  schedule's, ``after`` the schedule's mean step, and the per-op profile is of a sparse step.
"""

from __future__ import annotations

import bisect
import dataclasses
import json
import logging
import math
import os
import re
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import onnx
import torch
from torch.profiler import ProfilerActivity, profile

from backends.ort import session as ort_session
from backends.ort.rettention import STEP_INPUT, protocol_sites, site_configs, state_names
from backends.rettention_spec import DENSE, PHASES, REFRESH, SPARSE, Schedule
from rewriter.compile import compile_module
from rewriter.errors import BadInput
from rewriter.ir.onnx_reader import inline_proto
from rewriter.ir.onnx_view import OnnxView

log = logging.getLogger(__name__)

DEFAULT_STEPS = 20  # denoising steps of the schedule a stateful model is timed over

Progress = Callable[[int, int], None]  # (done, total)

__all__ = ["Target", "onnx_target", "torch_target", "target_for", "measure", "stats", "profile_op_types",
           "latency_section", "phase_targets", "schedule_counts", "DEFAULT_STEPS"]


@dataclasses.dataclass
class Target:
    """One thing to time: ``call()`` runs it once on fixed inputs."""

    label: str
    engine: str  # "onnxruntime" or "torch"
    call: Callable[[], Any]
    device: str = "cpu"
    providers: list[str] = dataclasses.field(default_factory=list)
    model: Any = None  # the ModelProto (onnx) for profiling
    feeds: Mapping[str, np.ndarray] | None = None
    sync: Callable[[], None] | None = None  # torch CUDA: synchronize
    backend: str = ""  # "onnxruntime", "torch-eager" or "torch-inductor"
    compile_s: float | None = None  # torch-inductor: seconds of the first (compiling) call
    phase: str = ""  # stateful models: "dense", "refresh" or "sparse"
    step: int | None = None  # the denoising step this target runs
    state_from: str = ""  # where its state inputs came from ("zeros", "dense step 0", ...)


def _session_options(threads: int | None, profile_dir: str | None = None):
    ort = ort_session._ort()
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.log_severity_level = 3
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    opts.add_session_config_entry("session.inter_op.allow_spinning", "0")
    if threads:
        opts.intra_op_num_threads = threads
    if profile_dir is not None:
        opts.enable_profiling = True
        opts.profile_file_prefix = os.path.join(profile_dir, "ort")
    return opts


def _session(model, threads: int | None, profile_dir: str | None = None):
    ort = ort_session._ort()
    opts = _session_options(threads, profile_dir)
    data = model.SerializeToString() if isinstance(model, onnx.ModelProto) else os.fspath(model)
    try:
        return ort.InferenceSession(data, opts, providers=ort_session.providers())
    except Exception as err:  # noqa: BLE001 - a model ORT has no kernel for is the user's problem
        msg = str(err)
        if "NOT_IMPLEMENTED" in msg or "Could not find an implementation" in msg:
            kernel = re.search(r"implementation for (\w+\(\d+\))", msg)
            what = f"no kernel for {kernel.group(1)}" if kernel else "a missing kernel"
            raise BadInput(f"cannot benchmark: ONNX Runtime ({', '.join(ort_session.providers())}) has {what} in this "
                           "model (bfloat16 on CPU?); rewrite without --bench, or benchmark on a device "
                           "that supports it") from err
        raise


def onnx_target(label: str, model: Any, feeds: Mapping[str, np.ndarray], *, threads: int | None = None) -> Target:
    """An ORT target for an ``onnx.ModelProto`` or a path (full graph optimizations)."""
    sess = _session(model, threads)
    names = [o.name for o in sess.get_outputs()]
    wanted = {i.name for i in sess.get_inputs()}
    feeds = {k: v for k, v in feeds.items() if k in wanted}
    provs = sess.get_providers()
    device = "cuda" if "CUDAExecutionProvider" in provs else "cpu"
    return Target(label, "onnxruntime", lambda: sess.run(names, feeds), device, provs, model, feeds,
                  backend="onnxruntime")


def torch_target(label: str, module: Any, args: Sequence[Any], *, compiled: bool = False, state: Any = None,
                 step: int | None = None, share: Target | None = None, lazy: bool = False) -> Target:
    """A torch target (a GraphModule or nn.Module); on CUDA when torch sees a GPU. With
    ``compiled`` the module runs under ``torch.compile`` (``rewriter.compile``); the
    compiling first call is made here and timed (``compile_s``). A stateful module's
    target sets ``state.set_step(step)`` before each call; ``share`` reuses another target's
    module, inputs and compiled function; ``lazy`` makes no first call."""
    if share is not None:
        fn, tensors = share.model
        device, sync = share.device, share.sync
    else:
        device = "cuda" if torch.cuda.is_available() else "cpu"
        tensors = [torch.as_tensor(a) for a in args]
        if device == "cuda":
            module = module.to(device)
            tensors = [t.to(device) for t in tensors]
        fn = module
        if compiled:
            fn = compile_module(module, device)
        sync = torch.cuda.synchronize if device == "cuda" else None

    def call():
        if state is not None:
            state.set_step(step)
        with torch.inference_mode():
            return fn(*tensors)

    t = Target(label, "torch", call, device, [], module, None, sync,
               backend="torch-inductor" if compiled else "torch-eager", step=step)
    if not lazy and (compiled or state is not None):
        t0 = time.perf_counter()
        call()
        if sync is not None:
            sync()
        if compiled:
            t.compile_s = time.perf_counter() - t0
    if state is not None:
        def run(*a):
            state.set_step(step)
            return fn(*a)
        t.model = (run, tensors)
    else:
        t.model = (fn, tensors)
    return t


def target_for(label: str, view, feeds: Mapping[str, np.ndarray] | None = None, *,
               threads: int | None = None, compiled: bool = False) -> Target:
    """A target for a GraphView: ORT for ONNX, torch for FX."""
    if isinstance(view, OnnxView):
        return onnx_target(label, view.to_proto(), feeds or {}, threads=threads)
    args = view.example_inputs
    if feeds:
        names = [n.name for n in view.graph.nodes if n.op == "placeholder"]
        if all(n in feeds for n in names):
            args = [feeds[n] for n in names]
    return torch_target(label, view.gm, args, compiled=compiled)


def stats(samples_ms: Sequence[float]) -> dict[str, Any]:
    """p50, p90, mean, min (ms per call) of the samples."""
    arr = np.asarray(samples_ms, dtype=np.float64)
    return {"p50_ms": float(np.percentile(arr, 50)), "p90_ms": float(np.percentile(arr, 90)),
            "mean_ms": float(arr.mean()), "min_ms": float(arr.min()), "samples": int(arr.size)}


def _time_calls(t: Target, n: int) -> float:
    """Seconds for ``n`` calls of ``t`` (CUDA events for torch on a GPU)."""
    if t.engine == "torch" and t.device == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(n):
            t.call()
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end) / 1e3
    t0 = time.perf_counter()
    for _ in range(n):
        t.call()
    if t.sync is not None:
        t.sync()
    return time.perf_counter() - t0


def measure(targets: Sequence[Target], *, runs: int = 100, warmup: int = 5, min_sample_ms: float = 5.0,
            progress: Progress | None = None) -> tuple[list[dict[str, Any]], int]:
    """Time ``targets`` interleaved (ABBA); returns (stats per target, inner calls per sample)."""
    if runs < 1:
        raise ValueError("runs must be >= 1")
    # Warm-up calls, each timed: calls per sample are chosen so that the fastest target's
    # sample lasts min_sample_ms; slow models (seconds per call) need no further calls for it.
    seen: list[list[float]] = [[] for _ in targets]
    for _ in range(max(warmup, 1)):
        for i, t in enumerate(targets):
            seen[i].append(_time_calls(t, 1))
    if min(min(x) for x in seen) * 1e3 < min_sample_ms:
        for i, t in enumerate(targets):
            seen[i] += [_time_calls(t, 1) for _ in range(3)]
    single = [min(x[-3:]) if len(x) > 3 else min(x) for x in seen]
    fastest = max(min(single), 1e-7)
    inner = int(min(1000, max(1, math.ceil(min_sample_ms / 1e3 / fastest))))
    samples: list[list[float]] = [[] for _ in targets]
    order = list(range(len(targets)))
    for r in range(runs):
        for i in (order if r % 2 == 0 else order[::-1]):
            samples[i].append(_time_calls(targets[i], inner) / inner * 1e3)
        if progress is not None:
            progress(r + 1, runs)
    out = [stats(s) for s in samples]
    for i, st in enumerate(out):
        # Paired ratio against the first target: each pair of samples was taken back to
        # back, so load bursts and drift cancel; its median is the robust speedup.
        st["ratio_to_first"] = float(np.median(np.asarray(samples[0]) / np.asarray(samples[i])))
    return out, inner


def profile_torch_op_types(target: Target, *, runs: int = 10) -> dict[str, float] | None:
    """Torch profiler: self device time (CPU, or CUDA on a GPU) per op name, ms per call."""
    if target.engine != "torch" or not isinstance(target.model, tuple):
        return None
    fn, tensors = target.model
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if target.device == "cuda" else [])
    with torch.inference_mode():
        fn(*tensors)
        with profile(activities=acts) as prof:
            for _ in range(runs):
                fn(*tensors)
            if target.sync is not None:
                target.sync()
    per_op: dict[str, float] = {}
    for ev in prof.key_averages():
        us = ev.self_device_time_total if target.device == "cuda" else ev.self_cpu_time_total
        if us > 0:
            per_op[ev.key] = per_op.get(ev.key, 0.0) + us / 1e3 / runs
    return per_op


def profile_op_types(target: Target, *, runs: int = 10, threads: int | None = None) -> dict[str, float] | None:
    """Kernel time per op type, in ms per call: ORT's profiler, or the torch profiler."""
    if target.engine == "torch":
        return profile_torch_op_types(target, runs=runs)
    if target.engine != "onnxruntime" or target.model is None:
        return None
    with tempfile.TemporaryDirectory(prefix="rewriter-prof-") as tmp:
        sess = _session(target.model, threads, tmp)
        names = [o.name for o in sess.get_outputs()]
        for _ in range(2):
            sess.run(names, target.feeds)
        # Events of the warm-up runs are in the file too: count runs by the session's own
        # "model_run" events and average over the timed ones only.
        for _ in range(runs):
            sess.run(names, target.feeds)
        path = sess.end_profiling()
        with open(path) as f:
            events = json.load(f)
    # Each kernel event belongs to the model_run interval that contains it; the first two
    # runs are warm-up. Per op type: the median over the timed runs of its time in the run
    # (medians, not sums, so one preempted run does not dominate).
    model_runs = sorted((e["ts"], e["ts"] + e.get("dur", 0)) for e in events
                        if e.get("cat") == "Session" and e.get("name") == "model_run")[2:]
    per_run: list[dict[str, float]] = [{} for _ in model_runs]
    starts = [r[0] for r in model_runs]
    for e in events:
        if e.get("cat") != "Node" or not str(e.get("name", "")).endswith("_kernel_time"):
            continue
        k = bisect.bisect_right(starts, e.get("ts", 0)) - 1
        if k < 0 or e["ts"] > model_runs[k][1]:
            continue
        op = e.get("args", {}).get("op_name", "?")
        per_run[k][op] = per_run[k].get(op, 0.0) + e.get("dur", 0) / 1e3
    ops = {op for r in per_run for op in r}
    per_op = {op: float(np.median([r.get(op, 0.0) for r in per_run])) for op in ops} if per_run else {}
    return per_op


def op_type_rows(before: Mapping[str, float] | None, after: Mapping[str, float] | None) -> list[dict[str, Any]]:
    """[{op, before_ms, after_ms, before_share, after_share}] sorted by the larger of the two,
    slowest first. The shares are fractions of each model's profiled total (None for a model
    that was not profiled): profiling adds overhead to every kernel, so its absolute times add
    up to more than the wall-clock latency, while the shares stay comparable."""
    has_after = after is not None
    before, after = dict(before or {}), dict(after or {})
    tb, ta = sum(before.values()), sum(after.values())
    ops = sorted(set(before) | set(after), key=lambda o: -max(before.get(o, 0.0), after.get(o, 0.0)))
    return [{"op": o, "before_ms": before.get(o, 0.0), "after_ms": after.get(o, 0.0),
             "before_share": before.get(o, 0.0) / tb if tb > 0 else None,
             "after_share": (after.get(o, 0.0) / ta if ta > 0 else None) if has_after else None} for o in ops]


def attach_op_types(sec: dict[str, Any], before: Mapping[str, float] | None, after: Mapping[str, float] | None) -> None:
    """Put the per-op-type profile into a latency section: ``op_types`` rows with shares, and
    each side's profiled total (``before.profiled_ms`` / ``after.profiled_ms``, ms per call)
    beside its wall-clock ``p50_ms``."""
    if before is None:
        return
    sec["op_types"] = op_type_rows(before, after)
    sec["before"]["profiled_ms"] = float(sum(before.values()))
    if after is not None and sec.get("after"):
        sec["after"]["profiled_ms"] = float(sum(after.values()))


def latency_section(before: Target, after: Target | None = None, *, runs: int = 100, warmup: int = 5,
                    profile: bool = True, threads: int | None = None, inputs: Mapping[str, Any] | None = None,
                    pass_names: Sequence[str] = (), prefixes: Sequence[Target] = (), progress: Progress | None = None,
                    min_sample_ms: float = 5.0, keep_results: bool = False) -> dict[str, Any]:
    """Measure and return the ``latency`` section of the report.

    ``prefixes``: the model after each prefix of ``pass_names`` but the whole list (that one
    is ``after``), timed in the same interleaved loop; gives ``latency.per_pass``."""
    extra = list(prefixes)
    targets = [before] + ([after] if after is not None else []) + extra
    results, inner = measure(targets, runs=runs, warmup=warmup, progress=progress, min_sample_ms=min_sample_ms)
    sec: dict[str, Any] = {
        "engine": before.engine,
        "backend": before.backend or before.engine,
        "device": before.device,
        "providers": before.providers,
        "graph_optimization": "all" if before.engine == "onnxruntime" else None,
        "threads": threads,
        "runs": runs,
        "warmup": warmup,
        "inner": inner,
        "order": "ABBA",
        "inputs": {k: list(np.shape(v)) for k, v in (inputs or {}).items()},
        "before": {"label": before.label, **{k: v for k, v in results[0].items() if k != "ratio_to_first"}},
        "after": None,
        "speedup": None,
        "p50_ratio": None,
        "op_types": None,
    }
    if after is not None:
        sec["after"] = {"label": after.label, **{k: v for k, v in results[1].items() if k != "ratio_to_first"}}
        sec["speedup"] = results[1]["ratio_to_first"]
        sec["p50_ratio"] = results[0]["p50_ms"] / results[1]["p50_ms"] if results[1]["p50_ms"] > 0 else None
    if before.compile_s is not None:
        sec["compile_s"] = {"before": before.compile_s, "after": after.compile_s if after is not None else None}
    if profile:
        prof_runs = max(3, min(runs, 20))
        pb = profile_op_types(before, runs=prof_runs, threads=threads)
        pa = profile_op_types(after, runs=prof_runs, threads=threads) if after is not None else None
        attach_op_types(sec, pb, pa)
    if pass_names and after is not None and len(prefixes) == len(pass_names) - 1:
        sec["per_pass"] = per_pass_rows(pass_names, results[2:] + [results[1]])
    if keep_results:
        sec["_results"] = (results, inner)
    return sec


def per_pass_rows(pass_names: Sequence[str], prefix_stats: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Rows of ``latency.per_pass``: p50 after each pass prefix, the cumulative speedup
    (paired ratio against the original) and each pass's own share of it."""
    rows, prev = [], 1.0
    for name, st in zip(pass_names, prefix_stats):
        cum = st["ratio_to_first"]
        rows.append({"pass": name, "p50_ms": st["p50_ms"], "p90_ms": st["p90_ms"],
                     "speedup": cum / prev if prev else None, "cumulative_speedup": cum})
        prev = cum
    return rows


# -- stateful models (Re-ttention): one target per phase, the schedule from the phases -------
def schedule_counts(schedule: Schedule, steps: int) -> dict[str, int]:
    """How many of ``steps`` denoising steps are dense, refresh and sparse steps."""
    counts = {name: 0 for name in PHASES.values()}
    for t in range(steps):
        counts[PHASES[schedule.phase(t)[0]]] += 1
    return counts


def _phase_steps(schedule: Schedule) -> dict[int, int]:
    """The step timed for each phase the schedule has: 0, ``warmup`` and ``warmup + 1``."""
    steps = {REFRESH: schedule.warmup}
    if schedule.warmup > 0:
        steps[DENSE] = 0
    if schedule.period > 1:
        steps[SPARSE] = schedule.warmup + 1
    return dict(sorted(steps.items()))


def _onnx_phase_targets(label: str, model: Any, feeds: Mapping[str, np.ndarray], threads: int | None
                        ) -> tuple[Schedule, dict[str, Target]] | None:
    """ORT targets of each phase of a model with the Re-ttention protocol, or None."""
    configs = site_configs(model)
    if not configs:
        return None
    schedule = configs[0].schedule
    # weights the loader mapped from the user's file go inline (as OnnxView.to_proto does):
    # ORT refuses a model from bytes whose tensors point at a file
    proto = inline_proto(model)
    sess = _session(proto, threads)
    args = list(sess.get_inputs()) + list(sess.get_overridable_initializers())
    names = [a.name for a in args]
    if STEP_INPUT not in names:
        return None
    shapes = {a.name: a.shape for a in args}
    sites = protocol_sites(names)
    base = {k: v for k, v in feeds.items() if k in names}
    batch = int(next(iter(base.values())).shape[0]) if base else 1
    outs = [o.name for o in sess.get_outputs()]
    state: dict[str, np.ndarray] = {}
    for s in range(sites):
        for nm in state_names(s)[:2]:
            shape = [batch if i == 0 else int(d) for i, d in enumerate(shapes[nm])]
            state[nm] = np.zeros(shape, dtype=np.float32)
    provs = sess.get_providers()
    device = "cuda" if "CUDAExecutionProvider" in provs else "cpu"
    targets: dict[str, Target] = {}
    came_from = "zeros"
    for phase, step in _phase_steps(schedule).items():
        f = {**base, **state, STEP_INPUT: np.asarray(step, dtype=np.int64)}
        values = dict(zip(outs, sess.run(outs, f)))
        name = PHASES[phase]
        targets[name] = Target(f"{label} ({name} step)", "onnxruntime", (lambda f=f: sess.run(outs, f)), device,
                               provs, proto, f, backend="onnxruntime", phase=name, step=step, state_from=came_from)
        for s in range(sites):  # the next step is fed this step's state outputs
            rho_in, res_in, rho_out, res_out = state_names(s)
            state = {**state, rho_in: values[rho_out], res_in: values[res_out]}
        came_from = f"{name} step {step}"
    return schedule, targets


def _torch_phase_targets(label: str, module: Any, args: Sequence[Any], compiled: bool
                         ) -> tuple[Schedule, dict[str, Target]] | None:
    """Torch targets of each phase of a GraphModule driven by ``rettention.set_step``, or None.
    The state lives in the module: the refresh call stores the rho and residual that the
    sparse call then reads (the refresh recomputes the same values from the same inputs)."""
    state = getattr(module, "rettention", None)
    if state is None or not hasattr(state, "set_step") or not getattr(state, "sites", None):
        return None
    schedule = state.sites[0].schedule
    targets: dict[str, Target] = {}
    shared = torch_target(label, module, args, compiled=compiled, lazy=True)
    came_from = "zeros"
    for phase, step in _phase_steps(schedule).items():
        name = PHASES[phase]
        t = torch_target(f"{label} ({name} step)", module, args, compiled=compiled, state=state, step=step,
                         share=shared)
        t.phase, t.step, t.state_from = name, step, came_from
        targets[name] = t
        came_from = f"{name} step {step}"
    return schedule, targets


def phase_targets(label: str, view, feeds: Mapping[str, np.ndarray] | None = None, *, threads: int | None = None,
                  compiled: bool = False) -> tuple[Schedule, dict[str, Target]] | None:
    """``(schedule, {phase: Target})`` of a stateful (Re-ttention) model, the targets made in
    step order so each is fed the states of the ones before it; None for a stateless model."""
    if isinstance(view, OnnxView):
        return _onnx_phase_targets(label, view.model, feeds or {}, threads)
    gm = getattr(view, "gm", None)
    if gm is None:
        return None
    args = view.example_inputs
    if feeds:
        names = [n.name for n in gm.graph.nodes if n.op == "placeholder"]
        if all(n in feeds for n in names):
            args = [feeds[n] for n in names]
    return _torch_phase_targets(label, gm, args, compiled)


def stateful_section(before: Target, schedule: Schedule, phases: Mapping[str, Target], *, steps: int | None = None,
                     runs: int = 100, warmup: int = 5, threads: int | None = None,
                     inputs: Mapping[str, Any] | None = None, progress: Progress | None = None,
                     min_sample_ms: float = 5.0) -> dict[str, Any]:
    """The ``latency`` section of a stateful model (module doc): the original and every phase
    timed interleaved; ``phases`` rows, the ``schedule`` over ``steps`` (default
    ``DEFAULT_STEPS``), ``speedup`` the schedule's and ``after`` its mean step."""
    steps = DEFAULT_STEPS if steps is None else steps
    if steps < 1:
        raise ValueError("steps must be >= 1")
    order = list(phases)
    sec = latency_section(before, None, runs=runs, warmup=warmup, profile=False, threads=threads, inputs=inputs,
                          prefixes=[phases[p] for p in order], progress=progress, min_sample_ms=min_sample_ms,
                          keep_results=True)
    sec.pop("per_pass", None)
    results, _ = sec.pop("_results")
    counts = schedule_counts(schedule, steps)
    rows = []
    for name, st in zip(order, results[1:]):
        t = phases[name]
        rows.append({"phase": name, "step": t.step, "label": t.label, "state_from": t.state_from,
                     "count": counts[name], "p50_ms": st["p50_ms"], "p90_ms": st["p90_ms"], "min_ms": st["min_ms"],
                     "samples": st["samples"], "speedup": st["ratio_to_first"],
                     "p50_ratio": results[0]["p50_ms"] / st["p50_ms"] if st["p50_ms"] > 0 else None})
    sec["phases"] = rows
    by = {r["phase"]: r for r in rows}
    missing = [p for p, c in counts.items() if c and p not in by]
    if missing:  # cannot happen for a schedule's own phases; guard the weighting
        raise ValueError(f"phases {missing} of the schedule were not timed")
    after_ms = sum(counts[p] * by[p]["p50_ms"] for p in by) / steps
    inv = sum(counts[p] / by[p]["speedup"] for p in by if counts[p])
    sched = {"steps": steps, "warmup": schedule.warmup, "period": schedule.period, "counts": counts,
             "before_ms": steps * results[0]["p50_ms"], "after_ms": steps * after_ms,
             "speedup": steps / inv if inv > 0 else None,
             "p50_ratio": results[0]["p50_ms"] / after_ms if after_ms > 0 else None}
    sec["schedule"] = sched
    first = rows[0]
    sec["after"] = {"label": f"{first['label'].rsplit(' (', 1)[0]} ({steps}-step schedule, mean step)",
                    "p50_ms": after_ms,
                    "p90_ms": sum(counts[p] * by[p]["p90_ms"] for p in by) / steps,
                    "min_ms": sum(counts[p] * by[p]["min_ms"] for p in by) / steps,
                    "mean_ms": after_ms, "samples": first["samples"]}
    sec["speedup"] = sched["speedup"]
    sec["p50_ratio"] = sched["p50_ratio"]
    sec["profiled_phase"] = "sparse" if "sparse" in phases else order[-1]
    return sec
