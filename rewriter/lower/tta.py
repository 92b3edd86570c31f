"""Layer 4, lowering of UnMix-TNS (``passes/unmixtns.py``): a BatchNorm replaced by a stateful
call in each IR.

ONNX: a ``rewriter::UnMixTNS`` function call (``backends/ort/tta.py`` builds the body)
reading the components from the graph inputs ``unmixtns_{i}_mean`` / ``_var`` (their
defaults: the initial components) and writing the updated ones to the outputs
``unmixtns_{i}_mean_out`` / ``_var_out``. FX: a call of the GraphModule's ``unmixtns``
state module (``backends/tta.py``), which keeps the components between calls.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import onnx_ir as ir
import torch

from backends.ort.tta import DOMAIN, UNMIX_NAME, state_names, state_sites, unmix_function
from backends.tta import MODULE_NAME, UnmixTnsState, init_components
from rewriter.ir.onnx_view import OnnxView
from rewriter.ir.view import GraphView, Node


def replace_unmix(view: GraphView, node: Node, name: str, *, gamma: np.ndarray, beta: np.ndarray,
                  mean: np.ndarray, var: np.ndarray, eps: float, k: int, spread: float, tau: float,
                  rho: float) -> tuple[Node | None, Any, int, tuple[str, str] | None]:
    """Replace the BatchNorm ``node`` (frozen statistics ``mean`` / ``var``, affine
    ``gamma`` / ``beta``) by an UnMix-TNS call with ``k`` components. Returns the new
    semantic node, the IR value of its output, the site's state index and, for ONNX, the
    names of its two state outputs."""
    if isinstance(view, OnnxView):
        m0, v0 = init_components(mean, var, k, spread)
        index = state_sites([v.name for v in view.model.graph.inputs])
        consts = {"scale": gamma, "bias": beta, "src_var": var, "params": np.array([eps, tau, rho])}
        call = _emit_onnx(view.model, node.raw[0], consts, m0, v0, index)
        out, state = call.outputs[0], (call.outputs[1].name, call.outputs[2].name)
    else:
        call = _emit_fx(view.gm, node.raw[0], name, gamma, beta, mean, var, eps, k, spread, tau, rho)
        out, index, state = call, call.kwargs["site"], None
    view.invalidate()
    return view.node_of(call), out, index, state


def _emit_onnx(model: ir.Model, bn: ir.Node, consts: Mapping[str, np.ndarray], comp_mean: np.ndarray,
               comp_var: np.ndarray, site: int) -> ir.Node:
    """Replace the BatchNormalization node ``bn`` of ``model`` by a ``rewriter::UnMixTNS`` call
    reading the state inputs of ``site`` and writing its state outputs; returns the call.
    ``consts``: ``Scale``, ``B``, ``SrcVar`` ``[C]`` and ``Params`` ``[3]`` (float32)."""
    g = model.graph
    opset = model.opset_imports.get("", 1)
    key = (DOMAIN, UNMIX_NAME, "")
    if key not in model.functions:
        model.functions[key] = unmix_function(opset)
    model.opset_imports.setdefault(DOMAIN, 1)
    base = bn.name or bn.outputs[0].name or f"bn{site}"
    inits = []
    for k, arr in consts.items():
        v = ir.Value(name=f"{base}.unmix_{k}", const_value=ir.tensor(np.ascontiguousarray(arr, np.float32),
                                                                     name=f"{base}.unmix_{k}"))
        v.shape, v.dtype = ir.Shape(arr.shape), ir.DataType.FLOAT
        g.register_initializer(v)
        inits.append(v)
    m_in, v_in, m_out, v_out = state_names(site)
    kc = list(comp_mean.shape)
    state_in = []
    for name, arr in ((m_in, comp_mean), (v_in, comp_var)):
        v = ir.Value(name=name, type=ir.TensorType(ir.DataType.FLOAT), shape=ir.Shape(kc))
        v.const_value = ir.tensor(np.ascontiguousarray(arr, np.float32), name=name)
        g.inputs.append(v)
        g.register_initializer(v)
        state_in.append(v)
    x, out = bn.inputs[0], bn.outputs[0]
    call = ir.Node(DOMAIN, UNMIX_NAME, [x, *inits[:3], *state_in, inits[3]], num_outputs=3,
                   name=f"{base}_unmixtns")
    y, mo, vo = call.outputs
    y.name, y.type, y.shape = f"{base}_unmixtns_out", out.type, out.shape
    for v, name in ((mo, m_out), (vo, v_out)):
        v.name, v.type, v.shape = name, ir.TensorType(ir.DataType.FLOAT), ir.Shape(kc)
    g.insert_before(bn, [call])
    ir.convenience.replace_all_uses_with(out, y)
    g.remove(bn, safe=True)
    g.outputs.extend([mo, vo])
    return call


def _emit_fx(gm, bn, name: str, weight, bias, mean, var, eps: float, k: int, spread: float, tau: float,
                  rho: float):
    """Replace the ``aten.batch_norm`` node ``bn`` of the GraphModule ``gm`` by a call of the
    ``unmixtns`` state module (added on first use); returns the new node."""
    st = getattr(gm, MODULE_NAME, None)
    if not isinstance(st, UnmixTnsState):
        st = UnmixTnsState()
        gm.add_module(MODULE_NAME, st)
    val = bn.meta.get("val")
    dtype = val.dtype if val is not None and hasattr(val, "dtype") else torch.float32
    site = st.add_site(name, weight, bias, mean, var, eps, k, spread, tau, rho, dtype=dtype)
    g = gm.graph
    with g.inserting_before(bn):
        call = g.call_module(MODULE_NAME, (bn.args[0],), {"site": site})
    call.meta.update({k_: v for k_, v in bn.meta.items() if k_ == "val"})
    bn.replace_all_uses_with(call)
    old = [a for a in bn.all_input_nodes if a.op == "get_attr"]
    g.erase_node(bn)
    for a in old:
        if not a.users:
            g.erase_node(a)
    return call
