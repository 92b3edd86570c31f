"""`rewrite check`: exit 0 when every goal is met, 1 when one is not (with the table), 2 on bad input."""

from __future__ import annotations

import json

import pytest

from rewriter.cli import main
from tests._report_models import conv_bn


@pytest.fixture()
def model(tmp_path):
    return conv_bn(tmp_path / "m.onnx")


def test_goals_met_exit_0(model, tmp_path, capsys):
    """A foldable model with a loose error goal passes: exit 0, goals table printed, -o written."""
    j, o = tmp_path / "c.json", tmp_path / "o.onnx"
    rc = main(["check", str(model), "--passes", "foldnorm", "--max-rel-error", "1e-3", "--json", str(j), "-o", str(o)])
    assert rc == 0
    assert "goals" in capsys.readouterr().out
    doc = json.loads(j.read_text())
    assert doc["passed"] is True and [g["goal"] for g in doc["goals"]] == ["verified", "applied", "max rel error"]
    assert o.exists()


def test_unreachable_speedup_exit_1(model, tmp_path, capsys):
    """An impossible --min-speedup fails the gate: exit 1, the table says why, -o is not written."""
    j, o = tmp_path / "c.json", tmp_path / "o.onnx"
    rc = main(["check", str(model), "--passes", "foldnorm", "--min-speedup", "1000", "--runs", "3",
               "--warmup", "1", "--json", str(j), "-o", str(o)])
    assert rc == 1
    cap = capsys.readouterr()
    assert "FAILED" in cap.out and "speedup" in cap.out
    assert cap.err.count("\n") == 1 and cap.err.startswith("error: check failed: speedup")
    doc = json.loads(j.read_text())
    assert doc["passed"] is False and doc["latency"]["speedup"] is not None
    assert not o.exists()


def test_error_budget_exit_1(model, tmp_path, capsys):
    """--max-rel-error 0 cannot be met by a float32 fold (error > 0): exit 1."""
    rc = main(["check", str(model), "--passes", "foldnorm", "--max-rel-error", "0", "-q"])
    assert rc == 1
    assert "max rel error" in capsys.readouterr().err


def test_nothing_applied_is_a_failed_goal(tmp_path, capsys):
    """A pass that applies to no site fails the 'applied' goal: exit 1 (not 3: check gates on goals)."""
    m = conv_bn(tmp_path / "nobn.onnx", with_bn=False)
    rc = main(["check", str(m), "--passes", "foldnorm", "-q"])
    assert rc == 1
    assert "applied: no site for foldnorm" in capsys.readouterr().err


@pytest.mark.parametrize("args", [
    ["check", "missing.onnx", "--passes", "foldnorm"],
    ["check", "{m}", "--passes", "nosuchpass"],
    ["check", "{m}", "--passes", "foldnorm", "--max-rel-error", "-1"],
    ["check", "{m}", "--passes", "foldnorm", "--json", "/nonexistent/dir/c.json"],
    ["check", "{m}"],
])
def test_bad_input_exit_2(args, model, capsys):
    """Bad input or usage exits 2 with one line on stderr and no traceback."""
    rc = main([a.replace("{m}", str(model)) for a in args])
    assert rc == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err
