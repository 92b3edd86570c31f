"""Constants and shapes of a torch.fx graph, read from the raw IR (layer 0,
docs/architecture.md): what the FX view and the FX recognition adapter both need.

``FxConsts(gm).tensor(node)`` folds a node whose inputs are all constant (parameters,
buffers, and pure ATen calls on them) by running the ATen op once, cached per node;
``shape`` / ``rank`` read the shapes ``torch.export`` (``meta["val"]``) or ``ShapeProp``
(``meta["tensor_meta"]``) recorded."""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import torch
import torch.fx as fx

from rewriter.ir.dtypes import to_numpy

log = logging.getLogger(__name__)

# ops never folded: random, uninitialised, in-place or guard ops
IMPURE_NAMES = ("rand", "normal", "bernoulli", "dropout", "uniform", "empty", "copy_", "_guards")


def attr(gm: torch.nn.Module, target: str) -> Any:
    """The attribute ``a.b.c`` of ``gm``, or None."""
    obj: Any = gm
    for part in target.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            return None
    return obj


def meta_shape(value: Any):
    """The recorded shape of an fx node (symbolic entries kept), or None."""
    if not isinstance(value, fx.Node):
        return None
    val = value.meta.get("val")
    if val is None:
        tm = value.meta.get("tensor_meta")
        return None if tm is None else tm.shape
    return getattr(val, "shape", None)


def shape(value: Any) -> tuple | None:
    """The recorded shape, a symbolic entry as None."""
    s = meta_shape(value)
    if s is None:
        return None
    return tuple(int(d) if isinstance(d, int) or str(d).isdigit() else None for d in s)


def rank(value: Any) -> int | None:
    s = meta_shape(value)
    return None if s is None else len(s)


class FxConsts:
    """Constant folding over one GraphModule (cache cleared by ``clear``)."""

    def __init__(self, gm: fx.GraphModule):
        self.gm = gm
        self._cache: dict[fx.Node, torch.Tensor | None] = {}

    def clear(self) -> None:
        self._cache.clear()

    def value(self, value: Any) -> np.ndarray | None:
        """The constant as numpy (bfloat16 as float32: the same values), or None."""
        t = self.tensor(value)
        return None if t is None else to_numpy(t.float() if t.dtype == torch.bfloat16 else t)

    def tensor(self, value: Any) -> torch.Tensor | None:
        if not isinstance(value, fx.Node):
            return None
        if value in self._cache:
            return self._cache[value]
        self._cache[value] = None
        result = None
        if value.op == "get_attr":
            obj = attr(self.gm, value.target)
            if isinstance(obj, torch.Tensor):
                result = obj
        elif value.op == "call_function" and isinstance(value.target, torch._ops.OpOverload):
            name = str(value.target)
            if value.all_input_nodes and not any(k in name for k in IMPURE_NAMES):
                if all(self.tensor(a) is not None for a in value.all_input_nodes):
                    args, kwargs = fx.node.map_arg((value.args, value.kwargs), self.tensor)
                    try:
                        with torch.no_grad():
                            out = value.target(*args, **kwargs)
                        if isinstance(out, torch.Tensor):
                            result = out
                    except Exception as err:  # noqa: BLE001 - best effort
                        log.debug("could not evaluate %s: %s", value.name, err)
        self._cache[value] = result
        return result
