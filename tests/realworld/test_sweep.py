"""A sample of the architecture sweep (``benchmarks/arch_sweep.py``) in ``make test``: families
that are not in the corpus, built from their library class with the sweep's shrunk config,
exported by TorchScript (opset 17, dynamic axes), every pass run and classified the sweep's
way. No case may be wrong (exit 1 / 4, beyond 1e-5, more attention sites rewritten than the
model's unmasked self-attention sites, a rewritten model that no longer runs).

The ground truth of attention sites comes from an eager forward and the library's module
metadata (``arch_sweep._ground_truth``), never from the tool; it is tested on its own.
"""

from __future__ import annotations

import numpy as np
import pytest

from benchmarks import arch_sweep as sweep

# family -> (pass -> expected outcome); from the architecture, not from what the tool does today
SAMPLE: dict[str, dict[str, str]] = {
    # RMSNorm decoder (Mistral): nothing to turn into RMSNorm, no re-centring of an RMS stream,
    # both pre-norms of every block scaled by lns, OS+ migrates the RMS scale; causal attention
    "mistral": {"rms": "declined", "crms": "declined", "lns": "applied", "osplus": "applied",
                "rettention": "declined", "foldnorm": "declined"},  # the rotary scale: no linear beside it
    # encoder-decoder speech model: encoder self-attention unmasked (applies), decoder
    # self-attention causal and cross-attention over the encoder output (declined)
    "whisper": {"rettention": "applied"},
    # joint attention DiT (SD3): image and text tokens concatenated, self-attention without mask
    "SD3Transformer2DModel": {"rettention": "applied"},
}


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    cache: dict[str, tuple] = {}

    def get(family: str):
        if family not in cache:
            out = tmp_path_factory.mktemp(family)
            b = sweep.build(family)
            truth = sweep._ground_truth(b)
            np.savez(out / "inputs.npz", **b.inputs)
            np.savez(out / "check_dyn.npz", **sweep._check_inputs(b, dynamic=True))
            np.savez(out / "check_static.npz", **sweep._check_inputs(b, dynamic=False))
            sweep.export_ts(b, out / "ts17.onnx")
            cache[family] = (out, b, truth)
        return cache[family]

    return get


def _cases():
    return [pytest.param(f, p, SAMPLE[f].get(p), id=f"{f}-{p}") for f in SAMPLE for p in sweep.PASSES]


@pytest.mark.parametrize("family,pass_name,want", _cases())
def test_sweep_sample(built, family, pass_name, want):
    """The pass is exact where it applies, declines or finds nothing elsewhere; never wrong."""
    out, b, truth = built(family)
    row = sweep.run_pass(str(out / "ts17.onnx"), out, pass_name, b.inputs, truth)
    assert row["outcome"] in ("applied", "declined", "none", "refused"), f"{family}/{pass_name}: {row}"
    if want:
        assert row["outcome"] == want, f"{family}/{pass_name}: expected {want}, got {row}"


def test_ground_truth_attention(built):
    """The eager ground truth tells self from cross and masked attention: Whisper (2 + 2 layers)
    has 2 unmasked encoder self-attention sites, 2 causal decoder ones and 2 cross-attention
    sites; SD3's joint attention is self-attention over the concatenated tokens."""
    _, _, whisper = built("whisper")
    assert (whisper["self_unmasked"], whisper["self_masked"], whisper["cross"]) == (2, 2, 2), whisper
    _, _, sd3 = built("SD3Transformer2DModel")
    assert (sd3["self_unmasked"], sd3["cross"], sd3["joint"]) == (2, 0, 2), sd3
    _, _, mistral = built("mistral")
    assert mistral["self_unmasked"] == 0 and mistral["self_masked"] == 2, mistral
    assert mistral["norms"]["pre_rms"] >= 4 and mistral["norms"]["pre_ln"] == 0, mistral["norms"]


def test_verdicts_can_fail():
    """The sweep's classification flags a rettention that rewrote more sites than the model's
    unmasked self-attention sites, and sorts decline reasons into model and tool limits."""
    truth = {"self_unmasked": 2, "self_masked": 2, "cross": 2}
    assert sweep.attention_verdict(2, truth) == ""
    assert "rewrote 4" in sweep.attention_verdict(4, truth)
    sites = [{"module": "model.blocks.0.attn1", "cross": False, "masked": False},
             {"module": "model.blocks.0.attn2", "cross": True, "masked": False}]
    assert sweep.attention_verdict(1, {"self_unmasked": 1, "sites": sites}, ["/model/blocks.0/attn1/Softmax"]) == ""
    assert "cross-attention site of module model.blocks.0.attn2" in sweep.attention_verdict(
        1, {"self_unmasked": 1, "sites": sites}, ["/model/blocks.0/attn2/Softmax"])
    assert sweep.reason_kind("a2: cross-attention (5 keys)")[0] == "model"
    assert sweep.reason_kind("n1: post-LN norm on the stream")[0] == "model"
    assert sweep.reason_kind("s: heads, tokens and head width must be static")[0] == "tool"
    assert sweep.reason_kind("something new")[0] == "tool?"


def test_built_modules_are_in_eval_mode():
    """The sweep's wrapper module is in eval mode all through (the dynamo exporter keeps training-mode Dropout)."""
    built = sweep.build("gpt2")
    assert not any(m.training for m in built.module.modules())
