"""A model whose outputs are random (the dynamo exporter writes training-mode ``Dropout`` for a
module left in training mode) is refused in one line before any pass runs: verification
would compare two random draws and blame the rewrite (the architecture sweep's gpt2 / opt /
t5 / bart dynamo files failed verification that way)."""

from __future__ import annotations

import warnings

import numpy as np
import onnx
import pytest
import torch

import rewriter
from rewriter.errors import BadInput
from tests.conftest import max_rel, run_ort


class _Block(torch.nn.Module):
    """Pre-LN residual block: x + W2 drop(W1 LN(x)) ; LN(x) -> head."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.ln, self.w1, self.w2 = torch.nn.LayerNorm(16), torch.nn.Linear(16, 16), torch.nn.Linear(16, 16)
        self.ln2, self.head = torch.nn.LayerNorm(16), torch.nn.Linear(16, 4)
        self.drop = torch.nn.Dropout(0.1)
        with torch.no_grad():
            self.ln.weight.add_(0.3 * torch.randn(16))
            self.ln.bias.add_(0.3 * torch.randn(16))

    def forward(self, x):
        x = x + self.w2(self.drop(self.w1(self.ln(x))))
        return self.head(self.ln2(x))


def _export(path, training: bool):
    m = _Block().train(training)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(m, (torch.randn(2, 5, 16),), str(path), dynamo=True, opset_version=18,
                          input_names=["x"], verbose=False, external_data=False)
    return path


def test_training_mode_dropout_is_refused(tmp_path):
    """dynamo export of a module in training mode: rewrite refuses (exit 2) naming the Dropout node, the file untouched."""
    path = _export(tmp_path / "train.onnx", training=True)
    assert any(n.op_type in ("Dropout", "RandomUniformLike") for n in onnx.load(str(path)).graph.node)
    before = path.read_bytes()
    with pytest.raises(BadInput, match=r"(Dropout|RandomUniformLike).*random") as err:
        rewriter.rewrite(str(path), ["rms"])
    assert err.value.exit_code == 2 and "\n" not in str(err.value)
    assert path.read_bytes() == before


def test_eval_mode_export_rewrites_exactly(tmp_path):
    """The same block exported in eval mode (no random op) is rewritten by osplus and stays within fp32 1e-5."""
    path = _export(tmp_path / "eval.onnx", training=False)
    res = rewriter.rewrite(str(path), ["osplus"])
    assert res.report["passes"][0]["applied"] >= 1 and res.passed
    feeds = {"x": np.random.default_rng(1).standard_normal((2, 5, 16)).astype(np.float32)}
    assert max_rel(run_ort(onnx.load(str(path)), feeds)[0], run_ort(res.model, feeds)[0]) <= 1e-5
