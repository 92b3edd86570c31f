"""Hostile ONNX files for the loader's tests (issue 21): each builder writes its files into
a folder and returns the model's file name and extra CLI arguments. The base model is a
Gemm + BatchNormalization (``foldnorm`` applies) whose weight ``W`` is 128 KiB, so the
reader maps it from the file (``rewriter.ir.onnx_reader``)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from rewriter.ir.onnx_reader import _enc_varint

N_IN, N_OUT = 128, 256  # W is [256, 128] float32: 128 KiB, over MIN_TENSOR_BYTES


def _init(name, a):
    return numpy_helper.from_array(np.asarray(a, np.float32), name)


def base(seed: int = 0, nodes_extra=(), outputs_extra=()) -> onnx.ModelProto:
    """x [2, 128] -> Gemm(W) -> BatchNormalization -> y [2, 256]."""
    rng = np.random.default_rng(seed)
    inits = [_init("W", rng.standard_normal((N_OUT, N_IN)) / np.sqrt(N_IN)),
             _init("bn.scale", rng.standard_normal(N_OUT) * 0.5 + 1), _init("bn.bias", rng.standard_normal(N_OUT)),
             _init("bn.mean", rng.standard_normal(N_OUT) * 0.5), _init("bn.var", rng.random(N_OUT) + 0.5)]
    nodes = [helper.make_node("Gemm", ["x", "W"], ["h"], transB=1, name="g"),
             helper.make_node("BatchNormalization", ["h", "bn.scale", "bn.bias", "bn.mean", "bn.var"], ["y"],
                              name="bn", epsilon=1e-3), *nodes_extra]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, N_IN])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, N_OUT]), *outputs_extra], inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 18)])
    m.ir_version = 10
    return m


def write(folder: Path, m: onnx.ModelProto, name: str = "m.onnx") -> str:
    (folder / name).write_bytes(m.SerializeToString())
    return name


def external(folder: Path, m: onnx.ModelProto, location: str = "w.data") -> onnx.ModelProto:
    """``m`` with every initializer in ``location`` (written now); returns the proto that
    refers to it (write it with ``write``)."""
    m = onnx.ModelProto.FromString(m.SerializeToString())
    blob = bytearray()
    for t in m.graph.initializer:
        raw = numpy_helper.to_array(t).tobytes()
        t.ClearField("raw_data")
        t.ClearField("float_data")
        t.data_location = TensorProto.EXTERNAL
        for k, v in (("location", location), ("offset", str(len(blob))), ("length", str(len(raw)))):
            t.external_data.add(key=k, value=v)
        blob += raw
    (folder / location).write_bytes(bytes(blob))
    return m


def set_entry(t: TensorProto, key: str, value: str | None) -> None:
    keep = [(e.key, e.value) for e in t.external_data if e.key != key]
    del t.external_data[:]
    for k, v in keep:
        t.external_data.add(key=k, value=v)
    if value is not None:
        t.external_data.add(key=key, value=value)


def W(m: onnx.ModelProto) -> TensorProto:
    return next(t for t in m.graph.initializer if t.name == "W")


def field(number: int, payload: bytes) -> bytes:
    return _enc_varint(number << 3 | 2) + _enc_varint(len(payload)) + payload


def without_graph(m: onnx.ModelProto) -> bytes:
    c = onnx.ModelProto.FromString(m.SerializeToString())
    c.ClearField("graph")
    return c.SerializeToString()


def write_bytes(folder: Path, data: bytes, name: str = "m.onnx") -> str:
    (folder / name).write_bytes(data)
    return name


def stream(extra_nodes=(), extra_outputs=(), chain: int = 0) -> onnx.ModelProto:
    """A one-block residual stream: r0 = x + p; y = r0 + LayerNorm(r0) (through ``chain``
    Identity nodes) @ W."""
    rng = np.random.default_rng(0)
    d = 16
    inits = [_init("s", np.ones(d)), _init("b", np.zeros(d)), _init("p", rng.standard_normal((3, d))),
             _init("Wm", rng.standard_normal((d, d)))]
    nodes = [helper.make_node("Add", ["x", "p"], ["r0"], name="emb"),
             helper.make_node("LayerNormalization", ["r0", "s", "b"], ["n"], name="ln", axis=-1)]
    src = "n"
    for i in range(chain):
        nodes.append(helper.make_node("Identity", [src], [f"i{i}"], name=f"id{i}"))
        src = f"i{i}"
    nodes += [helper.make_node("MatMul", [src, "Wm"], ["m"], name="mm"),
              helper.make_node("Add", ["r0", "m"], ["y"], name="res"), *extra_nodes]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3, d]),
                                       helper.make_tensor_value_info("c", TensorProto.BOOL, [])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3, d]), *extra_outputs], inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 18)])
    m.ir_version = 10
    return m
