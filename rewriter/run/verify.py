"""Verification: run the original and the rewritten model on the same inputs and compare.

Inputs are the user's ``--inputs FILE.npz`` or seeded random tensors drawn from the model's
input signature: floats from N(0, 1); integer inputs read by a constant-table ``Gather`` /
``embedding`` (token ids) uniformly in ``[0, rows)``, other integers in ``[0, 2)``; inputs
named like masks 0/1 with a prefix of ones in every row; ``position_ids`` as aranges; a KV
cache's ``past_*`` inputs N(0, 1) of one past length, the mask past + current long. Dynamic
dims come from ``--shape NAME=D0,D1,...``, one value per symbol across the inputs; a dim
still unknown defaults to ``DEFAULT_DYNAMIC_DIM`` and the report says so. The total size is
checked against ``--max-input-bytes`` before anything is allocated.

The error measure is per output: ``max|a - b|`` and ``max|a - b| / max|a|``. Exact passes
must stay within ``tolerance(dtype)``.

An ONNX model holding bfloat16 is run through its float32 shadow (``rewriter.run.shadow``: ONNX
Runtime on CPU has no bfloat16 kernels for most ops), the original and every rewritten model
alike; outputs come back as bfloat16, so the bfloat16 tolerance applies, and ``compare``
marks the record (``"shadow": "float32"`` and a note).
"""

from __future__ import annotations

import ast
import dataclasses
import logging
import math
import os
import re
import shutil
import tempfile
import warnings
from collections.abc import Mapping
from typing import Any

import ml_dtypes
import numpy as np
import onnx_ir as ir
import torch.fx as fx
import torch

from backends.ort import run_onnx
from backends.ort import session as ort_session
from rewriter.errors import BadInput
from rewriter.ir.dtypes import to_numpy, to_torch
from rewriter.ir.fx_view import FxView
from rewriter.ir.onnx_reader import inline_proto, is_mapped
from rewriter.ir.onnx_view import OnnxView
from rewriter.ir.view import GraphView
from rewriter.run import shadow
from rewriter.run.shadow import NOTE, holds_bfloat16

log = logging.getLogger(__name__)

DEFAULT_DYNAMIC_DIM = 2
DEFAULT_PAST_LENGTH = 3  # a KV cache's past length, unless --shape gives it
DEFAULT_MAX_INPUT_BYTES = 1 << 30  # verification inputs above this are refused (--max-input-bytes)
_TOL = {"float64": 1e-10, "float32": 1e-5, "float16": 1e-2, "bfloat16": 2e-2}


def tolerance(dtype: Any) -> float:
    """The exactness tolerance (max relative error) for outputs of ``dtype``."""
    name = str(dtype).replace("torch.", "")
    return _TOL.get(name, 1e-5)


@dataclasses.dataclass
class InputSpec:
    name: str
    shape: list[int | str | None]
    dtype: np.dtype
    int_high: int | None = None  # exclusive bound for integer inputs


def input_specs(view: GraphView) -> list[InputSpec]:
    if isinstance(view, OnnxView):
        specs = []
        for v in view.graph.inputs:
            if v.is_initializer():
                continue
            dims = [] if v.shape is None else [d if isinstance(d, int) else (str(d) if d is not None else None) for d in v.shape]
            dtype = v.dtype.numpy() if v.dtype is not None else np.dtype(np.float32)
            high = None
            if np.issubdtype(dtype, np.integer):
                for use in v.uses():
                    n = use.node
                    if n.op_type == "Gather" and use.idx == 1:
                        table = view.const_value(n.inputs[0])
                        if table is not None:
                            axis = n.attributes.get_int("axis", 0)
                            size = table.shape[axis]
                            high = size if high is None else min(high, size)
            specs.append(InputSpec(v.name, dims, dtype, high))
        return specs
    assert isinstance(view, FxView)
    specs = []
    names = [n.name for n in view.graph.nodes if n.op == "placeholder"]
    for name, x in zip(names, view.example_inputs):
        t = torch.as_tensor(x)
        dtype = to_numpy(t).dtype
        high = int(t.max()) + 1 if not t.is_floating_point() and t.numel() else None
        specs.append(InputSpec(name, list(t.shape), dtype, high))
    return specs


def input_role(name: str) -> str | None:
    """What a graph input is for, from its name: ``mask`` (attention / padding masks),
    ``position`` (``position_ids``, ``cache_position``), ``past`` (a KV cache:
    ``past_key_values.*``, ``past_*``, ``past.*``) or None."""
    low = name.lower()
    if "mask" in low:
        return "mask"
    if low.startswith("past") or "past_key" in low or "past_value" in low:
        return "past"
    if "position_id" in low or low in ("positions", "cache_position", "pos_ids"):
        return "position"
    return None


def _is_symbol(dim: Any) -> bool:
    """A dim that is one symbol (``batch``, ``s0``, ``?batch``), not a number or an expression."""
    return isinstance(dim, str) and dim.lstrip("?").isidentifier()


_OPS = {"Add": lambda a, b: a + b, "Sub": lambda a, b: a - b, "Mult": lambda a, b: a * b,
        "FloorDiv": lambda a, b: a // b}


def _eval_dim(expr: str, bound: Mapping[str, int]) -> int | None:
    """A symbolic dim written as arithmetic over other symbols (``s0 + s1``, the dynamo
    exporter's ``past_seq + seq``) evaluated with the bound ones; None when it cannot be."""
    def ev(n):
        if isinstance(n, ast.Constant) and isinstance(n.value, int):
            return n.value
        if isinstance(n, ast.Name):
            return bound[n.id]
        if isinstance(n, ast.BinOp) and type(n.op).__name__ in _OPS:
            return _OPS[type(n.op).__name__](ev(n.left), ev(n.right))
        raise KeyError(expr)

    try:
        value = ev(ast.parse(expr, mode="eval").body)
    except (SyntaxError, KeyError, ZeroDivisionError, ValueError, RecursionError):
        return None
    return value if isinstance(value, int) and value > 0 else None


def _human(n: int) -> str:
    for unit, size in (("TiB", 1 << 40), ("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= size:
            return f"{n / size:.3g} {unit}"
    return f"{n} B"


def parse_bytes(text: str) -> int:
    """``1073741824``, ``512M``, ``4G``, ``1T`` (binary units) -> bytes; BadInput otherwise."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kKmMgGtT]?)(?:i?[bB])?\s*", text or "")
    if not m:
        raise BadInput(f"--max-input-bytes {text!r}: expected a size such as 1073741824, 512M or 4G")
    value = float(m.group(1)) * (1 << {"": 0, "k": 10, "m": 20, "g": 30, "t": 40}[m.group(2).lower()])
    if value < 1:
        raise BadInput(f"--max-input-bytes {text!r}: must be at least 1 byte")
    return int(value)


def check_input_bytes(shapes: Mapping[str, list[int]], dtypes: Mapping[str, np.dtype], max_bytes: int | None,
                      what: str = "verification inputs") -> None:
    """Refuse inputs whose total size exceeds ``max_bytes`` before any of them is allocated."""
    limit = DEFAULT_MAX_INPUT_BYTES if max_bytes is None else max_bytes
    sizes = {n: math.prod(int(d) for d in sh) * np.dtype(dtypes[n]).itemsize for n, sh in shapes.items()}
    total = sum(sizes.values())
    if total > limit:
        big = max(sizes, key=sizes.get)
        raise BadInput(f"{what} would need {_human(total)} ({big} {list(shapes[big])} alone "
                       f"{_human(sizes[big])}), over the {_human(limit)} limit: --max-input-bytes raises it, "
                       "--shape sets dynamic dims, --no-verify skips verification")


def resolve_shapes(specs: list[InputSpec], shapes: Mapping[str, list[int]] | None = None
                   ) -> tuple[dict[str, list[int]], list[str]]:
    """Concrete shapes for every input: ``--shape`` first, then one value per symbolic dim
    across all inputs (so ``input_ids [batch, seq]`` and ``attention_mask [batch, seq]``
    agree). A KV cache's past length gets ``DEFAULT_PAST_LENGTH`` unless given, and a mask
    whose length is its own symbol (or an expression such as ``past + seq``) is past +
    current long. Returns (shapes, notes about defaulted dims)."""
    shapes = dict(shapes or {})
    unknown = set(shapes) - {s.name for s in specs}
    if unknown:
        raise BadInput(f"--shape names unknown input(s) {sorted(unknown)}; inputs are {[s.name for s in specs]}")
    role = {s.name: input_role(s.name) for s in specs}
    # unnamed dynamic dims: axis 0 is the batch everywhere; a cache's other unnamed dim its length
    dims = {s.name: [d if d is not None else ("?batch" if i == 0 else "?past" if role[s.name] == "past" else None)
                     for i, d in enumerate(s.shape)] for s in specs}
    bound: dict[str, int] = {}
    for s in specs:
        if s.name not in shapes:
            continue
        given = shapes[s.name]
        if len(given) != len(s.shape) or any(isinstance(d, int) and d != g for d, g in zip(s.shape, given)):
            raise BadInput(f"--shape {s.name}={','.join(map(str, given))} does not fit the input's shape {s.shape}")
        for d, g in zip(dims[s.name], given):
            if _is_symbol(d) and bound.setdefault(d, g) != g:
                raise BadInput(f"--shape gives the dim {d!r} two values ({bound[d]} and {g})")
    notes: list[str] = []
    plain = {d for s in specs if role[s.name] not in ("past", "mask") for d in dims[s.name] if _is_symbol(d)}
    past = [s for s in specs if role[s.name] == "past"]
    # the cache length: the past inputs' own symbols (not the batch, not shared with the tokens)
    past_len = None
    for s in past:
        for d in dims[s.name]:
            if _is_symbol(d) and d not in plain:
                if d not in bound:
                    bound[d] = DEFAULT_PAST_LENGTH
                    notes.append(f"{s.name}: past length {d.lstrip('?') or '?'} set to {DEFAULT_PAST_LENGTH} (use --shape)")
                past_len = bound[d] if past_len is None else past_len
    # plain symbols default to DEFAULT_DYNAMIC_DIM
    for s in specs:
        if role[s.name] == "mask":
            continue
        for d in dims[s.name]:
            if _is_symbol(d) and d not in bound:
                bound[d] = DEFAULT_DYNAMIC_DIM
                notes.append(f"{s.name}: dynamic dim {d.lstrip('?')} set to {DEFAULT_DYNAMIC_DIM} (use --shape)")
    # the current length: the tokens' last axis (ids) or axis 1 (embeddings)
    current = None
    for s in specs:
        if role[s.name] is None and len(s.shape) >= 2:
            d = dims[s.name][-1 if np.issubdtype(s.dtype, np.integer) else 1]
            current = d if isinstance(d, int) else bound.get(d) if isinstance(d, str) else None
            break
    out: dict[str, list[int]] = {}
    for s in specs:
        if s.name in shapes:
            out[s.name] = list(shapes[s.name])
            continue
        shape = []
        for i, d in enumerate(dims[s.name]):
            if isinstance(d, int):
                shape.append(d)
                continue
            value = None
            if isinstance(d, str):
                value = bound.get(d) if _is_symbol(d) else _eval_dim(d, bound)
            if value is None and role[s.name] == "mask" and i == len(dims[s.name]) - 1 and current is not None:
                value = current + (past_len or 0)  # the mask covers the past and the current tokens
                if isinstance(d, str):
                    bound[d] = value
                notes.append(f"{s.name}: mask length set to {value}"
                             + (f" (past {past_len} + current {current})" if past_len else " (the current length)"))
            if value is None:
                value = DEFAULT_DYNAMIC_DIM
                if isinstance(d, str):
                    bound[d] = value
                notes.append(f"{s.name}: dynamic dim {(d or '?').lstrip('?') or '?'} set to {DEFAULT_DYNAMIC_DIM} "
                             "(use --shape)")
            shape.append(value)
        out[s.name] = shape
    return out, notes


def _mask(rng: np.random.Generator, shape: list[int], dtype: np.dtype) -> np.ndarray:
    """A 0/1 mask: each row (last axis) a prefix of ones, at least half the row long (so
    every row attends somewhere and most of the computation is exercised)."""
    if not shape:
        return np.ones((), dtype=dtype)
    n = shape[-1]
    lengths = rng.integers((n + 1) // 2, n + 1, size=shape[:-1]) if n else np.zeros(shape[:-1], np.int64)
    return (np.arange(n) < lengths[..., None]).astype(dtype)


def make_inputs(specs: list[InputSpec], shapes: Mapping[str, list[int]] | None = None, *,
                seed: int = 0, max_bytes: int | None = None) -> tuple[dict[str, np.ndarray], list[str]]:
    """Seeded inputs for verification; returns (feeds, notes about defaulted dims).

    Floats (and KV-cache ``past_*`` inputs) from N(0, 1); token ids uniform over the rows of
    the table that reads them; masks 0/1 with a prefix of ones per row; ``position_ids``
    ``past, past + 1, ...`` along the last axis. Dims from ``resolve_shapes``; the total is
    checked against ``max_bytes`` (default ``DEFAULT_MAX_INPUT_BYTES``) before allocating."""
    concrete, notes = resolve_shapes(specs, shapes)
    check_input_bytes(concrete, {s.name: s.dtype for s in specs}, max_bytes)
    past_len = 0
    for s in specs:
        if input_role(s.name) == "past" and np.issubdtype(s.dtype, np.floating) and len(s.shape) >= 3:
            past_len = concrete[s.name][-2]  # [..., past, head_dim]
            break
    rng = np.random.default_rng(seed)
    feeds = {}
    for s in specs:
        shape = concrete[s.name]
        role = input_role(s.name)
        if role == "mask":
            feeds[s.name] = _mask(rng, shape, s.dtype)
        elif role == "position" and shape and not np.issubdtype(s.dtype, np.bool_):
            pos = np.arange(past_len, past_len + shape[-1])
            if s.int_high:
                pos = np.minimum(pos, s.int_high - 1)
            feeds[s.name] = np.ascontiguousarray(np.broadcast_to(pos, shape)).astype(s.dtype)
        elif np.issubdtype(s.dtype, np.integer):
            feeds[s.name] = rng.integers(0, s.int_high or 2, size=shape).astype(s.dtype)
        elif s.dtype == np.bool_:
            feeds[s.name] = rng.integers(0, 2, size=shape).astype(bool)
        else:
            feeds[s.name] = rng.standard_normal(shape).astype(s.dtype)
    return feeds, notes


def _npz_headers(data: Any) -> dict[str, tuple[list[int], np.dtype]]:
    """Shape and dtype of each array of an open ``.npz`` from its header alone (arrays
    whose header is not a plain 1.0 / 2.0 ``.npy`` header are left out)."""
    out = {}
    members = set(data.zip.namelist())
    for key in data.files:
        member = key + ".npy" if key + ".npy" in members else key
        try:
            with data.zip.open(member) as f:
                version = np.lib.format.read_magic(f)
                read = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}
                shape, _, dtype = read[version](f)
        except Exception:  # noqa: BLE001 - reading the array itself reports what is wrong
            continue
        out[key] = (list(shape), dtype)
    return out


def _read_npz(path: str, flag: str, max_bytes: int | None = None) -> dict[str, np.ndarray]:
    """The arrays of a ``.npz`` file (never unpickled); unreadable -> BadInput naming ``--flag``.
    With ``max_bytes``, arrays whose total size exceeds it are refused from their headers,
    before any is decompressed."""
    try:
        with np.load(path, allow_pickle=False) as data:
            if max_bytes is not None:
                heads = _npz_headers(data)
                check_input_bytes({k: h[0] for k, h in heads.items()}, {k: h[1] for k, h in heads.items()},
                                  max_bytes, what=f"--{flag} {path}")
            feeds = {k: data[k] for k in data.files}
    except BadInput:
        raise
    except FileNotFoundError:
        raise BadInput(f"--{flag} {path}: no such file") from None
    except Exception as err:  # noqa: BLE001
        raise BadInput(f"--{flag} {path}: not a readable .npz file ({type(err).__name__})") from None
    return feeds


def load_inputs(path: str, specs: list[InputSpec], max_bytes: int | None = None) -> dict[str, np.ndarray]:
    """Read ``--inputs FILE.npz`` (no pickle) and check names, ranks and dtypes (and the
    total size against ``max_bytes``, default ``DEFAULT_MAX_INPUT_BYTES``)."""
    feeds = _read_npz(path, "inputs", DEFAULT_MAX_INPUT_BYTES if max_bytes is None else max_bytes)
    by_name = {s.name: s for s in specs}
    extra = sorted(set(feeds) - set(by_name))
    missing = sorted(set(by_name) - set(feeds))
    if extra or missing:
        raise BadInput(
            f"--inputs {path}: input names do not match the model"
            + (f"; unknown {extra}" if extra else "") + (f"; missing {missing}" if missing else "")
            + f" (model inputs: {sorted(by_name)})")
    for name, arr in feeds.items():
        s = by_name[name]
        if len(arr.shape) != len(s.shape) or any(isinstance(d, int) and d != g for d, g in zip(s.shape, arr.shape)):
            raise BadInput(f"--inputs {path}: {name} has shape {list(arr.shape)}, the model expects {s.shape}")
        if arr.dtype != s.dtype:
            conv = _bfloat16_feed(arr, s)
            if conv is None:
                raise BadInput(f"--inputs {path}: {name} has dtype {arr.dtype}, the model expects {s.dtype}"
                               + (" (or float32)" if s.dtype.name == "bfloat16" else ""))
            feeds[name] = conv
    return feeds


def _bfloat16_feed(arr: np.ndarray, spec: InputSpec) -> np.ndarray | None:
    """numpy's .npz has no bfloat16: for a bfloat16 input accept float32 (rounded to
    bfloat16) or the 2-byte raw records ``np.savez`` writes for an ml_dtypes bfloat16 array."""
    if spec.dtype.name != "bfloat16":
        return None
    if arr.dtype == np.float32:
        return arr.astype(spec.dtype)
    if arr.dtype.kind == "V" and arr.dtype.itemsize == 2 and arr.dtype.fields is None:
        return arr.view(spec.dtype)
    return None


def load_calib(path: str, specs: list[InputSpec]) -> dict[str, np.ndarray]:
    """Read ``--calib FILE.npz`` (no pickle) and check it with ``check_calib``."""
    return check_calib(_read_npz(path, "calib"), specs, f"--calib {path}", "calibration file")


def check_calib(feeds: dict[str, Any], specs: list[InputSpec], where: str = "calib",
                what: str = "calibration data") -> dict[str, np.ndarray]:
    """Calibration arrays against the model's inputs: the same names and dtypes, samples
    stacked on the first axis, every other axis the model's where it is static (a torch
    module captured by ``torch.export`` is static in all of them); with a static batch, a
    whole number of batches (at least one). Returns them as numpy arrays; BadInput names
    the first mismatch."""
    by_name = {s.name: s for s in specs}
    if set(feeds) != set(by_name):
        raise BadInput(f"{where}: input names {sorted(feeds)} do not match the model's {sorted(by_name)}")
    out = {}
    for name, value in feeds.items():
        try:
            arr = value if isinstance(value, np.ndarray) else np.asarray(value)
        except (TypeError, ValueError, RuntimeError) as err:
            raise BadInput(f"{where}: {name} cannot be read as an array ({err})") from None
        s = by_name[name]
        if arr.dtype != s.dtype:
            raise BadInput(f"{where}: {name} has dtype {arr.dtype}, the model expects {s.dtype}")
        if arr.ndim != len(s.shape) or any(isinstance(d, int) and d != g for d, g in zip(s.shape[1:], arr.shape[1:])):
            raise BadInput(f"{where}: {name} has shape {list(arr.shape)}, the model expects {s.shape} "
                           "(samples stacked on the first axis)")
        batch = s.shape[0] if s.shape else None
        if isinstance(batch, int) and (arr.shape[0] < batch or arr.shape[0] % batch):
            raise BadInput(f"{where}: {what} too small or ragged: {name} holds "
                           f"{arr.shape[0]} sample(s), the model takes {batch} per run (need a multiple)")
        if arr.size == 0:
            raise BadInput(f"{where}: {what} too small: {name} is empty")
        out[name] = arr
    return out


def original_session(path: str | os.PathLike):
    """An ONNX Runtime session (optimizations off) of the user's file as given: ORT reads the
    path and its side files itself, so the reference is the runtime's own reading, never this
    tool's parse. ORT's own logging is silenced; a file it cannot load is BadInput, one line
    quoting its message."""
    ort = ort_session._ort()
    ort.set_default_logger_severity(4)
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    opts.log_severity_level = 4
    try:
        return ort.InferenceSession(os.fspath(path), opts, providers=ort_session.providers())
    except Exception as err:  # noqa: BLE001 - ORT's load errors
        text = " ".join(str(err).split())
        text = re.sub(r"^\[ONNXRuntimeError\] : \d+ : \w+ : ", "", text)
        if len(text) > 300:
            text = text[:297] + "..."
        raise _NoReference(f"{path}: ONNX Runtime cannot load the file ({type(err).__name__}: {text}), so "
                           "no rewrite can be verified against it (--no-verify rewrites without a reference)",
                           kind=type(err).__name__) from None


class _NoReference(BadInput):
    def __init__(self, message: str, kind: str):
        super().__init__(message)
        self.kind = kind


def reference_outputs(view: GraphView, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The original model's outputs, the reference of verification: for a model read from an
    ONNX file, ONNX Runtime's run of that file as given (``original_session``); a bfloat16
    model, once ORT has loaded the file (a missing bfloat16 kernel is the only error
    accepted), through the float32 shadow of the parse; for a module captured by this tool,
    the module's own forward (``module_reference``); otherwise ``Runner(view)``."""
    if isinstance(view, FxView) and view.source is not None:
        return module_reference(view, feeds)
    path = getattr(view, "path", None)
    if not (isinstance(view, OnnxView) and path is not None and os.path.isfile(path)):
        return Runner(view)(feeds)
    if holds_bfloat16(view.model):
        try:
            original_session(path)
        except _NoReference as err:
            if err.kind != "NotImplemented":
                raise
        return Runner(view)._run_shadow(feeds)
    return run_onnx(original_session(path), feeds)


def module_reference(view: FxView, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The outputs of the user's module itself (not of the graph captured from it), named as
    ``Runner`` names the captured graph's outputs: a capture that misread the module sits on
    one side of the comparison only. The feeds go to the module positionally, in the order
    of the captured graph's inputs; a module whose flattened inputs or outputs do not line
    up with the graph's is BadInput (one line)."""
    names = [n.name for n in view.graph.nodes if n.op == "placeholder"]
    if len(names) != len(view.example_inputs):
        raise BadInput(f"the captured graph takes {len(names)} inputs where the module takes "
                       f"{len(view.example_inputs)}: pass tensors as positional example inputs")
    args = [to_torch(feeds[n]) for n in names]
    with torch.no_grad():
        out = view.source(*args)
    flat = [t for t in torch.utils._pytree.tree_leaves(out) if isinstance(t, torch.Tensor)]
    captured = [n for n in view.graph.nodes if n.op == "output"][0].args[0]
    n_out = len([a for a in torch.utils._pytree.tree_leaves(captured) if isinstance(a, fx.Node)])
    if len(flat) != n_out:
        raise BadInput(f"the module returns {len(flat)} tensors where its captured graph returns {n_out}")
    return {f"output_{i}": to_numpy(t) for i, t in enumerate(flat)}


class Runner:
    """Runs a view on numpy feeds and returns its outputs as named numpy arrays."""

    def __init__(self, view: GraphView):
        self.view = view

    def _onnx_session(self, model=None):
        """ORT session, optimizations off. Models with external data (or > 2 GB) are written
        to a temporary directory first: ORT cannot resolve external files from bytes."""
        model = self.view.model if model is None else model
        inits = model.graph.initializers.values()
        external = any(isinstance(v.const_value, ir.ExternalTensor) and not is_mapped(v.const_value) for v in inits)
        big = sum(v.const_value.nbytes for v in inits if v.const_value is not None) > (1 << 31) - (1 << 24)
        if not (external or big):
            return ort_session.make_session(inline_proto(model), optimize=False)
        tmp = tempfile.mkdtemp(prefix="rewriter-verify-")
        try:
            path = f"{tmp}/model.onnx"
            ir.save(model.clone(), path, external_data="model.onnx.data")
            return ort_session.make_session(path, optimize=False)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    def _run_shadow(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """A bfloat16 model through its float32 shadow (``rewriter.run.shadow``), after checking
        that ORT loads the real model: its types must resolve, and a missing bfloat16 kernel
        is the only error accepted."""
        try:
            self._onnx_session()
        except Exception as err:  # noqa: BLE001
            if type(err).__name__ != "NotImplemented":  # ORT's "no kernel" error class
                raise
        model = self.view.model
        try:
            session = self._onnx_session(shadow.float32_shadow(model))
        except Exception as err:  # noqa: BLE001
            text = str(err).strip().splitlines()
            raise RuntimeError(f"bfloat16 model: its float32 verification shadow does not run either: "
                               f"{type(err).__name__}: {text[0] if text else ''}") from None
        return shadow.real_outputs(model, ort_session.run_onnx(session, shadow.shadow_feeds(model, feeds)))

    def __call__(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        if isinstance(self.view, OnnxView):
            if holds_bfloat16(self.view.model):
                return self._run_shadow(feeds)
            return ort_session.run_onnx(self._onnx_session(), feeds)
        names = [n.name for n in self.view.graph.nodes if n.op == "placeholder"]
        args = [to_torch(feeds[n]) for n in names]
        with torch.no_grad():
            out = self.view.gm(*args)
        flat = torch.utils._pytree.tree_leaves(out)
        # bf16 outputs stay bf16 (as ml_dtypes arrays), so the bfloat16 tolerance applies
        return {f"output_{i}": to_numpy(t) for i, t in enumerate(flat) if isinstance(t, torch.Tensor)}


# --------------------------------------------------------------------------- budgets and metrics


@dataclasses.dataclass(frozen=True)
class Budget:
    """An approximate pass's error budget, stated as a metric a user can reason about.

    ``fro``: relative Frobenius error ``||a - b||_F / ||a||_F`` of each float output <= value.
    ``cos``: mean cosine along the last axis (per token / per embedding row) of each float
    output >= value. ``max``: ``max|a - b| / max|a|`` <= value (the exact passes' measure).
    Written ``fro:0.3``, ``cos:0.98``, ``max:0.5``; a bare number means ``fro``."""

    metric: str
    value: float

    METRICS = ("fro", "cos", "max")

    @classmethod
    def parse(cls, text: str | float, where: str = "budget") -> Budget:
        if isinstance(text, Budget):
            return text
        if isinstance(text, (int, float)):
            return cls("fro", float(text))
        metric, sep, value = str(text).strip().partition(":")
        if not sep:
            metric, value = "fro", metric
        try:
            v = float(value)
        except ValueError:
            v = float("nan")
        if metric not in cls.METRICS or not np.isfinite(v) or v < 0 or (metric == "cos" and v > 1):
            raise BadInput(f"--set {where}={text}: expected fro:X (relative Frobenius error), cos:X "
                           "(mean cosine, 0..1) or max:X (max relative error)")
        return cls(metric, v)

    def ok(self, record: Mapping[str, Any]) -> bool:
        if self.metric == "max":
            return record["max_rel_error"] <= self.value
        if self.metric == "fro":
            return record["rel_fro_error"] <= self.value
        cos = record.get("cosine")
        return cos is None or cos >= self.value  # no cosine (integer / scalar output): not judged

    def __str__(self) -> str:
        return f"{self.metric}{'>=' if self.metric == 'cos' else '<='}{self.value:g}"


def metrics(a64: np.ndarray, b64: np.ndarray) -> dict[str, float]:
    """Relative Frobenius error and (float outputs with a last axis of 2+) mean cosine along
    the last axis."""
    out: dict[str, float] = {}
    norm = float(np.sqrt(np.nansum(a64 * a64)))
    err = float(np.sqrt(np.nansum((a64 - b64) ** 2)))
    out["rel_fro_error"] = err / norm if norm > 0 else err
    if a64.ndim >= 1 and a64.shape[-1] >= 2 and a64.size:
        a2, b2 = a64.reshape(-1, a64.shape[-1]), b64.reshape(-1, a64.shape[-1])
        na, nb = np.linalg.norm(a2, axis=1), np.linalg.norm(b2, axis=1)
        live = (na > 0) & (nb > 0)
        if live.any():
            cos = (a2[live] * b2[live]).sum(1) / (na[live] * nb[live])
            out["cosine"] = float(np.mean(cos))
            out["min_cosine"] = float(np.min(cos))
    return out


def compare(reference: Mapping[str, np.ndarray], actual: Mapping[str, np.ndarray],
            tol: float | Budget | None) -> dict[str, Any]:
    """Per-output errors and the overall verdict (``tol`` None: dtype tolerance; a float:
    max relative error; a ``Budget``: its metric). Every record carries the max relative
    error, the relative Frobenius error and, where it applies, the mean cosine. Silent on
    inf / NaN outputs (numpy's warnings would be stray stderr lines of the CLI)."""
    with np.errstate(all="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return _compare(reference, actual, tol)


def _compare(reference: Mapping[str, np.ndarray], actual: Mapping[str, np.ndarray],
             tol: float | Budget | None) -> dict[str, Any]:
    outputs = []
    worst_abs = worst_rel = 0.0
    passed = True
    for name, a in reference.items():
        if name not in actual:
            outputs.append({"name": name, "error": "missing in the rewritten model"})
            passed = False
            continue
        b = actual[name]
        if a.shape != b.shape:
            outputs.append({"name": name, "error": f"shape {list(b.shape)} instead of {list(a.shape)}"})
            passed = False
            continue
        a64, b64 = a.astype(np.float64), b.astype(np.float64)
        diff = np.abs(a64 - b64)
        nan_mismatch = bool(np.any(np.isnan(a64) != np.isnan(b64)))
        max_abs = float(np.nanmax(diff)) if diff.size else 0.0
        scale = float(np.nanmax(np.abs(a64))) if a64.size else 0.0
        max_rel = float("inf") if nan_mismatch else (max_abs / scale if scale > 0 else max_abs)
        rec = {"name": name, "max_abs_error": max_abs, "max_rel_error": max_rel}
        if isinstance(tol, Budget):
            rec.update(metrics(a64, b64) if not nan_mismatch else {"rel_fro_error": float("inf")})
            rec["budget"] = str(tol)
            rec["tolerance"] = tol.value
            ok = bool(tol.ok(rec))
        else:
            t = tol if tol is not None else tolerance(a.dtype)
            rec["tolerance"] = t
            ok = max_rel <= t
        rec["passed"] = ok
        passed &= ok
        worst_abs, worst_rel = max(worst_abs, max_abs), max(worst_rel, max_rel)
        outputs.append(rec)
    result = {"passed": passed, "max_abs_error": worst_abs, "max_rel_error": worst_rel, "outputs": outputs}
    through = getattr(actual, "shadow", None) or getattr(reference, "shadow", None)
    if through:  # a bfloat16 model run through its float32 shadow (rewriter.run.shadow)
        result["shadow"] = through
        result["notes"] = [NOTE]
    return result
