"""Load a one-file ``.onnx`` model without copying its weights.

``onnx.load`` copies every weight from the file into the parsed message, and each read of a
tensor through onnx-ir copies it again. For a model of a few hundred MB that is most of
the time a rewrite takes. Here the file is memory-mapped and its protobuf structure walked
just far enough to find each large initializer's ``raw_data`` bytes; the message that is
parsed has those tensors as *external data pointing into the model file itself* (location =
the file's own name, offset and length of the bytes). onnx-ir then reads them lazily as
memory maps of the page cache: no copy until a pass folds them, and unchanged weights are
streamed from the map to the output (``onnx_writer``).

The walk reads only the wire format (tags, varints, lengths) of ModelProto -> GraphProto
-> TensorProto. Anything unexpected returns None, and the caller loads the file the
ordinary way.
"""

from __future__ import annotations

import mmap
import os
import weakref
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir

MIN_TENSOR_BYTES = 1 << 16  # smaller tensors stay inline in the parsed message

_GRAPH = 7  # ModelProto.graph
_INITIALIZER = 5  # GraphProto.initializer
_T_RAW, _T_EXTERNAL, _T_LOCATION = 9, 13, 14  # TensorProto fields
_T_DATA = {4, 5, 6, 7, 10, 11}  # typed data fields: such a tensor is left as it is


def _varint(buf, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        b = buf[pos]
        pos += 1
        result |= (b & 0x7F) << shift
        if not b & 0x80:
            return result, pos
        shift += 7
        if shift > 63:
            raise ValueError("varint too long")


def _enc_varint(n: int) -> bytes:
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        out.append(b | 0x80 if n else b)
        if not n:
            return bytes(out)


def _fields(buf, start: int, end: int):
    """(number, wire type, field start, value start, value end) for each field."""
    pos = start
    while pos < end:
        begin = pos
        tag, pos = _varint(buf, pos)
        number, wire = tag >> 3, tag & 7
        if wire == 0:
            _, pos = _varint(buf, pos)
            yield number, wire, begin, pos, pos
            continue
        if wire == 1:
            vstart, pos = pos, pos + 8
        elif wire == 2:
            length, vstart = _varint(buf, pos)
            pos = vstart + length
        elif wire == 5:
            vstart, pos = pos, pos + 4
        else:
            raise ValueError(f"unsupported wire type {wire}")
        if pos > end:
            raise ValueError("field runs past its message")
        yield number, wire, begin, vstart, pos


def field_header(number: int, length: int) -> bytes:
    """The tag and length of a length-delimited field (wire type 2)."""
    return _enc_varint(number << 3 | 2) + _enc_varint(length)


def _len_field(number: int, payload: bytes) -> bytes:
    return field_header(number, len(payload)) + payload


def _entry(key: str, value: str) -> bytes:
    return _len_field(1, key.encode()) + _len_field(2, value.encode())


def _tensor(buf, start: int, end: int, location: str) -> bytes | None:
    """The TensorProto at ``buf[start:end]`` with its ``raw_data`` replaced by a reference
    into the model file, or None to keep it as it is."""
    raw = None
    for number, _, begin, vstart, vend in _fields(buf, start, end):
        if number in (_T_EXTERNAL, _T_LOCATION) or number in _T_DATA:
            return None
        if number == _T_RAW:
            raw = (begin, vstart, vend)
    if raw is None or raw[2] - raw[1] < MIN_TENSOR_BYTES:
        return None
    begin, vstart, vend = raw
    ref = (_len_field(_T_EXTERNAL, _entry("location", location))
           + _len_field(_T_EXTERNAL, _entry("offset", str(vstart)))
           + _len_field(_T_EXTERNAL, _entry("length", str(vend - vstart)))
           + _enc_varint(_T_LOCATION << 3) + _enc_varint(onnx.TensorProto.EXTERNAL))
    return bytes(buf[start:begin]) + bytes(buf[vend:end]) + ref


def load_mapped(path: str | os.PathLike) -> ir.Model | None:
    """The model at ``path`` with its large inline tensors as references into the file
    itself (see the module doc), or None when the file is not a plain one-file model."""
    path = Path(path)
    with open(path, "rb") as f:
        try:
            mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        except ValueError:  # empty file
            return None
    try:
        buf = memoryview(mm)
        try:
            parts: list[bytes] = []
            graph = None
            for number, wire, begin, vstart, vend in _fields(buf, 0, len(buf)):
                if number == _GRAPH and wire == 2:
                    if graph is not None:
                        return None  # a repeated graph field: merge semantics, leave it to onnx
                    graph = (vstart, vend)
                else:
                    parts.append(bytes(buf[begin:vend]))
            if graph is None:
                return None
            gparts: list[bytes] = []
            mapped = 0
            for number, wire, begin, vstart, vend in _fields(buf, *graph):
                new = _tensor(buf, vstart, vend, path.name) if number == _INITIALIZER and wire == 2 else None
                if new is None:
                    gparts.append(bytes(buf[begin:vend]))
                else:
                    gparts.append(_len_field(_INITIALIZER, new))
                    mapped += 1
            if not mapped:
                return None
            proto = onnx.ModelProto()
            proto.ParseFromString(b"".join(parts) + _len_field(_GRAPH, b"".join(gparts)))
        except (ValueError, IndexError):
            return None
        finally:
            buf.release()
    finally:
        mm.close()
    model = ir.serde.deserialize_model(proto)
    ir.external_data.set_base_dir(model.graph, str(path.parent))
    for v in model.graph.initializers.values():
        if isinstance(v.const_value, ir.ExternalTensor) and v.const_value.location == path.name:
            _MAPPED.add(v.const_value)
    return model


_MAPPED: weakref.WeakSet = weakref.WeakSet()  # the references load_mapped made


def is_mapped(t: ir.TensorProtocol | None) -> bool:
    """Whether ``t`` is a reference ``load_mapped`` made into a one-file model (its bytes
    are inline in that file: the model does not use external data)."""
    return t is not None and t in _MAPPED


def map_array(t: ir.ExternalTensor) -> np.ndarray:
    """An external tensor's values as a private (copy-on-write) memory map of its bytes,
    released with the array: neither onnx-ir's ``numpy()`` (which keeps the whole file
    mapped for the tensor's life, every page read staying resident) nor a copy (fresh
    memory of the weights' size when the pages are already in the page cache). A tensor
    whose bytes are not its array's (packed 4-bit types, big-endian dtypes) or whose file
    is too short goes through ``numpy()``."""
    dt = np.dtype(t.dtype.numpy())
    offset = t.offset or 0
    if (t.size and dt.kind in "fiub" and dt.itemsize * 8 == t.dtype.bitwidth and dt.byteorder in "=<|"
            and os.path.getsize(t.path) >= offset + t.size * dt.itemsize):
        return np.memmap(t.path, dtype=dt, mode="c", offset=offset, shape=tuple(t.shape.numpy()))
    return t.numpy()


def serialize_with(model: ir.Model, replace) -> onnx.ModelProto:
    """``model`` serialized with some initializers' tensors stood in for: ``replace(value)``
    returns the stand-in for ``value.const_value`` or None. The model is left as it was."""
    swapped = []
    try:
        for v in model.graph.initializers.values():
            t = v.const_value
            new = replace(v) if t is not None else None
            if new is not None:
                v.const_value = new
                swapped.append((v, t))
        return ir.serde.serialize_model(model)
    finally:
        for v, t in swapped:
            v.const_value = t


def _in_memory(v: ir.Value) -> ir.Tensor | None:
    """A mapped tensor as an in-memory tensor over its (mapped) values; else None."""
    t = v.const_value
    return ir.Tensor(np.asarray(map_array(t)), dtype=t.dtype, name=t.name) if is_mapped(t) else None


def materialize(model: ir.Model) -> None:
    """Replace every mapped reference in ``model`` by an in-memory tensor (same values)."""
    for v in model.graph.initializers.values():
        t = v.const_value
        if is_mapped(t):
            v.const_value = ir.Tensor(np.array(map_array(t)), dtype=t.dtype, name=t.name)


def inline_proto(model: ir.Model) -> onnx.ModelProto:
    """``model`` as a proto with the mapped tensors inline again (their bytes copied in), for
    consumers that take bytes, such as ONNX Runtime sessions."""
    return serialize_with(model, _in_memory)


def shape_only_proto(model: ir.Model) -> onnx.ModelProto:
    """The model as a proto in which every large in-memory initializer is a reference to
    external data that is never read: shape inference needs shapes, not weights, and
    copying ~GBs of weights into a proto would cost more than the whole rewrite."""
    def stand_in(v: ir.Value) -> ir.TensorProtocol | None:
        t = v.const_value
        if t.nbytes > (1 << 16) and not isinstance(t, ir.ExternalTensor):
            return ir.ExternalTensor("__shape_only__", 0, t.nbytes, t.dtype, shape=t.shape, name=v.name, base_dir="")
        return None

    return serialize_with(model, stand_in)
