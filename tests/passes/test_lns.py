"""``lns``: LayerNorm Scaling (architectural), FX and ONNX.

Structure: the scaling op that appears (FX ``ConstantScale`` module with a buffer, ONNX
``Mul``) or, in fold mode, no new op and the scaled gamma. Meaning: the intended change,
on intermediate tensors: each scaled norm's output equals the original norm (original
parameters, torch / numpy) applied to the input that norm sees in the rewritten model,
times ``1/sqrt(l)``; fold and train modes give the same outputs (fp32 rel err <= 1e-5).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import rewriter
from passes.lns import LayerNormScaling
from rewriter.ir.fx_view import FxView
from rewriter.lower.fx_emit import ConstantScale
from rewriter.ir.onnx_view import OnnxView
from rewriter.run.capture import capture
from tests.conftest import max_rel, run_ort
from tests.passes.rms_models import llama
from tests.passes.stream_models import onnx_model, torch_model


def _layers(rec) -> dict[str, int]:
    return {s["site"]: s["l"] for s in rec.verification["sites"]}


def _rewrite_fx(module, inputs, mode="train"):
    res = rewriter.rewrite(module, ["lns"], example_inputs=inputs, ir_kind="torch", options={"lns": {"mode": mode}})
    assert res.passed, res.verification
    return res


def test_lns_fx_train_inserts_buffer_modules_and_scales_norm_outputs():
    """FX train mode: one ConstantScale (buffer 1/sqrt(l)) per pre-norm; scaled output == LN(input) / sqrt(l)."""
    module, inputs = torch_model("zoo:prenorm-gpt")
    res = _rewrite_fx(module, inputs)
    gm, rec = res.model, res.records[0]
    scales = {n: m for n, m in gm.named_modules() if isinstance(m, ConstantScale)}
    assert len(scales) == 4
    assert sorted(round(float(m.scale), 6) for m in scales.values()) == [round(1 / math.sqrt(2), 6)] * 2 + [1.0] * 2
    assert not any(isinstance(p, torch.nn.Parameter) and p.ndim == 0 for p in gm.parameters())
    assert sorted(_layers(rec).values()) == [1, 1, 2, 2]
    final = [s for s in rec.declined]
    assert len(final) == 1 and final[0].reason.startswith("final norm")
    # independent check on intermediate tensors: original LN params applied to the rewritten model's norm inputs
    view = FxView(gm, inputs)
    calls = [n for n in gm.graph.nodes if n.op == "call_module" and n.target in scales]
    norms = [c.args[0] for c in calls]
    lns = [module.blocks[0].ln_1, module.blocks[0].ln_2, module.blocks[1].ln_1, module.blocks[1].ln_2]
    feeds = {"ids": inputs[0].numpy()}
    acts = capture(view, [n.args[0] for n in norms] + calls, feeds)
    for i, (ln, l) in enumerate(zip(lns, [1, 1, 2, 2])):
        x, got = torch.from_numpy(acts[i]), acts[len(norms) + i]
        want = F.layer_norm(x, ln.normalized_shape, ln.weight, ln.bias, ln.eps).detach().numpy() / math.sqrt(l)
        assert max_rel(want, got) <= 1e-5


def test_lns_onnx_fold_equals_train_and_scales_gamma_beta():
    """ONNX: fold adds no op and scales gamma/beta by 1/sqrt(l); train adds 4 Muls; outputs equal (<= 1e-5)."""
    model = onnx_model("zoo:prenorm-gpt")
    train = rewriter.rewrite(model, ["lns"], options={"lns": {"mode": "train"}})
    fold = rewriter.rewrite(model, ["lns"])  # auto -> fold for ONNX
    assert train.passed and fold.passed
    ops = lambda m: [n.op_type for n in m.graph.all_nodes()]  # noqa: E731
    assert ops(fold.model).count("Mul") == ops(model).count("Mul")
    assert ops(train.model).count("Mul") == ops(model).count("Mul") + 4
    assert fold.records[0].verification["sites"][0]["mode"] == "fold"
    before, after = OnnxView(model), OnnxView(fold.model)
    for node in [n for n in before.nodes() if n.op == "layer_norm"][2:4]:
        p0 = before.norm(node)
        p1 = after.norm(next(n for n in after.nodes() if n.name == node.name))
        np.testing.assert_allclose(p1.weight, p0.weight / math.sqrt(2), rtol=1e-6)
        np.testing.assert_allclose(p1.bias, p0.bias / math.sqrt(2), rtol=1e-6, atol=1e-8)
    feeds = {"ids": np.random.default_rng(3).integers(0, 96, (2, 32)).astype(np.int64)}
    a, b, c = (run_ort(m, feeds)[0] for m in (train.model, fold.model, model))
    assert max_rel(a, b) <= 1e-5
    assert max_rel(c, b) > 1e-3  # the function did change on purpose


def test_lns_fx_fold_equals_train():
    """FX: fold mode (gamma/beta scaled) gives train mode's output within 1e-5, with no new module."""
    module, inputs = torch_model("zoo:prenorm-gpt-parallel")
    train, fold = _rewrite_fx(module, inputs, "train"), _rewrite_fx(module, inputs, "fold")
    assert not any(isinstance(m, ConstantScale) for m in fold.model.modules())
    assert sorted(_layers(train.records[0]).values()) == [1, 1, 2, 2]  # parallel blocks: both norms of a block
    with torch.no_grad():
        assert max_rel(train.model(*inputs).numpy(), fold.model(*inputs).numpy()) <= 1e-5


def test_lns_graph_module_trains():
    """The zoo GPT (trained weights) with lns still trains: loss falls, every parameter gets a gradient."""
    module, (ids,) = torch_model("zoo:gpt-trained")
    gm = _rewrite_fx(module, (ids,)).model
    assert any(isinstance(m, ConstantScale) for m in gm.modules())
    params = [p for p in gm.parameters() if p.requires_grad]
    assert len(params) == len(list(module.parameters()))
    opt = torch.optim.Adam(params, lr=1e-3)
    losses = []
    for _ in range(3):
        opt.zero_grad()
        logits = gm(ids)
        loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))
        loss.backward()
        if not losses:
            assert all(p.grad is not None and bool(p.grad.abs().sum() > 0) for p in params)
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    buffers = [b for n, b in gm.named_buffers() if n.endswith(".scale")]
    assert sorted(round(float(b), 5) for b in buffers) == sorted(round(1 / math.sqrt(l), 5) for l in (1, 1, 2, 2, 3, 3, 4, 4))


@pytest.mark.parametrize("name", ["hf:gpt2", "llama"])
def test_lns_hf_fx(name):
    """HF GPT-2 (LayerNorm) and Llama (RMSNorm) via torch.export: 4 pre-norms scaled, l = 1, 1, 2, 2."""
    module, inputs = llama() if name == "llama" else torch_model(name)
    res = _rewrite_fx(module, inputs)
    rec = res.records[0]
    assert sorted(_layers(rec).values()) == [1, 1, 2, 2]
    assert rec.verification["passed"] and rec.verification["max_rel_error"] <= 1e-5
    assert sum(isinstance(m, ConstantScale) for m in res.model.modules()) == 4


def test_lns_llama_onnx_opset23():
    """Llama exported at opset 23 (RMSNormalization): fold scales the RMS scale; the check passes."""
    from rewriter.torch_export import export_to_onnx

    module, inputs = llama(batch=1)
    import tempfile
    from pathlib import Path

    path = Path(tempfile.mkdtemp()) / "llama23.onnx"
    export_to_onnx(module, inputs, path, opset=23)
    import onnx_ir as ir

    model = ir.load(path)
    res = rewriter.rewrite(model, ["lns"])
    rec = res.records[0]
    assert res.passed and sorted(_layers(rec).values()) == [1, 1, 2, 2]
    assert [n.op_type for n in res.model.graph.all_nodes()].count("RMSNormalization") == 5
    assert rec.verification["max_rel_error"] <= 1e-5


def test_lns_check_catches_a_wrong_factor():
    """The intent check fails when the applied scale is not 1/sqrt(l) (a pass that scales wrongly)."""

    class Wrong(LayerNormScaling):
        def apply(self, view, sites):
            super().apply(view, sites)
            for a in self.applied:
                a["factor"] *= 1.01  # what it claims differs from what it did

    module, inputs = torch_model("zoo:prenorm-gpt")
    res = rewriter.rewrite(module, [Wrong()], example_inputs=inputs, ir_kind="torch")
    assert not res.passed
    assert all(not o["passed"] for o in res.records[0].verification["outputs"])


def test_lns_declines_post_ln_with_reason():
    """Post-LN GPT: no pre-norm to scale; every norm declined, the reason says post-LN."""
    module, inputs = torch_model("zoo:postnorm-gpt")
    res = rewriter.rewrite(module, ["lns"], example_inputs=inputs, ir_kind="torch")
    rec = res.records[0]
    assert not rec.applied and rec.declined
    assert all("post-LN" in s.reason and "pre-norms only" in s.reason for s in rec.declined)
