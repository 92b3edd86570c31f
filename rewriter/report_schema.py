"""The JSON documents the CLI writes, as JSON-Schema (draft 2020-12) dicts.

- ``REPORT_SCHEMA``: ``rewrite MODEL --passes ... --json F`` and ``rewrite check --json F``
  (``"schema": "rewriter.report/1"``), and ``Result.report`` of the Python API.
  ``latency`` is present with ``--bench`` / ``Result.bench()`` (and in ``check`` with
  ``--min-speedup``); ``goals`` only in ``check``; ``samples`` and ``scaling`` only where a
  caller adds them (``make demo``: ``models_zoo.demo``).
- ``DIFF_SCHEMA``: ``rewrite diff A B --json F`` (``"schema": "rewriter.diff/1"``).
- ``BENCH_SCHEMA``: ``rewrite bench MODEL --json F`` (``"schema": "rewriter.bench/1"``).

Versioning: a key may be *added* within a version (readers must ignore unknown keys);
renaming, removing or changing the meaning of a key bumps the ``/N``.

Keys CI usually reads: ``verification.passed``, ``verification.max_rel_error``,
``latency.before.p50_ms``, ``latency.after.p50_ms``, ``latency.speedup``,
``diff.params.{before,after}``, ``diff.bytes.{before,after}``, ``goals[].passed``.
For a stateful (Re-ttention) model ``latency.speedup`` is the sampling schedule's
(``latency.schedule``: the phases weighed by their counts over ``steps``) and
``latency.after`` its mean step; each phase's own figures are in ``latency.phases``.
"""

from __future__ import annotations

from typing import Any

_NUM = {"type": "number"}
_NUM_OR_NULL = {"type": ["number", "null"]}
_INT = {"type": "integer", "minimum": 0}
_STR = {"type": "string"}
_BEFORE_AFTER_INT = {"type": "object", "required": ["before", "after"],
                     "properties": {"before": _INT, "after": _INT}}
_COUNTS = {"type": "object", "additionalProperties": _INT}
_SHAPE = {"type": ["array", "null"], "items": {"type": ["integer", "string", "null"]}}

_SITE = {"type": "object", "required": ["site", "accepted"],
         "properties": {"site": _STR, "accepted": {"type": "boolean"}, "reason": _STR}}

_OUTPUT_ERR = {
    "type": "object", "required": ["name"],
    "properties": {"name": _STR, "max_abs_error": _NUM, "max_rel_error": _NUM, "tolerance": _NUM,
                   "passed": {"type": "boolean"}, "error": _STR,
                   # approximate passes judged by a budget metric (rewriter.run.verify.Budget)
                   "rel_fro_error": _NUM, "cosine": _NUM, "min_cosine": _NUM, "budget": _STR},
}

_VERIFICATION = {
    "type": "object", "required": ["passed"],
    "properties": {
        "passed": {"type": "boolean"},
        "performed": {"type": "boolean"},
        "max_abs_error": _NUM,
        "max_rel_error": _NUM,
        "outputs": {"type": "array", "items": _OUTPUT_ERR},
        "failed_pass": _STR,
        "failing_site": {"type": ["string", "null"]},
        "inputs": {"type": "object", "additionalProperties": {"type": "array", "items": {"type": "integer"}}},
        "notes": {"type": "array", "items": _STR},
        "shadow": {"type": "string", "enum": ["float32"]},
        "runs": {"type": "boolean"},  # false: the rewritten model does not run (``error`` says why)
        "error": _STR,
    },
}

_PASS = {
    "type": "object", "required": ["name", "kind", "applied", "sites", "declined", "seconds"],
    "properties": {
        "name": _STR,
        "kind": {"enum": ["exact", "approximate", "architectural"]},
        "applied": _INT,
        "sites": {"type": "array", "items": _SITE},
        "declined": {"type": "array", "items": {"type": "object", "required": ["site", "reason"],
                                                 "properties": {"site": _STR, "reason": _STR}}},
        "seconds": _NUM,
        "verification": {"anyOf": [{"type": "null"}, _VERIFICATION]},
    },
}

_NODE_ENTRY = {
    "type": "object", "required": ["name", "op"],
    "properties": {
        "name": _STR, "op": _STR,
        "pass": _STR,  # the pass that made / removed / changed it (provenance)
        "replaced": {"type": "array", "items": _STR},
        "dead": {"type": "boolean"},  # removed because only removed/rewritten nodes read it
        "what": {"type": "array", "items": {"enum": ["attributes", "parameters", "inputs", "shape", "tagged"]}},
        "matched_by": {"enum": ["provenance", "name", "topology"]},
        "before_name": _STR,
    },
}
_IO_ENTRY = {"type": "object", "required": ["name"],
             "properties": {"name": _STR, "dtype": {"type": ["string", "null"]}, "shape": _SHAPE}}
_IO_CHANGES = {
    "type": "object", "required": ["added", "removed", "changed"],
    "properties": {"added": {"type": "array", "items": _IO_ENTRY},
                   "removed": {"type": "array", "items": _IO_ENTRY},
                   "changed": {"type": "array", "items": {"type": "object", "required": ["name", "before", "after"]}}},
}

#: The ``diff`` section. ``op_counts``, ``params`` and ``bytes`` are always there; the
#: node-level keys come with the graph diff (``rewrite diff``, and runs from the CLI).
DIFF_SECTION: dict[str, Any] = {
    "type": "object", "required": ["op_counts", "params", "bytes"],
    "properties": {
        "op_counts": {"type": "object", "required": ["before", "after"],
                      "properties": {"before": _COUNTS, "after": _COUNTS}},
        "params": _BEFORE_AFTER_INT,
        "bytes": _BEFORE_AFTER_INT,
        "nodes": {
            "type": "object",
            "required": ["before", "after", "added", "removed", "changed", "unchanged", "matched_by"],
            "properties": {
                "before": _INT, "after": _INT, "unchanged": _INT,
                "added": {"type": "array", "items": _NODE_ENTRY},
                "removed": {"type": "array", "items": _NODE_ENTRY},
                "changed": {"type": "array", "items": _NODE_ENTRY},
                "matched_by": {"type": "object", "properties": {"provenance": _INT, "name": _INT, "topology": _INT}},
            },
        },
        "io": {"type": "object", "required": ["inputs", "outputs"],
               "properties": {"inputs": _IO_CHANGES, "outputs": _IO_CHANGES}},
        "widths": {"type": "array", "items": {
            "type": "object", "required": ["tensor", "kind", "before", "after"],
            "properties": {"tensor": _STR, "kind": {"enum": ["param", "activation", "io"]},
                           "before": _SHAPE, "after": _SHAPE,
                           "axes": {"type": ["array", "null"], "items": {"type": "integer"}}, "node": _STR}}},
    },
}

_TIMING = {
    "type": "object", "required": ["label", "p50_ms", "p90_ms", "samples"],
    "properties": {"label": _STR, "p50_ms": _NUM, "p90_ms": _NUM, "mean_ms": _NUM, "min_ms": _NUM,
                   "samples": _INT,
                   "profiled_ms": _NUM},  # sum of the ORT-profiled kernel times (profiling overhead included)
}

#: The ``latency`` section: ms per call; ``speedup`` = before/after (> 1: faster).
LATENCY_SECTION: dict[str, Any] = {
    "type": "object", "required": ["engine", "device", "runs", "before", "after", "speedup"],
    "properties": {
        "engine": {"enum": ["onnxruntime", "torch"]},
        "backend": {"enum": ["onnxruntime", "torch-eager", "torch-inductor"]},
        "compile_s": {"type": "object", "properties": {"before": _NUM_OR_NULL, "after": _NUM_OR_NULL}},
        "device": {"enum": ["cpu", "cuda"]},
        "providers": {"type": "array", "items": _STR},
        "graph_optimization": {"type": ["string", "null"]},
        "threads": {"type": ["integer", "null"]},
        "runs": _INT, "warmup": _INT, "inner": _INT,
        "order": _STR,
        "inputs": {"type": "object"},
        "before": _TIMING,
        "after": {"anyOf": [{"type": "null"}, _TIMING]},
        "speedup": _NUM_OR_NULL,  # median of paired before/after sample ratios
        "p50_ratio": _NUM_OR_NULL,  # before.p50_ms / after.p50_ms
        "op_types": {"type": ["array", "null"], "items": {
            "type": "object", "required": ["op", "before_ms", "after_ms"],
            "properties": {"op": _STR, "before_ms": _NUM, "after_ms": _NUM,
                           # fraction of that model's profiled total (null: not profiled)
                           "before_share": _NUM_OR_NULL, "after_share": _NUM_OR_NULL}}},
        # stateful models (Re-ttention): each phase timed on the real states of the steps before
        # it, and the schedule they make up; ``speedup``/``after`` are then the schedule's
        "phases": {"type": "array", "items": {
            "type": "object", "required": ["phase", "step", "count", "p50_ms", "speedup"],
            "properties": {"phase": {"enum": ["dense", "refresh", "sparse"]}, "step": _INT, "label": _STR,
                           "state_from": _STR, "count": _INT, "p50_ms": _NUM, "p90_ms": _NUM, "min_ms": _NUM,
                           "samples": _INT, "speedup": _NUM, "p50_ratio": _NUM_OR_NULL}}},
        "schedule": {"type": "object", "required": ["steps", "counts", "speedup"],
                     "properties": {"steps": _INT, "warmup": _INT, "period": _INT,
                                    "counts": {"type": "object", "properties": {
                                        "dense": _INT, "refresh": _INT, "sparse": _INT}},
                                    "before_ms": _NUM, "after_ms": _NUM, "speedup": _NUM_OR_NULL,
                                    "p50_ratio": _NUM_OR_NULL}},
        "profiled_phase": _STR,
        "per_pass": {"type": "array", "items": {
            "type": "object", "required": ["pass", "p50_ms", "speedup", "cumulative_speedup"],
            "properties": {"pass": _STR, "p50_ms": _NUM, "p90_ms": _NUM, "speedup": _NUM_OR_NULL,
                           "cumulative_speedup": _NUM_OR_NULL}}},
    },
}

#: The ``scaling`` section (optional; ``make demo``): the same architecture timed per phase at
#: several token counts, ms per step of the original, the sparse step and the schedule's mean
#: step, and one sentence on where the rewrite starts to pay.
SCALING_SECTION: dict[str, Any] = {
    "type": "object", "required": ["rows", "pays_from"],
    "properties": {
        "description": _STR, "steps": _INT, "pays_from": _STR,
        "rows": {"type": "array", "items": {
            "type": "object", "required": ["tokens", "before_ms", "sparse_ms", "schedule_ms", "schedule_speedup"],
            "properties": {"tokens": _INT, "before_ms": _NUM, "sparse_ms": _NUM, "schedule_ms": _NUM,
                           "sparse_speedup": _NUM, "refresh_speedup": _NUM, "dense_speedup": _NUM,
                           "schedule_speedup": _NUM_OR_NULL}}},
    },
}

#: The ``samples`` section (optional): a generative model sampled with the same seeds by the
#: original model (``reference``) and by variants of the rewritten one; each variant's mean
#: PSNR (dB) / SSIM against the reference, and the worst seed's.
SAMPLES_SECTION: dict[str, Any] = {
    "type": "object", "required": ["reference", "steps", "seeds", "variants"],
    "properties": {
        "description": _STR, "reference": _STR, "steps": _INT,
        "seeds": {"type": "array", "items": {"type": "integer"}}, "images_per_seed": _INT,
        "variants": {"type": "array", "items": {
            "type": "object", "required": ["name", "psnr", "ssim"],
            "properties": {"name": _STR, "label": _STR, "psnr": _NUM_OR_NULL, "ssim": _NUM_OR_NULL,
                           "psnr_min": _NUM_OR_NULL, "ssim_min": _NUM_OR_NULL}}},
        # per denoising step: every rewritten site against its float64 formula
        "step_check": {"type": "object", "required": ["passed", "tolerance", "steps"],
                       "properties": {"passed": {"type": "boolean"}, "tolerance": _NUM,
                                      "steps": {"type": "array", "items": {
                                          "type": "object", "required": ["step", "phase", "max_rel_error"],
                                          "properties": {"step": _INT, "phase": _STR, "max_rel_error": _NUM}}}}},
    },
}

_GOAL = {
    "type": "object", "required": ["goal", "target", "measured", "passed"],
    "properties": {"goal": _STR, "target": {}, "measured": {}, "passed": {"type": "boolean"}, "why": _STR},
}

REPORT_SCHEMA: dict[str, Any] = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "$id": "rewriter.report/1",
    "title": "rewrite run report",
    "type": "object",
    "required": ["schema", "model", "passes", "verification", "diff", "output"],
    "properties": {
        "schema": {"const": "rewriter.report/1"},
        "model": {"type": "object", "required": ["source", "ir"],
                  "properties": {"source": _STR, "ir": {"enum": ["onnx", "torch"]}}},
        "passes": {"type": "array", "items": _PASS},
        "verification": _VERIFICATION,
        "diff": DIFF_SECTION,
        "latency": LATENCY_SECTION,
        "latency_eager": LATENCY_SECTION,  # --bench --compile: the eager timing beside the compiled one
        "compile": {"type": "object", "required": ["backend", "graphs", "graph_breaks"],  # --compile / Result.compile
                    "properties": {"backend": _STR, "graphs": _INT, "graph_breaks": _INT,
                                   "reasons": {"type": "array", "items": _STR}}},
        "goals": {"type": "array", "items": _GOAL},
        "samples": SAMPLES_SECTION,
        "scaling": SCALING_SECTION,
        "passed": {"type": "boolean"},  # check: every goal met
        "warnings": {"type": "array", "items": _STR},  # e.g. a pass that applied nowhere (--allow-unapplied)
        "output": {"type": ["string", "null"]},
        # dims taken from --shape / --inputs where the file's are symbolic (rewriter.run.shapes)
        "assumed_shapes": {"type": "object", "required": ["inputs"], "properties": {
            "inputs": {"type": "object", "additionalProperties": {"type": "array", "items": {"type": "integer"}}},
            "symbols": {"type": "object", "additionalProperties": {"type": "integer"}},
            "values": _INT, "error": _STR}},
        # initializers listed as graph inputs made constants (--freeze-initializer-inputs)
        "frozen_initializer_inputs": {"type": "array", "items": _STR},
    },
}

DIFF_SCHEMA: dict[str, Any] = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "$id": "rewriter.diff/1",
    "title": "rewrite diff",
    "type": "object",
    "required": ["schema", "before", "after", "diff"],
    "properties": {"schema": {"const": "rewriter.diff/1"}, "before": _STR, "after": _STR,
                   "diff": {**DIFF_SECTION, "required": ["op_counts", "params", "bytes", "nodes", "io", "widths"]}},
}

BENCH_SCHEMA: dict[str, Any] = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "$id": "rewriter.bench/1",
    "title": "rewrite bench",
    "type": "object",
    "required": ["schema", "model", "latency"],
    "properties": {"schema": {"const": "rewriter.bench/1"}, "model": _STR,
                   "against": {"type": ["string", "null"]}, "latency": LATENCY_SECTION,
                   "latency_eager": LATENCY_SECTION},
}

SCHEMAS = {"rewriter.report/1": REPORT_SCHEMA, "rewriter.diff/1": DIFF_SCHEMA, "rewriter.bench/1": BENCH_SCHEMA}


def validate(doc: dict[str, Any]) -> None:
    """Validate ``doc`` against the schema its ``"schema"`` key names (needs jsonschema,
    a dev dependency). Raises ``jsonschema.ValidationError``."""
    import jsonschema

    jsonschema.validate(doc, SCHEMAS[doc["schema"]])
