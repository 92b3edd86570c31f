"""A rewritten model that does not run: verification fails, and the CLI says that the model
does not run, naming the node and quoting the runtime's message in one line (not "max rel
error inf"); exit 1 and nothing written."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
from onnx import helper

from rewriter.manager import runtime_error
from tests.conftest import bn_inits, bn_node, init, make_model

ROOT = Path(__file__).resolve().parents[1]

BROKEN = (
    "import numpy as np\n"
    "from passes.foldnorm import FoldNorm\n"
    "from rewriter.ir.view import LinearParams\n"
    "def _bad(view, layer, affine):\n"
    "    p = view.linear(layer)\n"
    "    view.set_linear(layer, LinearParams(np.ones((p.weight.shape[0], 7)), p.bias))  # 7 inputs, not 4\n"
    "FoldNorm._fold_into_producer = staticmethod(_bad)\n"
)


def test_cli_says_the_rewritten_model_does_not_run(tmp_path):
    """A pass whose result ORT cannot run: the last line names the node and ORT's message,
    exit 1, no output file; the JSON report says runs=false with the same line."""
    (tmp_path / "broken_pass.py").write_text(BROKEN)
    rng = np.random.default_rng(0)
    m = make_model([helper.make_node("Gemm", ["x", "W"], ["h"], transB=1, name="g"), bn_node("bn", "h", "y")],
                   [("x", [2, 4])], [("y", [2, 3])], [init("W", rng.standard_normal((3, 4)))] + bn_inits("bn", 3, rng))
    onnx.save(m, tmp_path / "m.onnx")
    code = ("import sys, broken_pass; from rewriter.cli import main; "
            "sys.exit(main(['m.onnx', '--passes', 'foldnorm', '--json', 'r.json']))")
    env = dict(os.environ, PYTHONPATH=f"{tmp_path}{os.pathsep}{ROOT}")
    p = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, env=env,
                       timeout=300)
    assert p.returncode == 1, p.stderr
    lines = [ln for ln in p.stderr.strip().splitlines() if ln.strip()]
    last = lines[-1]
    assert "Traceback" not in p.stderr
    assert last.startswith("error: verification failed after pass 'foldnorm'"), last
    assert "the rewritten model does not run" in last and "'g'" in last, last
    assert "max rel error" not in last and "inf" not in last.split("does not run")[0], last
    assert not (tmp_path / "m.foldnorm.onnx").exists()
    doc = json.loads((tmp_path / "r.json").read_text())
    v = doc["verification"]
    assert v["passed"] is False and v["runs"] is False and "'g'" in v["error"], v
    from rewriter.report_schema import validate

    validate(doc)


def test_runtime_error_is_one_line():
    """ORT's run-time message becomes one line: the node named, ORT's source location dropped."""
    import onnxruntime as ort

    from tests.conftest import run_ort

    x = helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["N", 6])
    y = helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, None)
    shape = onnx.numpy_helper.from_array(np.array([-1, 4], np.int64), "shape")
    g = helper.make_graph([helper.make_node("Reshape", ["x", "shape"], ["y"], name="to_four")], "g", [x], [y], [shape])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 18)])
    m.ir_version = 10
    try:
        run_ort(m, {"x": np.zeros((3, 6), np.float32)})
    except ort.capi.onnxruntime_pybind11_state.Fail as err:  # noqa: F841
        line = runtime_error(err)
    else:
        raise AssertionError("ORT ran a reshape of 18 elements to [-1, 4]")
    assert line.startswith("node 'to_four': ") and "\n" not in line, line
    assert "cannot be reshaped" in line and ".h:" not in line, line
