"""The Python API: ``rewriter.rewrite(model, passes=[...]) -> Result``.

The CLI is a thin layer over this module: ``Result.report`` is the JSON document
``rewrite --json`` writes (schema ``rewriter.report/1``, ``rewriter/report_schema.py``);
``Result.diff()`` adds the node-level graph diff to it, ``Result.bench()`` the latency
section and ``Result.html(path)`` writes the HTML page, each through the same code the
CLI's ``--html`` and ``--bench`` run.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnx_ir as ir
import torch

import passes  # noqa: F401 - importing the package registers every pass (rewriter.pass_api)
from rewriter.compile import compile_module, graph_breaks
from rewriter.diff import diff_models
from rewriter.errors import BadInput, NothingApplied, VerificationFailed
from rewriter.html import render_html, write_html
from rewriter.ir.dtypes import to_numpy
from rewriter.ir.fx_view import FxView
from rewriter.ir.onnx_reader import materialize
from rewriter.ir.onnx_view import OnnxView
from rewriter.ir.view import GraphView
from rewriter.loader import Source, as_view, load_onnx, param_stats, resolve, save, to_view  # noqa: F401 - as_view, param_stats: public here
from rewriter.loader import check_runnable, freeze_initializer_inputs as freeze
from rewriter.manager import PassRecord, run_passes
from rewriter.pass_api import Context, Kind, Pass, get_pass, make_options
from rewriter.run import bench as B
from rewriter.run.shapes import specialise
from rewriter.run.verify import Budget, Runner, check_calib, compare, input_specs, load_calib, load_inputs, make_inputs

log = logging.getLogger(__name__)

SCHEMA = "rewriter.report/1"

log = logging.getLogger(__name__)

#: ``progress(description, done, total)``: ``done``/``total`` are None while a phase has no count.
BenchProgress = Callable[[str, "int | None", "int | None"], None]


@dataclasses.dataclass
class Result:
    """What a run produced. ``model`` is an ``onnx_ir.Model`` or an fx ``GraphModule``.

    ``report`` is the ``rewriter.report/1`` document; ``diff()``, ``bench()`` and
    ``html()`` add to it what the CLI's ``--html`` / ``--bench`` add."""

    view: GraphView
    records: list[PassRecord]
    verification: dict[str, Any]
    report: dict[str, Any]
    forced: bool = False
    allow_unapplied: bool = False  # save even when some (not all) requested passes applied nowhere
    #: the model before the passes (the caller's GraphView, or a copy sharing its tensors;
    #: built on first use when the input was a torch module or a file exported from one)
    original_factory: Callable[[], GraphView] | None = dataclasses.field(default=None, repr=False)
    #: the verification feeds (None when ``verify=False``); ``bench()`` times on them
    feeds: dict[str, np.ndarray] | None = dataclasses.field(default=None, repr=False)
    _run: dict[str, Any] = dataclasses.field(default_factory=dict, repr=False)  # passes, options, calib, inputs, shapes
    _original: GraphView | None = dataclasses.field(default=None, repr=False)
    _snapshots: tuple[Any, Any] | None = dataclasses.field(default=None, repr=False)
    _diff_error: Exception | None = dataclasses.field(default=None, repr=False)

    @property
    def model(self) -> Any:
        """The rewritten model, self-contained: weights that were mapped from a one-file
        input (``rewriter.ir.onnx_reader``) are read into memory the first time."""
        if isinstance(self.view, OnnxView):
            materialize(self.view.model)
            return self.view.model
        return self.view.gm

    @property
    def original(self) -> GraphView:
        """The model before the passes (never modified by the run)."""
        if self._original is None:
            if self.original_factory is None:
                raise BadInput("this Result has no record of the original model")
            self._original = self.original_factory()
        return self._original

    @property
    def passed(self) -> bool:
        return bool(self.verification.get("passed", True))

    @property
    def unapplied(self) -> list[PassRecord]:
        return [r for r in self.records if not r.applied]

    def unapplied_warnings(self) -> list[str]:
        """One line per requested pass that applied to no site, with its declined sites' reasons."""
        return [f"pass {r.name!r} applied to no site ("
                + ("; ".join(f"{s.site}: {s.reason}" for s in r.declined) or "no candidate sites") + ")"
                for r in self.unapplied]

    def check_applied(self) -> None:
        """Raise ``NothingApplied`` (exit 3) when a requested pass applied nowhere, unless
        ``allow_unapplied`` and at least one pass applied."""
        empty = self.unapplied
        if not empty or (self.allow_unapplied and len(empty) < len(self.records)):
            return
        reasons = "; ".join(f"{s.site}: {s.reason}" for r in empty for s in r.declined) or "no candidate sites"
        if len(empty) == len(self.records):
            hint = " (no requested pass applied)" if len(empty) > 1 else ""
        else:
            hint = " (--allow-unapplied writes what the other passes did)"
        raise NothingApplied(f"pass {', '.join(r.name for r in empty)} applied to no site ({reasons}); "
                             f"nothing written{hint}", result=self)

    def save(self, path: str | os.PathLike, *, force: bool | None = None) -> Path:
        """Write the model (``.onnx`` or ``.pt2``) atomically; refuses a model that failed
        verification unless ``force``."""
        force = self.forced if force is None else force
        if not self.passed and not force:
            raise VerificationFailed("refusing to save a model that failed verification (use force=True)")
        self.check_applied()
        src = self._run.get("model")
        if (self._original is None and isinstance(src, (str, os.PathLike)) and _onnx_file(str(src))
                and Path(src).resolve() == Path(path).resolve()):
            self._original = self.original  # overwriting the input: keep what diff()/bench() compare with
        out = save(self.view, path, overwrite_input=True)  # the CLI refuses it earlier (check_output_path)
        self.report["output"] = str(out)
        return out

    def compile(self, *, check: bool = True):
        """The rewritten torch model under ``torch.compile`` (Inductor; ``rewriter.compile``).
        With ``check``, Dynamo's trace at the example inputs is counted first and recorded
        in ``report["compile"]`` (``graphs``, ``graph_breaks``, ``reasons``). A Re-ttention
        model keeps its ``gm.rettention.set_step`` protocol."""
        if not isinstance(self.view, FxView):
            raise BadInput("compile: only torch models (rewrite with --ir torch, or a .pt2 / torch module)")
        gm = self.view.gm
        if check:
            self.report["compile"] = {"backend": "torch-inductor", **graph_breaks(gm, self.view.example_inputs)}
        return compile_module(gm)

    def diff(self) -> dict[str, Any]:
        """The node-level graph diff, original vs rewritten: adds ``nodes``, ``io`` and
        ``widths`` to ``report["diff"]`` (schema ``DIFF_SECTION``) and returns that section.
        Computed once; ``html()`` draws the two graphs from the same snapshots."""
        if self._diff_error is not None:
            raise self._diff_error
        if self._snapshots is None:
            try:
                d, sa, sb = diff_models(self.original, self.view, copy_on_write=True)
            except Exception as e:
                self._diff_error = e
                raise
            self.report["diff"].update({k: d[k] for k in ("nodes", "io", "widths")})
            self._snapshots = (sa, sb)
        return self.report["diff"]

    def bench(self, *, runs: int = 100, warmup: int = 5, threads: int | None = None, profile: bool = True,
              per_pass: bool = False, labels: tuple[str, str] = ("original", "rewritten"),
              progress: BenchProgress | None = None, compiled: bool = False,
              steps: int | None = None) -> dict[str, Any]:
        """Time the original and the rewritten model interleaved (``rewriter.run.bench``) on the
        verification inputs; sets and returns ``report["latency"]`` (schema
        ``LATENCY_SECTION``; ``speedup`` > 1 means faster). ``per_pass`` also times the model
        after each prefix of the pass list; ``profile`` adds per-op-type time; ``compiled``
        times torch models under ``torch.compile`` (backend ``torch-inductor``). A stateful
        (Re-ttention) result is timed per phase (dense, refresh, sparse, each fed the states
        of the steps before it) and over a schedule of ``steps`` denoising steps (default 20):
        ``speedup`` is then the schedule's, ``phases`` beside it.
        Refuses a model that failed verification unless the run was forced."""
        if not self.passed and not self.forced:
            raise VerificationFailed("not timing a model that failed verification (rewrite with force=True)")
        feeds = self.feeds
        if feeds is None:
            feeds, _ = verification_feeds(self.original, self._run.get("inputs"), self._run.get("shapes"),
                                          max_input_bytes=self._run.get("max_input_bytes"))
        names = list(self._run.get("passes") or [r.name for r in self.records])
        prefixes = self._prefix_views(names) if per_pass and len(names) > 1 else []
        pass_names = [p if isinstance(p, str) else p.name for p in names] if prefixes else []
        self.report["latency"] = latency(self.original, self.view, feeds, runs=runs, warmup=warmup,
                                         threads=threads, profile=profile, pass_names=pass_names,
                                         prefixes=prefixes, labels=labels, progress=progress, compiled=compiled,
                                         steps=steps)
        return self.report["latency"]

    def _prefix_views(self, passes: list) -> list[GraphView]:
        """The model after each proper prefix of the pass list, unverified."""
        options = self._run.get("options") or {}
        out = []
        for k in range(1, len(passes)):
            names = passes[:k]
            opts = {n: o for n, o in options.items() if n in names}
            out.append(rewrite(self.original, names, options=opts, calib=self._run.get("calib"), verify=False,
                               freeze_initializer_inputs=bool(self._run.get("freeze_initializer_inputs"))).view)
        return out

    def html(self, path: str | os.PathLike, *, images: Mapping[str, bytes] | None = None) -> Path:
        """Write the self-contained HTML page of ``report`` (graphs side by side, op counts,
        latency when ``bench()`` ran, numerics, sites) atomically; returns the path.
        ``images``: optional ``{name: PNG bytes}`` shown (as data URIs) in the samples
        section, next to ``report["samples"]``'s metrics. When the graph diff fails the page
        is written without the graphs (logged as a warning)."""
        if self._snapshots is None:
            try:
                self.diff()
            except Exception as e:  # noqa: BLE001 - the page is still useful without the graphs
                log.warning("graph diff failed (%s: %s); the page has op counts only", type(e).__name__, e)
        before, after = self._snapshots or (None, None)
        return write_html(path, render_html(self.report, before, after, images=images))


def latency(before: Any, after: Any, feeds: Mapping[str, np.ndarray], *, runs: int = 100, warmup: int = 5,
            threads: int | None = None, profile: bool = True, pass_names: Sequence[str] = (),
            prefixes: Sequence[Any] = (), labels: tuple[str, str] = ("original", "rewritten"),
            progress: BenchProgress | None = None, compiled: bool = False,
            steps: int | None = None) -> dict[str, Any]:
    """The ``latency`` section: ``before`` and ``after`` (GraphViews or ready
    ``rewriter.run.bench.Target``s; ``after`` may be None) timed interleaved, plus the models
    in ``prefixes`` (after each pass of ``pass_names``) and, with ``profile``, per-op-type
    time from a separate profiling run (ORT's profiler, or the torch profiler). Torch
    models with ``compiled``: under ``torch.compile`` (backend ``torch-inductor``; the
    compiling first call is timed apart, ``compile_s``). A stateful ``after`` (Re-ttention
    protocol) is timed per phase over a ``steps``-step schedule (``rewriter.run.bench``
    module doc); ``per_pass`` is not measured for it."""
    if runs < 1:
        raise BadInput(f"--runs {runs}: must be at least 1")
    if warmup < 0:
        raise BadInput(f"--warmup {warmup}: must be at least 0")
    say = progress or (lambda desc, done, total: None)

    def target(label, v):
        return v if isinstance(v, B.Target) else B.target_for(label, v, feeds, threads=threads, compiled=compiled)

    if steps is not None and steps < 1:
        raise BadInput(f"--steps {steps}: must be at least 1")
    say("compiling (torch.compile)" if compiled else "preparing sessions", None, None)
    tb = target(labels[0], before)
    stateful = None
    if after is not None and not isinstance(after, B.Target):
        stateful = B.phase_targets(labels[1], after, feeds, threads=threads, compiled=compiled)
    if stateful is not None:
        schedule, phases = stateful
        desc = f"timing the original and {len(phases)} phases, interleaved"
        say(desc, 0, runs)
        sec = B.stateful_section(tb, schedule, phases, steps=steps, runs=runs, warmup=warmup, threads=threads,
                                 inputs=feeds, progress=lambda done, total: say(desc, done, total))
        if tb.compile_s is not None:
            sec["compile_s"] = {"before": tb.compile_s,
                                "after": sum(t.compile_s or 0.0 for t in phases.values())}
        if profile:
            say(f"profiling per op type ({sec['profiled_phase']} step)", None, None)
            n = max(3, min(runs, 20))
            B.attach_op_types(sec, B.profile_op_types(tb, runs=n, threads=threads),
                              B.profile_op_types(phases[sec["profiled_phase"]], runs=n, threads=threads))
            prof = sec["after"].pop("profiled_ms", None)
            if prof is not None:  # the profile is of the phase, not of the schedule's mean step
                next(r for r in sec["phases"] if r["phase"] == sec["profiled_phase"])["profiled_ms"] = prof
        return sec
    ta = target(labels[1], after) if after is not None else None
    extra = [target(f"after {n}", v) for n, v in zip(pass_names, prefixes)]
    desc = f"timing {1 + (ta is not None) + len(extra)} model(s), interleaved"
    say(desc, 0, runs)
    sec = B.latency_section(tb, ta, runs=runs, warmup=warmup, profile=False, threads=threads,
                            inputs=feeds, pass_names=pass_names, prefixes=extra,
                            progress=lambda done, total: say(desc, done, total))
    if profile:
        say("profiling per op type", None, None)
        n = max(3, min(runs, 20))
        B.attach_op_types(sec, B.profile_op_types(tb, runs=n, threads=threads),
                          B.profile_op_types(ta, runs=n, threads=threads) if ta else None)
    return sec


def _instantiate(passes: Sequence[str | Pass], options: Mapping[str, Any] | None, ctx: Context) -> list[Pass]:
    options = dict(options or {})
    out = []
    for p in passes:
        if isinstance(p, Pass):
            out.append(p)
            continue
        cls = get_pass(p)
        opts = options.pop(p, None)
        if opts is None:
            opt_obj = cls.Options()
        elif isinstance(opts, cls.Options):
            opt_obj = opts
        else:
            fields = {f.name for f in dataclasses.fields(cls.Options)}
            opt_obj = make_options(cls, {k: v for k, v in opts.items() if isinstance(v, str)})
            for k, v in opts.items():
                if not isinstance(v, str):
                    if k not in fields:
                        raise BadInput(f"pass {p!r} has no option {k!r}")
                    setattr(opt_obj, k, v)
        out.append(cls(opt_obj, ctx))
    if options:
        raise BadInput(f"options given for pass(es) not in the list: {', '.join(sorted(options))}")
    return out


def verification_feeds(view: GraphView, inputs: Any = None,
                       shapes: Mapping[str, list[int]] | None = None, seed: int = 0,
                       max_input_bytes: int | None = None) -> tuple[dict, list[str]]:
    """The inputs verification runs on: ``inputs`` (a ``.npz`` path or ``{name: array}``),
    else the example inputs of a torch model, else seeded inputs from the signature
    (``rewriter.run.verify.make_inputs``); ``max_input_bytes`` bounds their total size."""
    specs = input_specs(view)
    if inputs is None:
        if isinstance(view, FxView):
            return {s.name: to_numpy(x) for s, x in zip(specs, view.example_inputs)}, []
        return make_inputs(specs, shapes, seed=seed, max_bytes=max_input_bytes)
    if isinstance(inputs, (str, os.PathLike)):
        return load_inputs(str(inputs), specs, max_input_bytes), []
    return {k: np.asarray(v) for k, v in dict(inputs).items()}, []


def rewrite(model: Any, passes: Sequence[str | Pass], *, options: Mapping[str, Any] | None = None,
            inputs: Any = None, calib: Any = None, example_inputs: Sequence[Any] | None = None,
            shapes: Mapping[str, list[int]] | None = None, verify: bool = True, force: bool = False,
            ir_kind: str | None = None, progress=None, source: str | None = None,
            max_input_bytes: int | None = None, freeze_initializer_inputs: bool = False,
            allow_unapplied: bool = False) -> Result:
    """Apply ``passes`` in order to ``model`` and verify each one.

    ``options``: ``{"foldnorm": {"direction": "next"}}`` (strings are parsed like ``--set``).
    ``calib``: a ``.npz`` path or ``{name: array}``, samples stacked on the first axis,
    checked against the model's inputs (names, dtypes, and every static axis after the
    first: a torch module captured by ``torch.export`` is static in all of them, so its
    calibration arrays have the example inputs' shapes past the batch axis).
    ``inputs``: a ``.npz`` path or ``{name: array}`` for verification (default: seeded
    random inputs, or the example inputs of a torch module); ``max_input_bytes`` bounds
    their total size (default ``rewriter.run.verify.DEFAULT_MAX_INPUT_BYTES``, checked before
    anything is allocated). ``freeze_initializer_inputs``: initializers that are also graph
    inputs (IR v3 files) become constants and leave the inputs (``--freeze-initializer-inputs``).
    Returns a ``Result``; a
    failed verification is recorded in it and ``Result.save`` refuses it unless forced.
    ``Result.save`` also refuses (``NothingApplied``) when a requested pass applied to no
    site, unless ``allow_unapplied`` and at least one pass applied; every unapplied pass is
    then a line of ``report["warnings"]`` (and ``passes[i]["applied"] == 0``).
    """
    if not passes:
        raise BadInput("no passes given")
    view = as_view(model, example_inputs=example_inputs, ir_kind=ir_kind)
    original_factory = _original_factory(model, view, example_inputs=example_inputs, ir_kind=ir_kind)
    frozen = []
    if freeze_initializer_inputs:
        frozen = freeze(view)
    calib_data = None
    if calib is not None:
        if isinstance(calib, (str, os.PathLike)):
            calib_data = load_calib(str(calib), input_specs(view))
        else:
            calib_data = check_calib(dict(calib), input_specs(view))
    pass_objs = _instantiate(passes, options, Context(calib=calib_data))
    for p in pass_objs:
        if view.ir not in p.irs:
            raise BadInput(f"pass {p.name!r} does not support {view.ir} models")
    before_ops = view.op_counts()
    before_params = param_stats(view)
    if verify and isinstance(view, OnnxView):
        check_runnable(view, source or "model")
    feeds, notes = (verification_feeds(view, inputs, shapes, max_input_bytes=max_input_bytes)
                    if verify else (None, []))
    if verify and inputs is None:
        feeds, notes = _calib_or_random(view, feeds, notes, calib_data, pass_objs)
    assumed = _specialise(view, shapes, inputs, feeds)
    records, reference = run_passes(view, pass_objs, feeds=feeds, progress=progress)
    if feeds is not None and records and all(r.verification is None or r.verification["passed"] for r in records):
        final = compare(reference, Runner(view)(feeds), _final_tolerance(pass_objs))
        final["passed"] = all(r.verification is None or r.verification["passed"] for r in records)
    elif feeds is not None:
        failed = next(r for r in records if r.verification and not r.verification["passed"])
        final = dict(failed.verification)
        final["failed_pass"] = failed.name
    else:
        final = {"performed": False, "passed": True}
    final.setdefault("performed", feeds is not None)
    if feeds is not None:
        final["inputs"] = {k: list(np.shape(v)) for k, v in feeds.items()}
        final["notes"] = notes + final.get("notes", [])  # + verification notes (bfloat16 shadow)
    if frozen:
        final.setdefault("notes", []).append(
            f"{len(frozen)} initializer(s) listed as graph inputs treated as constants "
            "(--freeze-initializer-inputs): they are not inputs of the output")
    if assumed:
        final.setdefault("notes", []).append(
            "shapes assumed for the analysis: " + ", ".join(f"{k}={v}" for k, v in assumed["inputs"].items())
            + "; the output keeps the file's dynamic signature")
    report = {
        "schema": SCHEMA,
        "model": {"source": source or (str(model) if isinstance(model, (str, os.PathLike)) else type(model).__name__),
                  "ir": view.ir},
        "passes": [r.to_json() for r in records],
        "verification": final,
        "diff": {
            "op_counts": {"before": before_ops, "after": view.op_counts()},
            "params": {"before": before_params["count"], "after": param_stats(view)["count"]},
            "bytes": {"before": before_params["bytes"], "after": param_stats(view)["bytes"]},
        },
        "output": None,
    }
    if assumed:
        report["assumed_shapes"] = assumed
    if frozen:
        report["frozen_initializer_inputs"] = frozen
    run = {"passes": list(passes), "options": dict(options or {}), "calib": calib, "inputs": inputs,
           "shapes": shapes, "model": model, "max_input_bytes": max_input_bytes,
           "freeze_initializer_inputs": freeze_initializer_inputs}
    result = Result(view, records, final, report, forced=force, allow_unapplied=allow_unapplied,
                    original_factory=original_factory, feeds=feeds, _run=run)
    if result.unapplied:
        report["warnings"] = result.unapplied_warnings()
    return result


def _original_factory(model: Any, view: GraphView, **kw) -> Callable[[], GraphView]:
    """How ``Result.original`` gets the model before the passes without holding the
    replaced weights through the run (the passes edit copy-on-write, so old tensors can be
    freed): the caller's GraphView itself (never modified); a file, proto, onnx-ir model or
    torch module is loaded, converted or captured again from the caller's (unmodified)
    object on first use. Only a model built by code (``zoo:NAME``, ``module:factory``)
    exported to ONNX is kept as a clone made now (onnx-ir clones share the tensors)."""
    if isinstance(model, GraphView):
        return lambda: model
    if isinstance(model, (str, os.PathLike)) and isinstance(view, OnnxView) and not _onnx_file(str(model)):
        snapshot = view.copy()
        return lambda: snapshot
    return lambda: as_view(model, **kw)


def _onnx_file(spec: str) -> bool:
    """``spec`` names an ONNX file (``loader.resolve``'s rule, without building anything)."""
    if spec.startswith("zoo:"):
        return False
    path = Path(spec)
    return path.suffix.lower() == ".onnx" or path.exists() or ":" not in spec


def _specialise(view: GraphView, shapes: Mapping[str, list[int]] | None, inputs: Any,
                feeds: Mapping[str, np.ndarray] | None) -> dict | None:
    """Concrete dims for the analysis from ``--shape`` and the arrays of ``--inputs``
    (``rewriter.run.shapes.specialise``); the report's ``assumed_shapes``, or None."""
    if not isinstance(view, OnnxView):
        return None
    given = {k: list(v) for k, v in (shapes or {}).items()}
    if inputs is not None and feeds is not None:
        given.update({k: list(np.shape(v)) for k, v in feeds.items()})
    if not given:
        return None
    return specialise(view, given)


VERIFY_CALIB_SAMPLES = 64  # calibration samples used for verification (first ones)


def _calib_or_random(view: GraphView, feeds, notes: list[str], calib: Mapping[str, Any] | None,
                     passes: list[Pass]) -> tuple[dict | None, list[str]]:
    """Without ``--inputs``: verify on the calibration data when there is some (the first
    ``VERIFY_CALIB_SAMPLES`` samples, or one static batch), else keep the random / example
    inputs and say that approximate passes are judged on them."""
    approximate = [p.name for p in passes if p.kind is Kind.APPROXIMATE]
    if calib:
        specs = {s.name: s for s in input_specs(view)}
        if set(calib) == set(specs):
            n = min(len(np.asarray(v)) for v in calib.values())
            take = min(n, VERIFY_CALIB_SAMPLES)
            static = [s.shape[0] for s in specs.values() if s.shape and isinstance(s.shape[0], int)]
            if static:
                take = min(static)
            out = {k: np.asarray(v)[:take] for k, v in calib.items()}
            return out, [f"verified on the calibration data ({take} of {n} samples, --calib)"]
    if approximate and isinstance(view, OnnxView):
        msg = (f"approximate pass(es) {', '.join(approximate)} judged on random inputs: "
               "give --inputs or --calib to verify on your data")
        log.warning(msg)
        notes = notes + [msg]
    return feeds, notes


def _final_tolerance(passes: list[Pass]):
    """The final comparison's budget: the approximate passes' (a ``Budget`` when one
    states a metric, the loosest of that metric), else the largest float budget."""
    budgets = [p.error_budget() for p in passes if p.error_budget() is not None]
    metric = [b for b in budgets if isinstance(b, Budget)]
    if metric:
        first = metric[0].metric
        same = [b.value for b in metric if b.metric == first]
        return Budget(first, min(same) if first == "cos" else max(same))
    return max(budgets) if budgets else None
