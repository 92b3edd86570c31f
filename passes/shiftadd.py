"""``shiftadd``: post-training shift-and-add reparameterization of linear layers
(ShiftAddLLM, You et al. 2024, the deployable "Lat" format; DenseShift as an option).
Approximate: the output changes by design and is verified against ``budget``.

Every linear ``y = x W^T + b`` (``W`` ``[N, K]``) inside the network becomes::

    W ~ sum_{k<q} alpha_k (.) B_k,    B_k in {-1, +1},    alpha = sum_{t<T} s_t 2^{p_t}

with one alpha per 8 input columns x ``group_rows`` output rows, so ``y_n = sum_k sum_j
alpha_{k,j,g(n)} (sum_{c in block j} +-x_c)``: adds of activations, then shifts. The
codes and scales come from ``passes/shiftadd_quant.py`` (alternating BCQ fit, exact
code search, GPTQ compensation with the calibration Hessian ``H = X^T X / n`` of the
layer's input, in activation order). ``mode=denseshift`` uses zero-free
``sigma_n * sign * 2^e`` weights instead.

Bits: an integer ``bits`` gives every layer that width; a fractional one (``2.5``)
quantizes each layer at every ``candidates`` width, scores ``tr(dW H dW^T)`` and picks the
widths by an exact DP under the average-bit budget. Each site's reason lists its width.

Lowering: ONNX, a ``rewriter::ShiftAddMatMul`` / ``DenseShiftMatMul`` model-local
function of standard ops (``backends/ort/shiftadd.py``) reading packed uint32 bit planes
and int8 (sign, exponent) scale terms, then the bias ``Add``; torch, the custom op
``torch.ops.rewriter.shiftadd_linear`` (``backends/triton/shiftadd.py``). Both decode the
same tensors to the same dense ``sum_k alpha_k B_k``.
``lowering=nbits`` / ``nbits8`` (ONNX only) quantize with one scale per output row and
``nbits_block`` input columns and run ONNX Runtime's ``com.microsoft::MatMulNBits``, so the
session keeps the weights packed: ``nbits``, the ``q`` +-alpha planes stacked as one 2-bit
call, then a sum over the planes (exact); ``nbits8``, the decoded weight on an 8-bit grid
per row and block (each weight within half a step), one 8-bit call.

Calibration (``--calib F.npz``: model inputs by name): layer-sequential, as GPTQ and
ShiftAddLLM do. The linears are visited in graph order, grouped by the tensor they read;
each group's ``H`` comes from a run of the model whose earlier linears are already
quantized, so a layer compensates the error of the layers before it; only one group's
input is held at a time. Without it ``H = I`` (data-free; no output-aware compensation),
and the sites say so. Each site's reason gives its all-in bits/weight (planes, scale
terms, padding) and the calibration-weighted error beside RTN-g128's at the same width.

Budget (``budget``): ``fro:X`` (default ``fro:0.5``; a bare number means this): relative
Frobenius error ``||a - b||_F / ||a||_F`` of each output; ``cos:X``: mean cosine along
the last axis (per token or embedding) >= X; ``max:X``: the max relative error. With
``--calib`` (and no ``--inputs``) verification runs on the calibration data.

Declined: the output head (a linear writing a graph output) and embedding tables unless
``include`` names them (``--set shiftadd.include=head``; embeddings are never quantized,
only linears); every linear of an ONNX model below opset 15 (the decode needs
``Shape(start=)`` and ``CastLike``).
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Literal

import numpy as np

from backends.ort.shiftadd import (MIN_OPSET, NBITS_BLOCKS, function_for, nbits8_dense, nbits8_function,
                                   nbits8_tensors, nbits_function, nbits_tensors)
from backends.triton.shiftadd import MODES, shiftadd_linear_op
from passes import shiftadd_quant as sq
from rewriter import lower
from rewriter.errors import BadInput
from rewriter.ir.view import Declined, GraphView, LinearOp, Node
from rewriter.pass_api import Kind, Pass, Site, register
from rewriter.run.capture import capture
from rewriter.run.verify import Budget

log = logging.getLogger(__name__)


@dataclasses.dataclass
class _Plan:
    node: Node
    shape: tuple[int, int]


@register
class ShiftAdd(Pass):
    name = "shiftadd"
    kind = Kind.APPROXIMATE
    summary = "post-training shift-and-add (BCQ, power-of-two scales) quantization of linear layers"

    @dataclasses.dataclass
    class Options:
        bits: float = 3.0  # average bits per weight; fractional: DP over `candidates`
        mode: Literal["bcq", "denseshift"] = "bcq"  # bcq: binary-coded scales; denseshift: sign + shift
        terms: int = 3  # powers of two per scale
        group_rows: int = 128  # output rows per scale block (0: all rows)
        row_scale: bool = False  # a power-of-two scale per output row (applied after the call)
        static_scales: bool = True  # block scales fitted to the original weights (GPTQ static groups)
        weighted_scales: bool = True  # scale fit weights each column's error by its input's diag H
        rounds: int = 8  # alternating refinement rounds
        act_order: bool = True  # quantize columns by decreasing Hessian diagonal (GPTQ)
        compensate: bool = True  # GPTQ-style output error compensation
        candidates: list[int] = dataclasses.field(default_factory=lambda: [2, 3, 4])  # bit widths of the DP
        include: list[str] = dataclasses.field(default_factory=list)  # extra layers to quantize: "head"
        budget: str = "fro:0.5"  # accepted output error: fro:X rel. Frobenius (bare number), cos:X mean cosine, max:X
        lowering: Literal["function", "nbits", "nbits8"] = "function"  # ONNX: decode function; ORT MatMulNBits: 2-bit planes, or 8-bit grid
        nbits_block: int = 64  # lowering=nbits: input columns per scale (per row), a power of two >= 16
        nbits_accuracy: int = 4  # lowering=nbits: MatMulNBits accuracy_level (4: int8 activations, fast; 0: fp32)

    def __init__(self, options=None, context=None):
        super().__init__(options, context)
        self.layers: list[dict] = []  # per applied site: name, shape, bits, bytes, error

    def error_budget(self) -> Budget:
        return Budget.parse(self.options.budget, "shiftadd.budget")

    # -- match -------------------------------------------------------------------------
    def match(self, view: GraphView) -> list[Site]:
        opt = self.options
        Budget.parse(opt.budget, "shiftadd.budget")  # a malformed budget is a BadInput now
        if opt.bits <= 0 or (opt.bits != int(opt.bits) and not opt.candidates):
            raise BadInput(f"--set shiftadd.bits={opt.bits}: expected a positive width")
        if opt.lowering in ("nbits", "nbits8"):
            if opt.nbits_block not in NBITS_BLOCKS:
                raise BadInput(f"--set shiftadd.nbits_block={opt.nbits_block}: expected one of {list(NBITS_BLOCKS)}")
            if opt.mode != "bcq":
                raise BadInput(f"--set shiftadd.lowering={opt.lowering} needs shiftadd.mode=bcq")
            if opt.nbits_accuracy not in (0, 1, 2, 3, 4):
                raise BadInput(f"--set shiftadd.nbits_accuracy={opt.nbits_accuracy}: expected 0..4")
        sites: list[Site] = []
        low_opset = view.ir == "onnx" and getattr(view, "opset", MIN_OPSET) < MIN_OPSET
        for node in view.nodes():
            if node.op == "embedding":
                try:
                    table = view.embedding(node)
                except (Declined, NotImplementedError):
                    continue
                if table.ndim == 2 and min(table.shape) > 1:  # a real table, not a shape lookup
                    sites.append(Site(node.name, False, "embedding table: shiftadd quantizes linear layers only"))
                continue
            if node.op != "linear":
                continue
            try:
                w = view.linear(node).weight
            except Declined as why:
                sites.append(Site(node.name, False, str(why)))
                continue
            if opt.lowering != "function" and view.ir != "onnx":
                sites.append(Site(node.name, False, f"lowering={opt.lowering} is ONNX Runtime's MatMulNBits (ONNX only); "
                                                    "torch graphs use lowering=function"))
                continue
            if low_opset:
                sites.append(Site(node.name, False, f"ONNX opset {view.opset} < {MIN_OPSET}: the decode needs "
                                                    f"Shape(start=) and CastLike (re-export at opset {MIN_OPSET}+)"))
                continue
            if self._is_head(view, node) and "head" not in opt.include:
                sites.append(Site(node.name, False, "output head (writes a graph output): include it with "
                                                    "--set shiftadd.include=head"))
                continue
            sites.append(Site(node.name, True, f"{w.shape[0]}x{w.shape[1]}", _Plan(node, w.shape)))
        return sites

    def _is_head(self, view: GraphView, node: Node) -> bool:
        """Whether the linear's output reaches a graph output through layout ops only."""
        todo, seen = [node.output], set()
        while todo:
            v = todo.pop()
            if view.is_graph_output(v):
                return True
            for u in view.users(v):
                if id(u) in seen:
                    continue
                seen.add(id(u))
                try:
                    lay = view.layout(u)
                except NotImplementedError:
                    lay = None
                if lay is not None:
                    todo.append(u.output)
        return False

    # -- apply -------------------------------------------------------------------------
    def _hessian(self, view: GraphView, value) -> np.ndarray:
        """``H = X^T X / n`` of one value on the calibration data, run on ``view`` as it is
        now (earlier linears already quantized: layer-sequential calibration)."""
        try:
            (acts,) = capture(view, [value], self.context.calib)
        except KeyError as err:
            raise BadInput(f"--calib: missing model input {err}; calibration arrays are named after "
                           "the model inputs") from None
        return sq.hessian(acts)

    def _quantize(self, w: np.ndarray, h: np.ndarray | None, bits: int) -> sq.Packed:
        o = self.options
        nb = o.lowering != "function"  # MatMulNBits: one scale per row and nbits_block columns
        return sq.quantize(w, h, mode=o.mode, bits=bits, terms=o.terms, group_rows=1 if nb else o.group_rows,
                           rounds=o.rounds, act_order=o.act_order, compensate=o.compensate,
                           row_scale=o.row_scale, static_scales=o.static_scales,
                           weighted_scales=o.weighted_scales, block_cols=o.nbits_block if nb else sq.BLOCK_COLS)

    def _op(self, packed: sq.Packed) -> tuple[LinearOp, bool]:
        """The replacing op and whether it holds the row scale itself."""
        o = self.options
        if o.lowering == "nbits8":
            return LinearOp(consts=nbits8_tensors(packed.dense(), packed.block_cols), attrs={},
                            onnx_function=nbits8_function, torch_op=None,
                            onnx_attrs={"K": packed.n_in, "N": packed.n_out, "block_size": packed.block_cols,
                                        "accuracy_level": o.nbits_accuracy}), True
        if o.lowering == "nbits":
            consts = nbits_tensors(packed.planes, packed.alpha(), packed.n_in, packed.block_cols, packed.row_scale)
            return LinearOp(consts=consts, attrs={}, onnx_function=nbits_function, torch_op=None,
                            onnx_attrs={"K": packed.n_in, "N": packed.n_out, "planes": packed.bits,
                                        "NQ": packed.bits * packed.n_out, "block_size": packed.block_cols,
                                                       "accuracy_level": o.nbits_accuracy}), True
        op = LinearOp(consts={"planes": packed.planes, "exps": packed.exps, "signs": packed.signs},
                      attrs={"group_rows": packed.group_rows, "mode": MODES[packed.mode]},
                      onnx_function=function_for(packed.mode), torch_op=shiftadd_linear_op,
                      onnx_attrs={"n_in": packed.n_in})
        return op, False

    def apply(self, view: GraphView, sites: list[Site]) -> None:
        """Sites are visited in graph order, grouped by the tensor they read (q/k/v share
        one capture). With ``--calib`` each group's Hessian comes from a run of the model
        whose earlier linears are already quantized (as GPTQ and ShiftAddLLM calibrate),
        and only that group's input is held at a time."""
        if not sites:
            return
        o = self.options
        calib = bool(self.context.calib)
        if not calib:
            log.warning("shiftadd: no calibration data: H = I (data-free, no output-aware compensation)")
        nodes = [s.plan.node for s in sites]
        params = [view.linear(n) for n in nodes]
        groups: dict[int, list[int]] = {}
        for i, n in enumerate(nodes):
            groups.setdefault(id(n.inputs[0]), []).append(i)
        order = list(groups.values())
        widths = [int(o.bits)] * len(sites)
        if float(o.bits) != int(o.bits):  # mixed widths: DP on errors under the fp32 model's H
            errors: list[dict[int, float]] = [{} for _ in sites]
            for grp in order:
                h = self._hessian(view, nodes[grp[0]].inputs[0]) if calib else None
                for i in grp:
                    for b in sorted(set(int(c) for c in o.candidates)):
                        errors[i][b] = sq.weighted_error(params[i].weight, self._quantize(params[i].weight, h, b).dense(), h)
                    log.info("shiftadd: %s errors by width %s", sites[i].site, errors[i])
            widths = sq.allocate_bits(errors, [p.weight.size for p in params], float(o.bits))
        for grp in order:
            h = self._hessian(view, nodes[grp[0]].inputs[0]) if calib else None
            for i in grp:
                site, node, p, b = sites[i], nodes[i], params[i], widths[i]
                packed = self._quantize(p.weight, h, b)
                op, holds_rows = self._op(packed)
                dense = packed.dense() if self.options.lowering != "nbits8" else \
                    nbits8_dense(op.consts["B"], op.consts["S"], packed.n_in)  # the weights that run
                err = sq.weighted_error(p.weight, dense, h)
                rel = err / max(sq.weighted_error(p.weight, np.zeros_like(p.weight), h), 1e-300)
                rtn = sq.rtn(p.weight, b)
                rtn_rel = sq.weighted_error(p.weight, rtn, h) / max(
                    sq.weighted_error(p.weight, np.zeros_like(p.weight), h), 1e-300)
                fp16 = p.weight.size * 2
                rows = None if holds_rows else packed.row_scale
                new = lower.replace_linear(view, node, op, p.bias if rows is None else None)
                view.tag(new, self.name, [node.name])
                if rows is not None:  # y = row_scale * call(x) + b
                    lower.insert(view, new.output, "scale_shift", weight=rows.astype(np.float64), bias=p.bias)
                for u in view.users(new.output) if (p.bias is not None or rows is not None) and view.ir == "onnx" else []:
                    view.tag(u, self.name, [node.name])
                nbytes = sum(int(c.nbytes) for c in op.consts.values())  # as stored (MatMulNBits: 2-bit codes)
                if rows is not None:
                    nbytes += rows.size * 4
                bpw = 8.0 * nbytes / p.weight.size
                low = {"nbits": f" as one MatMulNBits of {b} stacked 2-bit planes, block {packed.block_cols}",
                       "nbits8": f" on an 8-bit grid (one 8-bit MatMulNBits, block {packed.block_cols})"
                       }.get(self.options.lowering, "")
                site.reason = (f"{packed.n_out}x{packed.n_in}, {b} bits {packed.mode}{low}, {bpw:.3f} bits/weight all-in "
                               f"({nbytes} B vs {fp16} B fp16), rel. output error {rel:.2e} "
                               f"(RTN-g128 {b} bits, {sq.rtn_bits(b, n_in=packed.n_in):.3f} bits/weight: {rtn_rel:.2e})"
                               + ("" if h is not None else ", data-free"))
                self.layers.append({"site": site.site, "shape": [packed.n_out, packed.n_in], "bits": b,
                                    "bits_per_weight": bpw, "bytes": nbytes, "fp16_bytes": fp16,
                                    "rel_error": rel, "rtn_g128_rel_error": rtn_rel})
                log.info("shiftadd: %s: %s", site.site, site.reason)
        if self.layers:
            n = sum(L["shape"][0] * L["shape"][1] for L in self.layers)
            log.info("shiftadd: %.3f bits/weight all-in over %d quantized weights",
                     sum(L["bits_per_weight"] * L["shape"][0] * L["shape"][1] for L in self.layers) / n, n)
