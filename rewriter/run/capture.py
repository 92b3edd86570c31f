"""Capture: the arrays intermediate values take when a model runs on given inputs (layer 5,
docs/architecture.md); what calibration and the data-aware passes read.

``capture(view, values, feeds)`` runs the ONNX model in ONNX Runtime with the values made
outputs, or the GraphModule through an ``fx.Interpreter`` that records them."""

from __future__ import annotations

from typing import Any

import numpy as np
import onnx_ir as ir
import torch
import torch.fx as fx

from backends.ort import session as ort_session
from rewriter.ir.dtypes import to_torch
from rewriter.ir.fx_view import FxView
from rewriter.ir.onnx_view import OnnxView
from rewriter.ir.view import GraphView, Value
from rewriter.run.verify import Runner


def capture(view: GraphView, values: list[Value], feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    """Run the model on ``feeds`` and return the arrays ``values`` (intermediate tensors
    or graph inputs) take, in order (float32 for bfloat16)."""
    if isinstance(view, OnnxView):
        return _capture_onnx(view, values, feeds)
    return _capture_fx(view, values, feeds)


def _capture_onnx(view: OnnxView, values, feeds) -> list[np.ndarray]:
    model = view.model.clone()
    by_name = {v.name: v for v in model.graph.inputs}
    by_name.update({o.name: o for n in model.graph.all_nodes() for o in n.outputs})
    names = []
    for v in values:
        cv = by_name[v.name]
        names.append(cv.name)
        if cv.is_graph_input() or cv.is_graph_output():
            continue
        if cv.dtype is None:
            cv.dtype = ir.DataType.FLOAT
        model.graph.outputs.append(cv)
    # external data (a dynamo export's .onnx.data) or > 2 GB: the session reads a copy on disk
    sess = Runner(view)._onnx_session(model)
    specs = {i.name: i.shape for i in sess.get_inputs()}
    feeds = {k: np.asarray(v) for k, v in feeds.items() if k in specs}
    # a static batch dim smaller than the data's: run in chunks of it
    static = {specs[k][0] for k in feeds if specs[k] and isinstance(specs[k][0], int)}
    total = {len(v) for v in feeds.values() if v.ndim}
    step = min(static) if static and total and min(static) < min(total) else None
    if step is None:
        chunks = [ort_session.run_onnx(sess, feeds)]
    else:
        n = min(total) // step * step
        chunks = [ort_session.run_onnx(sess, {k: v[i : i + step] for k, v in feeds.items()}) for i in range(0, n, step)]
    return [np.asarray(feeds[n]) if n in specs else np.concatenate([c[n] for c in chunks]) for n in names]


def _capture_fx(view: FxView, values, feeds) -> list[np.ndarray]:
    names = [n.name for n in view.graph.nodes if n.op == "placeholder"]
    args = [to_torch(feeds[n]) for n in names]
    want: dict[fx.Node, Any] = {v: None for v in values}

    class _Recorder(fx.Interpreter):
        def run_node(self, n):
            result = super().run_node(n)
            if n in want:
                want[n] = result.detach().clone()
            return result

    # export specialises the batch dim: run in chunks of the example inputs' batch
    ex = [to_torch(e) for e in view.example_inputs]
    step = min((e.shape[0] for e in ex if e.dim()), default=None)
    total = min((a.shape[0] for a in args if a.dim()), default=None)
    starts = [0] if not step or not total or total <= step else range(0, total // step * step, step)
    got: dict[fx.Node, list] = {v: [] for v in values}
    for i in starts:
        chunk = [a[i : i + step] if step and a.dim() and len(starts) > 1 else a for a in args]
        with torch.no_grad():
            _Recorder(view.gm).run(*chunk)
        for v in values:
            got[v].append(want[v].float() if want[v].dtype == torch.bfloat16 else want[v])
    return [torch.cat(got[v]).numpy() if len(got[v]) > 1 else got[v][0].numpy() for v in values]

