"""rettention masks that follow the token layout (issue 22, point 4): the joint mask of
video / text+image attention (text rows and columns dense, a 2-D window inside each frame
and in the neighbouring frames), its listed block layout, every kernel on a CogVideoX-like
layout (text + frames x H x W) against the float64 masked reference, and ``mask=auto``
choosing from the layout that the pass reads from the patch embedding or an option."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import onnx_ir as ir
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import rewriter
from backends import flex_rettention as flex
from backends.ort import rettention as ort_rt
from backends.ort.session import make_session
from backends.rettention_spec import BlockLayout, MaskSpec, Schedule, TokenLayout, auto_block
from backends.triton import rettention as kern
from passes.rettention import Rettention, check_steps
from rewriter.ir.onnx_reader import inline_proto
from rewriter.pass_api import make_options
from tests.backends.test_rettention_kernel import kernel_tolerances, np_reference, rel

ROOT = Path(__file__).resolve().parents[2]

# CogVideoX's layout in miniature: 6 text tokens, then 3 frames of 4 x 5 patches
COG = TokenLayout.parse("6+3x4x5")
# a layout where the block lists are visibly sparse: 8 text + 4 frames of 8 x 8, 3x3 window, +-1 frame
WIDE = TokenLayout.parse("8+4x8x8")


def _specs():
    return [MaskSpec.joint(COG, 0.4), MaskSpec.joint(COG, 0.4, tradius=1), MaskSpec.joint(WIDE, 0.15, tradius=1),
            MaskSpec.joint(TokenLayout.parse("5+6x6"), 0.25)]


SPECS = _specs()


def test_layout_parsing():
    """T+FxHxW, T+HxW, FxHxW and HxW parse; a malformed layout is a one-line error."""
    assert TokenLayout.parse("226+13x30x45").n == 226 + 13 * 1350
    assert TokenLayout.parse("4+6x6") == TokenLayout(4, 1, 6, 6)
    assert TokenLayout.parse("2x3x4") == TokenLayout(0, 2, 3, 4)
    for bad in ("x", "3+", "a+2x2", "2x0", "1x2x3x4"):
        with pytest.raises(ValueError, match="layout="):
            TokenLayout.parse(bad)


def test_joint_mask_keeps_text_dense_and_windows_each_frame():
    """Text rows and columns are dense; a video token sees its in-frame window in frames within +-1."""
    spec = MaskSpec.joint(COG, 0.4, tradius=1)  # (2r+1)^2 ~= 20 * 0.4: r = 1
    m = spec.dense()
    t, hw = COG.text, COG.grid_h * COG.grid_w
    assert spec.radius == 1 and m[:t].all() and m[:, :t].all()

    def tok(f, r, c):
        return t + f * hw + r * COG.grid_w + c

    q = tok(0, 1, 1)
    assert m[q, tok(0, 2, 2)] and m[q, tok(1, 0, 0)] and m[q, tok(1, 1, 1)]
    assert not m[q, tok(0, 3, 1)] and not m[q, tok(0, 1, 3)] and not m[q, tok(2, 1, 1)]
    assert MaskSpec.joint(COG, 0.4).dense()[q, tok(2, 1, 1)]  # tradius -1: every frame (the paper's)
    assert 0 < spec.density() < MaskSpec.joint(COG, 0.4).density() < 1


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.describe())
def test_listed_layout_covers_the_mask_exactly(spec):
    """Blocked windows (index + bias) for the video query blocks and the dense prefix rows
    (prefix bias) together reproduce the mask, nothing more; block density >= token density."""
    lay = BlockLayout(spec, 16)
    idx, bias = lay.block_index(), lay.block_bias()
    got = np.zeros((lay.padded, lay.padded), int)
    for b in range(lay.nb):
        for col in range(lay.width):
            j = idx[b, col // lay.block] * lay.block + col % lay.block
            rows = b * lay.block + np.arange(lay.block)
            got[rows, j] += bias[b, :, col] == 0
    p = lay.prefix
    assert p == min(-(-spec.text // 16) * 16, spec.n) and p >= spec.text
    got[:p] = 0
    got[:p, :spec.n] = lay.prefix_bias() == 0
    assert got.max() == 1  # no key counted twice (the repeated padding blocks are masked)
    assert np.array_equal(got[:spec.n, :spec.n].astype(bool), spec.dense())
    assert not got[:spec.n, spec.n:].any()
    assert lay.block_density() >= spec.density() - 1e-12


@pytest.mark.parametrize("text", ["6+3x4x5", "40+2x6x6", "0+3x5x7"])
def test_joint_block_lists_and_density_equal_brute_force(text):
    """The per-axis key-block lists (grid dilation) and the per-axis densities (joint, band,
    window2d) equal the ones read off the dense N x N mask, for every frame reach and two block sizes."""
    for tr in (-1, 0, 1):
        spec = MaskSpec.joint(TokenLayout.parse(text), 0.3, tr)
        m = spec.dense()
        assert abs(spec.density() - m.mean()) < 1e-12
        for other in (MaskSpec.band(spec.n, 0.3), MaskSpec.window2d(spec.n - spec.text, 0.3, (spec.frames *
                                                                                              spec.grid_h, spec.grid_w))):
            assert abs(other.density() - other.dense().mean()) < 1e-12
        for bq in (16, 32):
            lay = BlockLayout(spec, bq)
            pad = np.zeros((lay.padded, lay.padded), bool)
            pad[:spec.n, :spec.n] = m
            want = [np.flatnonzero(pad[b * bq:(b + 1) * bq].reshape(bq, lay.nb, bq).any(axis=(0, 2)))
                    for b in range(lay.nb)]
            assert all(np.array_equal(a, g) for a, g in zip(want, lay.key_blocks())), (tr, bq)


def test_block_density_is_below_one_on_a_wider_layout():
    """On 8 + 4 x 8 x 8 tokens, +-1 frame, the sparse step visits a fraction of the key blocks."""
    spec = MaskSpec.joint(WIDE, 0.15, tradius=1)
    lay = BlockLayout(spec, 16)
    assert lay.block_density() < 0.8 and spec.density() < 0.4
    num, idx = lay.block_lists()
    assert num[0] == lay.nb  # the text query block reads everything
    assert all(0 in idx[b, :num[b]] for b in range(lay.nb))  # every block reads the text columns


def _qkv(spec, seed=0, batch=2, heads=2, d=8):
    rng = np.random.default_rng(seed)
    return [rng.standard_normal((batch, heads, spec.n, d)).astype(np.float32) for _ in range(3)]


def _reference(q, k, v, scale, spec, coef):
    o_full, rho, res = kern.reference_refresh(*map(torch.from_numpy, (q, k, v)), scale, spec)
    out = kern.reference_sparse(*map(torch.from_numpy, (q, k, v)), rho, res, coef, scale, spec)
    return o_full.numpy(), rho.numpy(), res.numpy(), out.numpy()


def _check(got, want, tol):
    for name, a, b in zip(("o", "rho", "r", "sparse"), want, got):
        assert rel(a, b) <= tol[name], (name, rel(a, b), tol[name])


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.describe())
def test_cpu_block_kernel_and_flex_match_float64_reference(spec):
    """The torch ops (CPU block kernel) and FlexAttention equal the float64 masked formulas."""
    q, k, v = _qkv(spec)
    scale, coef = 8 ** -0.5, 0.08
    lay = BlockLayout(spec, auto_block(spec))
    want = _reference(q, k, v, scale, spec, coef)
    tol = kernel_tolerances(q, k, v, scale, spec, coef)
    assert max(tol.values()) < 1e-3, tol
    tq, tk, tv = map(torch.from_numpy, (q, k, v))
    o, rho, res = kern.cpu_refresh(tq, tk, tv, scale, lay)
    _check([o, rho, res, kern.cpu_sparse(tq, tk, tv, rho, res, coef, scale, lay)], want, tol)
    # flex: the sparse step from the reference's state (its refresh on CPU uses the block kernel)
    rho64, res64 = torch.from_numpy(want[1]).float(), torch.from_numpy(want[2]).float()
    got = flex.sparse(tq, tk, tv, rho64, res64, coef, scale, lay)
    want_f = kern.reference_sparse(tq, tk, tv, rho64, res64, coef, scale, spec).numpy()
    assert rel(want_f, got) <= tol["sparse"]
    # a wrong mask (video rows without the text columns) is far outside the same tolerances
    wrong = spec.dense().copy()
    wrong[spec.text:, :spec.text] = False
    _, o_m, _ = np_reference(q, k, v, scale, spec.dense())
    _, o_m_wrong, _ = np_reference(q, k, v, scale, wrong)
    assert rel(o_m, o_m_wrong) > 10 * tol["sparse"]


def _function_model(cfg: ort_rt.FunctionConfig, shape) -> bytes:
    """A model that calls the ``Rettention`` function of ``cfg`` on its inputs."""
    b, h, n, d = shape
    f = ir.DataType.FLOAT
    ins = [ir.Value(name=nm, type=ir.TensorType(f), shape=ir.Shape([b, h, n, d])) for nm in "QKV"]
    step = ir.Value(name="step", type=ir.TensorType(ir.DataType.INT64), shape=ir.Shape([]))
    rho = ir.Value(name="rho", type=ir.TensorType(f), shape=ir.Shape([b, h, n]))
    res = ir.Value(name="res", type=ir.TensorType(f), shape=ir.Shape([b, h, n, d]))
    graph = ir.Graph([*ins, step, rho, res], [], nodes=[], opset_imports={"": 18}, name="g")
    model = ir.Model(graph, ir_version=10)
    name = ort_rt.ensure_function(model, cfg)
    call = ir.Node(ort_rt.DOMAIN, name, [*ins, step, rho, res], num_outputs=3, name="call")
    for o, nm in zip(call.outputs, ("O", "rho_out", "res_out")):
        o.name, o.type = nm, ir.TensorType(f)
    graph.append(call)
    graph.outputs.extend(call.outputs)
    return inline_proto(model)


@pytest.mark.parametrize("spec", SPECS[1:3], ids=lambda s: s.describe())
def test_ort_function_matches_float64_reference(spec):
    """The ONNX function's refresh (step = warmup) and sparse (k = 2) branches equal the formulas."""
    q, k, v = _qkv(spec, seed=1)
    scale, sch = 8 ** -0.5, Schedule(1, 4, 0.04)
    coef = 2 * sch.lam
    cfg = ort_rt.FunctionConfig(BlockLayout(spec, 16), 8, scale, sch)
    sess = make_session(_function_model(cfg, q.shape), optimize=False)
    zeros = {"rho": np.zeros(q.shape[:3], np.float32), "res": np.zeros(q.shape, np.float32)}
    o, rho, res = sess.run(None, {"Q": q, "K": k, "V": v, "step": np.asarray(1, np.int64), **zeros})
    out, _, _ = sess.run(None, {"Q": q, "K": k, "V": v, "step": np.asarray(4, np.int64), "rho": rho, "res": res})
    want = _reference(q, k, v, scale, spec, coef)
    _check([o, rho, res, out], want, kernel_tolerances(q, k, v, scale, spec, coef))


_TRITON = textwrap.dedent('''
    import json, os, torch
    assert os.environ["TRITON_INTERPRET"] == "1"
    from backends.rettention_spec import BlockLayout, MaskSpec, TokenLayout
    from backends.triton import rettention as kern
    from tests.backends.test_rettention_kernel import kernel_tolerances
    torch.manual_seed(0)
    out = {}
    for i, spec in enumerate((MaskSpec.joint(TokenLayout.parse("6+3x4x5"), 0.4, tradius=1),
                              MaskSpec.joint(TokenLayout.parse("5+6x6"), 0.25))):
        lay = BlockLayout(spec, 16)
        q, k, v = (torch.randn(1, 2, spec.n, 16) for _ in range(3))
        args = (q.numpy(), k.numpy(), v.numpy(), 0.25, spec, 0.08)
        tol = kernel_tolerances(*args, blocks=lay.nb)
        o, rho, r = kern.reference_refresh(q, k, v, 0.25, spec)
        want = (o, rho, r, kern.reference_sparse(q, k, v, rho, r, 0.08, 0.25, spec))
        got = kern.triton_refresh(q, k, v, 0.25, lay)
        got = (*got, kern.triton_sparse(q, k, v, rho.float(), r.float(), 0.08, 0.25, lay))
        for name, a, b in zip(("o", "rho", "r", "sparse"), want, got):
            out[f"{i}-{name}"] = [float((a - b.double()).abs().max() / a.abs().max()), tol[name]]
    print(json.dumps(out))
''')


@pytest.mark.slow
def test_triton_kernels_follow_the_block_lists_under_interpreter():
    """Triton (TRITON_INTERPRET=1, tiny shapes) reads the joint layout's block lists and equals
    the float64 reference within the fp_bounds tolerances."""
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=str(ROOT))
    proc = subprocess.run([sys.executable, "-c", _TRITON], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads(proc.stdout.strip().splitlines()[-1])
    assert len(results) == 8
    bad = {k: v for k, v in results.items() if not (v[0] <= v[1] < 1e-3)}
    assert not bad, bad


# -- the pass ------------------------------------------------------------------------------------
class TinyJoint(nn.Module):
    """CogVideoX's joint attention in miniature: frames patchified by a conv (batch B * F),
    text tokens projected and put first, one self-attention over [text | video]."""

    def __init__(self, frames=3, text=6, d=16, heads=2, patch=2):
        super().__init__()
        self.frames, self.heads = frames, heads
        self.patch = nn.Conv2d(4, d, patch, stride=patch)
        self.text = nn.Linear(12, d)
        self.qkv = nn.Linear(d, 3 * d)
        self.out = nn.Linear(d, d)

    def forward(self, video, text):  # video [B, F, 4, H, W], text [B, T, 12]
        b, f = video.shape[:2]
        x = self.patch(video.flatten(0, 1))  # [B*F, d, h, w]
        x = x.flatten(2).transpose(1, 2).reshape(b, -1, x.shape[1])  # [B, F*h*w, d]
        x = torch.cat([self.text(text), x], 1)
        q, k, v = self.qkv(x).chunk(3, -1)
        q, k, v = (t.unflatten(-1, (self.heads, -1)).transpose(1, 2) for t in (q, k, v))
        o = F.scaled_dot_product_attention(q, k, v)
        return self.out(o.transpose(1, 2).flatten(2))


def _joint_inputs(batch=2):
    g = torch.Generator().manual_seed(0)
    return torch.randn(batch, 3, 4, 8, 10, generator=g), torch.randn(batch, 6, 12, generator=g)


def _site(module, inputs, **opts):
    view = rewriter.api.as_view(module, example_inputs=inputs)
    return Rettention(make_options(Rettention, {k: str(v) for k, v in opts.items()})).match(view)[0]


def test_auto_reads_the_layout_from_the_patch_embedding():
    """mask=auto on joint attention: the conv patch embedding gives 3 frames of 4x5 and 6 text
    tokens; the reason names the choice, the token and the block density."""
    site = _site(TinyJoint(), _joint_inputs(), mask="auto", density=0.4)
    assert site.accepted, site.reason
    assert "mask=auto chose joint (layout 6+3x4x5 from the patch embedding" in site.reason
    assert "6 text tokens dense + 3 frame(s) x 4x5, 3x3 window in every frame" in site.reason
    assert "token density" in site.reason and "block density" in site.reason


def test_auto_choices_and_option_layouts():
    """auto: window2d for one image grid from a conv, the band with no layout; layout= overrides;
    a layout of the wrong size, or mask=joint without a layout, is a declined site."""
    from tests.passes.test_rettention import TinyAttention

    image = TinyJoint(frames=1, text=0)

    class Image(nn.Module):
        def __init__(self):
            super().__init__()
            self.m = image

        def forward(self, video):
            return self.m(video, torch.zeros(video.shape[0], 0, 12))

    vid = torch.randn(2, 1, 4, 8, 12)
    site = _site(Image(), (vid,), mask="auto", density=0.3)
    assert site.accepted and "mask=auto chose window2d (image grid 4x6 from the patch embedding" in site.reason
    plain = TinyAttention()
    x = (torch.randn(2, 24, 16),)
    assert "mask=auto chose band (no token layout found)" in _site(plain, x, mask="auto").reason
    s2 = _site(plain, x, mask="auto", layout="4+2x2x5", frames_window=0)
    assert s2.accepted and "chose joint (layout 4+2x2x5 from the layout option" in s2.reason
    assert "frames within +-0" in s2.reason
    bad = _site(plain, x, mask="joint", layout="4+2x2x4")
    assert not bad.accepted and "layout=4+2x2x4 holds 20 tokens, the site has 24" in bad.reason
    none = _site(plain, x, mask="joint")
    assert not none.accepted and "mask=joint needs the token layout" in none.reason


def test_joint_rewrite_runs_every_phase_in_both_irs(tmp_path):
    """The joint model rewritten with mask=auto: FX and ONNX, every site's dense, refresh and
    sparse steps equal the float64 formulas (check_steps), and FX equals ONNX step by step."""
    from backends.ort.rettention import RettentionRunner
    from rewriter.torch_export import export_to_onnx

    m = TinyJoint().eval()
    xs = _joint_inputs()
    opts = {"rettention": {"mask": "auto", "density": 0.4, "warmup": 1, "period": 3}}
    fx = rewriter.rewrite(m, ["rettention"], example_inputs=xs, options=opts)
    path = export_to_onnx(m, xs, tmp_path / "joint.onnx", opset=18)
    ox = rewriter.rewrite(str(path), ["rettention"], options=opts)
    for res in (fx, ox):
        assert len(res.records[0].applied) == 1 and "chose joint" in res.records[0].sites[0].reason
    names = [i.name for i in ox.view.graph.inputs if not i.name.startswith("rettention")]
    feeds = dict(zip(names, (x.numpy() for x in xs)))
    recs = check_steps(ox.view, feeds, 5)
    assert [r["phase"] for r in recs] == ["dense", "refresh", "sparse", "sparse", "refresh"]
    assert max(r["max_rel_error"] for r in recs) <= 1e-4
    runner = RettentionRunner(ox.view.model, optimize=False)
    gm = fx.model
    gm.rettention.reset()
    for t in range(5):
        gm.rettention.set_step(t)
        with torch.no_grad():
            a = gm(*xs).numpy()
        b = next(iter(runner(feeds, t).values()))
        assert rel(a, b) <= 1e-4, t
