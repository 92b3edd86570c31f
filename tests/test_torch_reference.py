"""Verification of a torch module compares the rewrite with the module's own forward, not
with the graph the tool captured from it (a misread capture would sit on both sides)."""

from __future__ import annotations

import torch

import rewriter
from rewriter import loader


class LinearBn(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.fc = torch.nn.Linear(8, 6)
        self.bn = torch.nn.BatchNorm1d(6)
        with torch.no_grad():
            self.bn.running_mean.uniform_(-1, 1)
            self.bn.running_var.uniform_(0.5, 2)

    def forward(self, x):
        return self.bn(self.fc(x))


def _example():
    return (torch.randn(4, 8, generator=torch.Generator().manual_seed(1)),)


def test_faithful_capture_verifies():
    """The module's forward is the reference: foldnorm on a faithful capture passes."""
    res = rewriter.rewrite(LinearBn().eval(), ["foldnorm"], example_inputs=_example())
    assert res.passed and res.records[0].applied


def test_misread_capture_fails_verification(monkeypatch):
    """A capture that misreads a weight (scaled by 1.5) is caught: the reference is the
    module itself, so verification of the pass fails (with the captured graph as the
    reference, as before, it passed)."""
    real = loader.capture

    def misread(module, example_inputs):
        gm = real(module, example_inputs)
        name, w = next((n, p) for n, p in gm.named_parameters() if n.endswith("weight") and p.ndim == 2)
        owner, _, leaf = name.rpartition(".")
        setattr(gm.get_submodule(owner) if owner else gm, leaf, torch.nn.Parameter(w.detach() * 1.5))
        return gm

    model = LinearBn().eval()
    keep = model.fc.weight.detach().clone()
    monkeypatch.setattr(loader, "capture", misread)
    res = rewriter.rewrite(model, ["foldnorm"], example_inputs=_example())
    ver = res.records[0].verification
    assert not res.passed and not ver["passed"] and ver["max_rel_error"] > 0.1
    assert torch.equal(model.fc.weight, keep)  # the user's module is untouched
