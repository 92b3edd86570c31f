"""Partial application: by default a pass that applies nowhere stops the run (exit 3, nothing
written); with --allow-unapplied / allow_unapplied=True the passes that applied are written,
each unapplied one is a warning line and ``applied == 0`` in the JSON."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import onnx
import pytest
from onnx import helper

import rewriter
from rewriter.report_schema import validate
from tests.conftest import bn_inits, bn_node, init, make_model, max_rel, op_types, run_ort


@pytest.fixture(scope="module")
def model_file(tmp_path_factory):
    """Gemm -> BatchNorm: foldnorm applies, rms and lns find nothing (no residual stream)."""
    rng = np.random.default_rng(0)
    m = make_model([helper.make_node("Gemm", ["x", "W"], ["h"], transB=1, name="g"), bn_node("bn", "h", "y")],
                   [("x", [2, 4])], [("y", [2, 3])], [init("W", rng.standard_normal((3, 4)))] + bn_inits("bn", 3, rng))
    path = tmp_path_factory.mktemp("m") / "model.onnx"
    onnx.save(m, path)
    return path


def cli(*args, cwd):
    p = subprocess.run([sys.executable, "-m", "rewriter.cli", *map(str, args)], cwd=cwd, capture_output=True,
                       text=True, timeout=300)
    return p.returncode, p.stdout, p.stderr


def test_default_exit_3_writes_nothing(model_file, tmp_path):
    """foldnorm applies, rms does not: exit 3, one error line naming rms, no output file."""
    rc, _, err = cli(model_file, "--passes", "foldnorm,rms", "-o", "out.onnx", "--json", "r.json", cwd=tmp_path)
    assert rc == 3, err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: pass rms applied to no site"), err
    assert "--allow-unapplied" in lines[0]
    assert not (tmp_path / "out.onnx").exists()
    doc = json.loads((tmp_path / "r.json").read_text())
    assert {p["name"]: p["applied"] for p in doc["passes"]} == {"foldnorm": 1, "rms": 0}


def test_allow_unapplied_writes_the_applied_passes(model_file, tmp_path):
    """--allow-unapplied: exit 0, the output has foldnorm's rewrite (and its meaning), one
    warning line per unapplied pass, applied == 0 and the warnings in the (valid) JSON."""
    rc, _, err = cli(model_file, "--passes", "rms,foldnorm,lns", "-o", "out.onnx", "--json", "r.json",
                     "--allow-unapplied", "-q", cwd=tmp_path)
    assert rc == 0, err
    warnings = [ln for ln in err.splitlines() if ln.startswith("warning: ")]
    assert [w.split("'")[1] for w in warnings] == ["rms", "lns"], err
    assert all("applied to no site" in w and w.endswith("written without it") for w in warnings)
    out = onnx.load(tmp_path / "out.onnx")
    assert "BatchNormalization" not in op_types(out) and "BatchNormalization" in op_types(onnx.load(model_file))
    x = np.random.default_rng(1).standard_normal((2, 4)).astype(np.float32)
    (want,), (got,) = run_ort(onnx.load(model_file), {"x": x}), run_ort(out, {"x": x})
    assert max_rel(want, got) <= 1e-5
    doc = json.loads((tmp_path / "r.json").read_text())
    validate(doc)
    assert {p["name"]: p["applied"] for p in doc["passes"]} == {"rms": 0, "foldnorm": 1, "lns": 0}
    assert len(doc["warnings"]) == 2 and doc["verification"]["passed"] is True
    assert doc["output"].endswith("out.onnx")


def test_allow_unapplied_still_needs_one_applied_pass(model_file, tmp_path):
    """--allow-unapplied with no pass applying anywhere: still exit 3, nothing written."""
    rc, _, err = cli(model_file, "--passes", "rms,lns", "-o", "out.onnx", "--allow-unapplied", cwd=tmp_path)
    assert rc == 3, err
    assert "no requested pass applied" in err and not (tmp_path / "out.onnx").exists()


def test_api_allow_unapplied(model_file, tmp_path):
    """API: Result.save refuses (NothingApplied) by default; allow_unapplied=True writes and warns."""
    res = rewriter.rewrite(str(model_file), ["foldnorm", "rms"])
    with pytest.raises(rewriter.NothingApplied, match="rms"):
        res.save(tmp_path / "a.onnx")
    assert not (tmp_path / "a.onnx").exists()
    res = rewriter.rewrite(str(model_file), ["foldnorm", "rms"], allow_unapplied=True)
    path = res.save(tmp_path / "b.onnx")
    assert path.exists() and "BatchNormalization" not in op_types(onnx.load(path))
    assert [p["applied"] for p in res.report["passes"]] == [1, 0]
    assert len(res.report["warnings"]) == 1 and "'rms'" in res.report["warnings"][0]
    validate(res.report)
