"""A small pattern language for the canonicalization layer, shared by both IRs.

A pattern is a tree matched *backwards* from a value: ``P(op, args)`` matches a value
produced by an IR node whose abstract op (``Adapter.op``) is ``op`` and whose operands
match ``args``; ``V(name)`` binds a value (the same name must bind the same value);
``C(name, test)`` matches a constant whose array passes ``test``; ``Or`` tries named
alternatives (``Alt``), each a rule with its gloss and the exporter that writes it.

The IR is reached only through an ``Adapter`` (``onnx_adapter``, ``fx_adapter``), which
maps IR ops to the abstract names below and checks the semantic conditions an op name
alone does not carry (a reduction over the last axis only, with keepdims; a float cast):

=============  =======================================================================
``mean_last``  mean over the last axis, keepdims (ONNX ReduceMean, axes attribute or
               input; aten.mean.dim)
``sub`` ...    ``add`` ``sub`` ``mul`` ``div`` ``pow`` ``sqrt`` ``rsqrt``
               ``reciprocal``: elementwise
``cast``       a float -> float cast (ONNX Cast; aten.to / _to_copy)
=============  =======================================================================
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import numpy as np


@dataclasses.dataclass(frozen=True)
class V:
    """A value variable: binds any value; the same name must bind the same value."""

    name: str


@dataclasses.dataclass(frozen=True)
class C:
    """A constant operand; ``test(array)`` returns None when it fits, else a reason."""

    name: str
    test: Callable[[np.ndarray], str | None]


@dataclasses.dataclass(frozen=True)
class P:
    """A value computed by abstract op ``op`` from operands matching ``args`` (in order,
    or in either order for a two-operand ``commute`` op)."""

    op: str
    args: tuple
    commute: bool = False


@dataclasses.dataclass(frozen=True)
class Alt:
    """One rule: a pattern, its one-line algebraic gloss and the exporters that write it."""

    name: str
    pattern: Any
    gloss: str
    exporters: str


@dataclasses.dataclass(frozen=True)
class Or:
    alts: tuple[Alt, ...]


class Adapter:
    """What the matcher needs from an IR (see ``onnx_adapter`` / ``fx_adapter``)."""

    def op(self, raw: Any) -> str | None:
        """The abstract op of an IR node, or None."""
        raise NotImplementedError

    def operands(self, raw: Any) -> list[Any]:
        """The data operands the abstract op reads, in order (constants included)."""
        raise NotImplementedError

    def producer(self, value: Any) -> Any | None:
        raise NotImplementedError

    def const(self, value: Any) -> np.ndarray | None:
        raise NotImplementedError

    def check(self, raw: Any, op: str) -> str | None:
        """The semantic condition of ``op`` on ``raw`` (None when it holds, else why not)."""
        return None


@dataclasses.dataclass
class Match:
    env: dict[str, Any]  # variable / constant name -> value
    consts: dict[str, np.ndarray]
    nodes: list[Any]  # the IR nodes matched
    rules: list[str]  # the alternatives taken


class Fail(Exception):
    """A near miss: the op types fit but a semantic condition does not (the reason)."""


def match(adapter: Adapter, pattern: Any, value: Any, m: Match | None = None) -> Match | None:
    """Match ``pattern`` against ``value``; None when the op types do not fit. Raises
    ``Fail`` with a reason when the structure fits but a semantic condition fails."""
    m = m or Match({}, {}, [], [])
    return m if _match(adapter, pattern, value, m) else None


def _copy(m: Match) -> Match:
    return Match(dict(m.env), dict(m.consts), list(m.nodes), list(m.rules))


def _match(ad: Adapter, pat: Any, value: Any, m: Match) -> bool:
    if isinstance(pat, V):
        bound = m.env.get(pat.name)
        if bound is None:
            m.env[pat.name] = value
            return True
        return bound is value
    if isinstance(pat, C):
        c = ad.const(value)
        if c is None:
            return False
        why = pat.test(c)
        if why is not None:
            raise Fail(f"{pat.name} {why}")
        m.env[pat.name] = value
        m.consts[pat.name] = c
        return True
    if isinstance(pat, Or):
        failure = None
        for alt in pat.alts:
            trial = _copy(m)
            try:
                ok = _match(ad, alt.pattern, value, trial)
            except Fail as why:
                failure = failure or why
                continue
            if ok:
                trial.rules.append(alt.name)
                m.__dict__.update(trial.__dict__)
                return True
        if failure is not None:
            raise failure
        return False
    assert isinstance(pat, P), pat
    raw = ad.producer(value)
    if raw is None or ad.op(raw) != pat.op:
        return False
    ops = ad.operands(raw)
    if len(ops) != len(pat.args):
        return False
    orders = [ops, ops[::-1]] if pat.commute and len(ops) == 2 else [ops]
    failure = None
    for order in orders:
        trial = _copy(m)
        try:
            if all(_match(ad, p, v, trial) for p, v in zip(pat.args, order)):
                why = ad.check(raw, pat.op)
                if why is not None:
                    raise Fail(why)
                trial.nodes.append(raw)
                m.__dict__.update(trial.__dict__)
                return True
        except Fail as err:
            failure = failure or err
    if failure is not None:
        raise failure
    return False


# -- constant tests ---------------------------------------------------------------------
def equals(x: float) -> Callable[[np.ndarray], str | None]:
    """A scalar exactly ``x``."""
    def test(c: np.ndarray) -> str | None:
        if c.size != 1 or not np.issubdtype(c.dtype, np.number):
            return f"is not a scalar (shape {list(c.shape)})"
        return None if float(c.reshape(-1)[0]) == x else f"is {float(c.reshape(-1)[0]):g}, not {x:g}"
    return test


def scalar_eps(c: np.ndarray) -> str | None:
    """A finite non-negative scalar (the epsilon of a norm)."""
    if c.size != 1:
        return f"is not a scalar (shape {list(c.shape)})"
    e = float(c.reshape(-1)[0])
    return None if np.isfinite(e) and e >= 0 else f"is {e:g}, not a non-negative number"
