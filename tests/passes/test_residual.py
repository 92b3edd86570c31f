"""The residual-stream analysis (passes/residual.py) on real exported graphs, both IRs."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch

import rewriter
from passes.residual import analyze
from rewriter.ir.fx_view import FxView, capture
from rewriter.ir.onnx_view import OnnxView
from tests.passes.stream_models import onnx_model, torch_model


def fx_view(name: str) -> FxView:
    m, x = torch_model(name)
    return FxView(capture(m, x), x)


@pytest.mark.parametrize("ir_kind", ["onnx", "torch"])
def test_prenorm_gpt_stream(ir_kind):
    """Pre-LN GPT: 2 embedding + 4 branch writers, 5 norms with block depth 0,0,1,1,2."""
    view = OnnxView(onnx_model("zoo:prenorm-gpt")) if ir_kind == "onnx" else fx_view("zoo:prenorm-gpt")
    s = analyze(view)
    assert s.problems == [] and s.width == 32
    assert sorted(w.kind for w in s.writers) == ["embedding"] * 2 + ["linear"] * 4
    norms = sorted(s.norms, key=lambda n: n.depth)
    assert [n.depth for n in norms] == [0, 1, 2, 3, 4]
    assert [n.block for n in norms] == [0, 0, 1, 1, 2]
    assert [n.attention for n in norms] == [True, False, True, False, False]
    assert [len(n.linears) for n in norms] == [3, 1, 3, 1, 1] and all(n.foldable for n in norms)
    assert len(s.joins) == 5


def test_parallel_blocks_share_the_stream_input():
    """Parallel attention/MLP blocks: both norms of a block read the same stream value."""
    s = analyze(fx_view("zoo:prenorm-gpt-parallel"))
    assert s.problems == []
    by_depth = {}
    for n in s.norms:
        by_depth.setdefault(n.depth, []).append(n)
    assert sorted(len(v) for v in by_depth.values()) == [1, 2, 2]  # ln_1, ln_2 of a block are siblings
    assert sorted(n.block for n in s.norms) == [0, 0, 1, 1, 2]


def test_vit_writers_conv_cls_positions():
    """ViT: the patch conv (through flatten/transpose), the cls token and positions are writers."""
    s = analyze(OnnxView(onnx_model("zoo:prenorm-vit")))
    kinds = sorted(w.kind for w in s.writers)
    assert kinds.count("conv") == 1 and kinds.count("const") == 2, kinds
    assert s.problems == []


def test_post_ln_is_a_problem():
    """Post-LN: a norm on the stream whose output is written back is reported as post-LN."""
    s = analyze(fx_view("zoo:postnorm-gpt"))
    assert any(p.startswith("post-LN:") for p in s.problems)


def test_exported_hidden_state_is_a_problem():
    """A stream value that is a graph output is reported."""
    s = analyze(OnnxView(onnx_model("zoo:prenorm-gpt-hidden")))
    assert any("is a graph output" in p and "hidden state" in p for p in s.problems)


def test_adaln_gate_is_a_problem():
    """adaLN-Zero: a channel-wise data-dependent gate on a branch output is reported."""
    s = analyze(fx_view("zoo:adaln-transformer"))
    assert any("data-dependent gate" in p for p in s.problems)


def test_bloom_embedding_norm_is_a_writer_not_a_reader():
    """BLOOM's embedding LayerNorm does not read the stream: it is a (norm) writer."""
    s = analyze(fx_view("hf:bloom"))
    assert s.problems == []
    assert [w.kind for w in s.writers].count("norm") == 1
    assert len(s.other_norms) == 1 and "does not read the residual stream" in s.other_norms[0][1]


class _Tokens(torch.nn.Module):
    """A cls and a distillation token (equal values: the TorchScript exporter writes the
    second as an Identity of the first) expanded over a dynamic batch, one pre-LN block."""

    def __init__(self, d: int = 8):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.cls = torch.nn.Parameter(torch.randn(1, 1, d, generator=g))
        self.dist = torch.nn.Parameter(self.cls.detach().clone())
        self.proj, self.ln1, self.fc = torch.nn.Linear(4, d), torch.nn.LayerNorm(d), torch.nn.Linear(d, d)
        self.lnf, self.head = torch.nn.LayerNorm(d), torch.nn.Linear(d, 3)
        with torch.no_grad():
            for ln in (self.ln1, self.lnf):
                ln.weight.normal_(1.0, 0.2, generator=g)
                ln.bias.normal_(0.0, 0.2, generator=g)

    def forward(self, x):
        b = x.shape[0]
        h = torch.cat([self.cls.expand(b, -1, -1), self.dist.expand(b, -1, -1), self.proj(x)], 1)
        h = h + self.fc(self.ln1(h))
        return self.head(self.lnf(h))


@pytest.mark.parametrize("pass_name", ["rms", "crms"])
def test_tokens_expanded_at_run_time_are_const_writers(tmp_path, pass_name):
    """TorchScript opset 14, dynamic batch: tokens reached through Expand (one through an
    Identity of the other's initializer) are const writers re-centred via their parameters;
    the pass applies and is exact in ORT."""
    from tests.conftest import max_rel, run_ort

    torch.manual_seed(0)
    m = _Tokens().eval()
    x = torch.randn(2, 5, 4)
    path = tmp_path / "tokens.onnx"
    torch.onnx.export(m, (x,), str(path), dynamo=False, opset_version=14, input_names=["x"],
                      dynamic_axes={"x": {0: "batch"}})
    proto = onnx.load(str(path))
    assert "Identity" in {n.op_type for n in proto.graph.node} and "Expand" in {n.op_type for n in proto.graph.node}
    feeds = {"x": x.numpy()}
    res = rewriter.rewrite(str(path), [pass_name], inputs=feeds)
    rec = res.report["passes"][0]
    assert rec["applied"] > 0 and res.passed, rec["declined"]
    reasons = [site.get("reason", "") for site in rec["sites"]]
    assert sum("constant re-centred" in r for r in reasons) == 2, reasons
    assert not any("explicit centering" in r for r in reasons), reasons
    check = {"x": np.random.default_rng(1).standard_normal((3, 5, 4)).astype(np.float32)}
    err = max(max_rel(a, b) for a, b in zip(run_ort(proto, check), run_ort(res.model, check)))
    assert err <= 1e-5
