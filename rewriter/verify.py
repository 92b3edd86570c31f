"""Verification: run the original and the rewritten model on the same inputs and compare.

Inputs are the user's ``--inputs FILE.npz`` or seeded random tensors drawn from the model's
input signature: floats from N(0, 1); integer inputs read by a constant-table ``Gather`` /
``embedding`` (token ids) uniformly in ``[0, rows)``, other integers in ``[0, 2)``. Dynamic
dims come from ``--shape NAME=D0,D1,...``; a dim still unknown defaults to
``DEFAULT_DYNAMIC_DIM`` and the report says so.

The error measure is per output: ``max|a - b|`` and ``max|a - b| / max|a|``. Exact passes
must stay within ``tolerance(dtype)``.

An ONNX model holding bfloat16 is run through its float32 shadow (``rewriter.shadow``: ONNX
Runtime on CPU has no bfloat16 kernels for most ops), the original and every rewritten model
alike; outputs come back as bfloat16, so the bfloat16 tolerance applies, and ``compare``
marks the record (``"shadow": "float32"`` and a note).
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping
from typing import Any

import ml_dtypes
import numpy as np
import torch

from rewriter.errors import BadInput
from rewriter.ir.dtypes import to_numpy, to_torch
from rewriter.ir.fx_view import FxView
from rewriter.ir.onnx_view import OnnxView
from rewriter.ir.view import GraphView

log = logging.getLogger(__name__)

DEFAULT_DYNAMIC_DIM = 2
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


def make_inputs(specs: list[InputSpec], shapes: Mapping[str, list[int]] | None = None, *,
                seed: int = 0) -> tuple[dict[str, np.ndarray], list[str]]:
    """Seeded random inputs; returns (feeds, notes about defaulted dims)."""
    shapes = dict(shapes or {})
    unknown = set(shapes) - {s.name for s in specs}
    if unknown:
        raise BadInput(f"--shape names unknown input(s) {sorted(unknown)}; inputs are {[s.name for s in specs]}")
    rng = np.random.default_rng(seed)
    feeds, notes = {}, []
    for s in specs:
        if s.name in shapes:
            shape = shapes[s.name]
            if len(shape) != len(s.shape) or any(isinstance(d, int) and d != g for d, g in zip(s.shape, shape)):
                raise BadInput(f"--shape {s.name}={','.join(map(str, shape))} does not fit the input's shape {s.shape}")
        else:
            shape = []
            for d in s.shape:
                if isinstance(d, int):
                    shape.append(d)
                else:
                    shape.append(DEFAULT_DYNAMIC_DIM)
                    notes.append(f"{s.name}: dynamic dim {d or '?'} set to {DEFAULT_DYNAMIC_DIM} (use --shape)")
        if np.issubdtype(s.dtype, np.integer):
            feeds[s.name] = rng.integers(0, s.int_high or 2, size=shape).astype(s.dtype)
        elif s.dtype == np.bool_:
            feeds[s.name] = rng.integers(0, 2, size=shape).astype(bool)
        else:
            feeds[s.name] = rng.standard_normal(shape).astype(s.dtype)
    return feeds, notes


def _read_npz(path: str, flag: str) -> dict[str, np.ndarray]:
    """The arrays of a ``.npz`` file (never unpickled); unreadable -> BadInput naming ``--flag``."""
    try:
        with np.load(path, allow_pickle=False) as data:
            feeds = {k: data[k] for k in data.files}
    except FileNotFoundError:
        raise BadInput(f"--{flag} {path}: no such file") from None
    except Exception as err:  # noqa: BLE001
        raise BadInput(f"--{flag} {path}: not a readable .npz file ({type(err).__name__})") from None
    return feeds


def load_inputs(path: str, specs: list[InputSpec]) -> dict[str, np.ndarray]:
    """Read ``--inputs FILE.npz`` (no pickle) and check names, ranks and dtypes."""
    feeds = _read_npz(path, "inputs")
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
    """Read ``--calib FILE.npz`` (no pickle): the model's input names and dtypes, samples
    stacked on the first axis; with a static batch, a whole number of batches (at least one)."""
    feeds = _read_npz(path, "calib")
    by_name = {s.name: s for s in specs}
    if set(feeds) != set(by_name):
        raise BadInput(f"--calib {path}: input names {sorted(feeds)} do not match the model's {sorted(by_name)}")
    for name, arr in feeds.items():
        s = by_name[name]
        if arr.dtype != s.dtype:
            raise BadInput(f"--calib {path}: {name} has dtype {arr.dtype}, the model expects {s.dtype}")
        if arr.ndim != len(s.shape) or any(isinstance(d, int) and d != g for d, g in zip(s.shape[1:], arr.shape[1:])):
            raise BadInput(f"--calib {path}: {name} has shape {list(arr.shape)}, the model expects {s.shape} "
                           "(samples stacked on the first axis)")
        batch = s.shape[0] if s.shape else None
        if isinstance(batch, int) and (arr.shape[0] < batch or arr.shape[0] % batch):
            raise BadInput(f"--calib {path}: calibration file too small or ragged: {name} holds "
                           f"{arr.shape[0]} sample(s), the model takes {batch} per run (need a multiple)")
        if arr.size == 0:
            raise BadInput(f"--calib {path}: calibration file too small: {name} is empty")
    return feeds


class Runner:
    """Runs a view on numpy feeds and returns its outputs as named numpy arrays."""

    def __init__(self, view: GraphView):
        self.view = view

    def _onnx_session(self, model=None):
        """ORT session, optimizations off. Models with external data (or > 2 GB) are written
        to a temporary directory first: ORT cannot resolve external files from bytes."""
        import shutil
        import tempfile

        import onnx_ir as ir

        from backends.ort import make_session

        model = self.view.model if model is None else model
        from rewriter.ir.onnx_reader import inline_proto, is_mapped

        inits = model.graph.initializers.values()
        external = any(isinstance(v.const_value, ir.ExternalTensor) and not is_mapped(v.const_value) for v in inits)
        big = sum(v.const_value.nbytes for v in inits if v.const_value is not None) > (1 << 31) - (1 << 24)
        if not (external or big):
            return make_session(inline_proto(model), optimize=False)
        tmp = tempfile.mkdtemp(prefix="rewriter-verify-")
        try:
            path = f"{tmp}/model.onnx"
            ir.save(model.clone(), path, external_data="model.onnx.data")
            return make_session(path, optimize=False)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    def _run_shadow(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """A bfloat16 model through its float32 shadow (``rewriter.shadow``), after checking
        that ORT loads the real model: its types must resolve, and a missing bfloat16 kernel
        is the only error accepted."""
        from backends.ort import run_onnx
        from rewriter import shadow

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
        return shadow.real_outputs(model, run_onnx(session, shadow.shadow_feeds(model, feeds)))

    def __call__(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        if isinstance(self.view, OnnxView):
            from backends.ort import run_onnx
            from rewriter.shadow import holds_bfloat16

            if holds_bfloat16(self.view.model):
                return self._run_shadow(feeds)
            return run_onnx(self._onnx_session(), feeds)
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
    error, the relative Frobenius error and, where it applies, the mean cosine."""
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
    if through:  # a bfloat16 model run through its float32 shadow (rewriter.shadow)
        from rewriter.shadow import NOTE

        result["shadow"] = through
        result["notes"] = [NOTE]
    return result
