"""Turning what the user names into a GraphView, and a view back into a file.

``MODEL`` may be an ONNX path, ``zoo:NAME`` or ``package.module:factory``. The last one
imports and runs user code (the factory returns ``(module, example_inputs)``): only name
modules you trust. Torch models go to the IR the output asks for: ``.onnx`` exports once
with the dynamo exporter and rewrites the ONNX graph; ``.pt2`` captures with torch.export
and rewrites the fx graph.

Files are written atomically: to a temporary name in the target directory, then renamed,
so a failure never leaves a partial output and the input is never touched.
"""

from __future__ import annotations

import dataclasses
import importlib
import logging
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import networkx as nx
import onnx
import onnx_ir as ir
import torch

import models_zoo
from rewriter.compile import export_program
from rewriter.errors import BadInput
from rewriter.ir.fx_view import FxView, capture
from rewriter.ir.onnx_reader import input_files, load_model, shape_only_proto
from rewriter.ir.onnx_view import OnnxView
from rewriter.ir.onnx_writer import save_single_file
from rewriter.ir.view import GraphView
from rewriter.torch_export import export_to_onnx

_EXTERNAL_THRESHOLD = 1 << 30  # save weights as external data above 1 GiB


@dataclasses.dataclass
class Source:
    """Where a model came from: ``kind`` is onnx, zoo or factory."""

    kind: str
    name: str  # path, zoo name or module:factory
    stem: str  # for the default output name
    module: torch.nn.Module | None = None
    example_inputs: tuple[Any, ...] = ()


def resolve(spec: str) -> Source:
    """Parse MODEL without loading heavy things yet; errors are BadInput."""
    if spec.startswith("zoo:"):
        name = spec[4:]
        try:
            module, inputs = models_zoo.build(name)
        except KeyError as err:
            raise BadInput(str(err.args[0])) from None
        return Source("zoo", name, name, module, inputs)
    path = Path(spec)
    if path.suffix.lower() == ".onnx" or path.exists() or ":" not in spec:
        if not path.exists():
            raise BadInput(f"{spec}: no such file")
        if path.is_dir():
            raise BadInput(f"{spec}: is a directory, not an ONNX file")
        return Source("onnx", str(path), path.name.removesuffix(".onnx"))
    mod_name, _, attr = spec.partition(":")
    try:
        mod = importlib.import_module(mod_name)
    except Exception as err:  # noqa: BLE001 - user code
        raise BadInput(f"{spec}: cannot import {mod_name!r} ({type(err).__name__}: {err})") from None
    factory = getattr(mod, attr, None)
    if not callable(factory):
        raise BadInput(f"{spec}: {mod_name!r} has no callable {attr!r}")
    try:
        built = factory()
        module, inputs = built
    except Exception as err:  # noqa: BLE001
        raise BadInput(f"{spec}: the factory must return (module, example_inputs): {type(err).__name__}: {err}") from None
    if not isinstance(module, torch.nn.Module):
        raise BadInput(f"{spec}: the factory returned {type(module).__name__}, not a torch.nn.Module")
    return Source("factory", spec, attr, module.eval(), tuple(inputs))


def load_onnx(path: str | os.PathLike) -> OnnxView:
    """Load an ONNX file (external data included) or raise BadInput naming the problem."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            head = f.read(1)
    except OSError as err:
        raise BadInput(f"{path}: cannot read ({err.strerror})") from None
    if not head:
        raise BadInput(f"{path}: empty file")
    try:
        # large weights mapped from the file, not copied; checked like ONNX Runtime checks it
        model = load_model(path)
    except BadInput:
        raise
    except Exception as err:  # noqa: BLE001 - any parse failure is bad input
        raise BadInput(f"{path}: not a valid ONNX model ({type(err).__name__})") from None
    if len(model.graph) == 0 and not model.graph.outputs:
        raise BadInput(f"{path}: the file holds no ONNX graph (a protobuf, but not a model)")
    _READS[str(path.resolve())] = input_files(model)
    view = OnnxView(model, path)
    check_model(view, str(path))
    infer_shapes(view)
    return view


MIN_OPSET = 9  # BatchNormalization and friends have their current semantics from 9 on
KNOWN_DOMAINS = {"", "ai.onnx", "ai.onnx.ml", "com.microsoft", "rewriter"}


def check_model(view: OnnxView, where: str) -> None:
    """Refuse what cannot be rewritten safely, with one line naming the problem."""
    opset = view.model.opset_imports.get("", view.model.opset_imports.get("ai.onnx"))
    if opset is not None and opset < MIN_OPSET:
        raise BadInput(f"{where}: opset {opset} is older than the oldest supported ({MIN_OPSET}); "
                       "convert it first (onnx.version_converter)")
    names: dict[str, int] = {}
    for node in view.graph.all_nodes():
        if node.name:
            names[node.name] = names.get(node.name, 0) + 1
    dups = sorted(n for n, c in names.items() if c > 1)
    if dups:
        raise BadInput(f"{where}: duplicate node name(s) {', '.join(repr(d) for d in dups[:3])}"
                       f"{' ...' if len(dups) > 3 else ''}: node names must be unique")
    check_dataflow(view.graph, where)


def _label(node: ir.Node) -> str:
    return repr(node.name) if node.name else f"<unnamed {node.op_type}>"


def _reads(node: ir.Node) -> list[ir.Value]:
    """The values ``node`` reads: its inputs and, for control flow, what its subgraphs read
    from enclosing scopes (a subgraph node reading its own graph's values is not counted)."""
    vals = [v for v in node.inputs if v is not None]
    for attr in node.attributes.values():
        if attr.type == ir.AttributeType.GRAPH:
            graphs = [attr.value]
        elif attr.type == ir.AttributeType.GRAPHS:
            graphs = list(attr.value)
        else:
            continue
        for g in graphs:
            inner = set(g.inputs) | set(g.initializers.values())
            for sub in g.all_nodes():
                inner.update(sub.outputs)
                if sub.graph is not None:
                    inner.update(sub.graph.inputs)
                    inner.update(sub.graph.initializers.values())
            vals.extend(v for sub in g.all_nodes() for v in sub.inputs if v is not None and v not in inner)
    return vals


def check_dataflow(graph: ir.Graph, where: str) -> None:
    """Every tensor a node reads is defined (a graph input, an initializer or a node's
    output), and the nodes form no cycle. A graph whose nodes are merely out of order is
    sorted (ONNX requires topological order; the passes rely on it)."""
    unsorted = False
    graph_attr = (ir.AttributeType.GRAPH, ir.AttributeType.GRAPHS)
    for g in [graph, *(a.value for n in graph.all_nodes() for a in n.attributes.values()
                       if a.type == ir.AttributeType.GRAPH)]:
        defined = set(g.inputs)
        defined.update(g.initializers.values())
        for node in g:
            reads = (_reads(node) if node.attributes and any(a.type in graph_attr for a in node.attributes.values())
                     else node.inputs)
            for v in reads:
                if v is None or v in defined:
                    continue
                p = v.producer()
                if p is None and not v.is_graph_input() and not v.is_initializer():
                    raise BadInput(f"{where}: node {_label(node)} ({node.op_type}) reads tensor {v.name!r}, "
                                   "which no node, graph input or initializer defines")
                if p is not None and p.graph is g:
                    unsorted = True  # read before the node that makes it
            defined.update(node.outputs)
    if not unsorted:
        return
    try:
        graph.sort()
    except ValueError:
        raise BadInput(f"{where}: the graph has a cycle ({_cycle(graph)}): an ONNX graph must be acyclic") from None


def _cycle(graph: ir.Graph) -> str:
    """One cycle of ``graph``'s nodes, as ``'a' -> 'b' -> 'a'``."""
    dg = nx.DiGraph()
    for g in [graph, *(a.value for n in graph.all_nodes() for a in n.attributes.values()
                       if a.type == ir.AttributeType.GRAPH)]:
        for node in g:
            for v in _reads(node):
                p = v.producer()
                if p is not None and p.graph is g:
                    dg.add_edge(p, node)
    try:
        edges = nx.find_cycle(dg)
    except nx.NetworkXNoCycle:  # pragma: no cover - sort() said there is one
        return "through a subgraph"
    ring = [e[0] for e in edges]
    order = {n: i for i, n in enumerate(graph.all_nodes())}
    first = min(range(len(ring)), key=lambda i: order.get(ring[i], len(order)))
    ring = ring[first:] + ring[:first]  # start at the node the file lists first
    path = ring + ring[:1]
    shown = " -> ".join(_label(n) for n in path[:8])
    return f"nodes {shown}{' -> ...' if len(path) > 8 else ''}"


def check_runnable(view: OnnxView, where: str) -> None:
    """Verification runs the model in ONNX Runtime: refuse unknown operator domains and random
    ops (a model whose outputs are random cannot be compared) early."""
    local = {(f.domain, f.name) for f in view.model.functions.values()}
    for node in view.graph.all_nodes():
        if node.domain not in KNOWN_DOMAINS and (node.domain, node.op_type) not in local:
            raise BadInput(f"{where}: unknown operator domain {node.domain!r} (node {node.name!r}, op "
                           f"{node.op_type}): ONNX Runtime cannot run it to verify the rewrite "
                           "(--no-verify rewrites without verification)")
        why = _random(view, node) if node.domain in ("", "ai.onnx") else ""
        if why:
            raise BadInput(f"{where}: node {node.name!r} ({node.op_type}) {why}: the model's outputs are random, "
                           "so no rewrite can be verified against it (export the model in eval mode, or "
                           "--no-verify)")


_RANDOM_OPS = ("RandomUniform", "RandomUniformLike", "RandomNormal", "RandomNormalLike", "Multinomial", "Bernoulli")


def _random(view: OnnxView, node: ir.Node) -> str:
    """Why ``node`` draws random numbers at run time, or ''. A ``Dropout`` is random only in
    training mode (its third input true) with a ratio that is not 0; the dynamo exporter
    writes training-mode Dropout (or ``RandomUniformLike`` masks) for a module left in
    training mode."""
    if node.op_type in _RANDOM_OPS:
        return "draws random numbers"
    if node.op_type != "Dropout" or len(node.inputs) < 3 or node.inputs[2] is None:
        return ""
    mode = view.const_value(node.inputs[2])
    ratio = view.const_value(node.inputs[1]) if node.inputs[1] is not None else None
    if mode is not None and not bool(mode.reshape(-1)[0]):
        return ""
    if ratio is not None and float(ratio.reshape(-1)[0]) == 0.0:
        return ""
    return "is a Dropout in training mode" if mode is not None else "is a Dropout whose training mode is a run-time input"


def infer_shapes(view: OnnxView) -> None:
    """Fill in missing shapes (passes need ranks): best effort, never fatal, and only where
    a value has no shape yet — existing types and shapes are never overwritten."""
    missing = [v for n in view.graph for v in n.outputs if v.shape is None]
    if not missing:
        return
    try:
        inferred = onnx.shape_inference.infer_shapes(shape_only_proto(view.model), strict_mode=False)
        infos = {vi.name: vi.type for vi in list(inferred.graph.value_info) + list(inferred.graph.output)}
        for v in missing:
            t = infos.get(v.name)
            if t is None or not t.HasField("tensor_type") or not t.tensor_type.HasField("shape"):
                continue
            dims = [d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in t.tensor_type.shape.dim]
            v.shape = ir.Shape(dims)
            if v.dtype is None and t.tensor_type.elem_type:
                v.dtype = ir.DataType(t.tensor_type.elem_type)
    except Exception as err:  # noqa: BLE001
        logging.getLogger(__name__).info("shape inference failed: %s", err)





def to_view(source: Source, ir_kind: str, *, opset: int = 18, workdir: str | None = None) -> GraphView:
    """Load ``source`` as an ONNX or torch view."""
    if source.kind == "onnx":
        if ir_kind != "onnx":
            raise BadInput(f"{source.name}: an ONNX model can only be written as .onnx")
        return load_onnx(source.name)
    if ir_kind == "onnx":
        tmp = workdir or tempfile.mkdtemp(prefix="rewriter-export-")
        path = Path(tmp) / f"{source.stem}.onnx"
        try:
            export_to_onnx(source.module, source.example_inputs, path, opset=opset)
        except Exception as err:  # noqa: BLE001
            raise BadInput(f"{source.name}: ONNX export failed ({type(err).__name__}: {err})") from None
        view = load_onnx(path)
        view.model.graph.initializers  # loaded eagerly enough for in-memory use
        return view
    try:
        gm = capture(source.module, source.example_inputs)
    except Exception as err:  # noqa: BLE001
        raise BadInput(f"{source.name}: cannot capture the module ({type(err).__name__}: {err})") from None
    return FxView(gm, source.example_inputs, source.module)


def _atomic_dir(target: Path) -> Path:
    parent = target.parent if str(target.parent) else Path(".")
    if not parent.exists():
        raise BadInput(f"{target}: directory {parent} does not exist")
    if not parent.is_dir() or not os.access(parent, os.W_OK):
        raise BadInput(f"{target}: directory {parent} is not writable")
    return parent


def check_output_path(target: str | os.PathLike, input_path: str | None = None) -> Path:
    """Validate an output path before any work is done."""
    target = Path(target)
    _atomic_dir(target)
    if target.suffix.lower() not in (".onnx", ".pt2"):
        raise BadInput(f"{target}: the output must end in .onnx or .pt2")
    if target.is_dir():
        raise BadInput(f"{target}: is a directory")
    if input_path is not None and (Path(input_path).resolve() == target.resolve() or _same(target, input_path)):
        raise BadInput(f"{target}: refusing to overwrite the input model")
    if input_path is not None and _same(_side_file(target), input_path):
        raise BadInput(f"{target}: its weights file {_side_file(target).name} would be the input model itself")
    return target


_READS: dict[str, list[Path]] = {}  # resolved model path -> the files loading it read


def _side_file(target: Path) -> Path:
    return target.with_name(target.name + ".data")


def _same(a: str | os.PathLike, b: str | os.PathLike) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def check_not_input(view: GraphView, target: str | os.PathLike, *, model_too: bool = True) -> None:
    """Refuse (BadInput, before anything is written) when an output file, the model or its
    ``.data`` side file, is a file the input model reads: the model file (unless not
    ``model_too``: the API may replace its own input file, which it has finished reading)
    or one of its external data files; compared by inode (``os.path.samefile``)."""
    path = getattr(view, "path", None)
    if path is None:
        return
    reads = _READS.get(str(Path(path).resolve())) or [Path(path)]
    target = Path(target)
    for out in (target, _side_file(target)):
        for i, f in enumerate(reads):
            if (i == 0 and not model_too and out == target) or not _same(out, f):
                continue
            what = "the input model" if i == 0 else f"the input's external data file {f.name!r}"
            raise BadInput(f"{out}: refusing to write over {what} (an output may not be a file the input reads)")


def save(view: GraphView, target: str | os.PathLike, *, overwrite_input: bool = False) -> Path:
    """Write ``view`` to ``target`` atomically (.onnx or .pt2). No output file may be a file
    the input reads (``check_not_input``); ``overwrite_input`` lets the model file replace
    the input model file (the API's explicit choice), never an input's side file."""
    target = Path(target)
    parent = _atomic_dir(target)
    check_not_input(view, target, model_too=not overwrite_input)
    tmpdir = Path(tempfile.mkdtemp(prefix=".rewriter-", dir=parent))
    try:
        if isinstance(view, OnnxView):
            if target.suffix.lower() != ".onnx":
                raise BadInput(f"{target}: an ONNX model is written as .onnx")
            tmp = tmpdir / target.name
            total = sum(v.const_value.nbytes for v in view.graph.initializers.values() if v.const_value is not None)
            external = total > _EXTERNAL_THRESHOLD or view.external_data
            if external:
                data_name = target.name + ".data"
                ir.save(view.model, tmp, external_data=data_name)
                os.replace(tmpdir / data_name, parent / data_name)
            else:
                save_single_file(view.model, tmp)
            os.replace(tmp, target)
        else:
            if target.suffix.lower() != ".pt2":
                raise BadInput(f"{target}: a torch model is written as .pt2 (or rewrite to .onnx from the start)")
            tmp = tmpdir / target.name
            ep = export_program(view.gm, view.example_inputs)  # a step program for Re-ttention
            torch.export.save(ep, str(tmp))
            os.replace(tmp, target)
    finally:
        for p in tmpdir.iterdir():
            p.unlink()
        tmpdir.rmdir()
    return target


# -- initializers listed as graph inputs (IR v3 files) --------------------------------------
FREEZE_FLAG = "--freeze-initializer-inputs"
FREEZE_HINT = (f"the model lists initializers as graph inputs (IR v3 style), so they are overridable, not "
               f"constants: {FREEZE_FLAG} (API: freeze_initializer_inputs=True) treats them as constants")


def initializer_inputs(view: GraphView) -> list[ir.Value]:
    """Graph inputs that carry an initializer (a default the caller may override)."""
    if not isinstance(view, OnnxView):
        return []
    return [v for v in view.graph.inputs if v.is_initializer()]


def freeze_initializer_inputs(view: GraphView) -> list[str]:
    """Make initializers that are also graph inputs plain constants: they leave the graph's
    inputs (the IR version goes to 4 if it was older: IR 3 requires every initializer to be
    an input). Returns their names. ``--freeze-initializer-inputs``; opt-in, because a
    caller that fed those inputs can no longer."""
    frozen = initializer_inputs(view)
    if not frozen:
        return []
    for v in frozen:
        view.graph.inputs.remove(v)
    if view.model.ir_version is not None and view.model.ir_version < 4:
        view.model.ir_version = 4
    view._const_cache.clear()
    view.invalidate()
    return [v.name for v in frozen]


def param_stats(view: GraphView) -> dict[str, int]:
    """Number of parameter elements and their bytes."""
    if isinstance(view, OnnxView):
        count = nbytes = 0
        for v in view.graph.initializers.values():
            t = v.const_value
            if t is not None:
                count += t.size
                nbytes += t.nbytes
        return {"count": int(count), "bytes": int(nbytes)}
    tensors = {id(t): t for t in list(view.gm.parameters()) + list(view.gm.buffers())}
    return {"count": int(sum(t.numel() for t in tensors.values())),
            "bytes": int(sum(t.numel() * t.element_size() for t in tensors.values()))}


def as_view(model: Any, *, example_inputs: Sequence[Any] | None = None, ir_kind: str | None = None) -> GraphView:
    """Accept a path, ``zoo:NAME``, ``module:factory``, ModelProto, onnx_ir Model or nn.Module."""
    if isinstance(model, GraphView):
        return model.copy()
    if isinstance(model, (onnx.ModelProto, ir.Model)):
        view = OnnxView(ir.from_proto(model) if isinstance(model, onnx.ModelProto) else model.clone())
        check_model(view, "model")
        infer_shapes(view)
        return view
    if isinstance(model, torch.nn.Module):
        if example_inputs is None:
            raise BadInput("a torch module needs example_inputs")
        if ir_kind == "onnx":
            src = Source("factory", type(model).__name__, type(model).__name__.lower(), model.eval(), tuple(example_inputs))
            return to_view(src, "onnx")
        if isinstance(model, torch.fx.GraphModule):
            return FxView(model, tuple(example_inputs)).copy()  # the caller's module stays as it was
        return FxView(capture(model.eval(), tuple(example_inputs)), tuple(example_inputs), model)
    if isinstance(model, (str, os.PathLike)):
        src = resolve(str(model))
        if src.kind == "onnx":
            return load_onnx(src.name)
        return to_view(src, ir_kind or "onnx")
    raise BadInput(f"cannot rewrite a {type(model).__name__}")
