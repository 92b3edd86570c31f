"""Re-ttention in ONNX: the model-local function ``rewriter::Rettention`` (standard ops)
and the state protocol around it.

``Rettention(Q, K, V, step, rho, residual) -> (O, rho_out, residual_out)`` with
``Q, K, V: [B, H, N, Dh]``, ``step``: int64 scalar (0-based denoising step),
``rho: [B, H, N]`` and ``residual: [B, H, N, Dh]`` float32. One function per distinct
configuration (N, Dh, scale, mask, block, schedule): ``Rettention``, ``Rettention_1``, ...;
the configuration is written in its doc string. The body branches on the schedule with
``If`` (``backends/rettention_spec.py``):

* dense (``step < warmup``): ``softmax(scale Q K^T) V``; ``rho``, ``residual`` passed through;
* refresh: the dense branch's own ops (scores, ``Softmax``, ``P V``), so the full scores
  are read once, plus one pass over each query block's window scores: ``rho = Z_M / Z =
  P[i, j*] * sum_W exp(S_W - S_ij*)`` (``j*`` the in-mask key of the largest score) and
  ``R = O - rho * O_M = O - P[i, j*] * exp(S_W - S_ij*) V_W`` (``_window_refresh``). An
  earlier body formed both LSEs from ``max + log(sum exp(S - max))`` over the full scores:
  four more passes over ``N x N`` than ``Softmax`` makes, 10 % slower than the dense step on
  PixArt at N = 4096;
* sparse: ``(rho + lam * k) * O_M + residual`` where ``O_M`` is computed block-sparse:
  ``K`` and ``V`` are cut into blocks of ``Bq`` tokens and ``Gather`` picks the ``2c + 1``
  blocks of each query block's window, so the MatMuls are
  ``[B, H, nb, Bq, Dh] x [B, H, nb, Dh, W]`` (``W = (2c + 1) Bq``): ``O(N W Dh)`` work, not
  ``O(N^2 Dh)`` under a mask. The scale multiplies the blocked ``Q`` right before the
  MatMul and ``K`` is transposed right before it, so ORT fuses both into one FusedMatMul.
  The block index and the band bias are one pair of constants at the top of the function,
  read by the refresh and sparse branches alike.

  Layouts measured against this one (N = 4096, 16 heads of 64, ORT CPU) and not kept: three
  shifted diagonal block products from a padded ``K`` (``Pad``/``Slice``, then ``Concat`` of
  the scores or of the windows, or ``Split`` of the probabilities): the copies cost more
  than the ``Gather`` they replace; blocks of 16, 32 or 128 (less wasted band work but more
  window copies, or bigger products with more waste); opset-23 ``Attention`` on the
  windows (no faster, and it needs opset 23); a ``Scan`` over the (batch, head) pairs that
  keeps each head's windows and scores in cache: up to 15 % faster at 1-2 threads, but
  2-3.5x slower at 16 threads, so the whole-tensor form stays.

Protocol (the pass adds it to the graph): an int64 scalar input ``rettention_step`` and,
per rewritten site ``s`` in graph order, inputs ``rettention_{s}_rho`` /
``rettention_{s}_residual`` and outputs ``rettention_{s}_rho_out`` /
``rettention_{s}_residual_out``. The inputs carry defaults (ONNX initializers under the
input's name: step 0, empty state), so the model runs unchanged, densely, for a caller that
ignores the protocol; a sampler starts from zeros and feeds each step's outputs back
(``RettentionRunner``).
"""

from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Mapping
from typing import Any

import numpy as np
import onnx_ir as ir

from backends.ort import session as ort_session
from backends.rettention_spec import BlockLayout, MaskSpec, Schedule
from rewriter.ir.onnx_reader import inline_proto

log = logging.getLogger(__name__)

DOMAIN = "rewriter"
NAME = "Rettention"
FUNCTION_OPSET = 1
STEP_INPUT = "rettention_step"
CONFIG_KEY = "rewriter.rettention"


def state_names(site: int) -> tuple[str, str, str, str]:
    """``(rho_in, residual_in, rho_out, residual_out)`` of site ``site``."""
    p = f"rettention_{site}"
    return f"{p}_rho", f"{p}_residual", f"{p}_rho_out", f"{p}_residual_out"


@dataclasses.dataclass(frozen=True)
class FunctionConfig:
    """What one ``Rettention`` function is specialised for."""

    layout: BlockLayout
    head_dim: int
    scale: float
    schedule: Schedule
    dtype: ir.DataType = ir.DataType.FLOAT

    def to_json(self) -> str:
        s = self.layout.spec
        return json.dumps({"n": s.n, "kind": s.kind, "half": s.half, "grid": [s.grid_h, s.grid_w],
                           "radius": s.radius, "text": s.text, "frames": s.frames, "tradius": s.tradius,
                           "block": self.layout.block, "head_dim": self.head_dim,
                           "scale": self.scale, "warmup": self.schedule.warmup, "period": self.schedule.period,
                           "lam": self.schedule.lam})

    @staticmethod
    def from_json(text: str) -> FunctionConfig:
        d = json.loads(text)
        spec = MaskSpec(d["kind"], d["n"], half=d["half"], grid_h=d["grid"][0], grid_w=d["grid"][1],
                        radius=d["radius"], text=d.get("text", 0), frames=d.get("frames", 1),
                        tradius=d.get("tradius", -1))
        return FunctionConfig(BlockLayout(spec, d["block"]), d["head_dim"], d["scale"],
                              Schedule(d["warmup"], d["period"], d["lam"]))

    def describe(self) -> str:
        s = self.layout.spec
        return (f"Re-ttention attention: N={s.n}, Dh={self.head_dim}, scale={self.scale:.9g}, "
                f"mask={s.describe()}, block={self.layout.block} (window {self.layout.width} keys), "
                f"warmup={self.schedule.warmup}, period={self.schedule.period}, lam={self.schedule.lam}")


class _Builder:
    """Appends standard-op nodes to a list; ``add`` returns the first output."""

    def __init__(self, prefix: str):
        self.nodes: list[ir.Node] = []
        self.prefix = prefix

    def add(self, op: str, inputs, attrs=(), *, outputs: int = 1):
        n = ir.Node("", op, list(inputs), list(attrs), num_outputs=outputs,
                    name=f"{self.prefix}{op}_{len(self.nodes)}")
        for i, o in enumerate(n.outputs):
            o.name = f"{n.name}_{i}"
        self.nodes.append(n)
        return n.outputs[0] if outputs == 1 else n.outputs

    def const(self, array, name: str | None = None) -> ir.Value:
        arr = np.asarray(array)
        return self.add("Constant", [], [ir.AttrTensor("value", ir.tensor(arr, name=name or f"c{len(self.nodes)}"))])

    def ints(self, values) -> ir.Value:
        return self.const(np.asarray(values, dtype=np.int64))


def _window_consts(bd: _Builder, cfg: FunctionConfig) -> tuple[ir.Value, ir.Value]:
    """The ``[nb, nw]`` block index and the ``[nb, Bq, W]`` additive mask of the layout, made
    once at the top of the function and read by both branches (outer-scope values)."""
    lay = cfg.layout
    return bd.const(lay.block_index(), "block_index"), bd.const(lay.block_bias(), "block_bias")


MIN_OPSET = 13  # Softmax over the last axis only, ReduceSum / Squeeze / Unsqueeze with axes as an input


def _reduce_max(bd: _Builder, s: ir.Value, axes: ir.Value, opset: int) -> ir.Value:
    """``ReduceMax(s, axis=-1, keepdims)``: axes as an input from opset 18, as an attribute before."""
    if opset >= 18:
        return bd.add("ReduceMax", [s, axes], [ir.AttrInt64("keepdims", 1)])
    return bd.add("ReduceMax", [s], [ir.AttrInt64s("axes", [-1]), ir.AttrInt64("keepdims", 1)])


def _blocked_masked(bd: _Builder, q: ir.Value, k: ir.Value, v: ir.Value, cfg: FunctionConfig,
                    idx: ir.Value, bias: ir.Value, *, with_lse: bool, opset: int) -> tuple[ir.Value, ir.Value | None]:
    """``O_M [B,H,N,D]`` (and ``LSE_M [B,H,N,1]``) from the blocked window of each query block."""
    lay, d = cfg.layout, cfg.head_dim
    n, npad, nb, bq = lay.spec.n, lay.padded, lay.nb, lay.block
    q0, k0, v0 = q, k, v
    if npad != n:
        pads = bd.ints([0, 0, 0, 0, 0, 0, npad - n, 0])
        q, k, v = (bd.add("Pad", [t, pads]) for t in (q, k, v))
    qb = bd.add("Reshape", [q, bd.ints([0, 0, nb, bq, d])])
    qb = bd.add("Mul", [qb, bd.const(np.asarray(cfg.scale, dtype=np.float32))])
    blocks = bd.ints([0, 0, nb, bq, d])
    window = bd.ints([0, 0, nb, lay.width, d])
    kw = bd.add("Reshape", [bd.add("Gather", [bd.add("Reshape", [k, blocks]), idx], [ir.AttrInt64("axis", 2)]), window])
    vw = bd.add("Reshape", [bd.add("Gather", [bd.add("Reshape", [v, blocks]), idx], [ir.AttrInt64("axis", 2)]), window])
    kt = bd.add("Transpose", [kw], [ir.AttrInt64s("perm", [0, 1, 2, 4, 3])])
    s = bd.add("Add", [bd.add("MatMul", [qb, kt]), bias])
    lse = None
    if with_lse:
        axes = bd.ints([-1])
        mx = _reduce_max(bd, s, axes, opset)
        e = bd.add("Exp", [bd.add("Sub", [s, mx])])
        z = bd.add("ReduceSum", [e, axes], [ir.AttrInt64("keepdims", 1)])
        o = bd.add("Div", [bd.add("MatMul", [e, vw]), z])
        lse = bd.add("Reshape", [bd.add("Add", [mx, bd.add("Log", [z])]), bd.ints([0, 0, npad, 1])])
    else:
        o = bd.add("MatMul", [bd.add("Softmax", [s], [ir.AttrInt64("axis", -1)]), vw])
    o = bd.add("Reshape", [o, bd.ints([0, 0, npad, d])])
    p = lay.prefix
    if npad != n or p:
        start, end, ax = bd.ints([p]), bd.ints([n]), bd.ints([2])
        o = bd.add("Slice", [o, start, end, ax])
        lse = None if lse is None else bd.add("Slice", [lse, start, end, ax])
    if p:  # joint masks: the text query blocks are dense rows under the prefix bias
        o_p, lse_p = _dense_prefix(bd, q0, k0, v0, cfg, with_lse=with_lse, opset=opset)
        o = bd.add("Concat", [o_p, o], [ir.AttrInt64("axis", 2)])
        lse = None if lse is None else bd.add("Concat", [lse_p, lse], [ir.AttrInt64("axis", 2)])
    return o, lse


def _dense_prefix(bd: _Builder, q, k, v, cfg: FunctionConfig, *, with_lse: bool, opset: int):
    """``(O_M, LSE_M)`` of the first ``P`` query rows (``BlockLayout.prefix``), dense over the
    keys under ``prefix_bias``: ``[B, H, P, N]`` scores."""
    lay = cfg.layout
    qp = bd.add("Slice", [q, bd.ints([0]), bd.ints([lay.prefix]), bd.ints([2])])
    s = bd.add("Add", [_scaled_scores(bd, qp, k, cfg), bd.const(lay.prefix_bias(), "prefix_bias")])
    if not with_lse:
        return bd.add("MatMul", [bd.add("Softmax", [s], [ir.AttrInt64("axis", -1)]), v]), None
    axes = bd.ints([-1])
    mx = _reduce_max(bd, s, axes, opset)
    e = bd.add("Exp", [bd.add("Sub", [s, mx])])
    z = bd.add("ReduceSum", [e, axes], [ir.AttrInt64("keepdims", 1)])
    return bd.add("Div", [bd.add("MatMul", [e, v]), z]), bd.add("Add", [mx, bd.add("Log", [z])])


def _window_refresh(bd: _Builder, q, k, v, p, o_full, cfg: FunctionConfig, idx, bias, opset: int):
    """``(rho [B,H,N], R [B,H,N,D])`` of the refresh from the dense step's probabilities
    ``p = softmax(S)`` and one pass over each query block's window scores ``S_W``.

    With ``j*`` the in-mask key of the largest score (``ArgMax`` of ``S_W``) and
    ``E_W = exp(S_W - S_ij*)`` (every in-mask term <= 1, masked ones 0)::

        rho = Z_M / Z = P[i, j*] * sum_W E_W          (P[i, j*] >= rho / |M_i|: no underflow
        R   = O - rho O_M = O - P[i, j*] * (E_W V_W)   while rho is representable)

    so neither ``LSE`` is formed and the full scores are read once, by the ``Softmax`` the
    dense step runs too; ``P[i, j*]`` is one ``GatherElements`` of ``N`` values."""
    lay, d = cfg.layout, cfg.head_dim
    n, npad, nb, bq, w = lay.spec.n, lay.padded, lay.nb, lay.block, lay.width
    if npad != n:
        pads = bd.ints([0, 0, 0, 0, 0, 0, npad - n, 0])
        q, k, v = (bd.add("Pad", [t, pads]) for t in (q, k, v))
    qb = bd.add("Mul", [bd.add("Reshape", [q, bd.ints([0, 0, nb, bq, d])]),
                        bd.const(np.asarray(cfg.scale, dtype=np.float32))])
    blocks, window = bd.ints([0, 0, nb, bq, d]), bd.ints([0, 0, nb, w, d])
    kw = bd.add("Reshape", [bd.add("Gather", [bd.add("Reshape", [k, blocks]), idx], [ir.AttrInt64("axis", 2)]), window])
    vw = bd.add("Reshape", [bd.add("Gather", [bd.add("Reshape", [v, blocks]), idx], [ir.AttrInt64("axis", 2)]), window])
    kt = bd.add("Transpose", [kw], [ir.AttrInt64s("perm", [0, 1, 2, 4, 3])])
    sw = bd.add("Add", [bd.add("MatMul", [qb, kt]), bias])  # [B, H, nb, Bq, W]
    col = bd.add("ArgMax", [sw], [ir.AttrInt64("axis", -1), ir.AttrInt64("keepdims", 1)])
    mx = bd.add("GatherElements", [sw, col], [ir.AttrInt64("axis", -1)])
    e = bd.add("Exp", [bd.add("Sub", [sw, mx])])
    zw = bd.add("ReduceSum", [e, bd.ints([-1])], [ir.AttrInt64("keepdims", 1)])
    ev = bd.add("MatMul", [e, vw])  # [B, H, nb, Bq, D]
    # the global key of window column col of query block b: key_of[b * W + col]
    key_of = (lay.block_index()[:, :, None] * bq + np.arange(bq)[None, None, :]).reshape(-1).astype(np.int64)
    base = (np.arange(nb, dtype=np.int64) * w).reshape(nb, 1, 1)
    key = bd.add("Gather", [bd.const(key_of, "key_of"), bd.add("Add", [col, bd.const(base, "window_base")])],
                 [ir.AttrInt64("axis", 0)])  # [B, H, nb, Bq, 1]
    key = bd.add("Reshape", [key, bd.ints([0, 0, npad, 1])])
    ev = bd.add("Reshape", [ev, bd.ints([0, 0, npad, d])])
    zw = bd.add("Reshape", [zw, bd.ints([0, 0, npad, 1])])
    if npad != n:
        start, end, ax = bd.ints([0]), bd.ints([n]), bd.ints([2])
        key, ev, zw = (bd.add("Slice", [t, start, end, ax]) for t in (key, ev, zw))
    # P[i, key_i]: GatherElements on p itself (a reshaped p would be copied: MatMul reads it too)
    pj = bd.add("GatherElements", [p, key], [ir.AttrInt64("axis", 3)])  # [B, H, N, 1]
    rho = bd.add("Squeeze", [bd.add("Mul", [pj, zw]), bd.ints([-1])])
    r_new = bd.add("Sub", [o_full, bd.add("Mul", [pj, ev])])
    return rho, r_new


def _scaled_scores(bd: _Builder, q, k, cfg: FunctionConfig):
    qs = bd.add("Mul", [q, bd.const(np.asarray(cfg.scale, dtype=np.float32))])
    kt = bd.add("Transpose", [k], [ir.AttrInt64s("perm", [0, 1, 3, 2])])
    return bd.add("MatMul", [qs, kt])


def _branch(name: str, bd: _Builder, outputs: list[ir.Value], opset: int) -> ir.Graph:
    for i, o in enumerate(outputs):
        o.name = f"{name}_out{i}"
        o.type = ir.TensorType(ir.DataType.FLOAT)
    return ir.Graph([], outputs, nodes=bd.nodes, opset_imports={"": opset}, name=name)


def rettention_function(cfg: FunctionConfig, name: str, opset: int) -> ir.Function:
    """The ``rewriter::<name>`` function for ``cfg`` (body of opset-``opset`` standard ops,
    ``MIN_OPSET`` or later: a function uses the model's opset of the default domain)."""
    q_in, k_in, v_in = ir.Value(name="Q"), ir.Value(name="K"), ir.Value(name="V")
    step, rho, res = ir.Value(name="step"), ir.Value(name="rho"), ir.Value(name="residual")
    top = _Builder("top_")
    q, k, v = q_in, k_in, v_in
    if cfg.dtype != ir.DataType.FLOAT:
        to = ir.AttrInt64("to", ir.DataType.FLOAT.value)
        q, k, v = (top.add("Cast", [t], [to]) for t in (q, k, v))
    sch = cfg.schedule
    warm = top.add("Less", [step, top.ints(sch.warmup)])
    mod = top.add("Mod", [top.add("Sub", [step, top.ints(sch.warmup)]), top.ints(sch.period)])
    is_refresh = top.add("Equal", [mod, top.ints(0)])
    kf = top.add("Cast", [top.add("Sub", [mod, top.ints(1)])], [ir.AttrInt64("to", ir.DataType.FLOAT.value)])
    coef = top.add("Mul", [kf, top.const(np.asarray(sch.lam, dtype=np.float32))])
    idx, bias = _window_consts(top, cfg)

    # dense: softmax(S) V, state unchanged
    bd = _Builder("dense_")
    o = bd.add("MatMul", [bd.add("Softmax", [_scaled_scores(bd, q, k, cfg)], [ir.AttrInt64("axis", -1)]), v])
    dense = _branch("dense", bd, [o, bd.add("Identity", [rho]), bd.add("Identity", [res])], opset)

    # refresh: the dense step's own ops (scores, Softmax, P V) plus one pass over the window
    # scores (module doc): rho = P[i, j*] * sum_W exp(S_W - S_ij*), R = O - P[i, j*] * E_W V_W
    bd = _Builder("refresh_")
    if getattr(cfg.layout, "prefix", 0):
        # a layout with dense prefix rows (rows that no window covers): both LSEs, the in-mask
        # one from _blocked_masked, which computes those rows apart
        s = _scaled_scores(bd, q, k, cfg)
        axes = bd.ints([-1])
        mx = _reduce_max(bd, s, axes, opset)
        e = bd.add("Exp", [bd.add("Sub", [s, mx])])
        z = bd.add("ReduceSum", [e, axes], [ir.AttrInt64("keepdims", 1)])
        o_full = bd.add("Div", [bd.add("MatMul", [e, v]), z])
        lse = bd.add("Add", [mx, bd.add("Log", [z])])
        o_m, lse_m = _blocked_masked(bd, q, k, v, cfg, idx, bias, with_lse=True, opset=opset)
        rho4 = bd.add("Exp", [bd.add("Sub", [lse_m, lse])])
        r_new = bd.add("Sub", [o_full, bd.add("Mul", [rho4, o_m])])
        rho_new = bd.add("Squeeze", [rho4, bd.ints([-1])])
    else:
        p = bd.add("Softmax", [_scaled_scores(bd, q, k, cfg)], [ir.AttrInt64("axis", -1)])
        o_full = bd.add("MatMul", [p, v])
        rho_new, r_new = _window_refresh(bd, q, k, v, p, o_full, cfg, idx, bias, opset)
    refresh = _branch("refresh", bd, [bd.add("Identity", [o_full]), rho_new, r_new], opset)

    # sparse: (rho + lam k) O_M + R
    bd = _Builder("sparse_")
    o_m, _ = _blocked_masked(bd, q, k, v, cfg, idx, bias, with_lse=False, opset=opset)
    gain = bd.add("Add", [bd.add("Unsqueeze", [rho, bd.ints([-1])]), coef])
    o = bd.add("Add", [bd.add("Mul", [gain, o_m]), res])
    sparse = _branch("sparse", bd, [o, bd.add("Identity", [rho]), bd.add("Identity", [res])], opset)

    # the refresh/sparse If lives in the not-warm branch: a dense step does no extra work
    bd = _Builder("warm_")
    inner = bd.add("If", [is_refresh], [ir.AttrGraph("then_branch", refresh), ir.AttrGraph("else_branch", sparse)],
                   outputs=3)
    not_warm = _branch("not_warm", bd, list(inner), opset)
    result = top.add("If", [warm], [ir.AttrGraph("then_branch", dense), ir.AttrGraph("else_branch", not_warm)],
                     outputs=3)
    out = list(result)
    if cfg.dtype != ir.DataType.FLOAT:
        out[0] = top.add("Cast", [out[0]], [ir.AttrInt64("to", cfg.dtype.value)])
    for value, nm in zip(out, ("O", "rho_out", "residual_out")):
        value.name = nm
    graph = ir.Graph([q_in, k_in, v_in, step, rho, res], out, nodes=top.nodes, opset_imports={"": opset}, name=name)
    fn = ir.Function(DOMAIN, name, graph=graph, attributes=[])
    fn.doc_string = cfg.describe()
    fn.metadata_props[CONFIG_KEY] = cfg.to_json()
    return fn


def ensure_function(model: ir.Model, cfg: FunctionConfig) -> str:
    """The name of the ``Rettention`` function for ``cfg`` in ``model``, added if needed."""
    doc = cfg.describe()
    taken = set()
    for (dom, name, _), fn in model.functions.items():
        if dom == DOMAIN and name.startswith(NAME):
            taken.add(name)
            if fn.doc_string == doc and fn.metadata_props.get(CONFIG_KEY) == cfg.to_json():
                return name
    name = NAME
    i = 0
    while name in taken:
        i += 1
        name = f"{NAME}_{i}"
    opset = model.opset_imports.get("", 18)
    model.functions[(DOMAIN, name, "")] = rettention_function(cfg, name, opset)
    model.opset_imports.setdefault(DOMAIN, FUNCTION_OPSET)
    return name


# -- running the protocol --------------------------------------------------------------------
def protocol_sites(input_names: list[str]) -> int:
    """How many rewritten sites a model's inputs declare."""
    n = 0
    while state_names(n)[0] in input_names:
        n += 1
    return n


def site_configs(model: ir.Model) -> list[FunctionConfig]:
    """The configuration of each ``Rettention`` call of a rewritten model, in graph order."""
    out = []
    for node in model.graph.all_nodes():
        if node.domain == DOMAIN and node.op_type.startswith(NAME):
            fn = model.functions[(node.domain, node.op_type, node.overload or "")]
            out.append(FunctionConfig.from_json(fn.metadata_props[CONFIG_KEY]))
    return out


class RettentionRunner:
    """Drives a rewritten ONNX model through a sampling loop: feeds ``rettention_step``
    and each site's state, starting from zeros, and keeps each step's state outputs.

    ``runner(feeds, step)`` returns the model's original outputs; state is kept per
    ``request`` (``reset(request)`` forgets it)."""

    def __init__(self, model: Any, *, optimize: bool = True, threads: int | None = None):
        if isinstance(model, ir.Model):
            model = inline_proto(model)
        self.session = ort_session.make_session(model, optimize=optimize, threads=threads)
        names = [i.name for i in self.session.get_inputs()]
        overridable = [i.name for i in self.session.get_overridable_initializers()]
        self.sites = protocol_sites(names + overridable)
        self._shapes = {i.name: i.shape for i in list(self.session.get_inputs()) + list(
            self.session.get_overridable_initializers())}
        state_outs = {n for s in range(self.sites) for n in state_names(s)[2:]}
        self.outputs = [o.name for o in self.session.get_outputs() if o.name not in state_outs]
        self._state: dict[Any, dict[str, np.ndarray]] = {}

    def reset(self, request: Any = None) -> None:
        if request is None:
            self._state.clear()
        else:
            self._state.pop(request, None)

    def _zeros(self, name: str, batch: int) -> np.ndarray:
        shape = [batch if i == 0 else int(d) for i, d in enumerate(self._shapes[name])]
        return np.zeros(shape, dtype=np.float32)

    def __call__(self, feeds: Mapping[str, np.ndarray], step: int, *, request: Any = 0) -> dict[str, np.ndarray]:
        batch = int(next(iter(feeds.values())).shape[0]) if feeds else 1
        state = self._state.setdefault(request, {})
        full = dict(feeds)
        full[STEP_INPUT] = np.asarray(step, dtype=np.int64)
        for s in range(self.sites):
            rho_in, res_in, _, _ = state_names(s)
            for nm in (rho_in, res_in):
                if nm not in state or state[nm].shape[0] != batch:
                    state[nm] = self._zeros(nm, batch)
                full[nm] = state[nm]
        names = self.outputs + [n for s in range(self.sites) for n in state_names(s)[2:]]
        values = dict(zip(names, self.session.run(names, full)))
        for s in range(self.sites):
            rho_in, res_in, rho_out, res_out = state_names(s)
            state[rho_in], state[res_in] = values[rho_out], values[res_out]
        return {n: values[n] for n in self.outputs}
