"""The committed trained zoo models load and reproduce their recorded metrics (fast, CI)."""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import load_file

import models_zoo
from models_zoo.dit import weight_paths
from models_zoo.eval import (
    attention_entropy,
    attention_maps,
    palette_error,
    perplexity,
    psnr,
    sample,
    ssim,
)
from models_zoo.gpt import GPT_META

DIT_NAMES = {"dit-trained": "adaln", "dit-trained-additive": "additive"}


def _meta(path):
    return json.loads(path.read_text())


@pytest.fixture(scope="module")
def gpt():
    return models_zoo.build("gpt-trained")


@pytest.fixture(scope="module")
def gpt_ppl(gpt):
    model, _ = gpt
    return {split: perplexity(model, split) for split in ("train", "val")}


@pytest.fixture(scope="module", params=sorted(DIT_NAMES))
def dit_run(request):
    """(model, inputs, meta, samples, trajectory, weights path) of one DiT, reference seed."""
    model, inputs = models_zoo.build(request.param)
    weights, meta_path = weight_paths(DIT_NAMES[request.param])
    meta = _meta(meta_path)
    ref = meta["reference_samples"]
    samples, traj = sample(model, ref["seed"], ref["steps"], n=ref["n"], return_trajectory=True)
    return model, inputs, meta, samples, traj, weights


def test_registry_lists_trained_models():
    """All three trained models are registered and flagged trained."""
    for name in ("gpt-trained", *DIT_NAMES):
        assert name in models_zoo.names()
        assert models_zoo.describe(name).trained


def test_gpt_val_perplexity_reproduces(gpt_ppl):
    """Committed GPT weights give the recorded val perplexity, far below uniform (256)."""
    meta = _meta(GPT_META)
    assert gpt_ppl["val"] == pytest.approx(meta["metrics"]["val_perplexity"], rel=1e-3)
    assert gpt_ppl["train"] == pytest.approx(meta["metrics"]["train_perplexity"], rel=1e-3)
    assert gpt_ppl["val"] < 256 / 20


def test_gpt_generalises(gpt_ppl):
    """Held-out perplexity is close to train perplexity (no memorisation of the train split)."""
    assert gpt_ppl["val"] < 1.5 * gpt_ppl["train"]


def test_gpt_attention_not_uniform(gpt):
    """Trained GPT attention rows have far lower entropy than uniform causal attention."""
    model, (ids,) = gpt
    ent, uniform = attention_entropy(attention_maps(model, ids), causal=True)
    assert ent < uniform - 1.0


def test_gpt_exports(gpt):
    """The trained GPT passes torch.export and the exported program matches eager."""
    model, inputs = gpt
    ep = torch.export.export(model, inputs)
    torch.testing.assert_close(ep.module()(*inputs), model(*inputs), rtol=1e-4, atol=1e-4)


def test_dit_samples_reproduce(dit_run):
    """Fresh reference-seed samples match the committed ones (PSNR, SSIM) and are flat-coloured."""
    model, _, meta, samples, _, weights = dit_run
    ref = load_file(str(weights.with_suffix("")) + "_ref.safetensors")["samples"]
    assert psnr(samples, ref) > 40.0
    assert ssim(samples, ref) > 0.99
    err = palette_error(samples)
    assert err < 0.6 * meta["metrics"]["palette_error_noise"]


def test_dit_attention_far_from_uniform(dit_run):
    """DiT attention entropy at recorded sampler steps reproduces and is ~1 nat below log N."""
    model, _, meta, _, traj, _ = dit_run
    log_n = math.log(model.cfg.num_tokens)
    assert model.cfg.num_tokens >= 256
    recorded = meta["metrics"]["attention_entropy_at_step"]
    for step, rec in recorded.items():
        x, t = traj[int(step)]
        ent, uniform = attention_entropy(attention_maps(model, x, t))
        assert uniform == pytest.approx(log_n)
        assert ent == pytest.approx(rec["entropy"], rel=1e-3, abs=1e-3)
        if rec["t"] < 1.0:  # at t = 1 the input is pure noise: nothing to attend to
            assert ent < log_n - 0.9


def test_dit_exports(dit_run):
    """The trained DiT passes torch.export and the exported program matches eager."""
    model, inputs, *_ = dit_run
    ep = torch.export.export(model, inputs)
    torch.testing.assert_close(ep.module()(*inputs), model(*inputs), rtol=1e-4, atol=1e-4)
