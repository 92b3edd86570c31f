"""``rms``: LayerNorm -> RMSNorm on real transformer graphs, ONNX (opset 18 and 23) and FX.

Structure: which norm op appears and that no LayerNormalization is left on the stream.
Meaning: the rewritten model is run (ORT with graph optimizations off, or the GraphModule)
against the original on the same inputs: fp32 max relative error <= 1e-5.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx_ir as ir
import pytest
import torch

import rewriter
from tests.conftest import max_rel, run_ort
from tests.passes.stream_models import onnx_model, torch_model

ROOT = Path(__file__).resolve().parents[2]


def feeds_for(model: ir.Model, seed: int = 0) -> dict:
    from rewriter.ir.onnx_view import OnnxView
    from rewriter.run.verify import input_specs, make_inputs

    return make_inputs(input_specs(OnnxView(model)), seed=seed)[0]


def rewrite_onnx(name: str, pass_name: str, opset: int = 18, **options):
    """Rewrite an exported model; compare original and rewritten in ORT (optimizations off)."""
    model = onnx_model(name, opset)
    res = rewriter.rewrite(model, [pass_name], options={pass_name: options} if options else None)
    assert res.passed, res.verification
    feeds = feeds_for(model, seed=1)
    err = max(max_rel(a, b) for a, b in zip(run_ort(model, feeds), run_ort(res.model, feeds)))
    return res, err


def rewrite_fx(name: str, pass_name: str):
    module, inputs = torch_model(name)
    res = rewriter.rewrite(module, [pass_name], example_inputs=inputs, ir_kind="torch")
    assert res.passed, res.verification
    with torch.no_grad():
        want = module(*inputs)
        got = res.model(*inputs)
    want = want[0] if isinstance(want, tuple) else want
    got = got[0] if isinstance(got, (tuple, list)) else got
    return res, max_rel(want.numpy(), got.numpy())


def onnx_ops(model: ir.Model) -> list[str]:
    return [n.op_type for n in model.graph.all_nodes()]


@pytest.mark.parametrize("name", ["zoo:prenorm-gpt", "zoo:prenorm-vit", "hf:gpt2", "hf:opt", "hf:bloom", "hf:vit"])
def test_rms_onnx_opset18_upgraded(name):
    """Opset-18 export: upgraded to 23, every stream LN -> RMSNormalization, output equal."""
    res, err = rewrite_onnx(name, "rms")
    ops = onnx_ops(res.model)
    n_ln = onnx_ops(onnx_model(name)).count("LayerNormalization")
    extra_ln = 1 if name == "hf:bloom" else 0  # BLOOM's embedding LN is a writer, kept
    assert ops.count("RMSNormalization") == n_ln - extra_ln
    assert ops.count("LayerNormalization") == extra_ln
    assert res.model.opset_imports[""] == 23
    assert err <= 1e-5


def test_rms_onnx_opset18_chain_without_upgrade(tmp_path):
    """upgrade_opset=false keeps opset 18 and emits the standard-op RMS chain, in the form
    ONNX Runtime fuses into its RMSNorm kernel (Pow, not Mul(x, x); the scale Mul kept)."""
    res, err = rewrite_onnx("zoo:prenorm-gpt", "rms", upgrade_opset="false")
    ops = onnx_ops(res.model)
    assert res.model.opset_imports[""] == 18
    assert "RMSNormalization" not in ops and "LayerNormalization" not in ops
    assert ops.count("ReduceMean") >= 5 and err <= 1e-5
    # the chain is in the form ORT fuses into one SimplifiedLayerNormalization kernel
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    opts.optimized_model_filepath = str(tmp_path / "opt.onnx")
    opts.log_severity_level = 3
    ort.InferenceSession(ir.serde.serialize_model(res.model).SerializeToString(), opts,
                         providers=["CPUExecutionProvider"])
    fused = [n.op_type for n in ir.load(tmp_path / "opt.onnx").graph]
    n_norms = onnx_ops(onnx_model("zoo:prenorm-gpt")).count("LayerNormalization")
    assert fused.count("SimplifiedLayerNormalization") == n_norms


@pytest.mark.parametrize("name", ["zoo:prenorm-gpt", "hf:gpt2"])
def test_rms_onnx_opset23(name):
    """Opset-23 export (LayerNormalization nodes): RMSNormalization with the same epsilon."""
    res, err = rewrite_onnx(name, "rms", opset=23)
    rms = [n for n in res.model.graph.all_nodes() if n.op_type == "RMSNormalization"]
    assert len(rms) == 5 and "LayerNormalization" not in onnx_ops(res.model)
    assert all(abs(n.attributes["epsilon"].value - 1e-5) < 1e-12 for n in rms)
    assert err <= 1e-5


@pytest.mark.parametrize("name", ["zoo:prenorm-gpt", "zoo:prenorm-vit", "zoo:prenorm-gpt-parallel",
                                  "hf:gpt2", "hf:opt", "hf:bloom"])
def test_rms_fx(name):
    """torch.export graph: aten.rms_norm replaces every stream LN; GraphModule output equal."""
    res, err = rewrite_fx(name, "rms")
    targets = [str(n.target) for n in res.model.graph.nodes]
    n_ln = targets.count("aten.layer_norm.default")
    assert targets.count("aten.rms_norm.default") == 5
    assert n_ln == (1 if name == "hf:bloom" else 0)
    assert err <= 1e-5


def test_tied_head_is_untied_and_said():
    """A tied embedding/head is untied by copying; the site says so; the output is unchanged."""
    res, err = rewrite_fx("zoo:prenorm-gpt", "rms")
    notes = [s.reason for s in res.records[0].sites if s.site.startswith("writer:")]
    assert any(r.startswith("tied embedding/head") and "untied by copying" in r for r in notes)
    emb = [n for n in res.model.graph.nodes if str(n.target) == "aten.embedding.default"][0]
    head = [n for n in res.model.graph.nodes if str(n.target) == "aten.linear.default"][-1]
    assert emb.args[0].target != head.args[1].target and err <= 1e-5


def test_modulated_norm_keeps_affine():
    """A norm output modulated by data (adaLN without gates) keeps gamma/beta after RMSNorm."""
    res, err = rewrite_fx("zoo:adaln-nogate-transformer", "rms")
    kept = [s for s in res.records[0].sites if "kept after the norm" in s.reason]
    assert len(kept) == 4 and err <= 1e-5


@pytest.mark.parametrize("name,ir_kind,needle", [
    ("zoo:postnorm-gpt", "torch", "post-LN:"),
    ("hf:bert", "onnx", "post-LN:"),
    ("hf:opt-post", "torch", "post-LN:"),
    ("zoo:prenorm-gpt-hidden", "onnx", "is a graph output (an exported hidden state"),
    ("zoo:adaln-transformer", "torch", "scaled channel-wise by a data-dependent gate"),
])
def test_rms_declines_with_reason(name, ir_kind, needle):
    """Models that break the preconditions: every site declined, the reason names why."""
    if ir_kind == "onnx":
        model = onnx_model(name)
        res = rewriter.rewrite(model, ["rms"])
        assert "RMSNormalization" not in onnx_ops(res.model)
    else:
        module, inputs = torch_model(name)
        res = rewriter.rewrite(module, ["rms"], example_inputs=inputs, ir_kind="torch")
    rec = res.records[0]
    assert not rec.applied and rec.declined
    assert all(needle in s.reason for s in rec.declined)


def test_cli_post_ln_exit_3_nothing_written(tmp_path):
    """`rewrite zoo:postnorm-gpt --passes rms`: exit 3, a post-LN reason, no file written."""
    out = tmp_path / "out.onnx"
    # this checkout's code through the running interpreter (not a .venv inside the checkout:
    # a worktree or the soak's clone has none)
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.run([sys.executable, "-m", "rewriter.cli", "zoo:postnorm-gpt", "--passes", "rms", "-o", str(out)],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 3, proc.stdout + proc.stderr
    assert "post-LN" in proc.stdout + proc.stderr
    assert not out.exists() and not list(tmp_path.iterdir())


def test_fp16_onnx_folded_in_float64():
    """An fp16 model: parameters folded in float64 and cast once; max rel err <= 2e-3."""
    module, inputs = torch_model("zoo:prenorm-gpt-untied")
    from rewriter.torch_export import export_to_onnx

    path = Path(__import__("tempfile").mkdtemp()) / "fp16.onnx"
    export_to_onnx(module.half(), inputs, path, opset=18)
    model = ir.load(path)
    res = rewriter.rewrite(model, ["rms"])
    feeds = feeds_for(model, seed=2)
    want, got = run_ort(model, feeds)[0], run_ort(res.model, feeds)[0]
    assert want.dtype == np.float16 and got.dtype == np.float16
    assert "RMSNormalization" in onnx_ops(res.model)
    assert max_rel(want, got) <= 2e-3
