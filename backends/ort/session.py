"""ONNX Runtime sessions.

Verification runs ORT with its graph optimizations *off*, so that ORT's own fusions
cannot hide (or cause) a difference between the original and the rewritten model.
"""

from __future__ import annotations

import os
import sys
import tempfile
from collections.abc import Mapping

import numpy as np
import onnx

from rewriter.errors import BadInput

_TWO_GB = 2**31 - 1024


_quiet = False


def quiet_logging() -> None:
    """Silence ORT's default logger (its errors included) for every session made from now
    on: the CLI quotes ORT's message in its own one line instead. onnxruntime itself is
    imported by the first session (about 20 MB), so a run that makes none never loads it."""
    global _quiet
    _quiet = True
    if "onnxruntime" in sys.modules:
        sys.modules["onnxruntime"].set_default_logger_severity(4)


def _ort():
    try:
        import onnxruntime as ort
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise BadInput(
            "onnxruntime is not installed: install the project with the `cpu` or `gpu` extra"
        ) from err
    if _quiet:
        ort.set_default_logger_severity(4)
    return ort


def providers() -> list[str]:
    ort = _ort()
    avail = ort.get_available_providers()
    return [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in avail]


def make_session(model: onnx.ModelProto | str | os.PathLike, *, optimize: bool = False,
                 threads: int | None = None, profile: bool = False):
    """An InferenceSession; ``optimize=False`` disables every ORT graph optimization."""
    ort = _ort()
    opts = ort.SessionOptions()
    opts.graph_optimization_level = (
        ort.GraphOptimizationLevel.ORT_ENABLE_ALL if optimize else ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    )
    opts.log_severity_level = 3
    if threads:
        opts.intra_op_num_threads = threads
    if profile:  # profiles go to a temporary directory, never the working directory
        opts.enable_profiling = True
        opts.profile_file_prefix = os.path.join(tempfile.mkdtemp(prefix="rewriter-prof-"), "ort")
    if isinstance(model, onnx.ModelProto):
        if model.ByteSize() > _TWO_GB:
            tmp = tempfile.mkdtemp(prefix="rewriter-ort-")
            path = os.path.join(tmp, "model.onnx")
            onnx.save(model, path, save_as_external_data=True, location="model.onnx.data")
            return ort.InferenceSession(path, opts, providers=providers())
        return ort.InferenceSession(model.SerializeToString(), opts, providers=providers())
    return ort.InferenceSession(os.fspath(model), opts, providers=providers())


def run_onnx(session, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    names = [o.name for o in session.get_outputs()]
    outs = session.run(names, dict(feeds))
    return dict(zip(names, outs))
