"""unmixtns: structure (state inputs / outputs in ONNX, a state module in FX), the update
rule step by step against the float64 reference in both IRs, rho = 0 / spread = 0 is the
original, and declines."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from torch import nn

import rewriter
from backends.ort import make_session
from backends.ort.tta import UnmixRunner, state_names
from backends.tta import init_components, state_module, unmix_step
from tests.conftest import bn_inits, bn_node, make_model, max_rel, op_types, run_ort

EPS32 = float(np.finfo(np.float32).eps)
OPTS = {"k": 3, "tau": 0.5, "rho": 0.3, "spread": 0.5}


def _onnx_bn(rng, shape=("N", 4, 5, 5)):
    inits = bn_inits("bn", shape[1], rng)
    m = make_model([bn_node("bn", "x", "h"), onnx.helper.make_node("Relu", ["h"], ["y"], name="relu")],
                   [("x", list(shape))], [("y", list(shape))], inits)
    params = [np.asarray(onnx.numpy_helper.to_array(t), np.float64) for t in inits]
    return m, params


def _stream(rng, steps, n=3, c=4, hw=5):
    """Batches whose statistics drift from step to step (a correlated stream)."""
    return [(rng.standard_normal((n, c, hw, hw)) * (1 + 0.5 * t) + t - 1).astype(np.float32) for t in range(steps)]


def _reference_chain(xs, g, b, mu, var, eps, o):
    """(y_t, m_t, v_t) per step, float64, from the initial components."""
    m, v = init_components(mu, var, o["k"], o["spread"])
    t = lambda a: torch.as_tensor(np.asarray(a, np.float64))  # noqa: E731
    out = []
    for x in xs:
        y, m, v = (r.numpy() for r in unmix_step(t(x), t(m), t(v), t(var), t(g), t(b), eps, o["tau"], o["rho"]))
        out.append((y, m, v))
    return out


def _rewrite(model, opts=OPTS, **kw):
    res = rewriter.rewrite(model, ["unmixtns"], options={"unmixtns": {k: str(v) for k, v in opts.items()}}, **kw)
    assert res.passed, res.verification
    return res


def test_onnx_structure_and_steps(rng, tmp_path):
    """ONNX: BatchNormalization -> one UnMixTNS call with the components as graph inputs
    (defaults: the initial components) and outputs; over 5 steps carried by UnmixRunner,
    every output and component update equals the float64 reference chain."""
    m, (g, b, mu, var) = _onnx_bn(rng)
    res = _rewrite(m)
    assert op_types(res.model) == ["UnMixTNS", "Relu"]
    m_in, v_in, m_out, v_out = state_names(0)
    model = res.model
    ins = [v.name for v in model.graph.inputs]
    outs = [v.name for v in model.graph.outputs]
    assert ins == ["x", m_in, v_in] and outs == ["y", m_out, v_out]
    path = tmp_path / "u.onnx"
    res.save(str(path))
    runner = UnmixRunner(make_session(str(path), optimize=False))
    xs = _stream(rng, 5)
    for step, (x, (y, mm, vv)) in enumerate(zip(xs, _reference_chain(xs, g, b, mu, var, 1e-3, OPTS))):
        (got,) = runner({"x": x})
        tol = 25 * EPS32 * (step + 1) + 1e-5  # H*W-sample float32 sums, accumulated over the steps
        assert max_rel(np.maximum(y, 0), got) <= tol, step
        assert max_rel(mm, runner.state[m_in]) <= tol and max_rel(vv, runner.state[v_in]) <= tol, step
    m0, _ = init_components(mu, var, OPTS["k"], OPTS["spread"])
    assert max_rel(m0, runner.state[m_in]) > 0.1  # the state moved: the check can fail


def test_fx_state_module_steps():
    """FX: aten.batch_norm -> a call of the `unmixtns` state module; over 5 steps its output
    and its buffers equal the float64 reference chain; reset() restores the start."""
    torch.manual_seed(0)
    mod = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4)).eval()
    with torch.no_grad():
        mod[1].running_mean.copy_(torch.randn(4) * 0.5)
        mod[1].running_var.copy_(torch.rand(4) * 2 + 0.2)
    x0 = torch.randn(3, 3, 5, 5)
    res = _rewrite(mod, example_inputs=(x0,))
    gm = res.model
    assert res.view.op_counts().get("unmixtns") == 1
    st = state_module(gm)
    st.reset()
    bn = mod[1]
    xs = [torch.from_numpy(x[:, :3]) for x in _stream(np.random.default_rng(1), 5)]
    with torch.no_grad():
        hs = [mod[0](x).numpy() for x in xs]
    chain = _reference_chain(hs, bn.weight.detach(), bn.bias.detach(), bn.running_mean, bn.running_var, bn.eps, OPTS)
    for step, (x, (y, mm, vv)) in enumerate(zip(xs, chain)):
        with torch.no_grad():
            got = gm(x).numpy()
        tol = 25 * EPS32 * (step + 1) + 1e-5
        m_now, v_now = (t.numpy() for t in st.components(0))
        assert max_rel(y, got) <= tol and max_rel(mm, m_now) <= tol and max_rel(vv, v_now) <= tol, step
    st.reset()
    m0, _ = init_components(bn.running_mean.numpy(), bn.running_var.numpy(), OPTS["k"], OPTS["spread"])
    assert max_rel(m0, st.components(0)[0].numpy()) <= EPS32


@pytest.mark.parametrize("k", [1, 3])
def test_no_update_no_spread_is_original(rng, k):
    """rho = 0 and spread = 0: every component is the source statistics, so the call is
    the frozen BatchNorm (ONNX, ORT optimizations off)."""
    m, _ = _onnx_bn(rng)
    res = _rewrite(m, {"k": k, "tau": 1.0, "rho": 0.0, "spread": 0.0})
    x = (rng.standard_normal((2, 4, 5, 5)) * 3 + 2).astype(np.float32)
    assert max_rel(run_ort(m, {"x": x})[0], run_ort(res.model, {"x": x})[0]) <= 1e-5


def test_declines_flat_bn(rng):
    """A BatchNorm over [N, C] has no per-instance statistics: declined with the reason."""
    inits = bn_inits("bn", 6, rng)
    m = make_model([bn_node("bn", "x", "y")], [("x", ["N", 6])], [("y", ["N", 6])], inits)
    res = rewriter.rewrite(m, ["unmixtns"], verify=False, allow_unapplied=True)
    (d,) = res.report["passes"][0]["declined"]
    assert "one sample per channel" in d["reason"] and "flat" not in d["reason"]
