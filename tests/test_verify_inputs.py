"""Verification inputs (issue 13, point 4): one value per symbolic dim across inputs,
attention masks 0/1 with ones in every row (never N(0, 1)), position ids as aranges, and a
KV-cache decode step fed a consistent past length with the mask covering past + current."""

from __future__ import annotations

import numpy as np
import onnx
import pytest

from rewriter.errors import BadInput
from rewriter.run.verify import (DEFAULT_DYNAMIC_DIM, DEFAULT_PAST_LENGTH, InputSpec, input_role, make_inputs,
                             resolve_shapes)
from tests.conftest import run_ort

I64, F32 = np.dtype(np.int64), np.dtype(np.float32)


def _decoder_specs(mask_dim="total_seq", mask_dtype=I64):
    return [InputSpec("input_ids", ["batch", "seq"], I64, 64),
            InputSpec("attention_mask", ["batch", mask_dim], mask_dtype),
            InputSpec("position_ids", ["batch", "seq"], I64, 32),
            InputSpec("past_key_values.0.key", ["batch", 2, "past_seq", 16], F32),
            InputSpec("past_key_values.0.value", ["batch", 2, "past_seq", 16], F32)]


def test_roles_from_names():
    """Masks, position ids and KV-cache inputs are told apart by name, the rest has no role."""
    assert [input_role(n) for n in ("attention_mask", "encoder_attention_mask", "padding_mask", "position_ids",
                                    "cache_position", "past_key_values.3.value", "past_0", "past.1.key",
                                    "input_ids", "pixel_values", "timestep")] == \
        ["mask"] * 3 + ["position"] * 2 + ["past"] * 3 + [None] * 3


@pytest.mark.parametrize("mask_dim", ["total_seq", "past_seq + seq", None])
def test_decode_step_shapes(mask_dim):
    """Past inputs share one past length; the mask is past + current long whether its dim is its own symbol, an expression or unnamed."""
    shapes, notes = resolve_shapes(_decoder_specs(mask_dim), {"input_ids": [3, 1]})
    assert shapes["input_ids"] == [3, 1] and shapes["position_ids"] == [3, 1]
    assert shapes["past_key_values.0.key"] == shapes["past_key_values.0.value"] == [3, 2, DEFAULT_PAST_LENGTH, 16]
    assert shapes["attention_mask"] == [3, DEFAULT_PAST_LENGTH + 1]
    assert any("past length past_seq set to 3" in n for n in notes)


def test_past_length_from_shape():
    """--shape on a past input sets the past length, and the mask follows."""
    shapes, _ = resolve_shapes(_decoder_specs(), {"past_key_values.0.key": [2, 2, 7, 16], "input_ids": [2, 4]})
    assert shapes["past_key_values.0.value"] == [2, 2, 7, 16] and shapes["attention_mask"] == [2, 11]


def test_one_value_per_symbol():
    """--shape on one input fixes its symbols everywhere (the mask of [batch, seq] follows the ids)."""
    specs = [InputSpec("input_ids", ["batch", "seq"], I64, 50), InputSpec("attention_mask", ["batch", "seq"], I64)]
    shapes, notes = resolve_shapes(specs, {"input_ids": [1, 9]})
    assert shapes == {"input_ids": [1, 9], "attention_mask": [1, 9]} and not notes
    shapes, notes = resolve_shapes(specs)
    assert shapes["attention_mask"] == [DEFAULT_DYNAMIC_DIM] * 2 and len(notes) == 2
    with pytest.raises(BadInput, match="two values"):
        resolve_shapes(specs, {"input_ids": [1, 9], "attention_mask": [1, 8]})


@pytest.mark.parametrize("dtype", [np.int64, np.int32, np.bool_, np.float32, np.float16])
def test_mask_values(dtype):
    """Every mask dtype gets 0/1 values, each row a prefix of ones at least half long, never N(0,1)."""
    spec = InputSpec("attention_mask", ["batch", "seq"], np.dtype(dtype))
    feeds, _ = make_inputs([spec], {"attention_mask": [64, 9]}, seed=3)
    m = feeds["attention_mask"]
    assert m.dtype == dtype and m.shape == (64, 9)
    v = m.astype(np.int64)
    assert set(np.unique(v)) <= {0, 1}
    assert (v.sum(-1) >= 5).all()  # at least half of each row
    assert (np.diff(v, axis=-1) <= 0).all()  # ones first, then zeros
    assert (v == 0).any()  # some padding is exercised


def test_decode_step_values():
    """Positions continue after the past (past, past+1, ...), past inputs are N(0,1) floats, ids within the table."""
    feeds, _ = make_inputs(_decoder_specs(), {"input_ids": [2, 3]}, seed=0)
    p = DEFAULT_PAST_LENGTH
    assert (feeds["position_ids"] == np.arange(p, p + 3)).all()
    past = feeds["past_key_values.0.key"]
    assert past.dtype == np.float32 and past.shape == (2, 2, p, 16) and past.min() < -1 and past.max() > 1
    assert 0 <= feeds["input_ids"].min() and feeds["input_ids"].max() < 64
    assert feeds["attention_mask"].shape == (2, p + 3)


def _export_gpt2_decode_step(path) -> None:
    """HF GPT-2 (tiny config, random weights) one decode step with a KV cache, as people
    export it: TorchScript exporter, use_cache=True, dynamic batch / seq / past axes."""
    import torch
    import transformers as T

    torch.manual_seed(0)
    cfg = T.GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=64, n_positions=64, bos_token_id=0, eos_token_id=0)
    cfg._attn_implementation = "eager"
    model = T.GPT2LMHeadModel(cfg).eval()
    layers = cfg.n_layer

    class Step(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.m = model

        def forward(self, input_ids, attention_mask, *past):
            cache = T.DynamicCache()
            for i in range(layers):
                cache.update(past[2 * i], past[2 * i + 1], i)
            out = self.m(input_ids=input_ids, attention_mask=attention_mask, past_key_values=cache, use_cache=True)
            return (out.logits, *[t for layer in out.past_key_values.layers[:layers] for t in (layer.keys, layer.values)])

    past_names = [f"past_key_values.{i}.{kv}" for i in range(layers) for kv in ("key", "value")]
    present = [f"present.{i}.{kv}" for i in range(layers) for kv in ("key", "value")]
    axes = {"input_ids": {0: "batch", 1: "seq"}, "attention_mask": {0: "batch", 1: "total_seq"},
            "logits": {0: "batch", 1: "seq"}, **{n: {0: "batch", 2: "past_seq"} for n in past_names},
            **{n: {0: "batch", 2: "total_seq"} for n in present}}
    args = (torch.randint(0, 64, (2, 1)), torch.ones(2, 6, dtype=torch.int64), *[torch.randn(2, 2, 5, 16) for _ in past_names])
    with torch.no_grad():
        torch.onnx.export(Step(), args, str(path), dynamo=False, opset_version=17,
                          input_names=["input_ids", "attention_mask", *past_names], output_names=["logits", *present],
                          dynamic_axes=axes)


@pytest.fixture(scope="module")
def gpt2_step(tmp_path_factory):
    path = tmp_path_factory.mktemp("gpt2") / "gpt2_step.onnx"
    _export_gpt2_decode_step(path)
    return path


def test_gpt2_decode_step_inputs_run(gpt2_step):
    """The generated feeds of a real KV-cache export run in ORT: present = past + current, no NaN, a 0/1 mask."""
    from rewriter.api import verification_feeds
    from rewriter.loader import load_onnx

    view = load_onnx(gpt2_step)
    feeds, notes = verification_feeds(view, shapes={"input_ids": [2, 1]})
    mask = feeds["attention_mask"]
    assert mask.shape == (2, DEFAULT_PAST_LENGTH + 1) and set(np.unique(mask)) <= {0, 1} and (mask[:, 0] == 1).all()
    outs = run_ort(onnx.load(gpt2_step), feeds)
    assert outs[0].shape == (2, 1, 64) and np.isfinite(outs[0]).all()
    assert all(o.shape == (2, 2, DEFAULT_PAST_LENGTH + 1, 16) for o in outs[1:])
    # the pre-issue generator drew every dynamic dim as 2 independently: mask [2, 2] for past 2 + current 2
    # does not fit, and ORT refuses to run; the consistent one does
    bad = dict(feeds, attention_mask=np.ones((2, 2), np.int64))
    with pytest.raises(Exception):
        run_ort(onnx.load(gpt2_step), bad)


def test_gpt2_decode_step_rms(gpt2_step):
    """rms on the decode step (Shape readers of the stream, KV cache, mask): applied and verified on the generated inputs."""
    import rewriter

    res = rewriter.rewrite(str(gpt2_step), ["rms"], shapes={"input_ids": [2, 1]})
    rec = res.records[0]
    assert res.passed and rec.applied
    assert res.verification["inputs"]["attention_mask"] == [2, DEFAULT_PAST_LENGTH + 1]
    assert res.verification["max_rel_error"] <= 1e-5
