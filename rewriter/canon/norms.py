"""Norms as exporters spell them: the rules, and the search that turns a chain of ops into
one ``layer_norm`` / ``rms_norm`` the passes understand.

Every spelling normalizes some ``d`` by the root of its mean square::

    d * (mean(d^2, -1) + eps)^-1/2                                    # RMSNorm(d)
    d = x - mean(x, -1)   =>   the same expression == LayerNorm(x)    # var(x) == mean(d^2)

so one pattern (``NORMALIZE``) covers both kinds, with ``d`` bound to ``x - mean(x)``
(LayerNorm of ``x``) or to ``x`` itself (RMSNorm of ``x``). Around that core, a chain may
carry float casts (fp16 / bf16 models and HF's ``.to(float32)``), a scale ``* gamma`` and
a shift ``+ beta`` (``SUFFIX``), each a constant broadcast over the last axis.

The conditions checked, beyond op types: every reduction is a mean over the last axis
only, with keepdims; ``Sub`` reads the same ``x`` as its mean; the exponent is exactly 2
(or -0.5 for the inverse root); ``eps`` is a constant scalar; ``gamma`` / ``beta`` are
constants varying along the last axis only; a leading cast widens (never narrows) and
the chain ends in the input's dtype; no value inside the chain is read from outside it
(it would not be a norm any more, only part of one). A chain whose op types fit but one
of these does not is a *near miss*: not recognised, and the reason kept
(``NormSearch.near_misses``).

Rules (``SQUARE``, ``NORMALIZE``, ``SUFFIX``) list their exporters; tests build each from
that exporter's real output (``tests/canon``).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from rewriter.canon.patterns import C, Adapter, Alt, Fail, Or, P, V, equals, match, scalar_eps

# d^2
SQUARE = Or((
    Alt("pow2", P("pow", (V("d"), C("exponent", equals(2.0)))), "Pow(d, 2) == d^2",
        "TorchScript and dynamo exporters (Tensor.pow(2)); torch.export aten.pow.Tensor_Scalar"),
    Alt("mul_self", P("mul", (V("d"), V("d"))), "Mul(d, d) == d^2",
        "hand-written d * d; onnxscript-optimized graphs"),
))

# mean(d^2) + eps
_VAR_EPS = P("add", (P("mean_last", (SQUARE,)), C("eps", scalar_eps)), commute=True)
_ROOT = P("sqrt", (_VAR_EPS,))

# d / sqrt(mean(d^2) + eps), five spellings
NORMALIZE = Or((
    Alt("div", P("div", (V("d"), _ROOT)), "d / sqrt(v + eps)",
        "TorchScript exporter LayerNorm at opset < 17 (GPT-2, ViT); T5-style RMSNorm"),
    Alt("reciprocal", P("mul", (V("d"), P("reciprocal", (_ROOT,))), commute=True), "d * Reciprocal(sqrt(v + eps))",
        "dynamo exporter, opset 18 (torch.rsqrt decomposed): HF LlamaRMSNorm"),
    Alt("div_one", P("mul", (V("d"), P("div", (C("one", equals(1.0)), _ROOT))), commute=True),
        "d * (1 / sqrt(v + eps))", "TorchScript exporter, torch.rsqrt: HF LlamaRMSNorm at opset 14-17"),
    Alt("rsqrt", P("mul", (V("d"), P("rsqrt", (_VAR_EPS,))), commute=True), "d * rsqrt(v + eps)",
        "torch.export (aten.rsqrt): HF LlamaRMSNorm, Gemma"),
    Alt("pow_half", P("mul", (V("d"), P("pow", (_VAR_EPS, C("exponent", equals(-0.5))))), commute=True),
        "d * (v + eps)^-0.5", "hand-written (v + eps) ** -0.5"),
))

# d == x - mean(x): the norm is a LayerNorm of x
CENTER = Alt("center", P("sub", (V("x"), P("mean_last", (V("x"),)))), "d = x - mean(x, -1)",
             "every exporter's decomposed LayerNorm")

# after the core, in this order, each optional: casts may sit anywhere between them
SUFFIX = (
    ("cast", "y.to(dtype): a float cast (HF .to(input_dtype), fp16/bf16 models)"),
    ("scale", "y * gamma, gamma constant over the last axis (Gemma: gamma = 1 + w, folded)"),
    ("shift", "y + beta, beta constant over the last axis"),
)

# the core ops whose output may start a chain (the last op of NORMALIZE), and the ops one
# of their operands must come from
ANCHORS = ("div", "mul")
_ROOT_OPS = ("sqrt", "reciprocal", "div", "rsqrt", "pow")


@dataclasses.dataclass
class NormMatch:
    """One recognised norm: ``out = kind(x) * weight + bias`` over the last axis."""

    kind: str  # layer_norm | rms_norm
    x: Any  # its input (before a leading cast)
    out: Any  # its output (after the suffix)
    nodes: list[Any]  # the IR nodes it covers (compute nodes only; constants stay)
    eps: float
    weight: Any = None  # the constant operand value of the scale op, or None
    weight_node: Any = None
    bias: Any = None
    bias_node: Any = None
    core: Any = None  # the value d / sqrt(...) (before casts and affine)
    rules: list[str] = dataclasses.field(default_factory=list)

    @property
    def rule(self) -> str:
        return "+".join(self.rules)


@dataclasses.dataclass
class NormSearch:
    matches: list[NormMatch]
    near_misses: list[tuple[Any, str]]  # (anchor IR node, reason)


class NormAdapter(Adapter):
    """What the norm search needs beyond the matcher's ``Adapter``."""

    def nodes(self) -> list[Any]:
        """The IR nodes in topological order."""
        raise NotImplementedError

    def readers(self, value: Any) -> list[Any]:
        """IR nodes reading ``value`` (ignoring metadata-only readers)."""
        raise NotImplementedError

    def is_output(self, value: Any) -> bool:
        raise NotImplementedError

    def output(self, raw: Any) -> Any:
        raise NotImplementedError

    def outputs(self, raw: Any) -> list[Any]:
        return [self.output(raw)]

    def float_kind(self, value: Any) -> tuple[str, int] | None:
        """(dtype name, bits) of a float value, None when unknown or not a float."""
        raise NotImplementedError

    def width(self, value: Any) -> int | None:
        raise NotImplementedError

    def rank(self, value: Any) -> int | None:
        raise NotImplementedError

    def affine_ok(self, const: np.ndarray, value: Any, width: int | None) -> bool:
        """``const`` broadcast against ``value`` varies along the last axis only."""
        rank = self.rank(value)
        if rank is None or const.ndim > rank:
            return False
        if any(d != 1 for d in const.shape[:-1]):
            return False
        return const.ndim == 0 or const.shape[-1] in (1, width) or width is None and const.shape[-1] >= 1


def find_norms(ad: NormAdapter) -> NormSearch:
    """Every norm chain in the graph, in topological order of their outputs; chains do
    not overlap."""
    taken: set[int] = set()
    found: list[NormMatch] = []
    misses: list[tuple[Any, str]] = []
    for raw in ad.nodes():
        if ad.op(raw) not in ANCHORS or id(raw) in taken:
            continue
        # cheap pre-filter: the core's last op reads a root (or its inverse)
        if not any(ad.op(p) in _ROOT_OPS for p in map(ad.producer, ad.operands(raw)) if p is not None):
            continue
        try:
            m = match(ad, NORMALIZE, ad.output(raw))
        except Fail as why:
            misses.append((raw, str(why)))
            continue
        if m is None:
            continue
        try:
            nm = _complete(ad, m, raw)
        except Fail as why:
            misses.append((raw, str(why)))
            continue
        if any(id(n) in taken for n in nm.nodes):
            continue
        taken.update(id(n) for n in nm.nodes)
        found.append(nm)
    return NormSearch(found, misses)


def _complete(ad: NormAdapter, m, anchor) -> NormMatch:
    d = m.env["d"]
    nodes = list(m.nodes)
    rules = list(m.rules)
    kind, x = "rms_norm", d
    # d = x - mean(x): a LayerNorm of x, when d is read by the chain alone
    try:
        c = match(ad, CENTER.pattern, d)
    except Fail:
        c = None
    if c is not None and _inside(ad, d, nodes + c.nodes):
        kind, x = "layer_norm", c.env["x"]
        nodes = c.nodes + nodes
        rules.insert(0, CENTER.name)
    core = ad.output(anchor)
    out = core
    eps = float(m.consts["eps"].reshape(-1)[0])
    nm = NormMatch(kind, x, out, nodes, eps, core=core, rules=rules)
    _suffix(ad, nm)
    _prefix(ad, nm)
    inner = nm.nodes
    for n in inner:
        for o in ad.outputs(n):
            if o is nm.out or o is None:
                continue
            if ad.is_output(o):
                raise Fail(f"{_name(o)} inside the chain is a graph output")
            outside = [r for r in ad.readers(o) if not any(r is n2 for n2 in inner)]
            if outside:
                raise Fail(f"{_name(o)} inside the chain is also read by {_name(outside[0])}")
    if ad.rank(nm.x) is None:
        raise Fail("the rank of its input is unknown")
    return nm


def _name(obj: Any) -> str:
    return str(getattr(obj, "name", None) or getattr(obj, "op_type", None) or obj)


def _inside(ad: NormAdapter, value: Any, nodes: list[Any]) -> bool:
    return not ad.is_output(value) and all(any(r is n for n in nodes) for r in ad.readers(value))


def _single_reader(ad: NormAdapter, value: Any) -> Any | None:
    if ad.is_output(value):
        return None
    rs = ad.readers(value)
    return rs[0] if len(rs) == 1 else None


def _suffix(ad: NormAdapter, nm: NormMatch) -> None:
    """Extend the chain forward over casts, then ``* gamma``, then ``+ beta``."""
    width = ad.width(nm.core) or ad.width(nm.x)
    stage = 0  # 0: scale next, 1: shift next, 2: done
    while True:
        r = _single_reader(ad, nm.out)
        if r is None:
            return
        op = ad.op(r)
        ops = ad.operands(r)
        if op == "cast" and ad.check(r, "cast") is None:
            nm.nodes.append(r)
            nm.out = ad.output(r)
            nm.rules.append("cast")
            continue
        if op in ("mul", "add") and len(ops) == 2 and stage < 2:
            other = ops[1] if ops[0] is nm.out else ops[0]
            c = ad.const(other)
            if c is None or not np.issubdtype(c.dtype, np.floating) or not ad.affine_ok(c, nm.out, width):
                return
            if op == "mul" and stage == 0:
                nm.weight, nm.weight_node, stage = other, r, 1
                nm.rules.append("scale")
            elif op == "add":
                nm.bias, nm.bias_node, stage = other, r, 2
                nm.rules.append("shift")
            else:
                return
            nm.nodes.append(r)
            nm.out = ad.output(r)
            continue
        return


def _prefix(ad: NormAdapter, nm: NormMatch) -> None:
    """A leading widening float cast read by the chain alone belongs to it, when the chain
    then ends in the dtype it started from; a trailing cast that does not restore the
    input's dtype is left out."""
    raw = ad.producer(nm.x)
    if raw is not None and ad.op(raw) == "cast" and ad.check(raw, "cast") is None:
        src = ad.operands(raw)[0]
        a, b = ad.float_kind(src), ad.float_kind(nm.x)
        if a is not None and b is not None and b[1] >= a[1] and _inside(ad, nm.x, nm.nodes):
            out_kind = ad.float_kind(nm.out)
            if out_kind is not None and out_kind[0] == a[0]:
                nm.nodes.insert(0, raw)
                nm.x = src
                nm.rules.insert(0, "cast")
    # the output must have the input's dtype: drop trailing casts that break it
    while ad.float_kind(nm.out) is not None and ad.float_kind(nm.x) is not None \
            and ad.float_kind(nm.out)[0] != ad.float_kind(nm.x)[0] and ad.op(nm.nodes[-1]) == "cast":
        nm.nodes.pop()
        nm.rules.pop()
        nm.out = ad.output(nm.nodes[-1])
    if ad.float_kind(nm.out) is not None and ad.float_kind(nm.x) is not None \
            and ad.float_kind(nm.out)[0] != ad.float_kind(nm.x)[0]:
        raise Fail(f"its output dtype {ad.float_kind(nm.out)[0]} differs from its input's {ad.float_kind(nm.x)[0]}")
