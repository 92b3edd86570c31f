"""rettention: structure (attention replaced by the Re-ttention op and its state protocol),
meaning (ORT / torch, optimizations off, step by step against a NumPy reference of the
formulas over a 20-step schedule with batched guidance) and the declined sites."""

from __future__ import annotations

import math

import numpy as np
import onnx_ir as ir
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import rewriter
from backends.ort.rettention import STEP_INPUT, RettentionRunner, state_names
from backends.rettention_spec import MaskSpec, Schedule
from passes.rettention import Rettention, check_steps
from passes.rettention_runtime import state_module
from rewriter.pass_api import make_options
from rewriter.torch_export import export_to_onnx
from tests.conftest import max_rel, op_types, run_ort

N, D, HEADS = 24, 16, 2
OPTS = {"warmup": 3, "period": 4, "density": 0.25, "lam": 0.05}  # band |i-j| <= 3, blocks of 16
SCHEDULE = Schedule(3, 4, 0.05)


class TinyAttention(nn.Module):
    """x [B, N, D] -> q/k/v projections -> heads -> attention -> out projection."""

    def __init__(self, form: str = "sdpa", cross: bool = False, mask: bool = False, causal: bool = False):
        super().__init__()
        torch.manual_seed(0)
        self.q, self.k, self.v, self.o = (nn.Linear(D, D) for _ in range(4))
        self.form, self.cross, self.mask, self.causal = form, cross, mask, causal

    def heads(self, t):
        b, n, _ = t.shape
        return t.view(b, n, HEADS, D // HEADS).transpose(1, 2)

    def forward(self, x, ctx=None):
        b, n, _ = x.shape
        src = ctx if self.cross else x
        q, k, v = self.heads(self.q(x)), self.heads(self.k(src)), self.heads(self.v(src))
        if self.form == "sdpa":
            mask = torch.ones(n, k.shape[2], dtype=torch.bool).tril() if self.mask else None
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=self.causal)
        else:  # the hand-written chain
            y = torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(D // HEADS), dim=-1) @ v
        return self.o(y.transpose(1, 2).reshape(b, n, D))


def np_model(m: TinyAttention, x: np.ndarray, t: int, state: dict) -> np.ndarray:
    """NumPy float64 reference of TinyAttention under Re-ttention at step ``t``."""
    w = {n: getattr(m, n).weight.detach().double().numpy() for n in "qkvo"}
    b = {n: getattr(m, n).bias.detach().double().numpy() for n in "qkvo"}
    bsz = x.shape[0]

    def heads(a):
        return a.reshape(bsz, N, HEADS, D // HEADS).transpose(0, 2, 1, 3)

    x = x.astype(np.float64)
    q, k, v = (heads(x @ w[n].T + b[n]) for n in "qkv")
    s = q @ k.transpose(0, 1, 3, 2) / math.sqrt(D // HEADS)
    e = np.exp(s - s.max(-1, keepdims=True))
    mask = MaskSpec.band(N, OPTS["density"]).dense()
    em = np.where(mask, e, 0.0)
    o_full = (e / e.sum(-1, keepdims=True)) @ v
    o_m = (em / em.sum(-1, keepdims=True)) @ v
    phase, kk = SCHEDULE.phase(t)
    if phase == 0:
        o = o_full
    elif phase == 1:
        rho = em.sum(-1) / e.sum(-1)
        state["rho"], state["R"] = rho, o_full - rho[..., None] * o_m
        o = o_full
    else:
        o = (state["rho"] + SCHEDULE.lam * kk)[..., None] * o_m + state["R"]
    return o.transpose(0, 2, 1, 3).reshape(bsz, N, D) @ w["o"].T + b["o"]


def inputs(steps: int = 20, batch: int = 2) -> list[np.ndarray]:
    """One input per step; batch 2 = the cond / uncond halves of classifier-free guidance."""
    rng = np.random.default_rng(1)
    return [rng.standard_normal((batch, N, D)).astype(np.float32) for _ in range(steps)]


def rewrite_onnx(tmp_path, module, opset=18, **opts):
    path = export_to_onnx(module, (torch.randn(2, N, D),), tmp_path / f"m{opset}.onnx", opset=opset)
    res = rewriter.rewrite(str(path), ["rettention"], options={"rettention": {**OPTS, **opts}})
    return path, res


# -- structure ---------------------------------------------------------------------------------
def test_fx_sdpa_replaced_by_stateful_op():
    """FX: SDPA is gone, one `rettention` module call replaces it; the default step is dense."""
    m = TinyAttention()
    res = rewriter.rewrite(m, ["rettention"], example_inputs=(torch.randn(2, N, D),), options={"rettention": OPTS})
    ops = res.view.raw_op_types()
    assert "aten.scaled_dot_product_attention.default" not in ops and ops.count("rettention") == 1
    assert res.passed and res.verification["max_rel_error"] <= 1e-6
    assert res.records[0].sites[0].accepted and "band |i-j| <= 3 over 24 tokens" in res.records[0].sites[0].reason


@pytest.mark.parametrize("opset,removed", [(18, "Softmax"), (23, "Attention")])
def test_onnx_function_and_protocol(tmp_path, opset, removed):
    """ONNX: the attention becomes one rewriter::Rettention call; the state protocol is added;
    with the protocol inputs left at their defaults the model is the original (ORT, opt off)."""
    path, res = rewrite_onnx(tmp_path, TinyAttention(), opset=opset)
    assert res.passed
    ops = op_types(res.model)
    assert removed not in ops and ops.count("Rettention") == 1
    g = res.model.graph
    names_in = [v.name for v in g.inputs]
    assert names_in[0] == "x" and STEP_INPUT in names_in and all(n in names_in for n in state_names(0)[:2])
    assert [v.name for v in g.outputs][1:] == list(state_names(0)[2:])
    fn = res.model.functions[("rewriter", "Rettention", "")]
    body = [n.op_type for n in fn.all_nodes()]
    # blocked windows; schedule; the refresh's window max and P[i, j*] (no LSE over N x N)
    assert "Gather" in body and "If" in body and "ArgMax" in body and "GatherElements" in body
    x = inputs(1)[0]
    assert max_rel(run_ort(ir.load(path), {"x": x})[0], run_ort(res.model, {"x": x})[0]) <= 1e-5


def test_onnx_sparse_branch_gathers_windows_not_dense_scores(tmp_path):
    """The sparse branch multiplies [.., nb, Bq, Dh] blocks by gathered [.., nb, Dh, W] windows:
    no MatMul there reads the un-gathered K (no N x N product under a mask)."""
    _, res = rewrite_onnx(tmp_path, TinyAttention())
    fn = res.model.functions[("rewriter", "Rettention", "")]
    outer = next(n for n in fn if n.op_type == "If")
    not_warm = outer.attributes["else_branch"].value
    inner = next(n for n in not_warm if n.op_type == "If")
    sparse = inner.attributes["else_branch"].value
    ops = [n.op_type for n in sparse]
    assert ops.count("Gather") == 2 and ops.count("MatMul") == 2 and "Softmax" in ops

    def from_gather(v):
        p = v.producer()
        while p is not None and p.op_type in ("Transpose", "Reshape"):
            if p.inputs[0].producer() is not None and p.inputs[0].producer().op_type == "Gather":
                return True
            p = p.inputs[0].producer()
        return False

    assert all(from_gather(mm.inputs[1]) for mm in sparse if mm.op_type == "MatMul")


# -- meaning: step by step against NumPy ---------------------------------------------------------
def _run_fx(m, xs):
    res = rewriter.rewrite(m, ["rettention"], example_inputs=(torch.from_numpy(xs[0]),), options={"rettention": OPTS})
    gm, st = res.model, state_module(res.model)
    outs = []
    for t, x in enumerate(xs):
        st.set_step(t)
        with torch.no_grad():
            outs.append(gm(torch.from_numpy(x)).numpy())
    return outs


def _run_onnx(tmp_path, m, xs):
    _, res = rewrite_onnx(tmp_path, m)
    runner = RettentionRunner(res.model, optimize=False)
    return [runner({"x": x}, t)[runner.outputs[0]] for t, x in enumerate(xs)]


@pytest.mark.parametrize("ir_kind", ["torch", "onnx"])
@pytest.mark.parametrize("form", ["sdpa", "chain"])
def test_twenty_steps_match_numpy_reference(tmp_path, ir_kind, form):
    """Dense, refresh and sparse steps over 20 steps (warmup 3, period 4, lam 0.05), batch 2 with
    per-row state, equal the NumPy formulas within 1e-4 (fp32)."""
    m = TinyAttention(form)
    xs = inputs()
    outs = _run_fx(m, xs) if ir_kind == "torch" else _run_onnx(tmp_path, m, xs)
    state: dict = {}
    errs = [max_rel(np_model(m, x, t, state), o) for t, (x, o) in enumerate(zip(xs, outs))]
    assert max(errs) <= 1e-4, errs
    # the sparse steps really are approximate: a dense model is off there
    dense = [np_model(m, x, 0, {}) for x in xs]
    assert max_rel(dense[4], outs[4]) > 1e-3


def test_check_steps_verifies_every_site(tmp_path):
    """check_steps compares each site's output with the formula from the Q, K, V it received."""
    _, res = rewrite_onnx(tmp_path, TinyAttention())
    recs = check_steps(res.view, {"x": inputs(1)[0]}, 9)
    assert [r["phase"] for r in recs] == ["dense"] * 3 + ["refresh", "sparse", "sparse", "sparse", "refresh", "sparse"]
    assert max(r["max_rel_error"] for r in recs) <= 1e-4


def test_fx_state_is_per_request_and_needs_a_refresh():
    """Two requests keep separate state; a sparse step without a refresh raises a clear error."""
    res = rewriter.rewrite(TinyAttention(), ["rettention"], example_inputs=(torch.randn(2, N, D),),
                           options={"rettention": OPTS})
    gm, st = res.model, state_module(res.model)
    x = torch.randn(2, N, D)
    st.set_step(4, request="a")
    with pytest.raises(RuntimeError, match="without a refresh step"):
        gm(x)
    st.set_step(3, request="a")
    gm(x)
    st.set_step(3, request="b")
    gm(2 * x)
    st.set_step(4, request="a")
    ya = gm(x)
    st.reset("b")
    st.set_step(4, request="b")
    with pytest.raises(RuntimeError):
        gm(x)
    st.set_step(4, request="a")
    assert torch.equal(gm(x), ya)


def test_runner_restarts_from_zeros_and_resets(tmp_path):
    """The runner feeds zero state first, keeps each step's outputs, and reset() forgets them."""
    _, res = rewrite_onnx(tmp_path, TinyAttention())
    runner = RettentionRunner(res.model, optimize=True)
    xs = inputs(6)
    first = [runner({"x": x}, t)[runner.outputs[0]] for t, x in enumerate(xs)]
    assert runner._state[0][state_names(0)[0]].shape == (2, HEADS, N)
    runner.reset()
    again = [runner({"x": x}, t)[runner.outputs[0]] for t, x in enumerate(xs)]
    assert all(np.array_equal(a, b) for a, b in zip(first, again))


# -- declined ------------------------------------------------------------------------------------
class CrossAttention(TinyAttention):
    def __init__(self, ctx_len):
        super().__init__(cross=True)
        self.ctx_len = ctx_len


@pytest.mark.parametrize("ctx_len,reason", [(10, "cross-attention (10 keys for 24 queries)"),
                                            (N, "cross-attention (keys are projected from")])
def test_cross_attention_declined(ctx_len, reason):
    """Keys of another length, or projected from another tensor, are declined with the reason."""
    m = CrossAttention(ctx_len)
    ex = (torch.randn(2, N, D), torch.randn(2, ctx_len, D))
    sites = Rettention(make_options(Rettention, {})).match(rewriter.api.as_view(m, example_inputs=ex))
    assert len(sites) == 1 and not sites[0].accepted and reason in sites[0].reason, sites


def test_cross_attention_declined_in_onnx(tmp_path):
    """ONNX opset 23: the cross-attention Attention node is declined; nothing is rewritten."""
    m = CrossAttention(10)
    path = export_to_onnx(m, (torch.randn(2, N, D), torch.randn(2, 10, D)), tmp_path / "c.onnx", opset=23)
    res = rewriter.rewrite(str(path), ["rettention"])
    rec = res.records[0]
    assert not rec.applied and "cross-attention (10 keys for 24 queries)" in rec.declined[0].reason
    assert "Attention" in op_types(res.model) and "Rettention" not in op_types(res.model)


@pytest.mark.parametrize("kw,reason", [({"mask": True}, "has an attention mask"),
                                       ({"causal": True}, "causal attention")])
def test_masked_and_causal_attention_declined(kw, reason):
    """An explicit mask or causal attention is declined, with the reason."""
    view = rewriter.api.as_view(TinyAttention(**kw), example_inputs=(torch.randn(2, N, D),))
    sites = Rettention().match(view)
    assert len(sites) == 1 and not sites[0].accepted and reason in sites[0].reason


def test_options_from_set_and_window2d():
    """--set strings parse; window2d on a 4x6 grid is accepted; a bad grid is a declined site."""
    opts = make_options(Rettention, {"density": "0.4", "mask": "window2d", "grid": "4x6", "warmup": "0"})
    assert opts.density == 0.4 and opts.warmup == 0
    view = rewriter.api.as_view(TinyAttention(), example_inputs=(torch.randn(2, N, D),))
    site = Rettention(opts).match(view)[0]
    assert site.accepted and "3x3 window on a 4x6 grid" in site.reason
    bad = Rettention(make_options(Rettention, {"mask": "window2d"})).match(view)[0]
    assert not bad.accepted and "not a square grid" in bad.reason
