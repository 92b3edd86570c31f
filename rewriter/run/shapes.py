"""Concrete shapes for the analysis where the file's are symbolic.

Exporters write symbolic dims (``batch``, ``height``, or nameless ``unk__17`` after ONNX
shape inference gives up on a ``Shape -> Gather -> Concat -> Reshape`` chain), so a pass
that needs a size (``rettention``: heads, tokens, head width) cannot see it. Given the
concrete shapes of some inputs (``--shape NAME=D0,...`` or the arrays of ``--inputs``),
``specialise`` binds the inputs' symbols to them, runs symbolic shape inference over the
whole graph and records the shapes it resolves as *hints* on the view: ``OnnxView.shape``
fills a symbolic dim from its hint. The model itself is not touched: its inputs, outputs
and ``value_info`` keep their symbolic dims, so the written file keeps its dynamic
signature, and the report lists the dims that were assumed (``assumed_shapes``). A pass
that bakes a size into the graph says so in its site reason (``rettention``).

Measured on diffusers DiT / PixArt (tiny configs, TorchScript exporter, opset 17, fixed
and dynamic axes): onnxruntime's ``SymbolicShapeInference`` resolves 100 % of the values
(308/308, 378/378, 379/379, 579/579; 0.1-0.2 s); ``onnx.shape_inference`` with
``data_prop`` 82-89 % (the attention scores stay ``[2, 2, unk, unk]`` with dynamic axes);
onnxscript's ``fold_constants`` 26-35 %. So onnxruntime's is used, and onnx's (with
``data_prop``) is the fallback when it fails (unknown ops, onnxruntime absent).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

import onnx

from rewriter.ir.onnx_reader import shape_only_proto
from rewriter.ir.onnx_view import OnnxView

log = logging.getLogger(__name__)


def _dims(vi: onnx.ValueInfoProto) -> tuple | None:
    t = vi.type
    if not t.HasField("tensor_type") or not t.tensor_type.HasField("shape"):
        return None
    return tuple(d.dim_value if d.HasField("dim_value") else None for d in t.tensor_type.shape.dim)


def _infer(proto: onnx.ModelProto) -> onnx.ModelProto:
    """Symbolic shape inference: onnxruntime's, else onnx's with data propagation."""
    try:
        from onnxruntime.tools.symbolic_shape_infer import SymbolicShapeInference

        out = SymbolicShapeInference.infer_shapes(proto, auto_merge=True, guess_output_rank=True)
        if out is not None:
            return out
    except Exception as err:  # noqa: BLE001 - fall back to onnx's inference
        log.info("onnxruntime symbolic shape inference failed (%s: %s); using onnx's", type(err).__name__, err)
    return onnx.shape_inference.infer_shapes(proto, strict_mode=False, data_prop=True)


def bind(view: OnnxView, shapes: Mapping[str, Sequence[int]]) -> tuple[dict[str, list], dict[str, int]]:
    """The graph inputs' shapes with every symbol bound by ``shapes`` replaced by its value
    (``--shape sample=2,4,8,8`` also fixes ``timestep [batch]``), and the symbols."""
    symbols: dict[str, int] = {}
    inputs = [v for v in view.graph.inputs if not v.is_initializer()]
    for v in inputs:
        given = shapes.get(v.name)
        if given is None or v.shape is None or len(v.shape) != len(given):
            continue
        for d, g in zip(v.shape, given):
            if not isinstance(d, int) and d is not None and getattr(d, "value", None):
                symbols.setdefault(str(d), int(g))
    out: dict[str, list] = {}
    for v in inputs:
        if v.name in shapes:
            out[v.name] = [int(g) for g in shapes[v.name]]
        elif v.shape is not None:
            out[v.name] = [d if isinstance(d, int) else symbols.get(str(d)) if d is not None else None for d in v.shape]
    return out, symbols


def _static(v: Any) -> bool:
    return v.shape is not None and all(isinstance(d, int) for d in v.shape)


def resolve_static(view: OnnxView) -> bool:
    """A file whose inputs are all static but some of whose inner shapes onnx's inference
    left open (the TorchScript exporter's ``Shape -> Gather -> Concat -> Reshape`` chains):
    hint the shapes that follow from the inputs. Nothing is assumed, so nothing is reported.
    Called by a pass that needs an inner shape it cannot see (``rettention``), not at load:
    it costs about 0.5 s on a GPT-2-124M export. Returns whether hints were added."""
    if not isinstance(view, OnnxView) or view.shape_hints:
        return False
    inputs = [v for v in view.graph.inputs if not v.is_initializer()]
    if not inputs or not all(_static(v) for v in inputs):
        return False
    if all(_static(o) for n in view.graph for o in n.outputs):
        return False
    return bool(_hints(view, {v.name: list(v.shape) for v in inputs}))


def specialise(view: OnnxView, shapes: Mapping[str, Sequence[int]]) -> dict[str, Any] | None:
    """Hint concrete shapes on ``view`` for the analysis (see the module docstring).

    Returns the report's ``assumed_shapes`` section, or None when nothing was assumed
    (no shapes given, or the inputs were static already: their inner shapes are then
    facts, hinted by ``resolve_static``)."""
    if not shapes or not isinstance(view, OnnxView):
        return None
    concrete, symbols = bind(view, shapes)
    assumed = {}
    for v in view.graph.inputs:
        if v.name in concrete and v.shape is not None and any(not isinstance(d, int) for d in v.shape):
            assumed[v.name] = concrete[v.name]
    if not assumed:
        return None  # static inputs: a pass that needs inner shapes calls resolve_static
    n = _hints(view, concrete)
    if n is None:
        return {"inputs": assumed, "symbols": symbols, "values": 0, "error": "shape inference failed"}
    log.info("specialised %d value shapes from %s", n, assumed)
    return {"inputs": assumed, "symbols": symbols, "values": n}


def _hints(view: OnnxView, concrete: Mapping[str, list]) -> int | None:
    """Infer every value's shape from the inputs' ``concrete`` shapes and store the dims
    that fill symbolic ones in ``view.shape_hints``; returns how many values got one."""
    proto = shape_only_proto(view.model)
    for vi in proto.graph.input:
        dims = concrete.get(vi.name)
        if dims is None or not vi.type.HasField("tensor_type"):
            continue
        for d, value in zip(vi.type.tensor_type.shape.dim, dims):
            if value is not None:
                d.Clear()
                d.dim_value = int(value)
    del proto.graph.value_info[:]  # the file's symbolic value_info would only be merged back in
    try:
        inferred = _infer(proto)
    except Exception as err:  # noqa: BLE001 - no hints, the passes see the file's shapes
        log.warning("shape inference with the given input shapes failed: %s", err)
        return None
    found = {vi.name: _dims(vi) for vi in list(inferred.graph.value_info) + list(inferred.graph.output)
             + list(inferred.graph.input)}
    hints: dict[str, tuple] = {}
    for node in view.graph:
        for v in node.outputs:
            _hint(hints, v, found.get(v.name))
    for v in view.graph.inputs:
        _hint(hints, v, tuple(concrete.get(v.name) or ()) or None)
    view.shape_hints = hints
    return len(hints)


def _hint(hints: dict[str, tuple], v: Any, dims: tuple | None) -> None:
    """Record ``dims`` for ``v`` where they fill a dim the file leaves symbolic."""
    if dims is None or not v.name:
        return
    own = None if v.shape is None else tuple(d if isinstance(d, int) else None for d in v.shape)
    if own is not None and (len(own) != len(dims) or None not in own):
        return
    if own is not None and any(a is not None and b is not None and a != b for a, b in zip(own, dims)):
        return  # inference disagrees with the file: trust the file
    if all(d is None for d in dims):
        return
    hints[v.name] = tuple(dims)
