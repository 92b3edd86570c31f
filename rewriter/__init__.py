"""rewriter: a verified graph-level rewriting compiler for ONNX and torch models.

>>> import rewriter
>>> result = rewriter.rewrite("model.onnx", passes=["foldnorm"])
>>> result.save("model.foldnorm.onnx")

The package's names are loaded on first use (PEP 562 ``__getattr__``): importing a low
layer such as ``rewriter.errors`` (which ``backends`` does) must not load the whole tool,
or a plugin that imports ``passes.foldnorm`` first would meet a half-initialised
``backends.ort`` (docs/architecture.md).
"""

from __future__ import annotations

import importlib
import importlib.util

from rewriter.errors import BadInput, NothingApplied, RewriterError, VerificationFailed

_LAZY = {
    "Result": "rewriter.api", "rewrite": "rewriter.api",
    "Kind": "rewriter.pass_api", "Pass": "rewriter.pass_api", "Site": "rewriter.pass_api",
    "all_passes": "rewriter.pass_api", "register": "rewriter.pass_api",
}

__all__ = [
    "BadInput", "Kind", "NothingApplied", "Pass", "Result", "RewriterError", "Site",
    "VerificationFailed", "all_passes", "register", "rewrite",
]


def __getattr__(name: str):
    module = _LAZY.get(name)
    if module is not None:
        value = getattr(importlib.import_module(module), name)
    elif importlib.util.find_spec(f"rewriter.{name}") is not None:
        value = importlib.import_module(f"rewriter.{name}")  # ``rewriter.api`` after ``import rewriter``
    else:
        raise AttributeError(f"module 'rewriter' has no attribute {name!r}")
    globals()[name] = value
    return value
