"""Torch -> ONNX export and torch.export program saving, used by the zoo and the CLI."""

from __future__ import annotations

import contextlib
import io
import logging
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger(__name__)


def export_to_onnx(module: torch.nn.Module, inputs: Sequence[Any], path: str | Path, *,
                   opset: int = 18, input_names: Sequence[str] | None = None) -> Path:
    """Export with the dynamo exporter and ``optimize=False``: norms stay separate nodes,
    as in ONNX files from other exporters. Opset 17 is refused (the exporter emits an
    invalid model there)."""
    if opset < 18:
        raise ValueError("export at opset >= 18 (opset 17 produces an invalid model)")
    path = Path(path)
    sink = io.StringIO()
    with warnings.catch_warnings(), contextlib.redirect_stdout(sink), contextlib.redirect_stderr(sink):
        warnings.simplefilter("ignore")
        logging.getLogger("torch.onnx").setLevel(logging.ERROR)
        prog = torch.onnx.export(module.eval(), tuple(inputs), dynamo=True, optimize=False,
                                 opset_version=opset, input_names=list(input_names) if input_names else None,
                                 verbose=False)
        prog.save(str(path))
    return path
