"""``osplus``: Outlier Suppression+ shift/scale migration (exact), FX and ONNX.

Structure: no op added or removed (only the norm affine and the reader weights change),
the per-site report figures. Meaning: original vs rewritten on the same inputs (ORT with
graph optimizations off, or the GraphModule): fp32 max relative error <= 1e-5; and the
point of the pass: with injected outlier channels the activation range and the
fake-quantized output error drop.
"""

from __future__ import annotations

import logging
from collections import Counter

import numpy as np
import pytest
import torch

import rewriter
from passes.calibration import calibration_feeds
from passes.osplus import fake_quant
from rewriter.ir.fx_view import capture
from rewriter.ir.onnx_view import OnnxView
from rewriter.pass_api import Context
from tests.conftest import max_rel, run_ort
from tests.passes.rms_models import llama
from tests.passes.stream_models import onnx_model, torch_model

FAST = {"osplus": {"grid": 40}}


def _fx(module, inputs, options=FAST):
    res = rewriter.rewrite(module, ["osplus"], example_inputs=inputs, ir_kind="torch", options=options)
    assert res.passed, res.verification
    with torch.no_grad():
        err = max_rel(module(*inputs).numpy(), res.model(*inputs).numpy())
    return res, err


def _targets(gm) -> list[str]:
    return sorted(str(n.target) for n in gm.graph.nodes if n.op == "call_function")


def test_outlier_channels_range_and_error_drop_fx():
    """gamma channels x20 (outliers): range ratio and 8-bit output error drop >= 5x; output unchanged; no new op."""
    module, inputs = torch_model("zoo:prenorm-gpt-untied")
    with torch.no_grad():
        module.blocks[0].ln_1.weight[[3, 17]] *= 20
        module.blocks[1].ln_2.weight[[5]] *= 20
    res, err = _fx(module, inputs)
    assert err <= 1e-5
    rec = res.records[0]
    assert _targets(res.model) == _targets(capture(module, inputs))  # same ops: only parameters changed
    by_site = {s.site: s for s in rec.applied}
    assert len(by_site) == 4 and "final norm" in rec.declined[0].reason
    outliers = [s for s in _pass_stats(res) if s["ratio_before"] > 10]
    assert len(outliers) == 2  # exactly the two norms with injected channels
    for s in outliers:
        assert s["ratio_after"] < s["ratio_before"] / 5
        assert s["error_after"] < s["error_before"] / 5
        assert s["shift"] and "max/median channel" in by_site[s["site"]].reason


def _pass_stats(res):
    """The per-site figures the pass keeps (the reasons carry the same numbers)."""
    out = []
    for s in res.records[0].applied:
        r = s.reason
        ratio = r.split("max/median channel ")[1].split(";")[0].split(" -> ")
        errs = r.split("output error (rel.) ")[1].split(";")[0].split(" -> ")
        out.append({"site": s.site, "ratio_before": float(ratio[0]), "ratio_after": float(ratio[1]),
                    "error_before": float(errs[0]), "error_after": float(errs[1]), "shift": r.startswith("shift")})
    return out


def test_onnx_with_calib_npz_exact_in_ort(tmp_path):
    """ONNX with --calib .npz: same op types, LN affine and MatMul weights changed, ORT outputs equal (<= 1e-5)."""
    model = onnx_model("zoo:prenorm-gpt")
    calib = tmp_path / "calib.npz"
    np.savez(calib, ids=np.random.default_rng(7).integers(0, 96, (4, 32)).astype(np.int64))
    res = rewriter.rewrite(model, ["osplus"], calib=str(calib), options=FAST)
    assert res.passed
    before, after = (Counter(n.op_type for n in m.graph.all_nodes()) for m in (model, res.model))
    # no op added; only the exporter's constant weight Transposes of the changed MatMuls are folded away
    assert not after - before and before - after == Counter({"Transpose": 8})
    applied = res.records[0].applied
    assert len(applied) == 4 and all("calibration: calib, 128 tokens" in s.reason for s in applied)
    tagged = [n for n in res.model.graph.all_nodes() if n.metadata_props.get("rewriter.pass") == "osplus"]
    assert sum(n.op_type == "LayerNormalization" for n in tagged) == 4
    assert sum(n.op_type == "MatMul" for n in tagged) == 8  # q, k, v and fc1 of two blocks
    feeds = {"ids": np.random.default_rng(1).integers(0, 96, (2, 32)).astype(np.int64)}
    assert max_rel(run_ort(model, feeds)[0], run_ort(res.model, feeds)[0]) <= 1e-5


def test_random_calibration_is_warned(caplog):
    """Without --calib or example inputs, calibration falls back to random inputs with a warning."""
    view = OnnxView(onnx_model("zoo:prenorm-gpt"))
    with caplog.at_level(logging.WARNING, logger="passes.calibration"):
        feeds, source = calibration_feeds("osplus", view, Context())
    assert source == "random" and set(feeds) == {"ids"}
    assert any("no calibration data" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("name,how", [("hf:opt", "shift+scale"), ("hf:bloom", "shift+scale"), ("llama", "scale")])
def test_hf_models_fx(name, how):
    """HF OPT / BLOOM (LayerNorm: shift+scale) and Llama (RMSNorm: scale only) via torch.export: exact."""
    module, inputs = llama() if name == "llama" else torch_model(name)
    res, err = _fx(module, inputs)
    rec = res.records[0]
    assert err <= 1e-5 and len(rec.applied) == 4
    assert all(s.reason.startswith(how + " into") for s in rec.applied)
    if name == "hf:bloom":
        assert any("does not read the residual stream" in s.reason for s in rec.declined)


def test_declines_norms_read_by_the_stream_with_reason():
    """Post-LN GPT: each norm's output also feeds the residual add: declined, the reason says linears only."""
    module, inputs = torch_model("zoo:postnorm-gpt")
    res = rewriter.rewrite(module, ["osplus"], example_inputs=inputs, ir_kind="torch", options=FAST)
    rec = res.records[0]
    assert not rec.applied and rec.declined
    reasons = [s.reason for s in rec.declined]
    assert sum("is read by add" in r and "the migration needs linear readers only" in r for r in reasons) == 3
    assert reasons[-1].startswith("final norm")


def test_fake_quant_levels():
    """The fake quantizer uses 2^bits levels per tensor (asymmetric) and keeps zero exact."""
    x = np.linspace(-1.0, 3.0, 1001)
    q = fake_quant(x, 4)
    assert len(np.unique(q)) == 16 and np.abs(q - x).max() <= (4.0 / 15) / 2 + 1e-12
    assert fake_quant(np.array([0.0, 1.0, -2.0]), 8)[0] == 0.0
    assert len(np.unique(fake_quant(x, 3, symmetric=True))) <= 8
