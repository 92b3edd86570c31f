"""ONNX lowering of test-time BatchNorm: model-local functions of standard ops in the
``rewriter`` domain (one node in Netron; any ONNX Runtime runs the body).

``rewriter::AlphaBatchNormalization(X, Scale, B, Mean, Var, Alpha, Epsilon)`` (attribute
``form``) computes alpha-BN (``backends/tta.py`` states the formula) over the batch and
spatial axes of ``X`` (all axes but 1; axis 0 only for a rank-2 ``X``)::

    axes  = [0] ++ range(2, rank(X))                  Shape, Size, Range, Concat
    n     = size(X) / shape(X)[1]                      samples per channel
    mu_b  = ReduceSum(X, axes) / n                     keepdims: [1, C, 1, ...]
    var_b = ReduceSum((X - mu_b)^2, axes) / n          biased
    mu    = a Mean + (1 - a) mu_b
    var   = a Var + (1 - a) var_b + form a (1 - a) (Mean - mu_b)^2
    Y     = (X - mu) * Scale / sqrt(var + Epsilon) + B

The per-channel inputs ``[C]`` are reshaped to the statistics' shape ``[1, C, 1, ...]``.
``Alpha`` and ``Epsilon`` are one-element tensors (initializers of the rewritten model, so
another alpha is an edit of that one tensor). ``ReduceSum`` takes its axes as an input from
opset 13: the body needs 13 and is declared at the model's own opset.

``rewriter::UnMixTNS(X, Scale, B, SrcVar, CompMean, CompVar, Params) -> (Y, CompMeanOut,
CompVarOut)`` is one UnMix-TNS call (formula in ``backends/tta.py``; ``Params`` is
``[eps, tau, rho]``). The components ``[K, C]`` are the state: the rewritten graph reads them
from the inputs ``unmixtns_{i}_mean`` / ``unmixtns_{i}_var`` (defaults: the initial
components) and writes the updated ones to ``unmixtns_{i}_mean_out`` / ``_var_out``; the
caller feeds the outputs of one call to the inputs of the next (``UnmixRunner``).
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import numpy as np
import onnx_ir as ir

from backends.ort.functions import FunctionBody

DOMAIN = "rewriter"
ALPHA_NAME = "AlphaBatchNormalization"
UNMIX_NAME = "UnMixTNS"
MIN_OPSET = 13
STATE_PREFIX = "unmixtns_"
_STATE_RE = re.compile(r"^unmixtns_(\d+)_(mean|var)$")


def alpha_function(opset: int = MIN_OPSET) -> ir.Function:
    """``rewriter::AlphaBatchNormalization`` (float32 bodies; the pass declines other dtypes)."""
    names = ("X", "Scale", "B", "Mean", "Var", "Alpha", "Epsilon")
    x, scale, b, mean, var, alpha, eps = (ir.Value(name=n) for n in names)
    f = FunctionBody()
    shape = f("Shape", [x])
    rank = f("Size", [shape])
    rest = f("Range", [f.i64("two", 2), rank, f.i64("one", 1)])
    axes = f("Concat", [f.i64("axis0", [0]), rest], [ir.AttrInt64("axis", 0)])
    per_c = f("Gather", [shape, f.i64("ch", 1)], [ir.AttrInt64("axis", 0)])
    n = f("Div", [f("Cast", [f("Size", [x])], [ir.AttrInt64("to", ir.DataType.FLOAT)]),
                  f("Cast", [per_c], [ir.AttrInt64("to", ir.DataType.FLOAT)])])
    keep = [ir.AttrInt64("keepdims", 1)]
    mu_b = f("Div", [f("ReduceSum", [x, axes], keep), n])
    d = f("Sub", [x, mu_b])
    var_b = f("Div", [f("ReduceSum", [f("Mul", [d, d]), axes], keep), n])
    stat_shape = f("Shape", [mu_b])

    def chan(v: ir.Value) -> ir.Value:
        return f("Reshape", [v, stat_shape])

    ms, vs, g, beta = chan(mean), chan(var), chan(scale), chan(b)
    a = f("Reshape", [alpha, f.i64("scalar", [])])
    one = f.const("one_f", np.array(1.0, dtype=np.float32))
    na = f("Sub", [one, a])
    mu = f("Add", [f("Mul", [a, ms]), f("Mul", [na, mu_b])])
    v = f("Add", [f("Mul", [a, vs]), f("Mul", [na, var_b])])
    form_c = ir.Node("", "Constant", [], [ir.RefAttr("value_int", "form", ir.AttributeType.INT)], name="form")
    f.nodes.append(form_c)
    form = f("Cast", [form_c.outputs[0]], [ir.AttrInt64("to", ir.DataType.FLOAT)])
    dm = f("Sub", [ms, mu_b])
    v = f("Add", [v, f("Mul", [f("Mul", [form, f("Mul", [a, na])]), f("Mul", [dm, dm])])])
    e = f("Reshape", [eps, f.i64("scalar_e", [])])
    k = f("Div", [g, f("Sqrt", [f("Add", [v, e])])])
    y = f("Add", [f("Mul", [f("Sub", [x, mu]), k]), beta])
    y.name = "Y"
    graph = ir.Graph([x, scale, b, mean, var, alpha, eps], [y], nodes=f.nodes,
                     opset_imports={"": max(opset, MIN_OPSET)}, name=ALPHA_NAME)
    return ir.Function(DOMAIN, ALPHA_NAME, graph=graph, attributes=[ir.AttrInt64("form", 1)])


def unmix_function(opset: int = MIN_OPSET) -> ir.Function:
    """``rewriter::UnMixTNS`` (float32)."""
    names = ("X", "Scale", "B", "SrcVar", "CompMean", "CompVar", "Params")
    x, scale, b, src_var, cm, cv, params = (ir.Value(name=n) for n in names)
    f = FunctionBody()
    shape = f("Shape", [x])
    rank = f("Size", [shape])
    sp_axes = f("Range", [f.i64("two", 2), rank, f.i64("one", 1)])
    keep0 = [ir.AttrInt64("keepdims", 0)]
    nc = f("Slice", [shape, f.i64("s0", [0]), f.i64("s2", [2])])  # [N, C]
    hw = f("Div", [f("Cast", [f("Size", [x])], [ir.AttrInt64("to", ir.DataType.FLOAT)]),
                   f("Cast", [f("ReduceProd", [nc], keep0)], [ir.AttrInt64("to", ir.DataType.FLOAT)])])
    mu_i = f("Reshape", [f("Div", [f("ReduceSum", [x, sp_axes], [ir.AttrInt64("keepdims", 1)]), hw]), nc])  # [N, C]
    sq_i = f("Reshape", [f("Div", [f("ReduceSum", [f("Mul", [x, x]), sp_axes], [ir.AttrInt64("keepdims", 1)]), hw]), nc])
    eps = f("Gather", [params, f.i64("p0", 0)], [ir.AttrInt64("axis", 0)])
    tau = f("Gather", [params, f.i64("p1", 1)], [ir.AttrInt64("axis", 0)])
    rho = f("Gather", [params, f.i64("p2", 2)], [ir.AttrInt64("axis", 0)])
    # assignment: d_ik = mean_c (mu_ic - m_kc)^2 / (var_s_c + eps); w = softmax_k(-d / tau)
    diff = f("Sub", [f("Unsqueeze", [mu_i, f.i64("ax1", [1])]), f("Unsqueeze", [cm, f.i64("ax0", [0])])])  # [N,K,C]
    scaled = f("Div", [f("Mul", [diff, diff]), f("Add", [src_var, eps])])
    width = f("Cast", [f("Gather", [shape, f.i64("g1", 1)], [ir.AttrInt64("axis", 0)])],
              [ir.AttrInt64("to", ir.DataType.FLOAT)])
    dist = f("Div", [f("ReduceSum", [scaled, f.i64("axm1", [-1])], keep0), width])  # [N, K]
    w = f("Softmax", [f("Div", [f("Neg", [dist]), tau])], [ir.AttrInt64("axis", 1)])  # [N, K]
    wt = f("Transpose", [w], [ir.AttrInt64s("perm", [1, 0])])  # [K, N]
    n = f("Cast", [f("Gather", [shape, f.i64("g0", 0)], [ir.AttrInt64("axis", 0)])], [ir.AttrInt64("to", ir.DataType.FLOAT)])
    step = f("Div", [rho, n])
    wsum = f("Unsqueeze", [f("ReduceSum", [w, f.i64("ax0r", [0])], keep0), f.i64("ax1u", [1])])  # [K, 1]
    s = f("Add", [cv, f("Mul", [cm, cm])])
    m_new = f("Add", [cm, f("Mul", [step, f("Sub", [f("MatMul", [wt, mu_i]), f("Mul", [wsum, cm])])])])
    s_new = f("Add", [s, f("Mul", [step, f("Sub", [f("MatMul", [wt, sq_i]), f("Mul", [wsum, s])])])])
    zero = f.const("zero_f", np.array(0.0, dtype=np.float32))
    v_new = f("Max", [f("Sub", [s_new, f("Mul", [m_new, m_new])]), zero])
    mu_t = f("MatMul", [w, m_new])  # [N, C]
    var_t = f("Max", [f("Sub", [f("MatMul", [w, f("Add", [v_new, f("Mul", [m_new, m_new])])]),
                                f("Mul", [mu_t, mu_t])]), zero])
    k = f("Div", [f("Unsqueeze", [scale, f.i64("ax0k", [0])]), f("Sqrt", [f("Add", [var_t, eps])])])  # [N, C]
    ones = f("ConstantOfShape", [f("Reshape", [f("Sub", [rank, f.i64("two_r", 2)]), f.i64("shape1", [1])])],
             [ir.AttrTensor("value", ir.tensor(np.array([1], dtype=np.int64)))])
    full = f("Concat", [nc, ones], [ir.AttrInt64("axis", 0)])  # [N, C, 1, ...]
    bshape = f("Concat", [f.i64("one_n", [1]), f("Slice", [full, f.i64("s1", [1]), f.i64("big", [1 << 30])])],
               [ir.AttrInt64("axis", 0)])
    y = f("Add", [f("Mul", [f("Sub", [x, f("Reshape", [mu_t, full])]), f("Reshape", [k, full])]),
                  f("Reshape", [b, bshape])])
    y.name, m_new.name, v_new.name = "Y", "CompMeanOut", "CompVarOut"
    graph = ir.Graph([x, scale, b, src_var, cm, cv, params], [y, m_new, v_new], nodes=f.nodes,
                     opset_imports={"": max(opset, MIN_OPSET)}, name=UNMIX_NAME)
    return ir.Function(DOMAIN, UNMIX_NAME, graph=graph, attributes=[])


def state_names(site: int) -> tuple[str, str, str, str]:
    """Graph input / output names of site ``site``'s components."""
    p = f"{STATE_PREFIX}{site}"
    return f"{p}_mean", f"{p}_var", f"{p}_mean_out", f"{p}_var_out"


def state_sites(input_names) -> int:
    """How many UnMix-TNS sites a graph already carries (from its input names)."""
    found = [int(m.group(1)) for n in input_names if (m := _STATE_RE.match(n))]
    return max(found) + 1 if found else 0


class UnmixRunner:
    """Run an UnMix-TNS-rewritten ONNX model over a stream, carrying the components from
    each call's outputs to the next call's inputs."""

    def __init__(self, session) -> None:
        self.session = session
        overridable = {i.name for i in session.get_overridable_initializers()}
        self.sites = state_sites(overridable | {i.name for i in session.get_inputs()})
        self.outputs = [o.name for o in session.get_outputs()]
        self.state: dict[str, np.ndarray] = {}

    def reset(self) -> None:
        self.state = {}

    def __call__(self, feeds: Mapping[str, np.ndarray]) -> list[np.ndarray]:
        res = self.session.run(self.outputs, {**feeds, **self.state})
        got = dict(zip(self.outputs, res))
        for i in range(self.sites):
            m_in, v_in, m_out, v_out = state_names(i)
            self.state[m_in], self.state[v_in] = got[m_out], got[v_out]
        return [got[o] for o in self.outputs if not o.startswith(STATE_PREFIX)]
