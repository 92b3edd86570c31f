"""ONNX lowering of the shift-add linear: model-local functions of standard ops in the
``rewriter`` domain, so Netron shows one node and any ONNX Runtime runs the body.

``rewriter::ShiftAddMatMul(X, Planes, Exps, Signs)`` (attribute ``group_rows`` G) and
``rewriter::DenseShiftMatMul(X, Planes, Exps, Signs)`` (both also carry ``mode``, the
torch op's format code, for the reader) compute ``X @ W^T`` for the packed
format of ``passes/shiftadd_quant.py`` (planes uint32 ``[q, ceil(K/32), N]``, scale
terms int8 ``[T, qa, Kb, Ng]``; ``K`` is the call's ``n_in`` attribute, a constant, so ONNX
Runtime's constant folding can decode the weight once at load; ``N`` from the planes)::

    bits[k, c, n]  = (Planes[k, c // 32, n] >> (c % 32)) mod 2       BitShift, Mod
    alpha          = sum_t Signs_t * 2^Exps_t                         Gather from a table of
                                                                      2^-126 .. 2^127 (exact)
    BCQ:        W^T[c, n] = sum_k alpha[k, c // 8, n // G] * (2 bits[k, c, n] - 1)
    DenseShift: W^T[c, n] = alpha[0, 0, n] * (2 bits[0] - 1) * 2^(sum_j 2^j bits[j + 1])
    Y = X @ W^T                                                       MatMul

The weight is decoded in float32 (then CastLike X), as the torch kernel does; a bias stays
an ``Add`` after the call. The bodies need opset 15 (``Shape(start=)``, ``CastLike``; the bit
test is ``Mod`` by 2 rather than opset-18 ``BitwiseAnd``, so TorchScript exports at opset
15-17 qualify) and are declared at the model's own opset.

``rewriter::ShiftAddNBits`` / ``ShiftAddNBits8`` (``nbits_function`` / ``nbits8_function``)
run the weights packed in ONNX Runtime through ``com.microsoft::MatMulNBits``: the BCQ bit
planes as 2-bit codes stacked along the output axis (one call, then ``ReduceSum`` over the
planes; exact), or the decoded weight on an 8-bit grid (one call; each weight within half
a grid step). Nothing is left for constant folding to expand at session load.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from backends.ort.functions import FunctionBody

DOMAIN = "rewriter"
SHIFTADD_NAME = "ShiftAddMatMul"
DENSESHIFT_NAME = "DenseShiftMatMul"
MIN_OPSET = 15
_POW2_LO = -126  # table index 0 holds 2^-126


def _bits(f: FunctionBody, planes: ir.Value, k: ir.Value) -> ir.Value:
    """0/1 float32 ``[q, K, N]`` of the uint32 planes ``[q, Kw, N]``."""
    shifts = f.const("shifts", np.arange(32, dtype=np.uint32).reshape(1, 1, 32, 1))
    two = f.const("two_u32", np.array([2], dtype=np.uint32))
    p4 = f("Unsqueeze", [planes, f.i64("axis2", [2])])  # [q, Kw, 1, N]
    sh = f("BitShift", [p4, shifts], [ir.AttrString("direction", "RIGHT")])  # [q, Kw, 32, N]
    bit = f("Mod", [sh, two])  # (p >> t) & 1
    n = f("Shape", [planes], [ir.AttrInt64("start", -1)])
    flat = f("Reshape", [bit, f("Concat", [f.i64("shape_q_k", [0, -1]), n], [ir.AttrInt64("axis", 0)])])  # [q, Kw*32, N]
    zero, axis1 = f.i64("zero", [0]), f.i64("axis1", [1])
    cut = f("Slice", [flat, zero, k, axis1])  # [q, K, N]
    return f("Cast", [cut], [ir.AttrInt64("to", ir.DataType.FLOAT)])


def _alpha(f: FunctionBody, exps: ir.Value, signs: ir.Value) -> ir.Value:
    """``sum_t signs_t 2^exps_t`` (float32 ``[qa, Kb, Ng]``), powers of two by table lookup."""
    table = f.const("pow2_table", np.ldexp(np.float32(1.0), np.arange(_POW2_LO, 128)).astype(np.float32))
    idx = f("Add", [f("Cast", [exps], [ir.AttrInt64("to", ir.DataType.INT32)]),
                    f.const("pow2_offset", np.array([-_POW2_LO], dtype=np.int32))])
    p2 = f("Gather", [table, idx], [ir.AttrInt64("axis", 0)])
    terms = f("Mul", [p2, f("Cast", [signs], [ir.AttrInt64("to", ir.DataType.FLOAT)])])
    return f("ReduceSum", [terms, f.i64("axis0", [0])], [ir.AttrInt64("keepdims", 0)])


def _pm1(f: FunctionBody, bits: ir.Value) -> ir.Value:
    two, one = f.const("two_f", np.array([2.0], dtype=np.float32)), f.const("one_f", np.array([1.0], dtype=np.float32))
    return f("Sub", [f("Mul", [bits, two]), one])


def _attr_vector(f: FunctionBody, attr: str) -> ir.Value:
    """The int attribute ``attr`` of the call as a 1-element int64 tensor (a constant)."""
    c = ir.Node("", "Constant", [], [ir.RefAttr("value_int", attr, ir.AttributeType.INT)], name=f"attr_{attr}")
    f.nodes.append(c)
    return f("Reshape", [c.outputs[0], f.i64(f"shape1_{attr}", [1])])


def shiftadd_function(opset: int = MIN_OPSET) -> ir.Function:
    """``rewriter::ShiftAddMatMul`` (BCQ, 8-column x ``group_rows`` blocks)."""
    x, planes, exps, signs = (ir.Value(name=n) for n in ("X", "Planes", "Exps", "Signs"))
    f = FunctionBody()
    k = _attr_vector(f, "n_in")  # a constant (not Shape(X)), so ORT can fold the decode
    n = f("Shape", [planes], [ir.AttrInt64("start", -1)])
    b = _pm1(f, _bits(f, planes, k))  # [q, K, N] in {-1, +1}
    a = _alpha(f, exps, signs)  # [q, Kb, Ng]
    a5 = f("Unsqueeze", [a, f.i64("axes24", [2, 4])])  # [q, Kb, 1, Ng, 1]
    g_scalar = ir.Node("", "Constant", [], [ir.RefAttr("value_int", "group_rows", ir.AttributeType.INT)],
                       name="group_rows")
    f.nodes.append(g_scalar)
    g = f("Reshape", [g_scalar.outputs[0], f.i64("shape1", [1])])
    shape = f("Concat", [f.i64("expand_head", [1, 1, 8, 1]), g], [ir.AttrInt64("axis", 0)])
    ae = f("Expand", [a5, shape])  # [q, Kb, 8, Ng, G]
    ar = f("Reshape", [ae, f.i64("shape_rows", [0, 0, 0, -1])])  # [q, Kb, 8, Ng*G]
    an = f("Slice", [ar, f.i64("zero_n", [0]), n, f.i64("axis3", [3])])  # [q, Kb, 8, N]
    ac = f("Reshape", [an, f("Concat", [f.i64("shape_cols", [0, -1]), n], [ir.AttrInt64("axis", 0)])])  # [q, Kb*8, N]
    ak = f("Slice", [ac, f.i64("zero_k", [0]), k, f.i64("axis1_k", [1])])  # [q, K, N]
    wt = f("ReduceSum", [f("Mul", [b, ak]), f.i64("axis0_w", [0])], [ir.AttrInt64("keepdims", 0)])  # [K, N]
    y = f("MatMul", [x, f("CastLike", [wt, x])])
    y.name = "Y"
    graph = ir.Graph([x, planes, exps, signs], [y], nodes=f.nodes, opset_imports={"": max(opset, MIN_OPSET)},
                     name=SHIFTADD_NAME)
    return ir.Function(DOMAIN, SHIFTADD_NAME, graph=graph, attributes=[ir.AttrInt64("group_rows", 1), ir.AttrInt64("mode", 0),
                                                                      ir.AttrInt64("n_in", 0)])


def denseshift_function(opset: int = MIN_OPSET) -> ir.Function:
    """``rewriter::DenseShiftMatMul`` (sign plane + exponent planes, per-row scale)."""
    x, planes, exps, signs = (ir.Value(name=n) for n in ("X", "Planes", "Exps", "Signs"))
    f = FunctionBody()
    k = _attr_vector(f, "n_in")
    bits = _bits(f, planes, k)  # [b, K, N]
    sign = _pm1(f, f("Gather", [bits, f.i64("zero_s", 0)], [ir.AttrInt64("axis", 0)]))  # [K, N]
    ebits = f("Slice", [bits, f.i64("one_e", [1]), f.i64("big_e", [1 << 30]), f.i64("axis0_e", [0])])
    q1 = f("Shape", [ebits], [ir.AttrInt64("start", 0), ir.AttrInt64("end", 1)])
    rng = f("Range", [f.i64("r0", 0), f("Squeeze", [q1, f.i64("axis0_q", [0])]), f.i64("r1", 1)])
    table = f.const("pow2_small", np.ldexp(np.float32(1.0), np.arange(0, 31)).astype(np.float32))
    weights = f("Gather", [table, rng], [ir.AttrInt64("axis", 0)])  # 2^j, j < b - 1
    w3 = f("Unsqueeze", [weights, f.i64("axes12", [1, 2])])
    e = f("ReduceSum", [f("Mul", [ebits, w3]), f.i64("axis0_r", [0])], [ir.AttrInt64("keepdims", 0)])  # [K, N]
    p2 = f("Gather", [table, f("Cast", [e], [ir.AttrInt64("to", ir.DataType.INT64)])], [ir.AttrInt64("axis", 0)])
    sigma = f("Reshape", [_alpha(f, exps, signs), f.i64("shape_row", [1, -1])])  # [1, N]
    wt = f("Mul", [f("Mul", [sign, p2]), sigma])
    y = f("MatMul", [x, f("CastLike", [wt, x])])
    y.name = "Y"
    graph = ir.Graph([x, planes, exps, signs], [y], nodes=f.nodes, opset_imports={"": max(opset, MIN_OPSET)},
                     name=DENSESHIFT_NAME)
    return ir.Function(DOMAIN, DENSESHIFT_NAME, graph=graph,
                       attributes=[ir.AttrInt64("group_rows", 1), ir.AttrInt64("mode", 1), ir.AttrInt64("n_in", 0)])


def function_for(mode: str):
    """The function builder (``opset -> ir.Function``) of a quantizer mode."""
    return {"bcq": shiftadd_function, "denseshift": denseshift_function}[mode]


# --------------------------------------------------------------------------- MatMulNBits

NBITS_NAME = "ShiftAddNBits"
NBITS_MS_DOMAIN = "com.microsoft"
NBITS_BLOCKS = (16, 32, 64, 128, 256)  # MatMulNBits block sizes (powers of two >= 16)


def nbits_function(opset: int = MIN_OPSET) -> ir.Function:
    """``rewriter::ShiftAddNBits(X, B, S)`` (attributes ``K``, ``N``, ``planes`` q, ``NQ`` = q N,
    ``block_size``, ``accuracy_level``): the BCQ layer as ONE ONNX Runtime
    ``com.microsoft::MatMulNBits`` (2-bit) over the ``q`` +-alpha bit planes stacked along
    the output axis (``q N`` rows), then ``Reshape`` to ``[..., q, N]`` and ``ReduceSum``
    over the planes. ``B`` uint8 ``[q N, K/bs, bs/4]`` holds code 3 for ``+1`` and 1 for
    ``-1`` (the default zero point of 2-bit ``MatMulNBits`` is 2), ``S`` float32
    ``[q N, K/bs]`` the plane's ``alpha`` per row and ``bs``-column block. One call, so the
    activations are read (and, at ``accuracy_level`` 4, quantized to int8) once for all
    planes. The weights stay packed in the session: ORT's kernels read them, nothing is
    folded back to dense."""
    x, b, s = ir.Value(name="X"), ir.Value(name="B"), ir.Value(name="S")
    f = FunctionBody()
    attrs = [ir.RefAttr("K", "K", ir.AttributeType.INT), ir.RefAttr("N", "NQ", ir.AttributeType.INT),
             ir.RefAttr("block_size", "block_size", ir.AttributeType.INT),
             ir.RefAttr("accuracy_level", "accuracy_level", ir.AttributeType.INT)]
    mm = ir.Node(NBITS_MS_DOMAIN, "MatMulNBits", [x, b, s], [*attrs, ir.AttrInt64("bits", 2)], name="planes")
    f.nodes.append(mm)
    lead = f("Shape", [mm.outputs[0]], [ir.AttrInt64("end", -1)])  # [..., q N] -> the leading dims
    q = _attr_vector(f, "planes")
    shape = f("Concat", [lead, q, f.i64("minus1", [-1])], [ir.AttrInt64("axis", 0)])
    y3 = f("Reshape", [mm.outputs[0], shape])  # [..., q, N]
    y = f("ReduceSum", [y3, f.i64("axis_q", [-2])], [ir.AttrInt64("keepdims", 0)])
    y.name = "Y"
    graph = ir.Graph([x, b, s], [y], nodes=f.nodes, opset_imports={"": max(opset, MIN_OPSET), NBITS_MS_DOMAIN: 1},
                     name=NBITS_NAME)
    return ir.Function(DOMAIN, NBITS_NAME, graph=graph,
                       attributes=[ir.AttrInt64(a, v) for a, v in (("K", 0), ("N", 0), ("planes", 1), ("NQ", 0),
                                                                  ("block_size", 64), ("accuracy_level", 4))])


def nbits_tensors(planes: np.ndarray, alpha: np.ndarray, n_in: int, block: int,
                  row_scale: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """The ``MatMulNBits`` inputs of a BCQ weight with one scale per row and ``block`` input
    columns: ``planes`` uint32 ``[q, ceil(K/32), N]`` (bit 1 = ``+1``), ``alpha`` float64
    ``[q, ceil(K/block), N]`` (exact in float32: sums of powers of two), ``row_scale``
    (powers of two, ``[N]``) multiplied into the scales. Returns ``{"B": codes uint8
    [q N, K/block, block/4], "S": scales float32 [q N, K/block]}``, plane ``k`` in rows
    ``k N .. (k+1) N - 1`` (codes 4 per byte, first column in the low bits; padding columns
    code 2, i.e. zero)."""
    q, kw, n = planes.shape
    kb = -(-n_in // block)
    shifts = np.arange(32, dtype=np.uint32)[None, None, :, None]
    bits = ((planes[:, :, None, :] >> shifts) & np.uint32(1)).reshape(q, kw * 32, n)[:, :n_in]  # [q, K, N]
    codes = np.full((q, n, kb * block), 2, dtype=np.uint8)
    codes[:, :, :n_in] = 1 + 2 * bits.transpose(0, 2, 1).astype(np.uint8)
    c4 = codes.reshape(q * n, kb, block // 4, 4)
    packed = (c4[..., 0] | (c4[..., 1] << 2) | (c4[..., 2] << 4) | (c4[..., 3] << 6)).astype(np.uint8)
    s = alpha[:, :kb].transpose(0, 2, 1).astype(np.float64)  # [q, N, Kb]
    if row_scale is not None:
        s = s * row_scale.astype(np.float64)[None, :, None]
    return {"B": packed, "S": s.reshape(q * n, kb).astype(np.float32)}


NBITS8_NAME = "ShiftAddNBits8"


def nbits8_function(opset: int = MIN_OPSET) -> ir.Function:
    """``rewriter::ShiftAddNBits8(X, B, S)`` (attributes ``K``, ``N``, ``block_size``,
    ``accuracy_level``): the decoded BCQ weight on an 8-bit grid per row and ``block_size``
    columns, ONE 8-bit ``com.microsoft::MatMulNBits`` (default zero point 128): a single
    product instead of one per bit plane, at 8 stored bits per weight; the grid rounds each
    weight by at most half its block's step (``nbits8_tensors``)."""
    x, b, s = ir.Value(name="X"), ir.Value(name="B"), ir.Value(name="S")
    attrs = [ir.RefAttr(a, a, ir.AttributeType.INT) for a in ("K", "N", "block_size", "accuracy_level")]
    mm = ir.Node(NBITS_MS_DOMAIN, "MatMulNBits", [x, b, s], [*attrs, ir.AttrInt64("bits", 8)], name="grid8")
    ident = ir.Node("", "Identity", [mm.outputs[0]], name="out")
    ident.outputs[0].name = "Y"
    graph = ir.Graph([x, b, s], [ident.outputs[0]], nodes=[mm, ident],
                     opset_imports={"": max(opset, MIN_OPSET), NBITS_MS_DOMAIN: 1}, name=NBITS8_NAME)
    return ir.Function(DOMAIN, NBITS8_NAME, graph=graph,
                       attributes=[ir.AttrInt64(a, v) for a, v in (("K", 0), ("N", 0), ("block_size", 64),
                                                                  ("accuracy_level", 4))])


def nbits8_tensors(w: np.ndarray, block: int) -> dict[str, np.ndarray]:
    """8-bit ``MatMulNBits`` inputs of a dense ``[N, K]`` weight (the BCQ decode, float64):
    per row and ``block`` columns the step ``s = max|w| / 127`` and codes
    ``round(w / s) + 128`` (so ``|w - (code - 128) s| <= s / 2``); padding columns code 128."""
    n, k = w.shape
    kb = -(-k // block)
    wp = np.zeros((n, kb * block))
    wp[:, :k] = w
    wb = wp.reshape(n, kb, block)
    step = np.abs(wb).max(-1) / 127.0
    step = np.where(step > 0, step, 1.0).astype(np.float32)  # float32: the grid ORT multiplies by
    codes = np.clip(np.rint(wb / step.astype(np.float64)[..., None]), -127, 127) + 128
    return {"B": codes.astype(np.uint8), "S": step}


def nbits8_dense(codes: np.ndarray, steps: np.ndarray, n_in: int) -> np.ndarray:
    """The ``[N, K]`` weight (float64) of ``nbits8_tensors``' codes and steps."""
    n = codes.shape[0]
    return ((codes.astype(np.float64) - 128.0) * steps.astype(np.float64)[:, :, None]).reshape(n, -1)[:, :n_in]
