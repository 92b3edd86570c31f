"""``rewriter.canon.attention.token_source``: self- or cross-attention by dataflow, on small
hand-written attentions exported by TorchScript (opset 17) and read through both IRs."""

from __future__ import annotations

import warnings

import pytest
import torch

from rewriter.api import as_view
from rewriter.canon.attention import find_attention


class _Attn(torch.nn.Module):
    """softmax(q k^T / sqrt(8)) v with q, k, v projected from ``x`` (or k, v from ``kv``),
    optionally through a RoPE-style rotation of q and k or a running sum of k over tokens."""

    def __init__(self, mode: str):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.q, self.k, self.v = (torch.nn.Linear(16, 16) for _ in range(3))
        for lin in (self.q, self.k, self.v):
            with torch.no_grad():
                lin.weight.copy_(0.3 * torch.randn(16, 16, generator=g))
        self.mode = mode
        self.register_buffer("cos", torch.randn(1, 1, 12, 8, generator=g))
        self.register_buffer("sin", torch.randn(1, 1, 12, 8, generator=g))

    @staticmethod
    def heads(t):
        return t.view(t.shape[0], t.shape[1], 2, 8).transpose(1, 2)

    def rope(self, t):
        a, b = t[..., :4], t[..., 4:]
        return t * self.cos + torch.cat([-b, a], dim=-1) * self.sin

    def forward(self, x, kv):
        src = kv if self.mode == "cross" else x
        q, k, v = self.heads(self.q(x)), self.heads(self.k(src)), self.heads(self.v(src))
        if self.mode == "cumsum":  # keys mixed over the tokens after their projection
            k = torch.cumsum(k, dim=2)
        if self.mode == "rope":
            q, k = self.rope(q), self.rope(k)
        p = torch.softmax(q @ k.transpose(-1, -2) * 8 ** -0.5, dim=-1)
        return (p @ v).transpose(1, 2).reshape(x.shape[0], x.shape[1], 16)


def _site(tmp_path, mode: str, ir_kind: str):
    m = _Attn(mode).eval()
    args = (torch.randn(2, 12, 16), torch.randn(2, 12, 16))  # kv as long as x: lengths cannot decide
    if ir_kind == "torch":
        view = as_view(m, example_inputs=args, ir_kind="torch")
    else:
        path = tmp_path / f"{mode}.onnx"
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")
            torch.onnx.export(m, args, str(path), dynamo=False, opset_version=17, input_names=["x", "kv"])
        view = as_view(str(path))
    sites = find_attention(view)
    assert len(sites) == 1
    return sites[0]


@pytest.mark.parametrize("ir_kind", ["onnx", "torch"])
def test_self_through_rope(tmp_path, ir_kind):
    """q and k rotated by position tables (rotate-half: slices, a negation, a feature concat) still derive from x: self-attention."""
    s = _site(tmp_path, "rope", ir_kind)
    assert s.ok and s.self_attention and "derive from" in s.note, (s.reason, s.note)


@pytest.mark.parametrize("ir_kind", ["onnx", "torch"])
def test_equal_length_cross_attention(tmp_path, ir_kind):
    """k, v projected from another tensor of the same length: cross-attention, declined by dataflow."""
    s = _site(tmp_path, "cross", ir_kind)
    assert not s.self_attention and ": cross-attention (keys are projected from" in s.reason, s.reason


@pytest.mark.parametrize("ir_kind", ["onnx", "torch"])
def test_undecided_names_the_op(tmp_path, ir_kind):
    """k projected from x, then summed over the tokens (not a per-token op): declined, the reason names the op."""
    s = _site(tmp_path, "cumsum", ir_kind)
    assert not s.ok and "cannot tell self- from cross-attention" in s.reason, s.reason
    assert "cumsum" in s.reason.lower(), s.reason
