"""Lowering of Re-ttention (layer 4, docs/architecture.md): one attention site, found by
``rewriter/canon/attention.py``, replaced by the Re-ttention op in each IR.

* ONNX: a call of the ``rewriter::Rettention`` function (``backends/ort/rettention.py``)
  on ``(q, k, v, rettention_step, rho, residual)`` plus the state protocol: the step and
  each site's ``rho`` / ``residual`` become graph inputs (empty defaults) and the updated
  state graph outputs.
* FX: ``call_module("rettention", (q, k, v), site=s)`` on the ``RettentionState`` module
  (``passes/rettention_runtime.py``) the GraphModule carries.

The pass (``passes/rettention.py``) calls ``lowering_problem`` while matching and
``lower_rettention`` when applying; it touches neither IR itself."""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import onnx_ir as ir
import torch

from backends.ort import rettention as ort_rt
from backends.rettention_spec import BlockLayout, Schedule
from passes.rettention_runtime import MODULE_NAME, RettentionState, SiteConfig
from rewriter.ir.fx_view import FxView
from rewriter.ir.onnx_view import PROVENANCE_PASS, PROVENANCE_REPLACED, OnnxView
from rewriter.ir.view import GraphView

log = logging.getLogger(__name__)


def lower_rettention(view: GraphView, s: Any, layout: BlockLayout, schedule: Schedule) -> None:
    """Replace the attention site ``s`` (an ``AttentionSite``) by Re-ttention with ``layout``
    and ``schedule``."""
    if isinstance(view, OnnxView):
        _lower_onnx(view, s, layout, schedule)
    else:
        _lower_fx(view, s, layout, schedule)


def lowering_problem(view: GraphView, s: Any) -> str:
    """Why the site cannot be lowered in ``view``'s IR (opset, dtype), or ``""``."""
    if isinstance(view, OnnxView):
        if view.opset < ort_rt.MIN_OPSET:
            return (f"{s.name}: the model's opset {view.opset} is below {ort_rt.MIN_OPSET} (the function body "
                    f"needs {ort_rt.MIN_OPSET}: convert it with onnx.version_converter)")
        if s.dtype not in (ir.DataType.FLOAT, ir.DataType.FLOAT16, ir.DataType.BFLOAT16):
            return f"{s.name}: attention in {s.dtype} (float32/16 and bfloat16 only)"
    else:
        if s.dtype is not None and not torch.is_floating_point(torch.empty((), dtype=s.dtype)):
            return f"{s.name}: attention in {s.dtype}"
    return ""


# -- ONNX ------------------------------------------------------------------------------------
def _state_value(view: OnnxView, name: str, dims: list, default_shape: list[int], dtype) -> Any:
    v = ir.Value(name=name, type=ir.TensorType(dtype), shape=ir.Shape(dims))
    v.const_value = ir.tensor(np.zeros(default_shape, dtype=dtype.numpy()), name=name)
    view.graph.inputs.append(v)
    view.graph.register_initializer(v)
    return v


def _lower_onnx(view: OnnxView, s: Any, layout: BlockLayout, schedule: Schedule) -> None:
    g = view.graph
    inputs = {v.name: v for v in g.inputs}
    index = ort_rt.protocol_sites(list(inputs))
    step = inputs.get(ort_rt.STEP_INPUT)
    if step is None:
        step = _state_value(view, ort_rt.STEP_INPUT, [], [], ir.DataType.INT64)
    h, n, d = s.heads, s.tokens, s.head_dim
    batch = "rettention_batch"
    rho_in, res_in, rho_out, res_out = ort_rt.state_names(index)
    rho = _state_value(view, rho_in, [batch, h, n], [0, h, n], ir.DataType.FLOAT)
    res = _state_value(view, res_in, [batch, h, n, d], [0, h, n, d], ir.DataType.FLOAT)
    cfg = ort_rt.FunctionConfig(layout, d, float(s.scale), schedule, s.dtype)
    fname = ort_rt.ensure_function(view.model, cfg)
    anchor = s.raw[-1]
    new_nodes = []
    k = s.k
    if s.k_transposed:
        tr = ir.Node("", "Transpose", [k], [ir.AttrInt64s("perm", [0, 1, 3, 2])], name=f"{s.name}_rettention_k")
        tr.outputs[0].name = f"{s.name}_rettention_k"
        tr.outputs[0].dtype = k.dtype
        new_nodes.append(tr)
        k = tr.outputs[0]
    call = ir.Node(ort_rt.DOMAIN, fname, [s.q, k, s.v, step, rho, res], num_outputs=3, name=f"{s.name}_rettention")
    o, ro, rr = call.outputs
    o.name = f"{s.name}_rettention_out"
    o.type, o.shape = s.out.type, s.out.shape
    ro.name, ro.type, ro.shape = rho_out, ir.TensorType(ir.DataType.FLOAT), ir.Shape([batch, h, n])
    rr.name, rr.type, rr.shape = res_out, ir.TensorType(ir.DataType.FLOAT), ir.Shape([batch, h, n, d])
    new_nodes.append(call)
    g.insert_before(anchor, new_nodes)
    view.replace_uses(s.out, o)
    g.remove(list(s.raw), safe=True)
    g.outputs.extend([ro, rr])
    replaced = ",".join(r.name or r.op_type for r in s.raw)
    for nd in new_nodes:
        nd.metadata_props[PROVENANCE_PASS] = "rettention"
        nd.metadata_props[PROVENANCE_REPLACED] = replaced
    log.debug("rettention: %s -> %s (site %d)", s.name, fname, index)


# -- FX --------------------------------------------------------------------------------------
def _lower_fx(view: FxView, s: Any, layout: BlockLayout, schedule: Schedule) -> None:
    gm, g = view.gm, view.graph
    state = getattr(gm, MODULE_NAME, None)
    if not isinstance(state, RettentionState):
        state = RettentionState()
        gm.add_module(MODULE_NAME, state)
    index = state.add_site(SiteConfig(s.name, layout, float(s.scale), schedule,
                                      heads=int(s.heads or 0), head_dim=int(s.head_dim or 0)))
    anchor = s.out
    with g.inserting_before(anchor):
        k = s.k
        if s.k_transposed:
            k = g.call_function(torch.ops.aten.transpose.int, (k, -2, -1))
            kv = s.k.meta.get("val") if hasattr(s.k, "meta") else None
            if kv is not None:
                k.meta["val"] = kv.transpose(-2, -1)
        node = g.call_module(MODULE_NAME, (s.q, k, s.v), {"site": index})
    if "val" in anchor.meta:
        node.meta["val"] = anchor.meta["val"]
    replaced = [r.name for r in s.raw]
    node.meta["rewriter"] = {"pass": "rettention", "replaced": replaced}
    if k is not s.k:
        k.meta["rewriter"] = {"pass": "rettention", "replaced": replaced}
    anchor.replace_all_uses_with(node)
    for r in reversed(s.raw):
        if not r.users:
            g.erase_node(r)
    log.debug("rettention: %s -> site %d", s.name, index)
