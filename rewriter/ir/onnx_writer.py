"""Write an ``onnx_ir.Model`` as one ``.onnx`` file, streaming large weights.

``onnx_ir.save`` (like ``onnx.save``) builds the whole ``ModelProto`` in memory, copying
every weight into it, then serializes that into one more ``bytes`` object before writing:
three copies of the weights alive at once. After a rewrite that changes most weights
(``crms`` changes every linear layer) those copies cost more than the rewrite itself.

Protobuf lets a message's fields come in any order, and a length-delimited field is its
tag, its length and its bytes. So the file is written as: the model without its graph,
the graph's header (tag + total length), the graph without its large initializers, then
each large initializer as a ``TensorProto`` header (name, dims, type) followed by its
``raw_data`` field, whose bytes go from the array to the file with no copy. ``onnx.load``
reads the result as the same model (tested against ``onnx_ir.save``); only the order of
the initializers differs.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir

from rewriter.ir.onnx_reader import field_header, is_mapped, map_array, serialize_with

STREAM_BYTES = 1 << 16  # initializers at least this large are streamed

_GRAPH_IN_MODEL = 7  # ModelProto.graph
_INITIALIZER_IN_GRAPH = 5  # GraphProto.initializer
_RAW_DATA_IN_TENSOR = 9  # TensorProto.raw_data


def _stream_array(t: ir.TensorProtocol) -> np.ndarray | None:
    """The tensor's bytes as a C-contiguous little-endian array, when it is an in-memory
    tensor (or one mapped from a one-file model, ``onnx_reader``) of a byte-aligned dtype
    whose ``raw_data`` is exactly its array's bytes."""
    mapped = is_mapped(t)
    if not (isinstance(t, ir.Tensor) or mapped) or t.nbytes < STREAM_BYTES:
        return None
    dtype = t.dtype
    if dtype == ir.DataType.STRING or dtype.bitwidth % 8:
        return None
    a = map_array(t) if mapped else t.numpy()
    if a.dtype.itemsize * 8 != dtype.bitwidth:
        return None
    if a.dtype.byteorder == ">" or (a.dtype.byteorder == "=" and not np.little_endian):
        return None  # raw_data is little-endian: let onnx-ir convert it
    return np.ascontiguousarray(a)


def _tensor_header(name: str, t: ir.TensorProtocol) -> bytes:
    tp = onnx.TensorProto()
    tp.name = name
    tp.dims.extend(int(d) for d in t.shape.numpy())
    tp.data_type = int(t.dtype)
    if t.doc_string:
        tp.doc_string = t.doc_string
    for k, v in t.metadata_props.items():
        tp.metadata_props.add(key=k, value=v)
    return tp.SerializeToString()


def save_single_file(model: ir.Model, path: str | os.PathLike) -> None:
    """Write ``model`` to ``path`` (one file, no external data) with large in-memory
    initializers streamed from their arrays. The model is left as it was."""
    streamed: dict[str, tuple[ir.TensorProtocol, np.ndarray]] = {}
    for v in model.graph.initializers.values():
        t = v.const_value
        a = _stream_array(t) if t is not None else None
        if a is not None:
            streamed[v.name] = (t, a)

    # everything else is serialized: a streamed tensor stands in as a tiny external
    # reference, a mapped one that cannot be streamed (packed 4-bit) is read in, so that
    # nothing is left pointing at the input
    def stand_in(v: ir.Value) -> ir.TensorProtocol | None:
        t = v.const_value
        if v.name in streamed:
            return ir.ExternalTensor("__streamed__", 0, 0, t.dtype, shape=t.shape, name=v.name, base_dir="")
        return ir.Tensor(map_array(t), dtype=t.dtype, name=t.name) if is_mapped(t) else None

    proto = serialize_with(model, stand_in)
    graph = proto.graph
    keep = [tp for tp in graph.initializer if tp.name not in streamed]
    del graph.initializer[:]
    graph.initializer.extend(keep)
    graph_head = graph.SerializeToString()
    proto.ClearField("graph")
    model_head = proto.SerializeToString()

    parts = []  # (tensor field prefix, raw bytes) per streamed initializer
    total = len(graph_head)
    for name, (t, a) in streamed.items():
        head = _tensor_header(name, t) + field_header(_RAW_DATA_IN_TENSOR, a.nbytes)
        msg_len = len(head) + a.nbytes
        prefix = field_header(_INITIALIZER_IN_GRAPH, msg_len) + head
        parts.append((prefix, a))
        total += len(prefix) + a.nbytes
    with open(Path(path), "wb") as f:
        f.write(model_head)
        f.write(field_header(_GRAPH_IN_MODEL, total))
        f.write(graph_head)
        for prefix, a in parts:
            f.write(prefix)
            f.write(memoryview(a.reshape(-1).view(np.uint8)))
