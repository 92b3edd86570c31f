"""Compiled lowering of rewritten torch models.

* ``compile_module(gm)``: the GraphModule under ``torch.compile`` (Inductor: C++ on CPU,
  Triton on CUDA). The project's ops compile without graph breaks: ``crms_norm`` /
  ``rms_norm`` / ``shiftadd_linear`` are ``triton_op``s whose bodies trace the plain-torch
  kernel off CUDA (Inductor fuses a norm into one kernel) and the Triton kernel on CUDA;
  ``rettention_refresh`` / ``rettention_sparse`` are opaque custom ops with registered
  fakes (their kernel, FlexAttention or Triton, is compiled on its own). A Re-ttention
  model's step is set with ``gm.rettention.set_step``; forward reads only each site's
  phase (a Python int Dynamo guards on) and the sparse coefficient ``lam * k`` (a buffer
  filled in place), so a sampling loop of any length compiles four graphs (dense, the
  first refresh, sparse, a refresh with the state present) and then none.
  On CPU, Inductor options from ``backends.flex_rettention.compile_options``.
* ``graph_breaks(gm, args)``: ``torch._dynamo.explain`` counts (``{graphs, graph_breaks,
  reasons}``), what ``Result.compile`` records in the report.
* ``export_program(gm, args)``: the ``torch.export`` program a ``.pt2`` holds. A
  Re-ttention model is exported as its ``StepProgram`` (``passes/rettention_runtime.py``):
  inputs ``(*model inputs, step, rho_0, R_0, ...)``, outputs ``(*model outputs, rho_0',
  R_0', ...)``, every phase in the program, as the ONNX protocol does. Load it with
  ``load_program(path)`` (which registers the project's ops first).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from typing import Any

import torch

from backends.flex_rettention import compile_options
import backends.triton.rettention  # noqa: F401 - defines torch.ops.rewriter.rettention_*
from backends.triton.crms_norm import crms_norm_op, rms_norm_op
from backends.triton.shiftadd import shiftadd_linear_op
from passes.rettention_runtime import MODULE_NAME, RettentionState, export_step_program

log = logging.getLogger(__name__)


def _register_ops() -> None:
    """Define the project's Triton-backed ops (on first use: defining them loads the
    Inductor, seconds that a run without them should not pay)."""
    crms_norm_op()
    rms_norm_op()
    shiftadd_linear_op()


def compile_module(module: torch.nn.Module, device: str | torch.device | None = None):
    """``torch.compile(module)`` with the project's Inductor options (module doc)."""
    _register_ops()
    if device is None:
        p = next(iter(module.parameters()), None)
        device = p.device if p is not None else "cpu"
    return torch.compile(module, dynamic=False, options=compile_options(device))


def graph_breaks(module: torch.nn.Module, args: Sequence[Any]) -> dict[str, Any]:
    """``{graphs, graph_breaks, reasons}`` of Dynamo's trace of ``module(*args)``."""
    _register_ops()
    torch._dynamo.reset()
    ex = torch._dynamo.explain(module)(*args)
    torch._dynamo.reset()
    return {"graphs": int(ex.graph_count), "graph_breaks": int(ex.graph_break_count),
            "reasons": [str(getattr(r, "reason", r)) for r in ex.break_reasons]}


def has_rettention(module: torch.nn.Module) -> bool:
    return isinstance(getattr(module, MODULE_NAME, None), RettentionState)


def export_program(module: torch.nn.Module, args: Sequence[Any]):
    """The ``torch.export`` program of ``module`` (a step program for Re-ttention)."""
    _register_ops()
    if has_rettention(module):
        return export_step_program(module, tuple(args))
    return torch.export.export(module, tuple(args))


def load_program(path: str | os.PathLike):
    """``torch.export.load`` after registering the project's ops."""
    _register_ops()
    return torch.export.load(str(path))
