"""The layering of docs/architecture.md holds: no import cycle among the project's modules,
no ``import`` inside a function except for an optional dependency, and every module imports
only from its own layer or the layers below it.

The import graph is read from the source with ``ast`` (nothing is imported), over
``rewriter/``, ``passes/``, ``backends/`` and ``models_zoo/``; a cycle is a strongly
connected component of more than one module (networkx)."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import networkx as nx
import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("rewriter", "passes", "backends", "models_zoo")

# Optional dependencies (pyproject extras or platform-dependent): the only modules a function
# may import, so that the project loads without them.
OPTIONAL = {"triton", "onnxruntime", "transformers", "diffusers", "jsonschema"}
# torch's Triton integration: ``torch.library.triton_op`` / ``wrap_triton`` load the Inductor
# (seconds at start-up); imported where the project's Triton-backed ops are first defined.
OPTIONAL_NAMES = {("torch.library", "triton_op"), ("torch.library", "wrap_triton")}

# The layer of each module, by the longest matching dotted prefix (docs/architecture.md).
LAYERS: dict[str, int] = {
    "rewriter.errors": 0, "rewriter.ir.view": 0, "rewriter.ir.dtypes": 0,
    "rewriter.ir.onnx_reader": 0, "rewriter.ir.onnx_writer": 0, "rewriter.ir.fx_consts": 0, "rewriter.ir.fx_ops": 0,
    "rewriter.ir": 3,
    "backends": 1,
    "passes.rettention_runtime": 1,  # the torch module a Re-ttention model carries: a runtime
    "rewriter.canon": 2,
    "rewriter.lower": 4,
    "rewriter.run": 5, "rewriter.compile": 5, "rewriter.torch_export": 5,
    "rewriter.pass_api": 6, "passes": 6,
    "rewriter": 7,  # manager, api, loader, report, diff, html, cli, the package itself
    "models_zoo": 5,  # the models the tests and examples build, exported by rewriter.torch_export
    "models_zoo.demo": 8,  # a script over the whole tool
}


def layer_of(mod: str) -> int:
    parts = mod.split(".")
    for i in range(len(parts), 0, -1):
        key = ".".join(parts[:i])
        if key in LAYERS:
            return LAYERS[key]
    raise KeyError(f"{mod}: no layer in tests/test_layers.py LAYERS (add it to docs/architecture.md)")


def modules(root: Path = ROOT) -> dict[str, Path]:
    out = {}
    for pkg in PACKAGES:
        for path in sorted((root / pkg).rglob("*.py")):
            rel = path.relative_to(root).with_suffix("")
            parts = list(rel.parts)
            if parts[-1] == "__init__":
                parts.pop()
            out[".".join(parts)] = path
    return out


def _resolve(name: str, mods: dict[str, Path]) -> str | None:
    """The project module ``name`` denotes (a module, or a package's ``__init__``), else None."""
    while name:
        if name in mods:
            return name
        name = name.rpartition(".")[0]
    return None


def _imports(mod: str, path: Path, mods: dict[str, Path]):
    """``(target, lineno, in_function, imported name or None)`` for each import in ``path``."""
    tree = ast.parse(path.read_text(), str(path))
    is_pkg = path.name == "__init__.py"

    def visit(node, in_func: bool):
        for child in ast.iter_child_nodes(node):
            f = in_func or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            if isinstance(child, ast.Import):
                for a in child.names:
                    yield a.name, child.lineno, f, None
            elif isinstance(child, ast.ImportFrom):
                base = child.module or ""
                if child.level:
                    pkg = mod.split(".") if is_pkg else mod.split(".")[:-1]
                    pkg = pkg[: len(pkg) - (child.level - 1)]
                    base = ".".join(pkg + ([base] if base else []))
                for a in child.names:  # `from pkg import submodule` imports the submodule
                    sub = f"{base}.{a.name}"
                    yield (sub if sub in mods else base), child.lineno, f, a.name
            else:
                yield from visit(child, f)

    yield from visit(tree, False)


def _type_checking_lines(path: Path) -> set[int]:
    """Lines under ``if TYPE_CHECKING:`` (imports for annotations only, never run)."""
    lines = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            for sub in node.body:
                lines.update(range(sub.lineno, (sub.end_lineno or sub.lineno) + 1))
    return lines


def import_graph(root: Path = ROOT):
    """``(graph, in_function)``: the project's module graph (edges from importer to imported,
    with the line) and the imports made inside a function ``(module, line, name)``."""
    mods = modules(root)
    g = nx.DiGraph()
    g.add_nodes_from(mods)
    in_function = []
    for mod, path in mods.items():
        skip = _type_checking_lines(path)
        for name, line, in_func, what in _imports(mod, path, mods):
            if line in skip:
                continue
            if in_func and name.split(".")[0] not in OPTIONAL and (name, what) not in OPTIONAL_NAMES:
                in_function.append((mod, line, name))
            target = _resolve(name, mods)
            if target is not None and target != mod:
                g.add_edge(mod, target, line=line)
    return g, in_function


def cycles(g: nx.DiGraph) -> list[list[str]]:
    return [sorted(c) for c in nx.strongly_connected_components(g) if len(c) > 1]


def upward(g: nx.DiGraph) -> list[str]:
    """The edges that import a higher layer."""
    bad = []
    for a, b, d in g.edges(data=True):
        if layer_of(b) > layer_of(a):
            bad.append(f"{a}:{d['line']} (layer {layer_of(a)}) imports {b} (layer {layer_of(b)})")
    return bad


@pytest.fixture(scope="module")
def graph():
    return import_graph()


def test_every_module_has_a_layer(graph):
    """Each module of the four packages is placed in a layer of the table."""
    g, _ = graph
    for mod in g.nodes:
        layer_of(mod)


def test_no_import_cycle(graph):
    """The module import graph (top-level and in-function imports alike) has no cycle."""
    g, _ = graph
    assert cycles(g) == []


def test_no_import_inside_a_function(graph):
    """Only an optional dependency is imported inside a function."""
    _, in_function = graph
    assert [f"{m}:{line} imports {n}" for m, line, n in in_function] == []


def test_imports_go_downward(graph):
    """Every import stays in the importer's layer or goes to a lower one."""
    g, _ = graph
    assert upward(g) == []


def test_checker_sees_a_cycle_and_a_function_import(tmp_path):
    """The checker itself can fail: a planted cycle, an upward import and an in-function
    import are each reported."""
    for pkg in PACKAGES:
        (tmp_path / pkg).mkdir()
        (tmp_path / pkg / "__init__.py").write_text("")
    (tmp_path / "rewriter" / "errors.py").write_text("from rewriter import api\n")
    (tmp_path / "rewriter" / "api.py").write_text(
        "from rewriter.errors import X\n\ndef f():\n    import passes\n    import triton\n")
    g, in_function = import_graph(tmp_path)
    assert cycles(g) == [["rewriter.api", "rewriter.errors"]]
    assert in_function == [("rewriter.api", 4, "passes")]
    assert any("rewriter.errors:1 (layer 0) imports rewriter.api" in e for e in upward(g))


def test_optional_heavy_dependencies_load_on_first_use():
    """Importing the CLI, every pass and the compile backend leaves triton (about 90 MB and a
    few tenths of a second) and the Inductor unloaded: a CPU-only ``rewrite`` never pays for
    them. Each Triton module defines its kernels in a cached factory (backends/triton)."""
    code = ("import sys, rewriter.cli, rewriter.manager, rewriter.compile, passes\n"
            "import backends.triton.crms_norm, backends.triton.rettention, backends.triton.shiftadd\n"
            "print(sorted(m for m in ('triton', 'torch._inductor') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                         timeout=300, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]", out.stdout
