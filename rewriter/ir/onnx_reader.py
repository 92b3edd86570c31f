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
-> TensorProto, as strictly as protobuf does (varints of at most 10 bytes, tags and lengths
of 32 bits, every field inside its message). Anything unexpected returns None, and the
caller loads the file the ordinary way (protobuf's own parser).

Either way the parsed message is checked before anything is built from it (``check_proto``),
with the rules ONNX Runtime applies when it loads the file: each tensor's bytes are exactly
what its dims and type need, from exactly one source; known data types; dims non-negative
and rank bounded; unique names; graph outputs that something produces; external data that
is a regular, unlinked file inside the model's folder, read within its bounds. A file that
breaks a rule is refused (``BadInput``, one line naming the tensor and the rule) before any
tensor is allocated.
"""

from __future__ import annotations

import mmap
import os
import stat
import weakref
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
from google.protobuf.message import DecodeError

from rewriter.errors import BadInput

MIN_TENSOR_BYTES = 1 << 16  # smaller tensors stay inline in the parsed message

_GRAPH = 7  # ModelProto.graph
_INITIALIZER = 5  # GraphProto.initializer
_T_RAW, _T_EXTERNAL, _T_LOCATION = 9, 13, 14  # TensorProto fields
_T_DATA = {4, 5, 6, 7, 10, 11}  # typed data fields: such a tensor is left as it is


def _varint(buf, pos: int, end: int, bits: int = 64) -> tuple[int, int]:
    """The varint at ``pos`` (ending before ``end``, at most 10 bytes, its value below
    ``2**bits``) and the position after it; ValueError otherwise."""
    result = shift = 0
    while True:
        if pos >= end:
            raise ValueError("varint runs past its message")
        b = buf[pos]
        pos += 1
        result |= (b & 0x7F) << shift
        if not b & 0x80:
            if result >> bits or (bits <= 32 and shift > 28):
                raise ValueError("varint out of range")  # a tag or length: 32 bits, 5 bytes
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
        tag, pos = _varint(buf, pos, end, 32)
        number, wire = tag >> 3, tag & 7
        if number == 0:
            raise ValueError("field number 0")
        if wire == 0:
            _, pos = _varint(buf, pos, end)
            yield number, wire, begin, pos, pos
            continue
        if wire == 1:
            vstart, pos = pos, pos + 8
        elif wire == 2:
            length, vstart = _varint(buf, pos, end, 31)
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


def _mapped_proto(path: Path) -> tuple[onnx.ModelProto, set[int]] | None:
    """The file parsed with its large inline tensors as references into itself, and the
    indices (in ``graph.initializer``) of the tensors so referenced; None when the file is
    not a plain one-file model with at least one large inline tensor."""
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
            mapped: set[int] = set()
            index = 0
            for number, wire, begin, vstart, vend in _fields(buf, *graph):
                is_init = number == _INITIALIZER and wire == 2
                new = _tensor(buf, vstart, vend, path.name) if is_init else None
                if new is None:
                    gparts.append(bytes(buf[begin:vend]))
                else:
                    gparts.append(_len_field(_INITIALIZER, new))
                    mapped.add(index)
                index += is_init
            if not mapped:
                return None
            proto = onnx.ModelProto()
            proto.ParseFromString(b"".join(parts) + _len_field(_GRAPH, b"".join(gparts)))
        except (ValueError, IndexError, DecodeError):
            return None
        finally:
            buf.release()
    finally:
        mm.close()
    return proto, mapped


def _build(proto: onnx.ModelProto, path: Path, mapped: set[int]) -> ir.Model:
    files = check_proto(proto, path, mapped)
    names = {proto.graph.initializer[i].name for i in mapped}
    model = ir.serde.deserialize_model(proto)
    ir.external_data.set_base_dir(model.graph, str(path.parent))
    for v in model.graph.initializers.values():
        if v.name in names and isinstance(v.const_value, ir.ExternalTensor):
            _MAPPED.add(v.const_value)
    _FILES[model] = [path.resolve(), *files]
    return model


_FILES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def input_files(model: ir.Model) -> list[Path]:
    """The files a model loaded by this module reads: the model file, then its external
    data files (resolved paths); [] for a model built otherwise."""
    return list(_FILES.get(model, ()))


def load_mapped(path: str | os.PathLike) -> ir.Model | None:
    """The model at ``path`` with its large inline tensors as references into the file
    itself (see the module doc), checked (``check_proto``: BadInput when a rule is
    broken), or None when the file is not a plain one-file model."""
    path = Path(path)
    got = _mapped_proto(path)
    return None if got is None else _build(got[0], path, got[1])


def load_model(path: str | os.PathLike) -> ir.Model:
    """The model at ``path``: large inline weights mapped (``load_mapped``), else parsed by
    protobuf without reading external data; checked like ONNX Runtime checks it
    (``check_proto``) before any tensor is built. BadInput names what is wrong."""
    path = Path(path)
    got = _mapped_proto(path)
    if got is None:
        try:
            proto = onnx.load_model(path, load_external_data=False)
        except Exception as err:  # noqa: BLE001 - protobuf's parse errors
            raise BadInput(f"{path}: not a valid ONNX model ({type(err).__name__}: "
                           f"{_one_line(err) or 'protobuf cannot parse it'})") from None
        got = (proto, set())
    return _build(got[0], path, got[1])


def _one_line(err: BaseException) -> str:
    text = " ".join(str(err).split())
    return text[:200] + ("..." if len(text) > 200 else "")


# -- the rules ONNX Runtime applies on load -------------------------------------------------
MAX_RANK = 64  # a tensor or a declared shape of more dims is refused (before anything is built)
_EXTERNAL_KEYS = {"location", "offset", "length", "checksum"}
_T = onnx.TensorProto
_INT32_TYPES = {_T.INT32, _T.INT16, _T.INT8, _T.UINT16, _T.UINT8, _T.BOOL, _T.FLOAT16, _T.BFLOAT16,
                _T.FLOAT8E4M3FN, _T.FLOAT8E4M3FNUZ, _T.FLOAT8E5M2, _T.FLOAT8E5M2FNUZ}
_PACKED_INT32 = {_T.INT4, _T.UINT4, _T.FLOAT4E2M1}  # two values per int32_data entry (0 below)
# typed field -> {data type: values per element}
_TYPED = {
    "float_data": {_T.FLOAT: 1, _T.COMPLEX64: 2},
    "int32_data": {**{d: 1 for d in _INT32_TYPES}, **{d: 0 for d in _PACKED_INT32}},
    "string_data": {_T.STRING: 1},
    "int64_data": {_T.INT64: 1},
    "double_data": {_T.DOUBLE: 1, _T.COMPLEX128: 2},
    "uint64_data": {_T.UINT32: 1, _T.UINT64: 1},
}
_KNOWN_TYPES = {int(d) for d in ir.DataType if d != ir.DataType.UNDEFINED}


def _nbytes(data_type: int, numel: int) -> int:
    bits = ir.DataType(data_type).bitwidth
    return (numel * bits + 7) // 8


class _Files:
    """The external data files of one model, each checked once (``os.lstat``, never opened)."""

    def __init__(self, path: Path):
        self.path = path
        self.base = path.resolve().parent
        self.sizes: dict[str, int] = {}

    def size(self, location: str, where: str) -> int:
        if location in self.sizes:
            return self.sizes[location]
        if not location or "\0" in location:
            raise BadInput(f"{where}: external data location {location!r} is empty or holds a NUL byte")
        if os.path.isabs(location) or location.startswith(("/", "\\")) or (len(location) > 1 and location[1] == ":"):
            raise BadInput(f"{where}: external data location {location!r} is absolute (it must be relative "
                           "to the model's folder)")
        full = self.base / location
        norm = Path(os.path.normpath(full))
        if self.base not in norm.parents:
            raise BadInput(f"{where}: external data location {location!r} lies outside the model's directory")
        try:
            st = os.lstat(norm)
            real = norm.resolve()
        except (OSError, RuntimeError) as err:
            raise BadInput(f"{where}: external data file {location!r} cannot be read "
                           f"({getattr(err, 'strerror', None) or type(err).__name__})") from None
        if stat.S_ISLNK(st.st_mode) or real != norm:
            raise BadInput(f"{where}: external data file {location!r} is a symbolic link (or lies behind one)")
        if not stat.S_ISREG(st.st_mode):
            raise BadInput(f"{where}: external data file {location!r} is not a regular file")
        if st.st_nlink > 1:
            raise BadInput(f"{where}: external data file {location!r} is a hard link ({st.st_nlink} names)")
        self.sizes[location] = st.st_size
        return st.st_size

    def files(self) -> list[Path]:
        return [Path(os.path.normpath(self.base / loc)) for loc in self.sizes]


def _check_tensor(t: onnx.TensorProto, where: str, files: _Files | None) -> None:
    """One tensor against ONNX Runtime's rules; ``files`` None: a reference ``load_mapped``
    made (its bytes are inline in the model file: only their count is checked)."""
    label = f"{where}: tensor {t.name!r}"
    if t.data_type not in _KNOWN_TYPES:
        name = "UNDEFINED" if t.data_type == 0 else str(t.data_type)
        raise BadInput(f"{label}: data type {name} is not a known ONNX tensor type")
    if len(t.dims) > MAX_RANK:
        raise BadInput(f"{label}: {len(t.dims)} dims, over the rank limit of {MAX_RANK}")
    numel = 1
    for d in t.dims:
        if d < 0:
            raise BadInput(f"{label}: negative dim {d} in {list(t.dims)}")
        numel *= d
    if t.HasField("segment"):
        raise BadInput(f"{label}: a segment of a larger tensor (TensorProto.segment is not supported)")
    typed = [f for f in _TYPED if len(getattr(t, f))]
    external = t.data_location == _T.EXTERNAL
    sources = len(typed) + t.HasField("raw_data") + external
    if t.external_data and not external:
        raise BadInput(f"{label}: external_data entries but data_location is not EXTERNAL")
    if sources > 1:
        raise BadInput(f"{label}: more than one data source ({', '.join(typed + ['raw_data'] * t.HasField('raw_data') + ['external'] * external)})")
    if t.data_type == _T.STRING:
        if t.HasField("raw_data") or external:
            raise BadInput(f"{label}: a STRING tensor holds its values in string_data")
        if len(t.string_data) != numel:
            raise BadInput(f"{label}: {len(t.string_data)} strings for dims {list(t.dims)} ({numel} values)")
        return
    if typed:
        field = typed[0]
        per = _TYPED[field].get(t.data_type)
        if per is None:
            raise BadInput(f"{label}: {field} cannot hold data type {ir.DataType(t.data_type).name}")
        want = numel * per if per else (numel + 1) // 2
        if len(getattr(t, field)) != want:
            raise BadInput(f"{label}: {len(getattr(t, field))} values in {field}, dims {list(t.dims)} need {want}")
        return
    need = _nbytes(t.data_type, numel)
    if external:
        entries: dict[str, str] = {}
        for e in t.external_data:
            if e.key not in _EXTERNAL_KEYS:
                raise BadInput(f"{label}: unknown external data key {e.key!r}")
            if e.key in entries:
                raise BadInput(f"{label}: external data key {e.key!r} given twice")
            entries[e.key] = e.value
        if "location" not in entries:
            raise BadInput(f"{label}: external data without a location")
        for key in ("offset", "length"):
            if key in entries and not (entries[key].isascii() and entries[key].isdigit()):
                raise BadInput(f"{label}: external data {key} {entries[key]!r} is not a non-negative integer")
        offset = int(entries.get("offset", "0"))
        length = int(entries.get("length", need))
        if files is None and length != need:  # load_mapped's reference to inline raw_data
            raise BadInput(f"{label}: {length} bytes of raw_data, dims {list(t.dims)} of "
                           f"{ir.DataType(t.data_type).name} need {need}")
        if length != need:
            raise BadInput(f"{label}: external data length {length} bytes, dims {list(t.dims)} of "
                           f"{ir.DataType(t.data_type).name} need {need}")
        if files is not None:
            size = files.size(entries["location"], label)
            if offset + length > size:
                raise BadInput(f"{label}: external data {entries['location']!r} offset {offset} + length "
                               f"{length} runs past the file's end ({size} bytes)")
        return
    have = len(t.raw_data) if t.HasField("raw_data") else 0
    if have != need:
        raise BadInput(f"{label}: {have} bytes of raw_data, dims {list(t.dims)} of "
                       f"{ir.DataType(t.data_type).name} need {need}")


def _check_type(tp: onnx.TypeProto, label: str) -> None:
    if tp.HasField("tensor_type") and tp.tensor_type.HasField("shape"):
        rank = len(tp.tensor_type.shape.dim)
        if rank > MAX_RANK:
            raise BadInput(f"{label}: a declared shape of {rank} dims, over the rank limit of {MAX_RANK}")
        for d in tp.tensor_type.shape.dim:
            if d.HasField("dim_value") and d.dim_value < 0:
                raise BadInput(f"{label}: negative dim {d.dim_value} in its declared shape")


def check_proto(proto: onnx.ModelProto, path: str | os.PathLike, mapped: set[int] = frozenset()) -> list[Path]:
    """Refuse (BadInput, one line) what ONNX Runtime refuses on load, or would read
    otherwise than this tool: see the module doc. ``mapped``: indices of ``graph.initializer``
    that ``load_mapped`` turned into references into the model file. Iterative (no
    recursion, whatever the nesting). Returns the external data files the model reads."""
    path = Path(path)
    where = str(path)
    files = _Files(path)
    if not proto.HasField("ir_version"):
        raise BadInput(f"{where}: the model has no ir_version (ONNX Runtime requires one)")
    seen_functions = set()
    for f in proto.functions:
        key = (f.domain, f.name, getattr(f, "overload", ""))
        if key in seen_functions:
            raise BadInput(f"{where}: local function {f.domain}::{f.name} is defined twice")
        seen_functions.add(key)
        for node in f.node:
            for a in node.attribute:
                for t in ([a.t] if a.HasField("t") else []) + list(a.tensors):
                    _check_tensor(t, f"{where}: function {f.name!r}", files)
    # (graph, names visible from enclosing scopes, label, is the main graph)
    stack = [(proto.graph, frozenset(), "graph", True)]
    while stack:
        g, outer, glabel, top = stack.pop()
        if len(g.sparse_initializer):
            raise BadInput(f"{where}: {glabel} {g.name!r} has sparse initializers (not supported)")
        local: set[str] = set()
        inputs = set()
        for vi in g.input:
            if vi.name in inputs:
                raise BadInput(f"{where}: {glabel} input {vi.name!r} is declared twice")
            if vi.name in outer:
                raise BadInput(f"{where}: {glabel} input {vi.name!r} shadows a name of an enclosing graph")
            inputs.add(vi.name)
            _check_type(vi.type, f"{where}: input {vi.name!r}")
        local |= inputs
        inits = set()
        for i, t in enumerate(g.initializer):
            if t.name in inits:
                raise BadInput(f"{where}: initializer {t.name!r} is defined twice")
            if t.name in outer:
                raise BadInput(f"{where}: initializer {t.name!r} of a subgraph shadows a name of an enclosing graph")
            inits.add(t.name)
            _check_tensor(t, where, None if top and i in mapped else files)
        local |= inits
        for vi in list(g.output) + list(g.value_info):
            _check_type(vi.type, f"{where}: value {vi.name!r}")
        for node in g.node:
            scope = None
            for a in node.attribute:
                if a.HasField("t"):
                    _check_tensor(a.t, where, files)
                for t in a.tensors:
                    _check_tensor(t, where, files)
                if a.HasField("g") or len(a.graphs):
                    if scope is None:
                        scope = frozenset(outer | local)
                    label = f"subgraph {a.name!r} of node {node.name or node.op_type!r}"
                    for sub in ([a.g] if a.HasField("g") else []) + list(a.graphs):
                        stack.append((sub, scope, label, False))
                if a.HasField("sparse_tensor") or len(a.sparse_tensors):
                    raise BadInput(f"{where}: node {node.name or node.op_type!r} has a sparse tensor "
                                   "attribute (not supported)")
            for o in node.output:
                if not o:
                    continue
                if o in local or o in outer:
                    raise BadInput(f"{where}: tensor {o!r} is defined twice (node {node.name or node.op_type!r} "
                                   "writes a name already taken)")
                local.add(o)
        for vi in g.output:
            if vi.name not in local and vi.name not in outer:
                raise BadInput(f"{where}: {glabel} output {vi.name!r} is produced by no node, input or initializer")
    return files.files()


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
