"""Property tests (hypothesis): random transformer variants, every exact pass, both IRs.

Each example is one small transformer drawn from a space of architectures: pre- or post-LN,
sequential or parallel blocks (with one shared or two norms), linear biases on or off, a
tied or untied head, GELU / ReLU / SwiGLU MLPs, SDPA or hand-written attention, LayerNorm
(with or without bias, or without affine), ``torch.nn.RMSNorm``, or a frozen-statistics
norm (BatchNorm1d through transposes, Unified Norm, PowerNorm; the ``foldnorm`` targets),
with or without a final norm, learned positions, and an optional extra output that reads
the residual stream (the stream itself, a block's stream, a reduction of it, or a
normalized tensor). It is built once per example, exported to ONNX (opset 18 or 23) or
captured with ``torch.export``, and every exact pass (``foldnorm``, ``rms``, ``crms``,
``osplus``) is run on it. The property: a pass either applies to no site and every
declined site carries a reason, or its own verification passed *and* an independent check
(original vs rewritten on fresh random inputs, ORT with graph optimizations off or the
GraphModule in torch) agrees within 1e-5 relative. Never a silently wrong model. In ONNX
the rewritten model's shape annotations must also agree with ONNX shape inference run
from scratch (strict mode). Where the outcome follows from the architecture alone (a plain
pre-LN model must be rewritten by ``rms``/``crms``; a post-LN one, or one whose raw stream
is an output, must be declined; ...) it is checked too (``expected``).

Examples are few and derandomized (CI must be deterministic); dims are tiny; one torch /
ORT thread (tiny models run several times faster that way on a loaded machine).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import tempfile
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from torch import nn

import rewriter
from models_zoo.norm_transformers import PowerNorm, TransposedBatchNorm, UnifiedNorm
from rewriter.ir.fx_view import FxView, capture
from rewriter.ir.onnx_view import OnnxView
from rewriter.run.verify import input_specs
from tests.conftest import max_rel

PASSES = ("foldnorm", "rms", "crms", "osplus")
TOL = 1e-5
VOCAB, SEQ, BATCH = 32, 8, 2
OPTIONS = {"osplus": {"grid": 16}}  # a coarse threshold grid: the search is not under test

# -- the architecture space -----------------------------------------------------------------

NORMS = ("ln", "ln-nobias", "ln-noaffine", "rms", "bn", "un", "power")
FROZEN = ("bn", "un", "power")


@dataclasses.dataclass(frozen=True)
class Arch:
    d: int = 16
    heads: int = 2
    layers: int = 1
    norm: str = "ln"  # one of NORMS
    post_ln: bool = False
    parallel: str = "no"  # no | two (two norms) | shared (one norm read by both branches)
    bias: bool = True
    tied: bool = False
    mlp: str = "gelu"  # gelu | relu | swiglu
    attn: str = "sdpa"  # sdpa | manual
    final_norm: bool = True
    positions: str = "param"  # none | param (a learned constant) | embedding (a Gather of arange)
    extra: str = "none"  # none | stream | block | reduce | normed
    eps: float = 1e-5
    seed: int = 0


def _norm(arch: Arch) -> nn.Module:
    d = arch.d
    if arch.norm == "ln":
        return nn.LayerNorm(d, eps=arch.eps)
    if arch.norm == "ln-nobias":
        return nn.LayerNorm(d, eps=arch.eps, bias=False)
    if arch.norm == "ln-noaffine":
        return nn.LayerNorm(d, eps=arch.eps, elementwise_affine=False)
    if arch.norm == "rms":
        return nn.RMSNorm(d, eps=arch.eps)
    if arch.norm == "bn":
        return TransposedBatchNorm(d)
    if arch.norm == "un":
        return UnifiedNorm(d, eps=arch.eps)
    return PowerNorm(d, groups=2, eps=arch.eps)


class Attention(nn.Module):
    def __init__(self, arch: Arch):
        super().__init__()
        d = arch.d
        self.heads, self.manual = arch.heads, arch.attn == "manual"
        self.q, self.k, self.v, self.out = (nn.Linear(d, d, bias=arch.bias) for _ in range(4))
        self.register_buffer("mask", torch.triu(torch.full((SEQ, SEQ), float("-inf")), 1))

    def forward(self, x):
        b, t, d = x.shape
        q, k, v = (f(x).reshape(b, t, self.heads, d // self.heads).transpose(1, 2) for f in (self.q, self.k, self.v))
        if self.manual:
            s = q @ k.transpose(-1, -2) / math.sqrt(d // self.heads) + self.mask[:t, :t]
            y = torch.softmax(s, dim=-1) @ v
        else:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.out(y.transpose(1, 2).reshape(b, t, d))


class MLP(nn.Module):
    def __init__(self, arch: Arch):
        super().__init__()
        d, h = arch.d, 2 * arch.d
        self.kind = arch.mlp
        self.fc1, self.fc2 = nn.Linear(d, h, bias=arch.bias), nn.Linear(h, d, bias=arch.bias)
        if self.kind == "swiglu":
            self.gate = nn.Linear(d, h, bias=arch.bias)

    def forward(self, x):
        if self.kind == "swiglu":
            return self.fc2(F.silu(self.gate(x)) * self.fc1(x))
        return self.fc2(F.gelu(self.fc1(x)) if self.kind == "gelu" else F.relu(self.fc1(x)))


class Block(nn.Module):
    def __init__(self, arch: Arch):
        super().__init__()
        self.arch = arch
        self.n1, self.attn, self.mlp = _norm(arch), Attention(arch), MLP(arch)
        self.n2 = _norm(arch) if arch.parallel != "shared" else None

    def forward(self, x):
        a = self.arch
        n2 = self.n2 if self.n2 is not None else self.n1
        if a.post_ln:
            if a.parallel != "no":
                return self.n1(x + self.attn(x) + self.mlp(x))
            x = self.n1(x + self.attn(x))
            return n2(x + self.mlp(x))
        if a.parallel != "no":
            return x + self.attn(self.n1(x)) + self.mlp(n2(x))
        x = x + self.attn(self.n1(x))
        return x + self.mlp(n2(x))


class Transformer(nn.Module):
    """``forward(ids [B, T]) -> logits [B, T, V]`` (and one extra output for ``extra``)."""

    def __init__(self, arch: Arch):
        super().__init__()
        self.arch = arch
        torch.manual_seed(arch.seed)
        self.tok = nn.Embedding(VOCAB, arch.d)
        self.pos = nn.Parameter(0.5 * torch.randn(1, SEQ, arch.d)) if arch.positions == "param" else None
        self.pos_emb = nn.Embedding(SEQ, arch.d) if arch.positions == "embedding" else None
        self.blocks = nn.ModuleList(Block(arch) for _ in range(arch.layers))
        self.norm = _norm(arch) if arch.final_norm and not arch.post_ln else None
        self.head = nn.Linear(arch.d, VOCAB, bias=arch.bias and not arch.tied)
        if arch.tied:
            self.head.weight = self.tok.weight
        _randomize(self, arch.seed)
        self.eval()

    def forward(self, ids):
        x = self.tok(ids)
        if self.pos is not None:
            x = x + self.pos[:, : ids.shape[1]]
        if self.pos_emb is not None:
            x = x + self.pos_emb(torch.arange(ids.shape[1]))
        extra = None
        for i, blk in enumerate(self.blocks):
            if i == 0 and self.arch.extra == "normed":
                extra = blk.n1(x)
            x = blk(x)
            if i == 0 and self.arch.extra == "block":
                extra = x
        logits = self.head(self.norm(x) if self.norm is not None else x)
        if self.arch.extra == "stream":
            extra = x
        elif self.arch.extra == "reduce":
            extra = x.mean(-1)
        return logits if extra is None else (logits, extra)


def _randomize(model: nn.Module, seed: int) -> None:
    """Norm affines and frozen statistics far from their initial values, as after training,
    so that a pass forgetting to fold one is caught."""
    gen = torch.Generator().manual_seed(seed + 1)

    def rnd(t, scale, offset=0.0):
        t.copy_(offset + scale * torch.randn(t.shape, generator=gen))

    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.LayerNorm, nn.RMSNorm, nn.BatchNorm1d, UnifiedNorm, PowerNorm)):
                if getattr(m, "weight", None) is not None:
                    rnd(m.weight, 0.3, 1.0)
                if getattr(m, "bias", None) is not None:
                    rnd(m.bias, 0.2)
            for name in ("running_var", "running_phi"):
                if getattr(m, name, None) is not None:
                    getattr(m, name).copy_(torch.rand(getattr(m, name).shape, generator=gen) * 2 + 0.25)
            if getattr(m, "running_mean", None) is not None:
                rnd(m.running_mean, 0.3)
            if isinstance(m, nn.Linear) and m.bias is not None:
                rnd(m.bias, 0.1)


@st.composite
def archs(draw) -> Arch:
    """A transformer variant (see the module docstring)."""
    d = draw(st.sampled_from([16, 24, 32]))
    norm = draw(st.sampled_from(NORMS + ("ln", "ln")))  # pre-LN, the rms/crms target, more often
    post = draw(st.sampled_from([False, False, False, True])) if norm not in FROZEN else False
    return Arch(
        d=d, heads=draw(st.sampled_from([h for h in (2, 4) if d % h == 0])), layers=draw(st.integers(1, 2)),
        norm=norm, post_ln=post, parallel=draw(st.sampled_from(["no", "no", "two", "shared"])),
        bias=draw(st.booleans()), tied=draw(st.booleans()), mlp=draw(st.sampled_from(["gelu", "relu", "swiglu"])),
        attn=draw(st.sampled_from(["sdpa", "manual"])),
        final_norm=draw(st.sampled_from([True, True, True, False])) or norm in FROZEN,
        positions=draw(st.sampled_from(["none", "param", "embedding"])),
        extra=draw(st.sampled_from(["none"] * 4 + ["stream", "block", "reduce", "normed"])),
        eps=draw(st.sampled_from([1e-5, 1e-6])), seed=draw(st.integers(0, 2**16)))


def _options(name: str) -> dict | None:
    return {name: OPTIONS[name]} if name in OPTIONS else None


def ids(seed: int) -> torch.Tensor:
    return torch.randint(0, VOCAB, (BATCH, SEQ), generator=torch.Generator().manual_seed(seed))


# -- checking one pass ----------------------------------------------------------------------


def check_result(res, name: str, rerun) -> str:
    """The property for one pass result; ``rerun(model) -> max rel error`` on fresh inputs.
    Returns "applied" or "declined"."""
    (rec,) = res.records
    for s in rec.declined:
        assert s.reason.strip(), f"{name}: declined site {s.site!r} has no reason"
    err = rerun(res.model)
    if not rec.applied:
        assert err <= TOL, f"{name} applied to no site but changed the outputs (rel err {err:.3g})"
        return "declined"
    assert res.passed, f"{name}: verification failed: {res.verification}"
    assert err <= TOL, (f"{name} passed its own verification but differs on fresh inputs: rel err {err:.3g}; "
                        f"sites {[s.site for s in rec.applied]}")
    return "applied"


def expected(arch: Arch, name: str, outcome: str) -> None:
    """Where the outcome is known from the architecture alone, the pass must reach it."""
    plain_pre_ln = (arch.norm in ("ln", "ln-nobias", "ln-noaffine") and not arch.post_ln
                    and arch.extra in ("none", "normed") and arch.final_norm)
    if name in ("rms", "crms") and plain_pre_ln:
        assert outcome == "applied", f"{name} declined a plain pre-LN model {arch}"
    if name in ("rms", "crms", "osplus") and (arch.post_ln or arch.norm in FROZEN):
        assert outcome == "declined", f"{name} applied to a model without pre-LN stream norms {arch}"
    if name in ("rms", "crms") and arch.extra in ("stream", "block", "reduce"):
        assert outcome == "declined", f"{name} applied although the raw stream is read ({arch.extra})"
    if name == "foldnorm" and arch.norm not in FROZEN:
        assert outcome == "declined", f"foldnorm applied to a model without frozen norms {arch}"
    if name == "foldnorm" and arch.norm in ("bn", "un") and arch.extra == "none":
        assert outcome == "applied", f"foldnorm declined a pre-norm {arch.norm} model {arch}"


# -- ONNX ---------------------------------------------------------------------------------

_DIR = Path(tempfile.mkdtemp(prefix="rewriter-properties-"))


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """Tiny models on a shared machine: one torch thread is several times faster than two
    contending ones (and the results do not depend on it)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@pytest.fixture(scope="module", autouse=True)
def _fast_onnx_export():
    """The dynamo exporter re-parses the source of ~500 torchlib functions on every call
    (~2 s); they do not change between exports, so list them once for this module."""
    try:
        import onnxscript._framework_apis.torch_2_11 as apis
    except ImportError:  # another onnxscript layout: exports are just slower
        yield
        return
    original = apis.get_torchlib_ops
    apis.get_torchlib_ops = functools.lru_cache(maxsize=None)(original)
    try:
        yield
    finally:
        apis.get_torchlib_ops = original


def _export(module: nn.Module, opset: int, tag: str) -> ir.Model:
    from rewriter.torch_export import export_to_onnx

    path = _DIR / f"{tag}.onnx"
    export_to_onnx(module, (ids(0),), path, opset=opset)
    return ir.load(path)


def run_ort(model: ir.Model, feeds: dict) -> list[np.ndarray]:
    """Run in ORT with graph optimizations off (one thread: tiny models, shared machine)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    opts.intra_op_num_threads = opts.inter_op_num_threads = 1
    proto = ir.serde.serialize_model(model).SerializeToString()
    return ort.InferenceSession(proto, opts, providers=["CPUExecutionProvider"]).run(None, feeds)


def _onnx_rerun(model: ir.Model, seed: int):
    names = [s.name for s in input_specs(OnnxView(model))]
    feeds = {names[0]: ids(seed).numpy()}
    want = run_ort(model, feeds)

    def rerun(new: ir.Model) -> float:
        # the shape annotations the rewrite left agree with what ONNX infers from scratch
        onnx.shape_inference.infer_shapes(ir.serde.serialize_model(new), strict_mode=True)
        got = run_ort(new, feeds)
        assert len(got) == len(want)
        return max(max_rel(a, b) for a, b in zip(want, got))

    return rerun, {names[0]: ids(0).numpy()}


@settings(max_examples=10, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
@given(arch=archs(), opset=st.sampled_from([18, 18, 23]))
def test_exact_passes_onnx(arch, opset):
    """Exported to ONNX, every exact pass declines with reasons or verifies, and the rewritten
    model agrees with the original on fresh inputs in ORT (optimizations off) within 1e-5."""
    module = Transformer(arch)
    model = _export(module, opset, f"m{abs(hash(arch))}_{opset}")
    rerun, calib = _onnx_rerun(model, seed=arch.seed + 7)
    for name in PASSES:
        res = rewriter.rewrite(model, [name], options=_options(name), calib=calib if name == "osplus" else None)
        outcome = check_result(res, name, rerun)
        event(f"onnx {name}: {outcome}")
        expected(arch, name, outcome)


# -- torch.export ---------------------------------------------------------------------------


def _torch_rerun(module: nn.Module, seed: int):
    x = ids(seed)
    with torch.no_grad():
        want = module(x)
    want = want if isinstance(want, tuple) else (want,)

    def rerun(gm) -> float:
        with torch.no_grad():
            got = gm(x)
        got = tuple(got) if isinstance(got, (tuple, list)) else (got,)
        assert len(got) == len(want)
        return max(max_rel(a.numpy(), b.numpy()) for a, b in zip(want, got))

    return rerun


@settings(max_examples=40, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
@given(arch=archs())
def test_exact_passes_fx(arch):
    """Captured with torch.export, every exact pass declines with reasons or verifies, and the
    rewritten GraphModule agrees with the module on fresh inputs within 1e-5."""
    module = Transformer(arch)
    x = ids(0)
    view = FxView(capture(module, (x,)), (x,))
    rerun = _torch_rerun(module, seed=arch.seed + 7)
    for name in PASSES:
        res = rewriter.rewrite(view, [name], options=_options(name))
        outcome = check_result(res, name, rerun)
        event(f"fx {name}: {outcome}")
        expected(arch, name, outcome)


def test_the_check_catches_a_silently_wrong_model(monkeypatch):
    """The property is not vacuous: an rms whose writers are not re-centred (a wrong model),
    run without verification so nothing flags it, is caught by the independent check."""
    import passes.rms

    arch = Arch(d=16, heads=2, layers=1, seed=5)
    module = Transformer(arch)
    x = ids(0)
    view = FxView(capture(module, (x,)), (x,))
    monkeypatch.setattr(passes.rms, "_center_rows", lambda a: a)
    res = rewriter.rewrite(view, ["rms"], verify=False)
    assert res.records[0].applied and res.passed  # applied, and nothing said it was wrong
    with pytest.raises(AssertionError, match="differs on fresh inputs"):
        check_result(res, "rms", _torch_rerun(module, seed=7))
