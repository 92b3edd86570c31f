"""Dynamic axes (issue 13, build point 2): the stream passes on the files exporters write.

Hugging Face GPT-2 (tiny config, random weights, randomized norms) is exported four ways,
each once per test run: the TorchScript exporter at opset 17 with ``dynamic_axes`` (batch,
sequence), the dynamo exporter at opset 18 with ``dynamic_shapes`` (batch, sequence), and a
KV-cache decode step (``past_*`` inputs, ``present_*`` outputs) through both; plus
``torch.export`` with dynamic batch and sequence for the FX side. These files read the
residual stream's shape (``Shape -> Gather -> Unsqueeze -> Concat -> Reshape``) and build
reshape targets from constants and shape reads (``Concat(B, S, 64)``).

Each (file, pass): structure (norm ops replaced, the stream narrowed for ``crms``) and
meaning: original and rewritten run in ORT with graph optimizations off (or as
GraphModules) at two different batch / sequence sizes, fp32 max relative error <= 1e-5
for the exact passes (the project's exact-pass bound). Verification gets explicit feeds
(0/1 attention masks, KV caches of the right shapes). Negative cases: a reshape target
computed at run time in a way that cannot be followed, and the stream's width used as a
number; ``crms`` declines naming the op, ``rms`` applies.
"""

from __future__ import annotations

import os
import subprocess
import sys
import warnings
from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper

import rewriter
from tests.conftest import init, max_rel

ROOT = Path(__file__).resolve().parents[2]
D, LAYERS, HEADS, VOCAB = 64, 2, 4, 100
NORMS = 2 * LAYERS + 1  # two pre-norms per block and the final norm
EXACT = 1e-5
SIZES = [(2, 8), (3, 5)]  # (batch, sequence): two sizes prove the dynamic signature still works
KV_SIZES = [(2, 6), (3, 9)]  # (batch, cached tokens) for the decode step
NAMES = ["input_ids", "attention_mask"]
KV_NAMES = NAMES + [f"past_{kv}_{i}" for i in range(LAYERS) for kv in ("key", "value")]


# -- the models --------------------------------------------------------------------------
def _gpt2():
    import transformers as T

    from tests.passes.hf_models import _randomize

    torch.manual_seed(0)
    cfg = T.GPT2Config(n_embd=D, n_layer=LAYERS, n_head=HEADS, vocab_size=VOCAB, n_positions=64,
                       bos_token_id=0, eos_token_id=0)
    cfg._attn_implementation = "eager"
    return _randomize(T.GPT2LMHeadModel(cfg)).eval()


class _Full(torch.nn.Module):
    """input_ids + attention_mask -> logits (transformers 5 traces torch.diff without a mask)."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask):
        return self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False, return_dict=False)[0]


class _Decode(torch.nn.Module):
    """One decode step: the new token, the mask over cache + token and the cache in; the
    logits and the grown cache out."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask, *past):
        from transformers.cache_utils import DynamicCache

        cache = DynamicCache([(past[2 * i], past[2 * i + 1]) for i in range(LAYERS)], config=self.model.config)
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, past_key_values=cache,
                         use_cache=True, return_dict=True)
        layers = out.past_key_values.layers
        return (out.logits, *[t for layer in layers for t in (layer.keys, layer.values)])


def full_feeds(batch: int, seq: int, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    mask = np.ones((batch, seq), np.int64)
    mask[0, :2] = 0  # left padding in the first row; every row keeps at least one 1
    return {"input_ids": rng.integers(0, VOCAB, (batch, seq)).astype(np.int64), "attention_mask": mask}


def kv_feeds(batch: int, past: int, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    f = {"input_ids": rng.integers(0, VOCAB, (batch, 1)).astype(np.int64),
         "attention_mask": np.ones((batch, past + 1), np.int64)}
    for name in KV_NAMES[2:]:
        f[name] = rng.standard_normal((batch, HEADS, past, D // HEADS)).astype(np.float32)
    return f


def _quiet(fn):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fn()


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    """The four ONNX files, exported once: name -> (path, feeds(batch, n, seed), sizes)."""
    d = tmp_path_factory.mktemp("dynamic")
    model = _gpt2()
    full, decode = _Full(model).eval(), _Decode(model).eval()
    f0 = {k: torch.from_numpy(v) for k, v in full_feeds(*SIZES[0]).items()}
    k0 = {k: torch.from_numpy(v) for k, v in kv_feeds(*KV_SIZES[0]).items()}
    outs = ["logits"] + [f"present_{kv}_{i}" for i in range(LAYERS) for kv in ("key", "value")]
    files = {}

    # TorchScript exporter, opset 17, dynamic_axes
    axes = {"input_ids": {0: "batch", 1: "seq"}, "attention_mask": {0: "batch", 1: "seq"},
            "logits": {0: "batch", 1: "seq"}}
    _quiet(lambda: torch.onnx.export(full, tuple(f0.values()), d / "ts17.onnx", dynamo=False, opset_version=17,
                                     input_names=NAMES, output_names=["logits"], dynamic_axes=axes))
    files["ts17"] = (d / "ts17.onnx", full_feeds, SIZES)
    kv_axes = {"input_ids": {0: "batch"}, "attention_mask": {0: "batch", 1: "total"}, "logits": {0: "batch"}}
    kv_axes.update({n: {0: "batch", 2: "past"} for n in KV_NAMES[2:]})
    kv_axes.update({n: {0: "batch", 2: "total"} for n in outs[1:]})
    _quiet(lambda: torch.onnx.export(decode, tuple(k0.values()), d / "kv17.onnx", dynamo=False, opset_version=17,
                                     input_names=KV_NAMES, output_names=outs, dynamic_axes=kv_axes))
    files["kv-ts17"] = (d / "kv17.onnx", kv_feeds, KV_SIZES)

    # dynamo exporter, opset 18, dynamic batch and sequence
    batch, seq = torch.export.Dim("batch", min=1, max=16), torch.export.Dim("seq", min=2, max=32)
    shapes = {"input_ids": {0: batch, 1: seq}, "attention_mask": {0: batch, 1: seq}}
    _quiet(lambda: torch.onnx.export(full, tuple(f0.values()), d / "dyn18.onnx", dynamo=True, opset_version=18,
                                     input_names=NAMES, output_names=["logits"], dynamic_shapes=shapes))
    files["dynamo18"] = (d / "dyn18.onnx", full_feeds, SIZES)
    past = torch.export.Dim("past", min=1, max=32)
    kv_shapes = {"input_ids": {0: batch}, "attention_mask": {0: batch, 1: past + 1}}
    kv_shapes["past"] = tuple({0: batch, 2: past} for _ in KV_NAMES[2:])
    _quiet(lambda: torch.onnx.export(decode, tuple(k0.values()), d / "kv18.onnx", dynamo=True, opset_version=18,
                                     input_names=KV_NAMES, output_names=outs, dynamic_shapes=kv_shapes))
    files["kv-dynamo18"] = (d / "kv18.onnx", kv_feeds, KV_SIZES)
    return files


def _session(path):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def _ops(path) -> Counter:
    return Counter(n.op_type for n in onnx.load(str(path), load_external_data=False).graph.node)


def _errors(orig, new, feeds, sizes) -> list[float]:
    """Max relative error over every output, at each (batch, n) size."""
    a, b = _session(orig), _session(new)
    out = []
    for i, (batch, n) in enumerate(sizes):
        f = feeds(batch, n, seed=10 + i)
        ra, rb = a.run(None, f), b.run(None, f)
        assert [x.shape for x in ra] == [x.shape for x in rb]
        out.append(max(max_rel(x, y) for x, y in zip(ra, rb)))
    return out


def _table_widths(path) -> list[int]:
    """The widths of the embedding tables (Gathers of a 2-D initializer)."""
    m = onnx.load(str(path))
    inits = {t.name: list(t.dims) for t in m.graph.initializer}
    return sorted({inits[n.input[0]][1] for n in m.graph.node
                   if n.op_type == "Gather" and len(inits.get(n.input[0], [])) == 2})


# -- ONNX: each export x each stream pass -----------------------------------------------
EXPORTS = ["ts17", "dynamo18", "kv-ts17", "kv-dynamo18"]


@pytest.mark.parametrize("export", EXPORTS)
@pytest.mark.parametrize("pass_name", ["rms", "crms", "osplus"])
def test_exact_stream_pass_on_dynamic_export(exports, export, pass_name, tmp_path):
    """rms / crms / osplus apply to every norm of a dynamic-axes export, exactly, and the
    rewritten file still runs at another batch and sequence size."""
    path, feeds, sizes = exports[export]
    calib = feeds(4, 6, seed=3) if pass_name == "osplus" else None
    res = rewriter.rewrite(str(path), [pass_name], inputs=feeds(*sizes[0]), calib=calib)
    assert res.passed, res.verification
    rec = res.records[0]
    norms = [s for s in rec.sites if "norm" in s.site.lower()]
    declined = [s.reason for s in rec.sites if not s.accepted]
    out = res.save(tmp_path / f"{export}.{pass_name}.onnx")
    ops = _ops(out)
    if pass_name == "osplus":  # the final norm feeds the head: not migrated unless asked
        assert len([s for s in norms if s.accepted]) == NORMS - 1, declined
        assert ops["LayerNormalization"] == NORMS
    else:
        assert not declined, declined
        assert "LayerNormalization" not in ops
        new = "CRMSNormalization" if pass_name == "crms" else "RMSNormalization"
        assert ops[new] == NORMS, ops
        assert _table_widths(out) == [D - 1 if pass_name == "crms" else D]
    errs = _errors(path, out, feeds, sizes)
    assert max(errs) <= EXACT, errs


@pytest.mark.parametrize("export", EXPORTS)
def test_lns_on_dynamic_export(exports, export, tmp_path):
    """lns scales the pre-norms of both blocks (l = 1, 2; not the final norm) of a
    dynamic-axes export, its own check passes at two sizes, and the file still runs."""
    path, feeds, sizes = exports[export]
    out = None
    for batch, n in sizes:
        res = rewriter.rewrite(str(path), ["lns"], inputs=feeds(batch, n, seed=batch))
        assert res.passed, res.verification
        layers = sorted(s.plan.layer for s in res.records[0].sites if s.accepted)
        assert layers == [1, 1, 2, 2]
        out = res.save(tmp_path / f"{export}.lns.{batch}.onnx")
    assert _ops(out)["LayerNormalization"] == NORMS
    a, b = _session(path), _session(out)
    f = feeds(*sizes[0], seed=7)
    ra, rb = a.run(None, f), b.run(None, f)
    assert ra[0].shape == rb[0].shape and np.isfinite(rb[0]).all()
    assert max_rel(ra[0], rb[0]) > 1e-3  # architectural: the function changed on purpose


def test_crms_narrows_the_concat_built_target(exports, tmp_path):
    """On the dynamo export, the reshape of the final norm's output to Concat(-1, S, 64)
    (a constant plus a shape read) is narrowed to 63: the case that broke the model."""
    path, feeds, sizes = exports["dynamo18"]
    res = rewriter.rewrite(str(path), ["crms"], inputs=feeds(*sizes[0]))
    assert res.passed, res.verification
    from rewriter.ir.onnx_view import OnnxView

    view = res.view
    assert isinstance(view, OnnxView)
    lm_in = [n for n in view.graph if n.op_type == "Reshape" and n.inputs[0].producer() is not None
             and n.inputs[0].producer().op_type == "CRMSNormalization"]
    assert lm_in, "no reshape reads a CRMSNorm output"
    for n in lm_in:
        target = view.shape_entries(n.inputs[1])
        assert isinstance(target[-1], int) and target[-1] in (D - 1, -1), (n.name, target)
    assert D not in [t for n in lm_in for t in view.shape_entries(n.inputs[1]) if isinstance(t, int)]


# -- FX: torch.export with dynamic batch and sequence -----------------------------------
@pytest.fixture(scope="module")
def fx_program():
    full = _Full(_gpt2()).eval()
    f0 = tuple(torch.from_numpy(v) for v in full_feeds(*SIZES[0]).values())
    batch, seq = torch.export.Dim("batch", min=1, max=16), torch.export.Dim("seq", min=2, max=32)
    ep = _quiet(lambda: torch.export.export(
        full, f0, dynamic_shapes={"input_ids": {0: batch, 1: seq}, "attention_mask": {0: batch, 1: seq}}))
    return ep.module(), f0


def _fx_targets(gm) -> Counter:
    return Counter(str(n.target) for n in gm.graph.nodes if n.op == "call_function")


@pytest.mark.parametrize("pass_name", ["rms", "crms", "osplus", "lns"])
def test_stream_pass_on_dynamic_torch_export(fx_program, pass_name):
    """The stream passes apply to a torch.export program with symbolic batch and sequence
    (views built from sym_size reads and constants); the result runs at another size."""
    gm, example = fx_program
    before = _fx_targets(gm)
    res = rewriter.rewrite(gm, [pass_name], example_inputs=example)
    assert res.passed, res.verification
    assert _fx_targets(gm) == before  # the caller's module is left as it was
    new = res.model
    ops = _fx_targets(new)
    if pass_name in ("rms", "crms"):
        assert "aten.layer_norm.default" not in ops
        want = "rewriter.crms_norm.default" if pass_name == "crms" else "aten.rms_norm.default"
        assert ops[want] == NORMS, ops
    if pass_name == "crms":  # the views of the norm outputs (one per norm) state the narrow width
        views = [n for n in new.graph.nodes if str(n.target) == "aten.view.default"
                 and str(getattr(n.args[0], "target", "")) == "rewriter.crms_norm.default"]
        assert len(views) == NORMS and {n.args[1][-1] for n in views} == {D - 1}, [n.args for n in views]
    for i, (batch, n) in enumerate(SIZES):
        f = [torch.from_numpy(v) for v in full_feeds(batch, n, seed=20 + i).values()]
        with torch.no_grad():
            ref, out = gm(*f), new(*f)
        err = max_rel(ref.numpy(), out.numpy())
        if pass_name == "lns":
            assert err > 1e-3 and torch.isfinite(out).all()
        else:
            assert err <= EXACT, (batch, n, err)


# -- negative cases: what crms cannot follow -------------------------------------------
def _stream_model(width_source: str) -> onnx.ModelProto:
    """A one-block pre-LN stream (ids -> embedding -> +MLP -> final LN -> head) with
    dynamic batch and sequence. ``width_source``:

    * ``runtime``: the stream is reshaped to ``[B, T, w]`` before the final norm, with
      ``w = Size(stream) / (B * T)`` computed at run time (the output declared ``[B, T, 8]``);
    * ``scale``: the branch output is divided by ``sqrt(stream.shape[-1])``, the width
      used as a number.
    """
    d, h = 8, 16
    rng = np.random.default_rng(0)
    n = helper.make_node
    nodes = [
        n("Gather", ["emb", "ids"], ["x0"], name="embed"),
        n("LayerNormalization", ["x0", "g1", "b1"], ["n1"], name="ln1", axis=-1),
        n("MatMul", ["n1", "w1"], ["m1"], name="fc1"), n("Relu", ["m1"], ["r1"], name="act"),
        n("MatMul", ["r1", "w2"], ["m2"], name="fc2"),
    ]
    branch = "m2"
    if width_source == "scale":
        nodes += [n("Shape", ["x0"], ["s0"], name="shape_w", start=-1),
                  n("Cast", ["s0"], ["s0f"], name="width_f", to=TensorProto.FLOAT),
                  n("Sqrt", ["s0f"], ["sq"], name="sqrt_w"),
                  n("Div", ["m2", "sq"], ["m2s"], name="scale_by_width")]
        branch = "m2s"
    nodes.append(n("Add", ["x0", branch], ["x1"], name="join"))
    stream = "x1"
    if width_source == "runtime":
        nodes += [n("Shape", ["ids"], ["bt"], name="shape_bt"),
                  n("ReduceProd", ["bt"], ["ntok"], name="tokens", keepdims=1),
                  n("Size", ["x1"], ["numel"], name="size_x"),
                  n("Div", ["numel", "ntok"], ["w"], name="width_at_runtime"),
                  n("Reshape", ["w", "one"], ["wv"], name="w_vec"),
                  n("Concat", ["bt", "wv"], ["target"], name="target", axis=0),
                  n("Reshape", ["x1", "target"], ["x2"], name="reshape_runtime")]
        stream = "x2"
    nodes += [n("LayerNormalization", [stream, "gf", "bf"], ["nf"], name="ln_f", axis=-1),
              n("MatMul", ["nf", "head"], ["logits"], name="head")]
    inits = [init("emb", rng.standard_normal((20, d))),
             init("g1", 1 + 0.3 * rng.standard_normal(d)), init("b1", 0.2 * rng.standard_normal(d)),
             init("w1", rng.standard_normal((d, h)) / 3), init("w2", rng.standard_normal((h, d)) / 4),
             init("gf", 1 + 0.3 * rng.standard_normal(d)), init("bf", 0.2 * rng.standard_normal(d)),
             init("head", rng.standard_normal((d, 5)))]
    inits.append(onnx.numpy_helper.from_array(np.array([1], np.int64), "one"))
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("ids", TensorProto.INT64, ["B", "T"])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["B", "T", 5])], inits)
    if width_source == "runtime":  # what an exporter states for it
        graph.value_info.append(helper.make_tensor_value_info("x2", TensorProto.FLOAT, ["B", "T", d]))
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 10
    onnx.checker.check_model(model)
    return model


def _ids(batch, seq, seed=0):
    return {"ids": np.random.default_rng(seed).integers(0, 20, (batch, seq)).astype(np.int64)}


@pytest.mark.parametrize("case,op", [("runtime", "reshape_runtime"), ("scale", "sqrt_w")])
def test_crms_declines_width_it_cannot_follow(case, op, tmp_path):
    """crms declines, naming the op, when the width reaches a reshape target computed at
    run time or is used as a number; rms applies to the same model exactly (shape reads
    are not reads of the stream's values), at two sizes."""
    model = _stream_model(case)
    res = rewriter.rewrite(model, ["crms"], inputs=_ids(2, 3))
    reasons = [s.reason for s in res.records[0].sites]
    assert res.records[0].sites and not any(s.accepted for s in res.records[0].sites)
    assert all(op in r for r in reasons), reasons[0]
    ok = rewriter.rewrite(model, ["rms"], inputs=_ids(2, 3))
    assert ok.passed and all(s.accepted for s in ok.records[0].sites), [s.reason for s in ok.records[0].sites]
    onnx.save(model, tmp_path / "m.onnx")
    out = ok.save(tmp_path / "m.rms.onnx")
    assert "LayerNormalization" not in _ops(out)
    errs = _errors(tmp_path / "m.onnx", out, lambda b, s, seed: _ids(b, s, seed), [(2, 3), (4, 7)])
    assert max(errs) <= EXACT, errs


def test_crms_cli_declines_runtime_reshape(tmp_path):
    """Through the CLI: one line naming the Reshape, a non-zero exit and no output file."""
    onnx.save(_stream_model("runtime"), tmp_path / "m.onnx")
    np.savez(tmp_path / "in.npz", **_ids(2, 3))
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    p = subprocess.run([sys.executable, "-m", "rewriter.cli", "m.onnx", "--passes", "crms", "--inputs", "in.npz",
                        "-o", "out.onnx"], cwd=tmp_path, capture_output=True, text=True, env=env, timeout=300)
    assert p.returncode == 3, p.stderr  # nothing applied
    last = p.stderr.strip().splitlines()[-1]
    assert "reshape_runtime" in last and "Traceback" not in p.stderr, p.stderr
    assert not (tmp_path / "out.onnx").exists()


# -- foldnorm with a shape reader -------------------------------------------------------
def test_foldnorm_ignores_shape_reader(tmp_path):
    """A BatchNorm whose output's batch size is read (Shape -> Gather -> Concat ->
    Reshape, dynamic batch) still folds into its linear reader, exactly, at two batches."""
    rng = np.random.default_rng(1)
    n = helper.make_node
    nodes = [n("Relu", ["x"], ["r"], name="act"),
             n("BatchNormalization", ["r", "s", "b", "m", "v"], ["y"], name="bn", epsilon=1e-3),
             n("Shape", ["y"], ["sh"], name="shape_y"),
             n("Gather", ["sh", "zero"], ["nb"], name="batch", axis=0),
             n("Unsqueeze", ["nb", "zero_v"], ["nb1"], name="batch_v"),
             n("Concat", ["nb1", "minus1"], ["tgt"], name="target", axis=0),
             n("MatMul", ["y", "w"], ["z"], name="fc"),
             n("Reshape", ["z", "tgt"], ["out"], name="flatten")]
    inits = [init("s", 1 + 0.3 * rng.standard_normal(6)), init("b", 0.2 * rng.standard_normal(6)),
             init("m", 0.5 * rng.standard_normal(6)), init("v", rng.random(6) + 0.5),
             init("w", rng.standard_normal((6, 4)))]
    inits += [onnx.numpy_helper.from_array(np.array(0, np.int64), "zero"),
              onnx.numpy_helper.from_array(np.array([0], np.int64), "zero_v"),
              onnx.numpy_helper.from_array(np.array([-1], np.int64), "minus1")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 6])],
                              [helper.make_tensor_value_info("out", TensorProto.FLOAT, ["N", None])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 10
    feeds = lambda b, _n, seed: {"x": np.random.default_rng(seed).standard_normal((b, 6)).astype(np.float32)}  # noqa: E731
    res = rewriter.rewrite(model, ["foldnorm"], inputs=feeds(3, 0, 0))
    assert res.passed and [s.accepted for s in res.records[0].sites] == [True], \
        [s.reason for s in res.records[0].sites]
    onnx.save(model, tmp_path / "m.onnx")
    out = res.save(tmp_path / "m.fold.onnx")
    assert "BatchNormalization" not in _ops(out)
    errs = _errors(tmp_path / "m.onnx", out, feeds, [(3, 0), (7, 0)])
    assert max(errs) <= EXACT, errs
