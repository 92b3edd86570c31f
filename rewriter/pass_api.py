"""The pass contract and the registry.

A pass is a small class::

    @register
    class FoldNorm(Pass):
        name = "foldnorm"
        kind = Kind.EXACT
        summary = "fold frozen-statistics norms into adjacent linear/conv layers"

        @dataclasses.dataclass
        class Options:
            direction: str = "auto"

        def match(self, view) -> list[Site]: ...   # every candidate, accepted or declined
        def apply(self, view, sites) -> None: ...   # only accepted sites are passed

Options are a dataclass; ``--set foldnorm.direction=next`` is parsed against its field
types. ``match`` never edits; ``apply`` edits and tags every node it makes or changes with
provenance (``view.tag``). The manager verifies according to ``kind``.
"""

from __future__ import annotations

import dataclasses
import enum
import inspect
import io
import tokenize
import types
import typing
from typing import Any, ClassVar

from rewriter.errors import BadInput
from rewriter.ir.view import GraphView


class Kind(str, enum.Enum):
    EXACT = "exact"  # output equal up to float rounding
    APPROXIMATE = "approximate"  # output changes by design, within an error budget
    ARCHITECTURAL = "architectural"  # changes the function on purpose; pass checks intent


@dataclasses.dataclass
class Site:
    """One candidate place for a pass: accepted, or declined with the reason."""

    site: str  # readable id, e.g. the norm's node name
    accepted: bool
    reason: str = ""  # why declined (or a note on how it was accepted)
    plan: Any = dataclasses.field(default=None, repr=False)  # private to the pass

    def to_json(self) -> dict[str, Any]:
        d = {"site": self.site, "accepted": self.accepted}
        if self.reason:
            d["reason"] = self.reason
        return d


@dataclasses.dataclass
class Context:
    """What a pass may need besides the graph: data and user-supplied settings."""

    example_inputs: dict[str, Any] | None = None
    calib: dict[str, Any] | None = None


class Pass:
    """Base class of every pass. Subclasses set the class attributes and the two methods."""

    name: ClassVar[str] = ""
    kind: ClassVar[Kind] = Kind.EXACT
    summary: ClassVar[str] = ""
    irs: ClassVar[frozenset[str]] = frozenset({"onnx", "torch"})
    # False when sites only make sense together (e.g. a whole residual stream changing
    # width): the manager then does not bisect a failure to one site.
    bisectable: ClassVar[bool] = True
    needs_calibration: ClassVar[bool] = False

    @dataclasses.dataclass
    class Options:
        pass

    def __init__(self, options: Any = None, context: Context | None = None):
        self.options = options if options is not None else self.Options()
        self.context = context or Context()

    def match(self, view: GraphView) -> list[Site]:
        raise NotImplementedError

    def apply(self, view: GraphView, sites: list[Site]) -> None:
        raise NotImplementedError

    def finish(self, view: GraphView) -> None:
        """Clean-up after all sites are applied (e.g. cancel inverse transposes)."""

    # Verification hooks for non-exact passes --------------------------------------------
    def error_budget(self) -> float | None:
        """Max relative error allowed after this pass; None means dtype tolerance (exact)."""
        return None


_REGISTRY: dict[str, type[Pass]] = {}


def register(cls: type[Pass]) -> type[Pass]:
    if not cls.name:
        raise ValueError(f"{cls.__name__} has no name")
    if cls.name in _REGISTRY:
        raise ValueError(f"pass {cls.name!r} registered twice")
    _REGISTRY[cls.name] = cls
    return cls


def all_passes() -> dict[str, type[Pass]]:
    """The registered passes. Importing ``passes`` registers them all; ``rewriter.api``
    does, so ``import rewriter`` (which any ``rewriter.X`` import runs first) has them."""
    return dict(sorted(_REGISTRY.items()))


def get_pass(name: str) -> type[Pass]:
    try:
        return _REGISTRY[name]
    except KeyError:
        known = ", ".join(sorted(_REGISTRY))
        raise BadInput(f"unknown pass {name!r} (known passes: {known})") from None


def _coerce(text: str, typ: Any, where: str) -> Any:
    origin = typing.get_origin(typ)
    if typ is bool:
        low = text.strip().lower()
        if low in ("1", "true", "yes", "on"):
            return True
        if low in ("0", "false", "no", "off"):
            return False
        raise BadInput(f"--set {where}: expected true/false, got {text!r}")
    if typ in (int, float, str):
        try:
            return typ(text)
        except ValueError:
            raise BadInput(f"--set {where}: expected {typ.__name__}, got {text!r}") from None
    if origin is typing.Literal:
        choices = typing.get_args(typ)
        if text not in choices:
            raise BadInput(f"--set {where}: expected one of {', '.join(map(str, choices))}, got {text!r}")
        return text
    if origin in (list, tuple):
        (inner, *_) = typing.get_args(typ) or (str,)
        return [_coerce(t, inner, where) for t in text.split(",") if t]
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(typ) if a is not type(None)]
        if text.lower() in ("none", "null", ""):
            return None
        return _coerce(text, args[0], where)
    return text


def make_options(pass_cls: type[Pass], settings: dict[str, str]) -> Any:
    """Build ``pass_cls.Options`` from ``{"key": "text"}``; unknown keys are a BadInput."""
    hints = typing.get_type_hints(pass_cls.Options)
    fields = {f.name for f in dataclasses.fields(pass_cls.Options)}
    values = {}
    for key, text in settings.items():
        if key not in fields:
            known = ", ".join(sorted(fields)) or "none"
            raise BadInput(f"--set {pass_cls.name}.{key}: pass {pass_cls.name!r} has no option {key!r} (options: {known})")
        values[key] = _coerce(text, hints[key], f"{pass_cls.name}.{key}")
    return pass_cls.Options(**values)


def parse_sets(items: list[str]) -> dict[str, dict[str, str]]:
    """``["foldnorm.direction=next"]`` -> ``{"foldnorm": {"direction": "next"}}``."""
    out: dict[str, dict[str, str]] = {}
    for item in items:
        key, sep, value = item.partition("=")
        pname, dot, opt = key.partition(".")
        if not sep or not dot or not pname or not opt:
            raise BadInput(f"malformed --set {item!r}: expected PASS.KEY=VALUE")
        out.setdefault(pname.strip(), {})[opt.strip()] = value
    return out


# -- descriptions (``rewrite passes``) ---------------------------------------------------------
def _type_name(typ: Any) -> str:
    """``Literal["a", "b"]`` -> ``a|b``; ``list[int]`` -> ``list[int]``; ``int`` -> ``int``."""
    origin = typing.get_origin(typ)
    if origin is typing.Literal:
        return "|".join(map(str, typing.get_args(typ)))
    if origin in (list, tuple):
        return f"{origin.__name__}[{', '.join(_type_name(a) for a in typing.get_args(typ))}]"
    if origin in (typing.Union, types.UnionType):
        return " | ".join(_type_name(a) for a in typing.get_args(typ))
    return getattr(typ, "__name__", str(typ))


def _field_comments(options_cls: type) -> dict[str, str]:
    """The trailing ``# comment`` of each field line in the Options class source."""
    try:
        src = inspect.getsource(options_cls)
    except (OSError, TypeError):
        return {}
    names = {f.name for f in dataclasses.fields(options_cls)}
    out: dict[str, str] = {}
    first_name: dict[int, str] = {}
    try:
        for tok in tokenize.generate_tokens(io.StringIO(src).readline):
            row = tok.start[0]
            if tok.type == tokenize.NAME and row not in first_name:
                first_name[row] = tok.string
            elif tok.type == tokenize.COMMENT and first_name.get(row) in names:
                out.setdefault(first_name[row], tok.string.lstrip("#").strip())
    except (tokenize.TokenError, IndentationError):
        pass
    return out


def option_default(f: dataclasses.Field) -> Any:
    """A field's default value (calling its ``default_factory``)."""
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
        return f.default_factory()  # type: ignore[misc]
    return None


def describe_passes() -> list[dict[str, Any]]:
    """Every registered pass as data: name, kind, IRs, summary and its options, each with
    type, default (a value, never a sentinel) and a one-line meaning (``metadata["help"]``,
    else the field's trailing comment in the source)."""
    docs = []
    for name, cls in all_passes().items():
        hints = typing.get_type_hints(cls.Options)
        comments = _field_comments(cls.Options)
        opts = []
        for f in dataclasses.fields(cls.Options):
            opts.append({"name": f.name, "type": _type_name(hints.get(f.name, f.type)),
                         "default": option_default(f),
                         "help": f.metadata.get("help") or comments.get(f.name, "")})
        docs.append({"name": name, "kind": cls.kind.value, "irs": sorted(cls.irs), "summary": cls.summary,
                     "options": opts})
    return docs
