"""The ATen op tables of the torch.fx side (layer 0, docs/architecture.md): which targets are
linear layers, convolutions, elementwise ops, reshapes, identities, shape readers; shared by
the FX view, its sibling modules and recognition."""

from __future__ import annotations

import operator

import torch
import torch.fx as fx

aten = torch.ops.aten

_LINEAR = {aten.linear.default, aten.addmm.default, aten.mm.default}
_CONV = {aten.conv1d.default, aten.conv2d.default, aten.conv3d.default, aten.convolution.default}
_BN = {aten.batch_norm.default, aten._native_batch_norm_legit_no_training.default}
_ELEMENTWISE = {
    aten.mul.Tensor: "mul", aten.mul.Scalar: "mul", operator.mul: "mul", torch.mul: "mul",
    aten.add.Tensor: "add", aten.add.Scalar: "add", operator.add: "add", torch.add: "add",
    aten.sub.Tensor: "sub", aten.sub.Scalar: "sub", operator.sub: "sub", torch.sub: "sub",
    aten.div.Tensor: "div", aten.div.Scalar: "div", operator.truediv: "div", torch.div: "div",
}
_TRANSPOSE = {aten.transpose.int, aten.permute.default, aten.t.default}
_SIMPLE = {
    aten.layer_norm.default: "layer_norm",
    aten.rms_norm.default: "rms_norm",
    aten.embedding.default: "embedding",
    aten.scaled_dot_product_attention.default: "attention",
}
_IDENTITY = {aten.clone.default, aten.alias.default, aten.detach.default, aten.contiguous.default,
             aten.lift_fresh_copy.default}
_TO = {aten.to.dtype, aten.to.dtype_layout, aten._to_copy.default, aten.to.device}
_RESHAPE = {aten.view.default, aten.reshape.default, aten._unsafe_view.default}
_RESHAPE_NOTARGET = {aten.flatten.using_ints, aten.unflatten.int, aten.squeeze.dim, aten.squeeze.dims,
                     aten.squeeze.default, aten.unsqueeze.default}
_HARMLESS = {aten._assert_tensor_metadata.default}
_SYM_SIZE = {aten.sym_size.int}
_SHAPE_READERS = {aten.sym_size.int, aten.sym_size.default, aten.sym_numel.default, aten.sym_stride.int,
                  aten.sym_stride.default, aten.sym_storage_offset.default}


def _target_name(node: fx.Node) -> str:
    if node.op == "call_module":
        return node.target
    t = node.target
    return getattr(t, "__name__", str(t)) if not isinstance(t, torch._ops.OpOverload) else str(t)
