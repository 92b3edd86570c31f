"""Small reference models, built in code.

Every entry is a factory returning ``(module, example_inputs)`` with the module in eval
mode. ``names()`` lists them, ``build(name)`` builds one, ``export_onnx(name, path)``
exports it (dynamo exporter, ``optimize=False`` so that norms survive as separate nodes,
the way ONNX files from other exporters carry them). The CLI accepts ``zoo:NAME``.
"""

from __future__ import annotations

import dataclasses
import importlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from rewriter.torch_export import export_to_onnx

__all__ = ["ZooEntry", "build", "describe", "export_onnx", "names", "register"]


@dataclasses.dataclass(frozen=True)
class ZooEntry:
    name: str
    summary: str
    factory: Callable[[], tuple[torch.nn.Module, tuple[Any, ...]]]
    trained: bool = False


_REGISTRY: dict[str, ZooEntry] = {}

# Modules that register entries when imported. Later issues add a line here.
_MODULES = (
    "models_zoo.vision",
    "models_zoo.norm_transformers",
    "models_zoo.prenorm",
    "models_zoo.gpt",
    "models_zoo.dit",
    "models_zoo.tta_cnn",
)
_loaded = False


def register(name: str, summary: str, *, trained: bool = False):
    """Decorator: register ``factory() -> (module, example_inputs)`` under ``name``."""

    def deco(factory):
        if name in _REGISTRY:
            raise ValueError(f"zoo model {name!r} registered twice")
        _REGISTRY[name] = ZooEntry(name, summary, factory, trained)
        return factory

    return deco


def _load() -> None:
    global _loaded
    if not _loaded:
        _loaded = True
        for mod in _MODULES:
            importlib.import_module(mod)


def names() -> list[str]:
    _load()
    return sorted(_REGISTRY)


def describe(name: str) -> ZooEntry:
    _load()
    try:
        return _REGISTRY[name]
    except KeyError:
        raise KeyError(
            f"unknown zoo model {name!r}; known: {', '.join(sorted(_REGISTRY))}"
        ) from None


def build(name: str) -> tuple[torch.nn.Module, tuple[Any, ...]]:
    """Build zoo model ``name``: ``(module in eval mode, example inputs)``."""
    entry = describe(name)
    torch.manual_seed(0)
    module, inputs = entry.factory()
    return module.eval(), tuple(inputs)


def export_onnx(name: str, path: str | Path, *, opset: int = 18) -> Path:
    """Export zoo model ``name`` to ONNX at ``path`` and return the path."""
    module, inputs = build(name)
    return export_to_onnx(module, inputs, path, opset=opset)
