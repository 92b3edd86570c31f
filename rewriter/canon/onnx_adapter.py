"""The ONNX side of the canonicalization layer: onnx-ir nodes seen through the abstract
ops of ``rewriter.canon.patterns`` (constants read through the view's constant folding)."""

from __future__ import annotations

from typing import Any

import numpy as np
import onnx_ir as ir

from rewriter.canon.norms import NormAdapter

_OPS = {"Add": "add", "Sub": "sub", "Mul": "mul", "Div": "div", "Pow": "pow", "Sqrt": "sqrt",
        "Reciprocal": "reciprocal", "ReduceMean": "mean_last", "Cast": "cast"}


class OnnxNormAdapter(NormAdapter):
    def __init__(self, view):
        self.view = view

    def nodes(self) -> list[ir.Node]:
        return list(self.view.graph)

    def op(self, raw: ir.Node) -> str | None:
        name = _OPS.get(raw.op_type)
        return None if name is None or raw.domain not in ("", "ai.onnx") else name

    def operands(self, raw: ir.Node) -> list[Any]:
        if raw.op_type == "ReduceMean":
            return [raw.inputs[0]]
        return list(raw.inputs)

    def producer(self, value: Any) -> ir.Node | None:
        return None if value is None else value.producer()

    def const(self, value: Any) -> np.ndarray | None:
        return self.view.const_value(value)

    def check(self, raw: ir.Node, op: str) -> str | None:
        if op == "mean_last":
            x = raw.inputs[0]
            rank = self.view.rank(x)
            if raw.attributes.get_int("keepdims", 1) != 1:
                return f"{raw.name}: keepdims=0"
            if len(raw.inputs) > 1 and raw.inputs[1] is not None:
                c = self.view.const_value(raw.inputs[1])
                if c is None:
                    return f"{raw.name}: its axes are not constant"
                axes = [int(a) for a in c.reshape(-1)]
            else:
                axes = raw.attributes.get_ints("axes", None)
                axes = None if axes is None else list(axes)
            if not axes:
                return f"{raw.name}: a mean over every axis"
            if rank is None:
                return None if axes == [-1] else f"{raw.name}: mean over axes {axes} of a tensor of unknown rank"
            if sorted(a % rank for a in axes) != [rank - 1]:
                return f"{raw.name}: mean over axes {axes}, not the last axis only"
            return None
        if op == "cast":
            src, dst = raw.inputs[0].dtype, raw.outputs[0].dtype
            if src is None or dst is None or not src.is_floating_point() or not dst.is_floating_point():
                return f"{raw.name}: not a float -> float cast"
            return None
        if op in ("mul", "add", "sub", "div", "pow") and len(raw.inputs) != 2:
            return f"{raw.name}: {len(raw.inputs)} inputs"
        return None

    def readers(self, value: Any) -> list[ir.Node]:
        return [u.node for u in value.uses()]

    def is_output(self, value: Any) -> bool:
        return value.is_graph_output()

    def output(self, raw: ir.Node) -> Any:
        return raw.outputs[0]

    def outputs(self, raw: ir.Node) -> list[Any]:
        return list(raw.outputs)

    def float_kind(self, value: Any) -> tuple[str, int] | None:
        dt = value.dtype if value is not None else None
        if dt is None or not dt.is_floating_point():
            return None
        return dt.name, dt.bitwidth

    def width(self, value: Any) -> int | None:
        s = self.view.shape(value)
        return s[-1] if s else None

    def rank(self, value: Any) -> int | None:
        return self.view.rank(value)
