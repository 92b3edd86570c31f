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
from rewriter.compile import compile_module
from rewriter.errors import BadInput
from rewriter.ir.onnx_view import OnnxView

log = logging.getLogger(__name__)

Progress = Callable[[int, int], None]  # (done, total)

__all__ = ["Target", "onnx_target", "torch_target", "target_for", "measure", "stats", "profile_op_types",
           "latency_section"]


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


def torch_target(label: str, module: Any, args: Sequence[Any], *, compiled: bool = False) -> Target:
    """A torch target (a GraphModule or nn.Module); on CUDA when torch sees a GPU. With
    ``compiled`` the module runs under ``torch.compile`` (``rewriter.compile``); the
    compiling first call is made here and timed (``compile_s``)."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    tensors = [torch.as_tensor(a) for a in args]
    if device == "cuda":
        module = module.to(device)
        tensors = [t.to(device) for t in tensors]
    fn = module
    if compiled:
        fn = compile_module(module, device)

    def call():
        with torch.inference_mode():
            return fn(*tensors)

    sync = torch.cuda.synchronize if device == "cuda" else None
    t = Target(label, "torch", call, device, [], module, None, sync,
               backend="torch-inductor" if compiled else "torch-eager")
    if compiled:
        t0 = time.perf_counter()
        call()
        if sync is not None:
            sync()
        t.compile_s = time.perf_counter() - t0
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
    for _ in range(max(warmup, 1)):
        for t in targets:
            t.call()
    # Calls per sample: enough for the fastest target to last min_sample_ms.
    single = [min(_time_calls(t, 1) for _ in range(3)) for t in targets]
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
                    min_sample_ms: float = 5.0) -> dict[str, Any]:
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
