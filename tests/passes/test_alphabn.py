"""alphabn: alpha = 1 is the original (both IRs), a batch matches the float64 formula (both
IRs, both variance forms), structure (BatchNorm gone, the new op there), declines (folded
norms, [N, C] norms, training mode), and held-out exports (dynamo optimize=False,
TorchScript from transformers' ResNet)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from onnx import helper
from torch import nn

import rewriter
from backends.tta import alpha_reference
from tests.conftest import bn_inits, bn_node, init, make_model, max_rel, op_types, run_ort

TOL = 1e-5
EPS32 = float(np.finfo(np.float32).eps)


def _onnx_bn(rng, shape=("N", 4, 5, 5), **attrs):
    c = shape[1]
    inits = bn_inits("bn", c, rng)
    m = make_model([bn_node("bn", "x", "y", **attrs)], [("x", list(shape))], [("y", list(shape))], inits)
    params = [np.asarray(__import__("onnx").numpy_helper.to_array(t), np.float64) for t in inits]
    return m, params


def _shifted(rng, shape):
    """Activations whose statistics are far from the frozen ones (a covariate shift)."""
    return (rng.standard_normal(shape) * 2.5 + 1.5).astype(np.float32)


def _alphabn(model, alpha, **kw):
    opts = {"alpha": str(alpha), **{k: str(v) for k, v in kw.pop("opts", {}).items()}}
    res = rewriter.rewrite(model, ["alphabn"], options={"alphabn": opts}, **kw)
    assert res.passed, res.verification
    return res


# -- ONNX ------------------------------------------------------------------------------------
def test_onnx_alpha_one_is_original(rng):
    """ONNX, alpha = 1: BatchNormalization becomes one AlphaBatchNormalization call and the
    output equals the original's (ORT, optimizations off) at any batch size."""
    m, _ = _onnx_bn(rng)
    res = _alphabn(m, 1.0)
    assert op_types(res.model) == ["AlphaBatchNormalization"]
    for n in (1, 3):
        x = _shifted(rng, (n, 4, 5, 5))
        assert max_rel(run_ort(m, {"x": x})[0], run_ort(res.model, {"x": x})[0]) <= TOL


@pytest.mark.parametrize("variance,form", [("mixture", 1), ("mix", 0)])
@pytest.mark.parametrize("alpha", [0.0, 0.3])
def test_onnx_batch_matches_reference(rng, variance, form, alpha):
    """ONNX: a shifted batch through the call == the float64 alpha-BN formula (tolerance:
    float32 sums over the N*H*W samples of a channel)."""
    m, (g, b, mu, var) = _onnx_bn(rng)
    res = _alphabn(m, alpha, opts={"variance": variance})
    x = _shifted(rng, (3, 4, 5, 5))
    got = run_ort(res.model, {"x": x})[0]
    want = alpha_reference(x, g, b, mu, var, alpha, 1e-3, form)
    assert max_rel(want, got) <= 3 * 5 * 5 * EPS32
    assert max_rel(want, run_ort(m, {"x": x})[0]) > 0.05  # the shift matters: the test can fail


def test_onnx_forms_differ(rng):
    """The two variance forms are different functions for 0 < alpha < 1 (the extra term
    a (1 - a)(mu_s - mu_b)^2 is not zero under a shift)."""
    m, (g, b, mu, var) = _onnx_bn(rng)
    x = _shifted(rng, (2, 4, 5, 5))
    a = alpha_reference(x, g, b, mu, var, 0.5, 1e-3, 0)
    c = alpha_reference(x, g, b, mu, var, 0.5, 1e-3, 1)
    assert max_rel(a, c) > 1e-2


def test_onnx_declines_training_mode(rng):
    """A BatchNormalization in training mode is declined with the reason."""
    m, _ = _onnx_bn(rng, shape=(2, 4, 5, 5), training_mode=1)
    m.graph.node[0].output.extend(["rm", "rv"])
    res = rewriter.rewrite(m, ["alphabn"], verify=False, allow_unapplied=True)
    (d,) = res.report["passes"][0]["declined"]
    assert "training mode" in d["reason"]


def test_onnx_flat_bn_needs_flat(rng):
    """A BatchNorm over [N, C] is declined (one sample per channel at batch 1) unless
    flat=true, and then follows the formula over the batch axis."""
    m, (g, b, mu, var) = _onnx_bn(rng, shape=("N", 6))
    res = rewriter.rewrite(m, ["alphabn"], verify=False, allow_unapplied=True)
    assert "one sample per channel" in res.report["passes"][0]["declined"][0]["reason"]
    res = _alphabn(m, 0.5, opts={"flat": True})
    x = _shifted(rng, (5, 6))
    assert max_rel(alpha_reference(x, g, b, mu, var, 0.5, 1e-3), run_ort(res.model, {"x": x})[0]) <= 5 * EPS32 + TOL


def test_onnx_folded_conv_declined_with_the_way_out(rng):
    """A conv with no BatchNorm (what a folding export leaves) is declined, naming the
    --no-fold exports (optimize=False / do_constant_folding=False)."""
    m = make_model([helper.make_node("Conv", ["x", "W", "B"], ["y"], pads=[1, 1, 1, 1], name="conv")],
                   [("x", [1, 3, 5, 5])], [("y", [1, 4, 5, 5])],
                   [init("W", rng.standard_normal((4, 3, 3, 3))), init("B", rng.standard_normal(4))])
    res = rewriter.rewrite(m, ["alphabn"], verify=False, allow_unapplied=True)
    (d,) = res.report["passes"][0]["declined"]
    assert d["site"] == "conv"
    assert "cannot be recovered" in d["reason"] and "--no-fold" in d["reason"] and "optimize=False" in d["reason"]


# -- FX --------------------------------------------------------------------------------------
def _torch_bn(seed=0):
    torch.manual_seed(seed)
    m = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4)).eval()
    with torch.no_grad():
        bn = m[1]
        bn.running_mean.copy_(torch.randn(4) * 0.5)
        bn.running_var.copy_(torch.rand(4) * 2 + 0.2)
        bn.weight.copy_(torch.randn(4) * 0.5 + 1)
        bn.bias.copy_(torch.randn(4) * 0.3)
    return m


def test_fx_alpha_one_is_original():
    """FX, alpha = 1: aten.batch_norm becomes rewriter.alpha_batch_norm and the GraphModule
    equals the module."""
    m = _torch_bn()
    x = torch.randn(2, 3, 6, 6) * 2 + 1
    res = _alphabn(m, 1.0, example_inputs=(x,))
    ops = res.view.op_counts()
    assert ops.get("rewriter.alpha_batch_norm.default") == 1 and not any("batch_norm.default" == k.split("aten.")[-1]
                                                                         for k in ops)
    with torch.no_grad():
        assert max_rel(m(x).numpy(), res.model(x).numpy()) <= TOL


@pytest.mark.parametrize("variance,form", [("mixture", 1), ("mix", 0)])
def test_fx_batch_matches_reference(variance, form):
    """FX: the rewritten module on a shifted batch == the float64 formula applied to the
    conv's output; and the module still trains (gradients reach the conv)."""
    m = _torch_bn()
    x = torch.randn(2, 3, 6, 6) * 2 + 1
    res = _alphabn(m, 0.4, example_inputs=(x,), opts={"variance": variance})
    bn = m[1]
    with torch.no_grad():
        h = m[0](x).numpy()
    want = alpha_reference(h, bn.weight.detach(), bn.bias.detach(), bn.running_mean, bn.running_var, 0.4, bn.eps, form)
    gm = res.model
    got = gm(x)
    assert max_rel(want, got.detach().numpy()) <= 2 * 6 * 6 * EPS32
    got.square().sum().backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in gm.parameters())


def test_fx_training_bn_declined():
    """FX: a BatchNorm captured in training mode is declined with the reason."""
    from rewriter.ir.fx_view import FxView, capture
    from rewriter.pass_api import get_pass

    x = torch.randn(2, 3, 6, 6)
    view = FxView(capture(_torch_bn().train(), (x,)), (x,))
    sites = get_pass("alphabn")().match(view)
    assert sites and not any(s.accepted for s in sites)
    assert any("training mode" in s.reason for s in sites)


# -- held-out exports ------------------------------------------------------------------------
@pytest.mark.slow
def test_dynamo_optimize_false_export(tmp_path):
    """A BatchNorm CNN exported by the dynamo exporter with optimize=False: every
    BatchNormalization is rewritten and alpha = 1 equals the original in ORT."""
    import models_zoo

    path = models_zoo.export_onnx("tta-cnn", tmp_path / "cnn.onnx")
    res = _alphabn(str(path), 1.0)
    types = op_types(res.model)
    assert "BatchNormalization" not in types and types.count("AlphaBatchNormalization") == 4
    x = np.random.default_rng(1).standard_normal((4, 3, 32, 32)).astype(np.float32)
    import onnx

    orig = onnx.load(str(path))
    assert max_rel(run_ort(orig, {orig.graph.input[0].name: x})[0],
                   run_ort(res.model, {orig.graph.input[0].name: x})[0]) <= TOL


def _hf_cnn(arch):
    import transformers as tf

    torch.manual_seed(0)
    if arch == "resnet":
        cfg = tf.ResNetConfig(embedding_size=16, hidden_sizes=[16, 32], depths=[1, 1], layer_type="basic", num_labels=5)
        return tf.ResNetForImageClassification(cfg).eval(), 6
    if arch == "mobilenetv2":
        cfg = tf.MobileNetV2Config(depth_multiplier=0.35, image_size=32, num_labels=5)
        return tf.MobileNetV2ForImageClassification(cfg).eval(), 52
    cfg = tf.RegNetConfig(embedding_size=16, hidden_sizes=[16, 32], depths=[1, 1], groups_width=8, num_labels=5)
    return tf.RegNetForImageClassification(cfg).eval(), 9


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["resnet", "mobilenetv2", "regnet"])
def test_torchscript_transformers_cnns(tmp_path, arch):
    """transformers ResNet / MobileNetV2 / RegNet exported by the TorchScript exporter with
    do_constant_folding=False keep their BatchNormalization nodes: all are rewritten and
    alpha = 1 equals the original at batch 3 (dynamic batch); the default export (folded)
    is declined with the way out."""
    import warnings

    import onnx

    model, n_bn = _hf_cnn(arch)
    x = torch.randn(2, 3, 32, 32)
    paths = {}
    for fold in (False, True):
        paths[fold] = tmp_path / f"resnet_{fold}.onnx"
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(model, (x,), str(paths[fold]), dynamo=False, input_names=["pixel_values"],
                              output_names=["logits"], dynamic_axes={"pixel_values": {0: "batch"}}, opset_version=17,
                              do_constant_folding=fold)
    res = _alphabn(str(paths[False]), 1.0)
    types = op_types(res.model)
    assert "BatchNormalization" not in types and types.count("AlphaBatchNormalization") == n_bn
    xb = np.random.default_rng(2).standard_normal((3, 3, 32, 32)).astype(np.float32)
    orig = onnx.load(str(paths[False]))
    assert max_rel(run_ort(orig, {"pixel_values": xb})[0], run_ort(res.model, {"pixel_values": xb})[0]) <= TOL
    folded = rewriter.rewrite(str(paths[True]), ["alphabn"], verify=False, allow_unapplied=True)
    declined = folded.report["passes"][0]["declined"]
    assert declined and all("--no-fold" in d["reason"] for d in declined)


def test_fx_dynamic_batch_graphmodule():
    """FX: a GraphModule exported with a dynamic batch (torch.export Dim) is rewritten as
    given, so the result runs at batch 1 and 7 (test-time BN is used at several batch
    sizes); alpha = 1 equals the module at both."""
    m = _torch_bn()
    x = torch.randn(2, 3, 6, 6)
    ep = torch.export.export(m, (x,), dynamic_shapes=({0: torch.export.Dim("batch", min=1, max=64)},))
    res = _alphabn(ep.module(), 1.0, example_inputs=(x,))
    assert res.report["passes"][0]["applied"] == 1
    for n in (1, 7):
        xb = torch.randn(n, 3, 6, 6) * 2 + 1
        with torch.no_grad():
            assert max_rel(m(xb).numpy(), res.model(xb).numpy()) <= TOL
