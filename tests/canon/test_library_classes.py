"""Library classes on which recognition failed (issue 20), each built from the real class
(transformers / diffusers, tiny config, random weights) and exported the way users do
(TorchScript opset 17 with dynamic batch axes; dynamo opset 18), then rewritten through
``rewriter.rewrite``. Where a pass applies, the rewritten file is compared with the
original in ONNX Runtime with graph optimizations off (fp32: max rel err <= 1e-5); where it
declines, the reason must be the true one."""

from __future__ import annotations

import onnx
import onnx_ir as ir
import pytest

import rewriter
from rewriter.api import as_view
from rewriter.canon.attention import find_attention
from tests.canon import lib_models as L
from tests.conftest import max_rel, run_ort

FP32 = 1e-5


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """``files(name, exporter)``: the export, built on first use and kept for the module."""
    root = tmp_path_factory.mktemp("libclasses")
    built: dict[str, L.Built] = {}
    cache: dict[tuple[str, str], object] = {}

    def get(name: str, exporter: str):
        if (name, exporter) not in cache:
            if name not in built:
                built[name] = getattr(L, name)()
            path = root / f"{name}-{exporter}.onnx"
            cache[(name, exporter)] = L.export(built[name], path, dynamo=exporter == "dynamo18")
        return cache[(name, exporter)], built[name]

    return get


def _rewrite(path, pass_name: str, **kw):
    res = rewriter.rewrite(str(path), [pass_name], **kw)
    return res, res.report["passes"][0]


def _reasons(rep) -> list[str]:
    return [d["reason"] for d in rep["declined"]]


def _exact(path, res, built: L.Built) -> float:
    """max rel err of the rewritten model against the original, ORT optimizations off."""
    f = built.feeds()
    want = run_ort(onnx.load(str(path)), f)
    got = run_ort(res.model, f)
    return max(max_rel(a, b) for a, b in zip(want, got))


# -- 1. Swin: the stream changes width at each patch merging -------------------------------
def test_swin_stream_passes(files):
    """SwinModel (TorchScript 17; dynamo cannot export it): rms / crms decline (the stream changes width at the patch merging, which reads it raw), osplus applies exactly."""
    path, built = files("swin", "ts17")
    for p in ("rms", "crms"):
        res, rep = _rewrite(path, p)
        assert rep["applied"] == 0
        assert all("different widths [16, 32]" in r for r in _reasons(rep)), _reasons(rep)[:1]
    res, rep = _rewrite(path, "osplus")
    assert rep["applied"] == 2 and res.passed  # layernorm_after of each stage: one linear reader each
    assert _exact(path, res, built) <= FP32


# -- 2. self- or cross-attention by dataflow -----------------------------------------------
@pytest.mark.parametrize("exporter", ["ts17", "dynamo18"])
def test_hunyuan_equal_length_cross_attention_declined(files, exporter):
    """HunyuanDiT2DModel, text length 16 == image tokens 16: every attn2 (text keys) declined as cross-attention by dataflow, every attn1 found as self-attention and rewritten."""
    path, built = files("hunyuan_dit", exporter)
    shapes = {n: list(a.shape) for n, a in zip(built.names, built.args)} if exporter == "ts17" else None
    view = as_view(str(path))
    sites = [s for s in find_attention(view) if s.form != "linear"]
    assert len(sites) == 5  # the time pooler's attention, 2 x (attn1, attn2)
    res, rep = _rewrite(path, "rettention", shapes=shapes)
    cross = [r for r in _reasons(rep) if ": cross-attention (keys are projected from" in r]
    assert len(cross) == 2, _reasons(rep)  # attn2 of both blocks (the pooler: 9 keys for 1 query)
    assert len(rep["declined"]) == 3
    assert rep["applied"] == 2 and res.passed
    for site in res.records[0].applied:
        assert "self-attention: queries and keys derive from" in site.reason, site.reason
    if exporter == "dynamo18":  # static shapes: text keys as many as image queries, so only dataflow tells
        same = [s for s in sites if "keys are projected from" in s.reason]
        assert len(same) == 2 and all(s.tokens == view.shape(s.k)[-1] == 16 for s in same)


@pytest.mark.parametrize("name,joint", [("cogvideox", False), ("sd3", True)])
def test_joint_attention_self_for_the_right_reason(files, name, joint):
    """CogVideoX (concat then project) and SD3 (project, then concat Q / K / V): every attention is self-attention because Q and K derive from one concatenation of token tensors."""
    path, _ = files(name, "dynamo18")
    sites = [s for s in find_attention(as_view(str(path))) if s.form != "linear"]
    assert len(sites) == 2
    for s in sites:
        assert s.ok and s.self_attention, s.reason
        assert s.note.startswith("self-attention: queries and keys derive from")
        assert ("concat(" in s.note) == joint, s.note
    res, rep = _rewrite(path, "rettention")
    assert rep["applied"] == 2 and res.passed


# -- 5. adaLN-Zero: one answer from both exporters -----------------------------------------
@pytest.mark.parametrize("name", ["cogvideox", "sd3"])
def test_adaln_zero_same_answer_from_both_exporters(files, name):
    """adaLN-Zero DiTs: crms declines the gated branches from TorchScript (gate of unknown width) and dynamo (gate of known width) alike, by data dependence on the timestep."""
    for exporter in ("ts17", "dynamo18"):
        path, _ = files(name, exporter)
        res, rep = _rewrite(path, "crms")
        assert rep["applied"] == 0, exporter
        assert any("data-dependent gate computed from a conditioning input" in r for r in _reasons(rep)), (exporter, _reasons(rep)[:1])


# -- 6. linear attention: the decline names the real cause ----------------------------------
@pytest.mark.parametrize("exporter", ["ts17", "dynamo18"])
def test_sana_linear_attention_reason(files, exporter):
    """SanaTransformer2DModel: rettention names the linear attention (no softmax) and the cross-attention to the caption, never the user's shapes."""
    path, _ = files("sana", exporter)
    res, rep = _rewrite(path, "rettention")
    reasons = _reasons(rep)
    assert rep["applied"] == 0
    assert any(": linear attention (feature map Relu" in r and "no softmax" in r for r in reasons), reasons
    assert any(": cross-attention" in r for r in reasons), reasons
    assert not any("must be static" in r or "shape inference" in r for r in reasons), reasons


def test_unknown_rank_names_where_inference_stopped(files):
    """SanaTransformer2DModel (TorchScript 17): a norm whose input rank shape inference lost is declined by osplus / lns with the op where inference stopped, not as the user's input."""
    path, _ = files("sana", "ts17")
    for p in ("osplus", "lns"):
        res, rep = _rewrite(path, p)
        lost = [r for r in _reasons(rep) if "the rank of its input is unknown" in r]
        assert lost, _reasons(rep)
        assert all("shape inference stopped at Reshape " in r for r in lost), lost[:1]


def test_unknown_shapes_name_where_inference_stopped(files):
    """CogVideoX with dynamic axes, no --shape: the self-attention decline says shape inference stopped (naming the op) and which input sizes would fix it; with them, applied."""
    path, built = files("cogvideox", "ts17")
    res, rep = _rewrite(path, "rettention")
    reasons = _reasons(rep)
    assert rep["applied"] == 0 and len(reasons) == 2
    for r in reasons:
        assert "shape inference left the heads, tokens or head width unknown" in r
        assert "inference stops at " in r and "--shape" in r
    shapes = {n: list(a.shape) for n, a in zip(built.names, built.args)}
    res, rep = _rewrite(path, "rettention", shapes=shapes)
    assert rep["applied"] == 2 and res.passed


def test_clip_hidden_state_output_declines_for_the_model(files):
    """CLIPVisionModel returning last_hidden_state (TorchScript 17): rms / crms decline because the model returns the raw stream, and say so."""
    path, _ = files("clip_vision_hidden", "ts17")
    for p in ("rms", "crms"):
        res, rep = _rewrite(path, p)
        assert rep["applied"] == 0
        assert any("whose output is a graph output (the model returns the unnormalized stream)" in r
                   for r in _reasons(rep)), _reasons(rep)[:2]


@pytest.mark.parametrize("exporter", ["ts17", "dynamo18"])
def test_hunyuan_first_pre_norm_is_not_an_embedding_norm(files, exporter):
    """HunyuanDiT2DModel: block 0's norm1 reads the patch embedding that the residual add also reads, so it is a stream norm, not a stream start: rms applies, exactly."""
    path, built = files("hunyuan_dit", exporter)
    res, rep = _rewrite(path, "rms")
    assert rep["applied"] > 0 and res.passed, _reasons(rep)[:1]
    assert not any("norm1" in s.reason and "explicit centering op" in s.reason for s in res.records[0].applied)
    assert _exact(path, res, built) <= FP32


# -- 4. BatchNorm1d through a Flatten after a bias-free linear ------------------------------
@pytest.mark.parametrize("exporter", ["ts17", "dynamo18"])
def test_levit_batchnorms_fold_through_flatten(files, exporter):
    """LevitModel: every BatchNormalization (MatMul -> Flatten / Reshape -> BatchNormalization -> Reshape, and the patch-embedding convs') folds, exactly."""
    path, built = files("levit", exporter)
    n_bn = sum(n.op_type == "BatchNormalization" for n in onnx.load(str(path)).graph.node)
    assert n_bn == 22  # the patch-embedding convs', and two or three per block
    res, rep = _rewrite(path, "foldnorm")
    assert rep["applied"] == n_bn and not rep["declined"] and res.passed
    proto = res.model if isinstance(res.model, onnx.ModelProto) else ir.to_proto(res.model)
    assert not any(n.op_type == "BatchNormalization" for n in proto.graph.node)
    assert _exact(path, res, built) <= FP32


# -- 3. an embedding LayerNorm before a pre-LN stack ----------------------------------------
@pytest.mark.parametrize("exporter", ["ts17", "dynamo18"])
def test_clip_embedding_norm_is_a_writer(files, exporter):
    """CLIPVisionModel: pre_layrnorm starts the stream (a writer, centred by one op), not a post-LN norm: rms and crms apply, exactly."""
    path, built = files("clip_vision", exporter)
    for p in ("rms", "crms"):
        res, rep = _rewrite(path, p)
        assert rep["applied"] > 0 and not rep["declined"] and res.passed, _reasons(rep)[:1]
        starts = [s.reason for s in res.records[0].applied if "explicit centering op" in s.reason]
        assert len(starts) == 1, starts  # pre_layrnorm's output, the only writer without parameters to re-centre
        assert _exact(path, res, built) <= FP32
