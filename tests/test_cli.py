"""The `rewrite` CLI: exit codes, one-line errors, no traceback, no output on failure."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import helper

from tests.conftest import bn_inits, bn_node, init, make_model

REWRITE = [sys.executable, "-m", "rewriter.cli"]


def cli(*args, cwd):
    p = subprocess.run(REWRITE + [str(a) for a in args], cwd=cwd, capture_output=True, text=True, timeout=300)
    return p.returncode, p.stdout, p.stderr


@pytest.fixture(scope="module")
def model_file(tmp_path_factory):
    rng = np.random.default_rng(0)
    d = tmp_path_factory.mktemp("m")
    m = make_model([helper.make_node("Gemm", ["x", "W"], ["h"], transB=1, name="g"), bn_node("bn", "h", "y")],
                   [("x", [2, 4])], [("y", [2, 3])], [init("W", rng.standard_normal((3, 4)))] + bn_inits("bn", 3, rng))
    path = d / "model.onnx"
    onnx.save(m, path)
    return path


def assert_one_line_error(rc, err, code=2, needle=""):
    assert rc == code, err
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith("error: ") and "Traceback" not in err
    assert needle in lines[0], lines[0]


def test_success_writes_output_and_json(model_file, tmp_path):
    """A good run exits 0, writes the default-named output and the JSON document."""
    rc, out, err = cli(model_file, "--passes", "foldnorm", "--json", "r.json", cwd=tmp_path)
    assert rc == 0, err
    assert (tmp_path / "model.foldnorm.onnx").exists()
    doc = json.loads((tmp_path / "r.json").read_text())
    assert doc["passes"][0]["name"] == "foldnorm" and doc["passes"][0]["kind"] == "exact"
    assert doc["passes"][0]["applied"] == 1
    assert doc["verification"]["passed"] is True and doc["verification"]["max_rel_error"] <= 1e-5
    assert doc["diff"]["op_counts"]["before"]["BatchNormalization"] == 1
    assert "BatchNormalization" not in doc["diff"]["op_counts"]["after"]
    assert "seconds" in doc["passes"][0] and "declined" in doc["passes"][0]
    assert "BatchNormalization" in out and "foldnorm" in out


def test_pt2_output_for_torch_input(tmp_path):
    """zoo:NAME with -o x.pt2 rewrites the torch.export graph and saves a loadable program."""
    import torch

    rc, _, err = cli("zoo:bn-cnn", "--passes", "foldnorm", "-o", "out.pt2", cwd=tmp_path)
    assert rc == 0, err
    ep = torch.export.load(str(tmp_path / "out.pt2"))
    assert not any("batch_norm" in str(n.target) for n in ep.graph.nodes)


def test_nothing_applied_exit_3(tmp_path):
    """A pass that applies to no site exits 3, prints the reasons and writes nothing."""
    rng = np.random.default_rng(0)
    m = make_model([bn_node("bn", "x", "y")], [("x", [2, 4])], [("y", [2, 4])], bn_inits("bn", 4, rng))
    onnx.save(m, tmp_path / "m.onnx")
    rc, _, err = cli("m.onnx", "--passes", "foldnorm", cwd=tmp_path)
    assert_one_line_error(rc, err, 3, "applied to no site")
    assert "graph input" in err
    assert not (tmp_path / "m.foldnorm.onnx").exists()


def test_verification_failure_exit_1(tmp_path, monkeypatch):
    """A pass that breaks the model: exit 1, the pass and site named, nothing written."""
    plugin = tmp_path / "broken_pass.py"
    plugin.write_text(
        "import numpy as np\n"
        "from passes.foldnorm import FoldNorm\n"
        "from rewriter.ir.view import LinearParams\n"
        "def _bad(view, layer, affine):\n"
        "    p = view.linear(layer)\n"
        "    view.set_linear(layer, LinearParams(p.weight * 1.5, p.bias))\n"
        "FoldNorm._fold_into_producer = staticmethod(_bad)\n"
    )
    rng = np.random.default_rng(0)
    m = make_model([helper.make_node("Gemm", ["x", "W"], ["h"], transB=1, name="g"), bn_node("bn", "h", "y")],
                   [("x", [2, 4])], [("y", [2, 3])], [init("W", rng.standard_normal((3, 4)))] + bn_inits("bn", 3, rng))
    onnx.save(m, tmp_path / "m.onnx")
    code = ("import sys, broken_pass; from rewriter.cli import main; "
            "sys.exit(main(['m.onnx', '--passes', 'foldnorm']))")
    env = dict(os.environ, PYTHONPATH=f"{tmp_path}{os.pathsep}{Path(__file__).resolve().parents[1]}")
    p = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, env=env)
    assert_one_line_error(p.returncode, p.stderr, 1, "verification failed after pass 'foldnorm' at site 'bn'")
    assert not (tmp_path / "m.foldnorm.onnx").exists()


BAD = [
    (["missing.onnx", "--passes", "foldnorm"], "no such file"),
    (["adir", "--passes", "foldnorm"], "is a directory"),
    (["random.onnx", "--passes", "foldnorm"], "not a valid ONNX model"),
    (["truncated.onnx", "--passes", "foldnorm"], "not a valid ONNX model"),
    (["empty.onnx", "--passes", "foldnorm"], "empty file"),
    (["{model}", "--passes", "nosuchpass"], "unknown pass 'nosuchpass'"),
    (["{model}", "--passes", "foldnorm", "--set", "foldnorm"], "malformed --set"),
    (["{model}", "--passes", "foldnorm", "--set", "foldnorm.nope=1"], "has no option 'nope'"),
    (["{model}", "--passes", "foldnorm", "--set", "foldnorm.direction=sideways"], "expected one of"),
    (["{model}", "--passes", "foldnorm", "-o", "no/such/dir/out.onnx"], "does not exist"),
    (["{model}", "--passes", "foldnorm", "--inputs", "wrong.npz"], "input names do not match"),
    (["{model}", "--passes", "foldnorm", "--shape", "x=2,a"], "malformed --shape"),
    (["{model}", "--passes", "foldnorm", "-o", "{model}"], "refusing to overwrite the input"),
    (["{model}", "--passes", "foldnorm", "--no-such-flag"], "No such option"),
    (["zoo:nope", "--passes", "foldnorm"], "unknown zoo model 'nope'"),
]


@pytest.mark.parametrize("args,needle", BAD, ids=[b[1] for b in BAD])
def test_bad_input(args, needle, model_file, tmp_path, monkeypatch, capsys):
    """Each bad input exits 2 with one line naming the problem, no traceback, no output
    (in-process through ``main``; ``test_console_script_bad_input`` runs the real binary)."""
    from rewriter.cli import main

    (tmp_path / "adir").mkdir()
    (tmp_path / "random.onnx").write_bytes(os.urandom(300))
    (tmp_path / "truncated.onnx").write_bytes(model_file.read_bytes()[:40])
    (tmp_path / "empty.onnx").write_bytes(b"")
    np.savez(tmp_path / "wrong.npz", notx=np.zeros((2, 4), np.float32))
    local = tmp_path / "model.onnx"
    local.write_bytes(model_file.read_bytes())
    before = set(os.listdir(tmp_path))
    monkeypatch.chdir(tmp_path)
    rc = main([a.replace("{model}", "model.onnx") for a in args])
    err = capsys.readouterr().err
    assert_one_line_error(rc, err, 2, needle)
    assert set(os.listdir(tmp_path)) == before  # nothing written
    assert local.read_bytes() == model_file.read_bytes()  # input untouched


def test_passes_and_explain(model_file, tmp_path):
    """`rewrite passes` lists foldnorm; `rewrite explain` shows the site and its status."""
    rc, out, _ = cli("passes", cwd=tmp_path)
    assert rc == 0 and "foldnorm" in out and "exact" in out
    rc, out, _ = cli("explain", model_file, "--passes", "foldnorm", "--json", "e.json", cwd=tmp_path)
    assert rc == 0 and "applied" in out
    doc = json.loads((tmp_path / "e.json").read_text())
    assert doc["passes"][0]["sites"][0]["site"] == "bn"


def test_console_script_bad_input(tmp_path):
    """The installed `rewrite` script: random bytes named .onnx -> exit 2, one line."""
    import shutil

    exe = shutil.which("rewrite") or str(Path(sys.executable).parent / "rewrite")
    (tmp_path / "junk.onnx").write_bytes(os.urandom(64))
    p = subprocess.run([exe, "junk.onnx", "--passes", "foldnorm"], cwd=tmp_path, capture_output=True, text=True)
    assert_one_line_error(p.returncode, p.stderr, 2, "not a valid ONNX model")


def test_default_report_is_a_summary_and_v_prints_the_tables(model_file, tmp_path):
    """Without -v the run prints a summary (pass with applied/declined counts, the changed ops,
    the numerics verdict, the output path, how to see more), none of the tables; -v prints
    the op-count, sites and numerics tables."""
    rc, out, err = cli(model_file, "--passes", "foldnorm", "-o", "a.onnx", cwd=tmp_path)
    assert rc == 0, err
    lines = [ln for ln in out.splitlines() if ln.strip()]
    assert len(lines) <= 8, out
    assert "pass foldnorm (exact): 1 site(s) applied, 0 declined" in out and "verified" in out
    assert "BatchNormalization 1 -> 0" in out and "numerics" in out and "passed" in out
    assert "wrote" in out and "a.onnx" in out and lines[-1].startswith("more: -v")
    assert "op counts" not in out and "┃" not in out
    rc, out, err = cli(model_file, "--passes", "foldnorm", "-o", "b.onnx", "-v", cwd=tmp_path)
    assert rc == 0, err
    assert "op counts" in out and "sites" in out and "numerics (original vs rewritten)" in out
    assert "more: -v" not in out
