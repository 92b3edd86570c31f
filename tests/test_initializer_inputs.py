"""IR v3 files, whose initializers are all listed as graph inputs (issue 13, point 6):
without ``--freeze-initializer-inputs`` every decline they cause names the flag; with it
they are constants and ``foldnorm`` folds exactly."""

from __future__ import annotations

import hashlib
import os

import numpy as np
import onnx
import pytest

import rewriter
from rewriter.cli import main
from rewriter.loader import FREEZE_FLAG
from tests.conftest import max_rel, op_types, run_ort


def _export_ir3(path) -> None:
    """A conv + BatchNorm net (with a residual join and a head) as the model zoo's old files
    are: TorchScript exporter at opset 9, initializers kept as inputs, IR version 3."""
    import torch

    torch.manual_seed(0)

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.c1, self.b1 = torch.nn.Conv2d(3, 8, 3, padding=1, bias=False), torch.nn.BatchNorm2d(8)
            self.c2, self.b2 = torch.nn.Conv2d(8, 8, 3, padding=1), torch.nn.BatchNorm2d(8)
            self.fc = torch.nn.Linear(8, 5)

        def forward(self, x):
            h = torch.relu(self.b1(self.c1(x)))
            h = torch.relu(self.b2(self.c2(h)) + h)
            return self.fc(h.mean((2, 3)))

    net = Net()
    with torch.no_grad():
        for b in (net.b1, net.b2):
            b.running_mean.uniform_(-0.5, 0.5)
            b.running_var.uniform_(0.5, 2.0)
            b.weight.uniform_(0.5, 1.5)
            b.bias.uniform_(-0.3, 0.3)
    net.eval()
    with torch.no_grad():
        torch.onnx.export(net, (torch.randn(1, 3, 16, 16),), str(path), dynamo=False, opset_version=9,
                          keep_initializers_as_inputs=True, do_constant_folding=False,
                          input_names=["data"], output_names=["out"])
    m = onnx.load(path)
    m.ir_version = 3
    onnx.save(m, path)


@pytest.fixture(scope="module")
def ir3(tmp_path_factory):
    path = tmp_path_factory.mktemp("ir3") / "net.onnx"
    _export_ir3(path)
    return path


def test_the_file_is_ir3_and_runs(ir3, rng):
    """The test file is what the zoo's are: IR 3, every initializer an input, BatchNorm kept, and ORT loads it."""
    m = onnx.load(ir3)
    assert m.ir_version == 3 and m.opset_import[0].version == 9
    inits = {t.name for t in m.graph.initializer}
    assert inits and inits <= {i.name for i in m.graph.input}
    assert [n.op_type for n in m.graph.node].count("BatchNormalization") == 2
    x = rng.standard_normal((1, 3, 16, 16)).astype(np.float32)
    assert run_ort(m, {"data": x})[0].shape == (1, 5)


def test_declines_name_the_flag(ir3, tmp_path, monkeypatch, capsys):
    """Without the flag foldnorm declines both BatchNorms, each reason naming the flag; exit 3, nothing written."""
    res = rewriter.rewrite(str(ir3), ["foldnorm"])
    rec = res.records[0]
    assert not rec.applied and len(rec.declined) == 2
    for s in rec.declined:
        assert "non-constant statistics" in s.reason and FREEZE_FLAG in s.reason, s.reason
    monkeypatch.chdir(tmp_path)
    digest = hashlib.sha256(ir3.read_bytes()).hexdigest()
    before = set(os.listdir(tmp_path))
    rc = main([str(ir3), "--passes", "foldnorm", "-o", "out.onnx"])
    err = capsys.readouterr().err
    assert rc == 3 and err.count(FREEZE_FLAG) == 2, err
    assert set(os.listdir(tmp_path)) == before and hashlib.sha256(ir3.read_bytes()).hexdigest() == digest


def test_flag_folds_exactly(ir3, tmp_path, monkeypatch, rng):
    """With the flag both BatchNorms fold into their convs, exact in ORT (opt. off, fp32 <= 1e-5); the inputs are just 'data'."""
    monkeypatch.chdir(tmp_path)
    assert main([str(ir3), "--passes", "foldnorm", "-o", "out.onnx", FREEZE_FLAG, "-q"]) == 0
    out = onnx.load(tmp_path / "out.onnx")
    assert "BatchNormalization" not in op_types(out) and op_types(out).count("Conv") == 2
    assert [i.name for i in out.graph.input] == ["data"] and out.ir_version >= 4
    onnx.checker.check_model(out)
    for seed in range(3):
        x = np.random.default_rng(seed).standard_normal((1, 3, 16, 16)).astype(np.float32)
        assert max_rel(run_ort(onnx.load(ir3), {"data": x})[0], run_ort(out, {"data": x})[0]) <= 1e-5


def test_api_reports_the_frozen_inputs(ir3):
    """The report lists the initializers made constants and says so in a note."""
    res = rewriter.rewrite(str(ir3), ["foldnorm"], freeze_initializer_inputs=True)
    assert res.passed and len(res.records[0].applied) == 2
    assert "b1.running_var" in res.report["frozen_initializer_inputs"]
    assert any(FREEZE_FLAG in n for n in res.verification["notes"])


def test_weight_input_decline_names_the_flag(rng):
    """A decline caused by a weight that is an input (its MatMul is then no linear layer) names the flag; with it, it folds."""
    from onnx import helper

    from tests.conftest import init, make_model

    w = init("W", rng.standard_normal((4, 3)))
    m = make_model([helper.make_node("MatMul", ["x", "W"], ["h"], name="mm"),
                    helper.make_node("BatchNormalization", ["h", "s", "b", "mu", "var"], ["y"], name="bn", epsilon=1e-3)],
                   [("x", [2, 4]), ("W", [4, 3])], [("y", [2, 3])],
                   [w, init("s", np.ones(3)), init("b", np.zeros(3)), init("mu", np.zeros(3)), init("var", np.ones(3))])
    res = rewriter.rewrite(m, ["foldnorm"])
    reasons = [s.reason for s in res.records[0].declined]
    assert not res.records[0].applied and reasons and all(FREEZE_FLAG in r for r in reasons), reasons
    res = rewriter.rewrite(m, ["foldnorm"], freeze_initializer_inputs=True)
    assert res.passed and res.records[0].applied
