"""The torch.fx side of recognition: each ATen call as the semantic ``Node`` the passes
see (``FxView`` takes its nodes from ``classify``), and ``canonicalize``, which turns the
leaf modules of a ``symbolic_trace`` graph into ATen calls and norm chains into ATen norms.

Rules (each with its gloss; where it comes from):

* ``linear``: ``aten.linear(x, W, b)`` / ``aten.addmm(b, x, W^T)`` / ``aten.mm(x, W^T)`` with
  constant weights (``torch.export`` of ``nn.Linear``; ``addmm`` / ``mm`` after decompositions);
* ``conv``: ``aten.conv{1,2,3}d``, ``aten.convolution`` when not transposed;
* ``batch_norm``: ``aten.batch_norm`` and the eval-mode ``_native_batch_norm_legit_no_training``
  with its ``getitem(., 0)`` (one node over both);
* ``mul`` / ``add`` / ``sub`` / ``div`` over their run-time operands; ``transpose`` (also
  ``permute``, ``t``); ``layer_norm`` / ``rms_norm`` / ``embedding`` / ``attention`` (SDPA);
  anything else ``other:TARGET``.

Tests: ``tests/canon/test_norms.py`` (FX cases), ``tests/test_core.py``.
"""

from __future__ import annotations

import operator

import torch
import torch.fx as fx

from rewriter.canon.fx_adapter import canonicalize_norms
from rewriter.ir.fx_ops import _BN, _CONV, _ELEMENTWISE, _LINEAR, _SIMPLE, _TRANSPOSE, _target_name, aten
from rewriter.ir.view import Node

target_name = _target_name


def data_args(view, raw: fx.Node) -> list[fx.Node]:
    return [a for a in raw.all_input_nodes if view.const_value(a) is None]


def classify(view, raw: fx.Node, taken: set[int]) -> Node:
    t = raw.target
    if raw.op == "call_function":
        if t in _LINEAR and linear_ok(view, raw):
            x = raw.args[1] if t is aten.addmm.default else raw.args[0]
            return Node("linear", raw.name, [x], raw, [raw])
        if t in _CONV and not (t is aten.convolution.default and raw.args[6]):
            return Node("conv", raw.name, [raw.args[0]], raw, [raw])
        if t in _BN:
            if t is aten._native_batch_norm_legit_no_training.default:
                getters = [u for u in raw.users if u.target is operator.getitem and u.args[1] == 0]
                if len(getters) == 1 and len(raw.users) == 1:
                    taken.add(id(getters[0]))
                    return Node("batch_norm", raw.name, [raw.args[0]], getters[0], [raw, getters[0]])
                return Node("other:batch_norm", raw.name, [raw.args[0]], raw, [raw])
            return Node("batch_norm", raw.name, [raw.args[0]], raw, [raw])
        if t in _ELEMENTWISE:
            return Node(_ELEMENTWISE[t], raw.name, data_args(view, raw), raw, [raw])
        if t in _TRANSPOSE:
            return Node("transpose", raw.name, [raw.args[0]], raw, [raw])
        if t is aten.embedding.default:
            return Node("embedding", raw.name, [raw.args[1]], raw, [raw])
        if t in _SIMPLE:
            return Node(_SIMPLE[t], raw.name, [raw.args[0]], raw, [raw])
    return Node(f"other:{target_name(raw)}", raw.name, data_args(view, raw), raw, [raw])

def linear_ok(view, raw: fx.Node) -> bool:
    t = raw.target
    if t is aten.linear.default:
        return view.const_value(raw.args[1]) is not None and (
            len(raw.args) < 3 or raw.args[2] is None or view.const_value(raw.args[2]) is not None)
    if t is aten.addmm.default:
        if raw.kwargs.get("beta", 1) != 1 or raw.kwargs.get("alpha", 1) != 1:
            return False
        b = view.const_value(raw.args[0])
        return b is not None and b.ndim == 1 and view.const_value(raw.args[2]) is not None
    return view.const_value(raw.args[1]) is not None  # mm


def canonicalize(gm: fx.GraphModule) -> fx.GraphModule:
    """Rewrite leaf-module calls (symbolic_trace graphs) into ATen calls on get_attr params,
    and norm chains into ``aten.layer_norm`` / ``aten.rms_norm`` (``rewriter.canon.fx_adapter``)."""
    g = gm.graph
    for node in list(g.nodes):
        if node.op != "call_module":
            continue
        mod = gm.get_submodule(node.target)
        if isinstance(mod, (torch.nn.Linear, torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Conv3d,
                            torch.nn.modules.batchnorm._BatchNorm, torch.nn.LayerNorm)):
            with g.inserting_before(node):
                def attr(name):
                    t = getattr(mod, name, None)
                    return None if t is None else g.get_attr(f"{node.target}.{name}")
                x = node.args[0]
                if isinstance(mod, torch.nn.Linear):
                    new = g.call_function(aten.linear.default, (x, attr("weight"), attr("bias")))
                elif isinstance(mod, torch.nn.modules.batchnorm._BatchNorm):
                    if mod.training or not mod.track_running_stats:
                        continue
                    new = g.call_function(aten.batch_norm.default, (
                        x, attr("weight"), attr("bias"), attr("running_mean"), attr("running_var"),
                        False, mod.momentum or 0.0, mod.eps, False))
                elif isinstance(mod, torch.nn.LayerNorm):
                    new = g.call_function(aten.layer_norm.default, (
                        x, list(mod.normalized_shape), attr("weight"), attr("bias"), mod.eps))
                else:
                    if mod.padding_mode != "zeros" or isinstance(mod.padding, str):
                        continue
                    fn = {torch.nn.Conv1d: aten.conv1d.default, torch.nn.Conv2d: aten.conv2d.default,
                          torch.nn.Conv3d: aten.conv3d.default}[type(mod)]
                    new = g.call_function(fn, (x, attr("weight"), attr("bias"), list(mod.stride),
                                               list(mod.padding), list(mod.dilation), mod.groups))
            new.meta.update(node.meta)
            node.replace_all_uses_with(new)
            g.erase_node(node)
    g.lint()
    gm.recompile()
    canonicalize_norms(gm)  # norm chains (HF LlamaRMSNorm, decomposed LayerNorm) -> aten norms
    return gm
