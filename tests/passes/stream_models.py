"""Models for the residual-stream pass tests, exported once per test session.

``onnx_model(name, opset)`` exports a zoo model (``zoo:NAME``) or a Hugging Face model
(``hf:NAME``, ``tests/passes/hf_models.py``) to ONNX and returns a fresh ``onnx_ir``
model; ``torch_model(name)`` returns ``(module, example_inputs)``.
"""

from __future__ import annotations

import functools
import tempfile
from pathlib import Path

import onnx_ir as ir

_DIR = Path(tempfile.mkdtemp(prefix="rewriter-stream-tests-"))


def torch_model(name: str):
    kind, _, key = name.partition(":")
    if kind == "zoo":
        import models_zoo

        return models_zoo.build(key)
    from tests.passes import hf_models

    return hf_models.MODELS[key]()


@functools.lru_cache(maxsize=None)
def _export(name: str, opset: int) -> Path:
    from rewriter.torch_export import export_to_onnx

    module, inputs = torch_model(name)
    path = _DIR / f"{name.replace(':', '_')}_{opset}.onnx"
    export_to_onnx(module, inputs, path, opset=opset)
    return path


def onnx_model(name: str, opset: int = 18) -> ir.Model:
    return ir.load(_export(name, opset))
