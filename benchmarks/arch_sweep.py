"""Architecture sweep: every transformers / diffusers model class that builds from a shrunk
config, exported by TorchScript (opset 17, dynamic axes) and dynamo (opset 18), rewritten by
every pass, each (file, pass) classified as applied-and-exact, declined (with the reason) or
wrong.

    PYTHONPATH=. .venv/bin/python benchmarks/arch_sweep.py [--families gpt2,vit|default|all]
        [--limit N] [--json benchmarks/results/arch_sweep.json] [--table] [--rebuild]

Families come from the libraries' registries: transformers' ``MODEL_MAPPING_NAMES`` (the base
model class of a ``model_type``) restricted to the task registries that say what the model
is (causal LM: decoder; masked LM: encoder; image classification: vision; CTC / audio
classification: audio; seq2seq: encoder-decoder), and the diffusers classes whose name ends
in ``Transformer*Model`` / ``UNet*Model``. Each config is shrunk generically (hidden sizes,
layers, heads, vocabulary, image sizes; ``_shrink``) with per-family overrides
(``HF_OVERRIDES``); diffusers classes need their constructor arguments and inputs spelled
out (``DIFFUSERS``); a class without one is listed as not configured. ``default`` is a
sample of every kind (``DEFAULT``); ``all`` is the whole registry.

Per family, a subprocess (timeout, address-space cap, ``nice``) builds the model with
seeded random weights, records the ground truth of its attention and norm sites from an
eager forward (``_ground_truth``: which attention calls are self-attention without a mask,
from the library's own module metadata and the tensors passed, never from the tool), and
exports both files. Built files live in ``~/.cache/rewriter/sweep/<versions>/`` (they do not
depend on this project's code), so a rerun only redoes the passes. Per file, a second
subprocess runs each pass through ``rewriter.rewrite`` and checks the saved result
independently: plain ONNX Runtime, optimizations off, fresh seeded inputs of another batch
(and sequence, where the file keeps it dynamic), fp32 ``max|a-b| / max|a| <= 1e-5`` for the
exact passes (``lns`` changes the function on purpose: it must run and give finite outputs).

Outcomes of a (file, pass): ``applied`` (exact), ``declined`` (no site applied; reasons
kept, each sorted into a limit of the model or of the tool by ``REASON_KINDS``), ``none``
(the file holds no candidate), ``refused`` (the tool refused the file in one line, exit 2),
``wrong`` (exit 1 or 4, not exact, more attention sites rewritten than the model has
unmasked self-attention sites, or a rewritten model that no longer runs).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import hashlib
import inspect
import io
import json
import logging
import os
import re
import resource
import signal
import subprocess
import sys
import tempfile
import time
import traceback
import warnings
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
PASSES = ("rms", "crms", "lns", "osplus", "rettention", "foldnorm")
EXPORTERS = ("ts17", "dynamo18")
EXACT_TOL = 1e-5
BATCH, SEQ = 2, 8
CHECK_BATCH, CHECK_SEQ = 3, 6
VOCAB = 96
SPEC_VERSION = 1  # bump when the shrinking / inputs / export code changes (invalidates the cache)
GT_VERSION = 2  # bump when _ground_truth changes (recomputed from a fresh build, the exports kept)
BUILD_TIMEOUT, PASSES_TIMEOUT, PASS_TIMEOUT = 600, 900, 240
MEM_CAP = 6 << 30  # address space per worker

# -- families ---------------------------------------------------------------------------------
# a sample of every kind, run by default; `--families all` runs the whole registry
DEFAULT = (  # ordered so that a run cut short has covered every kind
    # diffusion transformers and UNets
    "DiTTransformer2DModel", "PixArtTransformer2DModel", "SD3Transformer2DModel", "FluxTransformer2DModel",
    "HunyuanDiT2DModel", "CogVideoXTransformer3DModel", "SanaTransformer2DModel", "UNet2DModel",
    "UNet2DConditionModel",
    # vision
    "swin", "clip_vision_model", "levit", "vit", "beit", "dinov2", "convnext", "resnet", "mobilevit",
    "segformer", "siglip_vision_model", "efficientnet", "poolformer", "regnet", "convnextv2", "deit",
    # decoders
    "gpt2", "gpt_neox", "llama", "qwen2", "mistral", "phi", "gemma", "falcon", "bloom", "opt", "olmo",
    "stablelm", "gptj",
    # encoders
    "bert", "roberta", "distilbert", "albert", "electra", "deberta-v2", "mpnet",
    # encoder-decoders
    "t5", "bart", "whisper",
    # audio
    "wav2vec2", "hubert", "audio-spectrogram-transformer",
)

# per-family config overrides (applied after the generic shrink)
HF_OVERRIDES: dict[str, dict[str, Any]] = {
    "swin": {"image_size": 32, "patch_size": 2, "embed_dim": 16, "depths": [2, 2], "num_heads": [2, 4],
             "window_size": 4},
    "levit": {"image_size": 32, "patch_size": 16, "hidden_sizes": [32, 48], "num_attention_heads": [2, 3],
              "depths": [1, 1], "key_dim": [8, 8], "attention_ratio": [2, 2], "mlp_ratio": [2, 2],
              "down_ops": [["Subsample", 8, 2, 4, 2, 2]]},
    "mobilevit": {"image_size": 32, "hidden_sizes": [32, 48, 64], "neck_hidden_sizes": [8, 8, 16, 16, 24, 32, 64]},
    "efficientnet": {"image_size": 32, "hidden_dim": 320, "width_coefficient": 0.25, "depth_coefficient": 0.25,
                     "strides": [1, 2, 2, 2, 1, 2, 1]},
    "segformer": {"hidden_sizes": [16, 32, 32, 32], "num_attention_heads": [1, 2, 2, 2], "depths": [1, 1, 1, 1],
                  "decoder_hidden_size": 32},
    "poolformer": {"hidden_sizes": [16, 32], "depths": [1, 1], "num_encoder_blocks": 2},
    "regnet": {"embedding_size": 16, "hidden_sizes": [16, 32], "depths": [1, 1], "groups_width": 8},
    "resnet": {"embedding_size": 16, "hidden_sizes": [16, 32], "depths": [1, 1], "layer_type": "basic"},
    "convnext": {"hidden_sizes": [16, 32], "depths": [2, 2], "num_stages": 2, "layer_scale_init_value": 0.5},
    "convnextv2": {"hidden_sizes": [16, 32], "depths": [2, 2], "num_stages": 2},
    "whisper": {"num_mel_bins": 16, "max_source_positions": 8, "max_target_positions": 32},
    "audio-spectrogram-transformer": {"num_mel_bins": 16, "max_length": 32, "patch_size": 16,
                                      "frequency_stride": 8, "time_stride": 8},
    "mpt": {"attn_config": {"attn_impl": "torch"}},
}
_AUDIO_CONV = {"conv_dim": [32, 32], "conv_stride": [5, 4], "conv_kernel": [10, 4], "num_conv_pos_embeddings": 16,
               "num_conv_pos_embedding_groups": 4, "num_feat_extract_layers": 2}
for _fam in ("wav2vec2", "hubert", "data2vec-audio", "wavlm", "sew", "sew-d", "unispeech", "unispeech-sat",
             "wav2vec2-conformer"):
    HF_OVERRIDES[_fam] = dict(_AUDIO_CONV)

KIND_MAPS = (  # registry -> kind (first match wins)
    ("MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES", "encoder-decoder"),
    ("MODEL_FOR_SPEECH_SEQ_2_SEQ_MAPPING_NAMES", "encoder-decoder"),
    ("MODEL_FOR_CAUSAL_LM_MAPPING_NAMES", "decoder"),
    ("MODEL_FOR_MASKED_LM_MAPPING_NAMES", "encoder"),
    ("MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES", "vision"),
    ("MODEL_FOR_CTC_MAPPING_NAMES", "audio"),
    ("MODEL_FOR_AUDIO_CLASSIFICATION_MAPPING_NAMES", "audio"),
)


def hf_families() -> dict[str, str]:
    """model_type -> kind, for every base model class of the registry with a task saying what it is."""
    from transformers.models.auto import modeling_auto as ma

    base = ma.MODEL_MAPPING_NAMES
    multimodal = set(ma.MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES) | set(ma.MODEL_FOR_MULTIMODAL_LM_MAPPING_NAMES)
    out: dict[str, str] = {}
    for attr, kind in KIND_MAPS:
        for model_type in getattr(ma, attr):
            if model_type in base and model_type not in out and model_type not in multimodal:
                out[model_type] = kind
    for extra in ("clip_vision_model", "siglip_vision_model"):
        if extra in base:
            out.setdefault(extra, "vision")
    return out


# diffusers: constructor kwargs and an input builder name per class
DIFFUSERS: dict[str, dict[str, Any]] = {
    "DiTTransformer2DModel": dict(kwargs=dict(num_attention_heads=2, attention_head_dim=16, in_channels=4,
                                              num_layers=2, sample_size=8, patch_size=2, num_embeds_ada_norm=10,
                                              norm_num_groups=4), inputs="dit"),
    "PixArtTransformer2DModel": dict(kwargs=dict(num_attention_heads=2, attention_head_dim=16, in_channels=4,
                                                 out_channels=8, num_layers=2, sample_size=8, patch_size=2,
                                                 cross_attention_dim=32, caption_channels=24, norm_num_groups=4,
                                                 use_additional_conditions=False), inputs="pixart", static=True),
    "SD3Transformer2DModel": dict(kwargs=dict(sample_size=8, patch_size=2, in_channels=4, num_layers=2,
                                              attention_head_dim=16, num_attention_heads=2, joint_attention_dim=24,
                                              caption_projection_dim=32, pooled_projection_dim=16, out_channels=4,
                                              pos_embed_max_size=16), inputs="sd3"),
    "FluxTransformer2DModel": dict(kwargs=dict(patch_size=1, in_channels=16, num_layers=1, num_single_layers=1,
                                               attention_head_dim=16, num_attention_heads=2, joint_attention_dim=24,
                                               pooled_projection_dim=16, guidance_embeds=False,
                                               axes_dims_rope=(4, 6, 6)), inputs="flux"),
    "HunyuanDiT2DModel": dict(kwargs=dict(num_attention_heads=2, attention_head_dim=16, in_channels=4,
                                          sample_size=8, patch_size=2, hidden_size=32, num_layers=2,
                                          cross_attention_dim=24, cross_attention_dim_t5=24,
                                          pooled_projection_dim=16, text_len=8, text_len_t5=8,
                                          use_style_cond_and_image_meta_size=False), inputs="hunyuan"),
    "CogVideoXTransformer3DModel": dict(kwargs=dict(num_attention_heads=2, attention_head_dim=16, in_channels=4,
                                                    out_channels=4, time_embed_dim=32, text_embed_dim=24,
                                                    num_layers=2, sample_width=8, sample_height=8, sample_frames=5,
                                                    patch_size=2, max_text_seq_length=8), inputs="cogvideox"),
    "SanaTransformer2DModel": dict(kwargs=dict(in_channels=4, out_channels=4, num_attention_heads=2,
                                               attention_head_dim=16, num_layers=2, num_cross_attention_heads=2,
                                               cross_attention_head_dim=16, cross_attention_dim=32,
                                               caption_channels=24, sample_size=8, patch_size=2,
                                               norm_elementwise_affine=False), inputs="sana"),
    "UNet2DModel": dict(kwargs=dict(sample_size=16, in_channels=3, out_channels=3, layers_per_block=1,
                                    block_out_channels=(16, 32), down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                                    up_block_types=("AttnUpBlock2D", "UpBlock2D"), norm_num_groups=8,
                                    attention_head_dim=8), inputs="unet"),
    "UNet2DConditionModel": dict(kwargs=dict(sample_size=8, in_channels=4, out_channels=4, layers_per_block=1,
                                             block_out_channels=(16, 32),
                                             down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                             up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
                                             cross_attention_dim=24, norm_num_groups=8, attention_head_dim=8),
                                 inputs="unet_cond"),
}


def diffusers_families() -> dict[str, str]:
    import diffusers

    return {n: "diffusion" for n in dir(diffusers)
            if re.fullmatch(r"\w*(Transformer\w*Model|DiT\w*Model|UNet\w*Model)", n)}


def all_families() -> dict[str, str]:
    fams = hf_families()
    fams.update(diffusers_families())
    return fams


# -- shrinking --------------------------------------------------------------------------------
_SIZE_KEYS = {
    "hidden_size": 32, "d_model": 32, "n_embd": 32, "embed_dim": 32, "dim": 32, "n_embed": 32,
    "intermediate_size": 64, "ffn_dim": 64, "d_ff": 64, "n_inner": 64, "encoder_ffn_dim": 64, "decoder_ffn_dim": 64,
    "hidden_dim": 64, "num_hidden_layers": 2, "n_layer": 2, "num_layers": 2, "n_layers": 2, "encoder_layers": 2,
    "decoder_layers": 2, "num_decoder_layers": 2, "num_attention_heads": 4, "n_head": 4, "n_heads": 4,
    "encoder_attention_heads": 4, "decoder_attention_heads": 4, "num_heads": 4, "num_key_value_heads": 2,
    "head_dim": 8, "d_kv": 8, "vocab_size": VOCAB, "max_position_embeddings": 64, "n_positions": 64,
    "n_ctx": 64, "image_size": 32, "patch_size": 8, "num_labels": 5, "projection_dim": 16,
    "embedding_size": 32, "d_head": 8, "rotary_dim": 4, "num_experts": 4, "n_routed_experts": 4,
    "num_local_experts": 4, "moe_intermediate_size": 32, "shared_expert_intermediate_size": 32,
    "max_window_layers": 2, "sliding_window": 64, "num_buckets": 16, "relative_attention_num_buckets": 16,
    "type_vocab_size": 2, "position_buckets": 16, "max_relative_positions": 32,
}
_TOKEN_KEYS = ("pad_token_id", "bos_token_id", "eos_token_id", "decoder_start_token_id", "sep_token_id",
               "cls_token_id", "mask_token_id", "unk_token_id", "forced_eos_token_id", "forced_bos_token_id")


def _shrink(config, overrides: dict[str, Any]) -> None:
    """Generic: every size key set small, per-stage lists shortened, token ids into the vocabulary;
    sub-configs recursively; then the family's overrides."""
    for key, small in _SIZE_KEYS.items():
        val = getattr(config, key, None)
        if isinstance(val, bool) or val is None:
            continue
        if isinstance(val, int) and val > small:
            with contextlib.suppress(Exception):
                setattr(config, key, small)
    for key in ("hidden_sizes", "depths", "num_attention_heads", "num_heads", "sr_ratios", "mlp_ratios",
                "strides", "patch_sizes", "embed_dims", "num_channels_list"):
        val = getattr(config, key, None)
        if isinstance(val, (list, tuple)) and len(val) > 2 and all(isinstance(v, int) for v in val):
            new = list(val)[:2]
            if key == "hidden_sizes":
                new = [16, 32]
            if key == "depths":
                new = [1, 1]
            with contextlib.suppress(Exception):
                setattr(config, key, new)
    if hasattr(config, "num_stages") and isinstance(getattr(config, "depths", None), list):
        with contextlib.suppress(Exception):
            config.num_stages = len(config.depths)
    if getattr(config, "stage_names", None) and isinstance(getattr(config, "depths", None), list):
        with contextlib.suppress(Exception):
            config.stage_names = ["stem"] + [f"stage{i + 1}" for i in range(len(config.depths))]
            config.out_features = config.out_indices = None
    for key in _TOKEN_KEYS:
        val = getattr(config, key, None)
        if isinstance(val, int) and val >= VOCAB:
            with contextlib.suppress(Exception):
                setattr(config, key, {"pad_token_id": 1}.get(key, 0))
        elif isinstance(val, list):
            with contextlib.suppress(Exception):
                setattr(config, key, [v if v < VOCAB else 0 for v in val])
    heads = getattr(config, "num_attention_heads", None)
    if isinstance(heads, int) and heads and isinstance(getattr(config, "num_key_value_heads", None), int):
        config.num_key_value_heads = min(config.num_key_value_heads, heads)
    for attr in ("text_config", "vision_config", "audio_config", "encoder", "decoder"):
        sub = getattr(config, attr, None)
        if sub is not None and hasattr(sub, "to_dict") and sub is not config:
            _shrink(sub, {})
    for key, val in overrides.items():
        if isinstance(val, dict) and isinstance(getattr(config, key, None), dict):
            getattr(config, key).update(val)
        else:
            setattr(config, key, val)


def _seeded(model, seed: int = 1):
    """Random, non-trivial weights everywhere (norm gammas / betas, biases, BN statistics)."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1:
                low = name.lower()
                if name.endswith("weight") and ("norm" in low or "ln" in low or "bn" in low):
                    p.copy_(1 + 0.2 * torch.randn(p.shape, generator=gen))
                else:
                    p.copy_(0.1 * torch.randn(p.shape, generator=gen))
            elif p.dim() >= 2 and float(p.abs().max()) == 0.0:  # zero-initialised (adaLN-Zero, out proj)
                p.copy_(0.05 * torch.randn(p.shape, generator=gen))
        for name, b in model.named_buffers():
            if name.endswith("running_mean"):
                b.copy_(0.2 * torch.randn(b.shape, generator=gen))
            elif name.endswith("running_var"):
                b.copy_(0.5 + torch.rand(b.shape, generator=gen))
    return model.eval()


# -- model + inputs ---------------------------------------------------------------------------
@dataclasses.dataclass
class Built:
    module: Any  # nn.Module taking the inputs positionally, returning one tensor
    inputs: dict[str, np.ndarray]
    dynamic: dict[str, dict[int, str]]
    make_inputs: Any  # (batch, seq, seed) -> dict[str, np.ndarray]
    static: bool = False


def _ids(b, s, seed):
    import torch

    return torch.randint(2, VOCAB, (b, s), generator=torch.Generator().manual_seed(seed)).numpy()


def _mask(b, s, seed):
    """0/1, right padding, the first row full (the mask is real, so a tracer keeps it)."""
    import torch

    keep = torch.randint(max(1, s // 2), s + 1, (b,), generator=torch.Generator().manual_seed(seed + 100))
    keep[0] = s
    keep[-1] = max(1, s - 2)
    return (torch.arange(s)[None, :] < keep[:, None]).to(torch.int64).numpy()


def _randn(shape, seed):
    import torch

    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).numpy()


class _Positional:
    """Wraps a model: positional tensors in (named by ``names``), its first tensor output out."""

    def __new__(cls, model, names, extra=None, pick=None):
        import torch

        class Wrap(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.model = model

            def forward(self, *args):
                kw = dict(zip(names, args))
                kw.update(extra or {})
                out = self.model(**kw, return_dict=False)
                out = out[0] if isinstance(out, (tuple, list)) else out
                return out.sample if hasattr(out, "sample") else out

        # eval: a fresh module starts in training mode, and the dynamo exporter keeps that
        # (training-mode Dropout nodes: a random model that no rewrite can match)
        return Wrap().eval()


def build_hf(family: str):
    import torch
    import transformers as T
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING
    from transformers.models.auto.modeling_auto import MODEL_MAPPING_NAMES

    config = CONFIG_MAPPING[family]()
    _shrink(config, HF_OVERRIDES.get(family, {}))
    cls = getattr(T, MODEL_MAPPING_NAMES[family]) if isinstance(MODEL_MAPPING_NAMES[family], str) \
        else getattr(T, MODEL_MAPPING_NAMES[family][0])
    torch.manual_seed(0)
    try:
        model = cls._from_config(config, attn_implementation="sdpa")
    except Exception:  # noqa: BLE001 - no SDPA implementation: the eager one
        model = cls._from_config(config, attn_implementation="eager")
    model = _seeded(model)
    params = inspect.signature(model.forward).parameters
    main = getattr(model, "main_input_name", "input_ids")
    names, dyn = [main], {}
    if main == "input_ids":
        names += [n for n in ("attention_mask",) if n in params]
        if "decoder_input_ids" in params and getattr(config, "is_encoder_decoder", False):
            names += [n for n in ("decoder_input_ids", "decoder_attention_mask") if n in params]
        dyn = {n: {0: "batch", 1: "seq"} for n in names}

        def make(b, s, seed):
            out = {"input_ids": _ids(b, s, seed)}
            if "attention_mask" in names:
                out["attention_mask"] = _mask(b, s, seed)
            if "decoder_input_ids" in names:
                out["decoder_input_ids"] = _ids(b, s, seed + 1)
            if "decoder_attention_mask" in names:  # without a mask transformers traces torch.diff (no ONNX)
                out["decoder_attention_mask"] = _mask(b, s, seed + 1)
            return out
    elif main == "pixel_values":
        size = getattr(config, "image_size", 32)
        size = size if isinstance(size, int) else size[0]
        chans = getattr(config, "num_channels", 3)
        dyn = {main: {0: "batch"}}

        def make(b, s, seed):
            return {"pixel_values": _randn((b, chans, size, size), seed)}
    elif main == "input_values":
        names += [n for n in ("attention_mask",) if n in params and False]
        dyn = {main: {0: "batch"}}

        def make(b, s, seed):
            return {"input_values": _randn((b, 1600), seed)}
    elif main == "input_features":
        mels = getattr(config, "num_mel_bins", 16)
        frames = 2 * getattr(config, "max_source_positions", 8) if family == "whisper" else \
            getattr(config, "max_length", 32)
        if "decoder_input_ids" in params and getattr(config, "is_encoder_decoder", False):
            names += [n for n in ("decoder_input_ids", "decoder_attention_mask") if n in params]
        dyn = {main: {0: "batch"}, **{n: {0: "batch", 1: "seq"} for n in names[1:]}}

        def make(b, s, seed):
            feats = _randn((b, frames, mels) if family != "whisper" else (b, mels, frames), seed)
            out = {"input_features": feats}
            if "decoder_input_ids" in names:
                out["decoder_input_ids"] = _ids(b, s, seed + 1)
            if "decoder_attention_mask" in names:
                out["decoder_attention_mask"] = _mask(b, s, seed + 1)
            return out
    else:
        raise NotImplementedError(f"main input {main!r} not handled")
    extra = {"use_cache": False} if "use_cache" in params else {}
    module = _Positional(model, tuple(names), extra)
    return Built(module, make(BATCH, SEQ, 0), dyn, make)


def build_diffusers(family: str):
    import diffusers
    import torch

    spec = DIFFUSERS.get(family)
    if spec is None:
        raise NotImplementedError("not configured: no shrunk constructor arguments / inputs for this class in "
                                  "benchmarks/arch_sweep.py DIFFUSERS")
    torch.manual_seed(0)
    model = _seeded(getattr(diffusers, family)(**spec["kwargs"]))
    kind = spec["inputs"]

    def t(b, seed):
        return torch.randint(0, 1000, (b,), generator=torch.Generator().manual_seed(seed + 7)).numpy()

    def make(b, s, seed):  # noqa: C901 - one branch per input layout
        lat = _randn((b, 4, 8, 8), seed)
        if kind == "dit":
            return {"hidden_states": lat, "timestep": t(b, seed),
                    "class_labels": torch.randint(0, 10, (b,), generator=torch.Generator().manual_seed(seed)).numpy()}
        if kind == "pixart":
            return {"hidden_states": lat, "encoder_hidden_states": _randn((b, 5, 24), seed + 3), "timestep": t(b, seed)}
        if kind == "sd3":
            return {"hidden_states": lat, "encoder_hidden_states": _randn((b, 5, 24), seed + 3),
                    "pooled_projections": _randn((b, 16), seed + 4), "timestep": t(b, seed)}
        if kind == "flux":
            return {"hidden_states": _randn((b, 16, 16), seed), "encoder_hidden_states": _randn((b, 5, 24), seed + 3),
                    "pooled_projections": _randn((b, 16), seed + 4), "timestep": t(b, seed).astype(np.float32) / 1000,
                    "img_ids": np.stack(np.meshgrid(np.zeros(1), np.arange(4), np.arange(4), indexing="ij"), -1)
                    .reshape(16, 3).astype(np.float32),
                    "txt_ids": np.zeros((5, 3), np.float32)}
        if kind == "hunyuan":  # CLIP + T5 text (8 + 8) as long as the image tokens (16): equal-length cross-attention
            return {"hidden_states": lat, "timestep": t(b, seed).astype(np.float32),
                    "encoder_hidden_states": _randn((b, 8, 24), seed + 3),
                    "text_embedding_mask": np.ones((b, 8), np.int64),
                    "encoder_hidden_states_t5": _randn((b, 8, 24), seed + 5),
                    "text_embedding_mask_t5": np.ones((b, 8), np.int64)}
        if kind == "cogvideox":
            return {"hidden_states": _randn((b, 2, 4, 8, 8), seed), "encoder_hidden_states": _randn((b, 8, 24), seed + 3),
                    "timestep": t(b, seed)}
        if kind == "sana":
            return {"hidden_states": lat, "encoder_hidden_states": _randn((b, 5, 24), seed + 3), "timestep": t(b, seed)}
        if kind == "unet":
            return {"sample": _randn((b, 3, 16, 16), seed), "timestep": t(b, seed)}
        if kind == "unet_cond":
            return {"sample": lat, "timestep": t(b, seed), "encoder_hidden_states": _randn((b, 5, 24), seed + 3)}
        raise KeyError(kind)

    inputs = make(BATCH, SEQ, 0)
    names = tuple(inputs)
    extra = {}
    if kind == "pixart":
        extra = {"added_cond_kwargs": {"resolution": None, "aspect_ratio": None}}
    if kind in ("flux",):
        dyn = {n: {0: "batch"} for n in names if n not in ("img_ids", "txt_ids")}
    else:
        dyn = {n: {0: "batch"} for n in names}
    return Built(_Positional(model, names, extra), inputs, dyn, make, static=spec.get("static", False))


def build(family: str) -> Built:
    import diffusers  # noqa: F401

    if family in DIFFUSERS or family[0].isupper():
        return build_diffusers(family)
    return build_hf(family)


# -- ground truth from an eager forward ---------------------------------------------------------
_CROSS_NAMES = re.compile(r"crossattention|encoder_attn|encdecattention|cross_attn|attn2\b", re.I)
_CROSS_KW = ("encoder_hidden_states", "key_value_states", "cross_attention_states", "encoder_outputs")


def _ground_truth(built: Built) -> dict[str, Any]:
    """Attention calls (``F.scaled_dot_product_attention``, or softmax inside an attention module
    for eager-only models) and norm modules seen in one eager forward, with the library's own
    metadata: a call is cross-attention when its module says so (``is_cross_attention``, a
    cross-attention name, a key/value source passed in) unless it is joint attention (diffusers'
    ``added_kv_proj_dim``), or when queries and keys differ in length; masked when a mask or
    ``is_causal`` reaches it, or its module got an ``attention_mask``. A norm is pre-LN when its
    input is later an operand of an addition (the residual reads the stream raw)."""
    import torch
    import torch.nn.functional as F
    from torch.overrides import TorchFunctionMode

    stack: list[tuple[str, Any, dict]] = []
    names = {m: n for n, m in built.module.named_modules()}
    sites: list[dict[str, Any]] = []
    norm_inputs: list[tuple[str, Any]] = []
    pre_norms: set[int] = set()

    def is_attn(m):
        c = type(m).__name__.lower()
        return ("attention" in c or "attn" in c) and "block" not in c and "layer" not in c

    def pre(m, args, kwargs):
        kw = dict(kwargs)
        if args and isinstance(args[0], torch.Tensor):
            kw.setdefault("hidden_states", args[0])
        stack.append((names.get(m, "?"), m, kw))
        c = type(m).__name__
        if isinstance(m, torch.nn.LayerNorm) or c.endswith("LayerNorm") or "RMSNorm" in c or isinstance(
                m, getattr(torch.nn, "RMSNorm", ())):
            x = args[0] if args else next(iter(kwargs.values()), None)
            if isinstance(x, torch.Tensor):
                rms = "RMS" in c or (not isinstance(m, torch.nn.LayerNorm) and getattr(m, "bias", None) is None
                                     and hasattr(m, "variance_epsilon"))
                norm_inputs.append(("rms" if rms else "ln", x))

    def post(m, args, kwargs, out):
        stack.pop()

    hooks = []
    for m in built.module.modules():
        hooks.append(m.register_forward_pre_hook(pre, with_kwargs=True))
        hooks.append(m.register_forward_hook(post, with_kwargs=True))

    def site(q_len, k_len, mask, causal, via):
        attn = next(((n, m, kw) for n, m, kw in reversed(stack) if is_attn(m)), (None, None, {}))
        name, mod, mkw = attn
        kw_any = any(kw.get(k) is not None for _, m, kw in stack if is_attn(m) for k in _CROSS_KW)
        # joint attention: the module got two token streams and attends over their union
        # (queries as many as both), e.g. CogVideoX, SD3, Flux
        h, e = mkw.get("hidden_states"), mkw.get("encoder_hidden_states")
        union = (isinstance(h, torch.Tensor) and isinstance(e, torch.Tensor) and h.dim() == 3 and e.dim() == 3
                 and q_len == k_len == h.shape[1] + e.shape[1])
        joint = mod is not None and (bool(getattr(mod, "added_kv_proj_dim", None)) or union
                                     or "joint" in type(mod).__name__.lower())
        cross_meta = mod is not None and (bool(getattr(mod, "is_cross_attention", False)) or
                                          bool(_CROSS_NAMES.search(name or "")) or kw_any)
        masked_kw = any(kw.get("attention_mask") is not None for _, m, kw in stack if is_attn(m))
        sites.append({"module": name, "class": type(mod).__name__ if mod is not None else None, "via": via,
                      "q_len": q_len, "k_len": k_len, "cross": bool(cross_meta and not joint) or q_len != k_len,
                      "joint": bool(joint), "masked": bool(mask or causal or masked_kw)})

    class Mode(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            if func is F.scaled_dot_product_attention:
                q = args[0] if args else kwargs["query"]
                k = args[1] if len(args) > 1 else kwargs["key"]
                mask = kwargs.get("attn_mask", args[3] if len(args) > 3 else None)
                causal = kwargs.get("is_causal", args[5] if len(args) > 5 else False)
                site(int(q.shape[-2]), int(k.shape[-2]), mask is not None, bool(causal), "sdpa")
            elif func in (torch.softmax, F.softmax, torch.Tensor.softmax) and any(is_attn(m) for _, m, _ in stack):
                x = args[0]
                if isinstance(x, torch.Tensor) and x.dim() >= 3:
                    site(int(x.shape[-2]), int(x.shape[-1]), False, False, "softmax")
            elif func in (torch.add, torch.Tensor.add, torch.Tensor.__add__, torch.Tensor.__radd__,
                          torch.Tensor.__iadd__, torch.Tensor.add_):
                for a in args[:2]:
                    for i, (_, x) in enumerate(norm_inputs):
                        if a is x:
                            pre_norms.add(i)
            return func(*args, **kwargs)

    import torch as _t

    with torch.no_grad(), Mode():
        built.module(*[_t.from_numpy(v) for v in built.inputs.values()])
    for h in hooks:
        h.remove()
    self_sites = [s for s in sites if not s["cross"]]
    counts = {"ln": 0, "rms": 0, "pre_ln": 0, "pre_rms": 0}
    for i, (kind, _) in enumerate(norm_inputs):
        counts[kind] += 1
        if i in pre_norms:
            counts["pre_" + kind] += 1
    bn = sum(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in built.module.modules())
    return {"attention": len(sites), "self_unmasked": sum(not s["masked"] for s in self_sites),
            "self_masked": sum(s["masked"] for s in self_sites), "cross": len(sites) - len(self_sites),
            "joint": sum(s["joint"] for s in sites), "sites": sites[:64], "norms": counts, "batchnorm": bn}


# -- export -----------------------------------------------------------------------------------
@contextlib.contextmanager
def _quiet():
    sink = io.StringIO()
    with warnings.catch_warnings(), contextlib.redirect_stdout(sink), contextlib.redirect_stderr(sink):
        warnings.simplefilter("ignore")
        logging.disable(logging.WARNING)
        try:
            yield
        finally:
            logging.disable(logging.NOTSET)


def export_ts(built: Built, path: Path) -> None:
    import torch

    with _quiet(), torch.no_grad():
        torch.onnx.export(built.module, tuple(torch.from_numpy(v) for v in built.inputs.values()), str(path),
                          dynamo=False, opset_version=17, input_names=list(built.inputs), output_names=["output"],
                          dynamic_axes={} if built.static else {k: dict(v) for k, v in built.dynamic.items()})


def export_dynamo(built: Built, path: Path) -> str:
    """Dynamic batch / sequence; where torch.export cannot keep them dynamic, static shapes
    (said in the returned note)."""
    import torch
    from torch.export import Dim

    args = tuple(torch.from_numpy(v) for v in built.inputs.values())
    dims: dict[str, Any] = {}
    shapes = tuple({ax: dims.setdefault(lbl, Dim.DYNAMIC) for ax, lbl in built.dynamic.get(n, {}).items()} or None
                   for n in built.inputs)
    note = ""
    with _quiet():
        try:
            if built.static:
                raise RuntimeError("static by spec")
            prog = torch.onnx.export(built.module, args, dynamo=True, opset_version=18, input_names=list(built.inputs),
                                     output_names=["output"], dynamic_shapes=(shapes,))
        except Exception as err:  # noqa: BLE001 - retried with static shapes
            note = f"static shapes (dynamic export failed: {type(err).__name__}: {str(err).splitlines()[0][:160]})" \
                if not built.static else "static shapes (by spec)"
            prog = torch.onnx.export(built.module, args, dynamo=True, opset_version=18, input_names=list(built.inputs),
                                     output_names=["output"])
        prog.save(str(path))
    return note


def _versions() -> str:
    import diffusers
    import onnx
    import torch
    import transformers

    return f"t{torch.__version__}-tf{transformers.__version__}-d{diffusers.__version__}-o{onnx.__version__}-s{SPEC_VERSION}"


def worker_ground_truth(family: str, out: Path) -> None:
    """Recompute the ground truth of a cached family (``GT_VERSION`` changed), exports kept."""
    import torch

    torch.set_num_threads(1)
    meta = json.loads((out / "meta.json").read_text())
    with _quiet():
        built = build(family)
    meta["ground_truth"] = _ground_truth(built)
    meta["gt_version"] = GT_VERSION
    (out / "meta.json").write_text(json.dumps(meta, indent=1))


def worker_build(family: str, out: Path) -> None:
    """Build, record the ground truth, export both files; write ``meta.json`` (also on failure)."""
    import torch

    torch.set_num_threads(1)
    out.mkdir(parents=True, exist_ok=True)
    meta: dict[str, Any] = {"family": family, "files": {}, "export_errors": {}, "notes": {}, "gt_version": GT_VERSION}
    t0 = time.perf_counter()
    try:
        with _quiet():
            built = build(family)
        meta["ground_truth"] = _ground_truth(built)
    except Exception as err:  # noqa: BLE001 - recorded
        meta["build_error"] = f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"[:300]
        meta["seconds"] = time.perf_counter() - t0
        (out / "meta.json").write_text(json.dumps(meta, indent=1))
        return
    np.savez(out / "inputs.npz", **built.inputs)
    np.savez(out / "check_dyn.npz", **_check_inputs(built, dynamic=True))
    np.savez(out / "check_static.npz", **_check_inputs(built, dynamic=False))
    for exp in EXPORTERS:
        path = out / f"{exp}.onnx"
        t1 = time.perf_counter()
        try:
            if exp == "ts17":
                export_ts(built, path)
            else:
                note = export_dynamo(built, path)
                if note:
                    meta["notes"][exp] = note
            meta["files"][exp] = str(path)
        except Exception as err:  # noqa: BLE001 - recorded
            meta["export_errors"][exp] = f"{type(err).__name__}: {(str(err).splitlines() or [''])[0]}"[:300]
            path.unlink(missing_ok=True)
        meta[f"{exp}_seconds"] = round(time.perf_counter() - t1, 1)
    meta["seconds"] = round(time.perf_counter() - t0, 1)
    (out / "meta.json").write_text(json.dumps(meta, indent=1))


def _check_inputs(built: Built, dynamic: bool) -> dict[str, np.ndarray]:
    if dynamic and not built.static:
        return built.make_inputs(CHECK_BATCH, CHECK_SEQ, 11)
    return built.make_inputs(BATCH, SEQ, 11)


# -- passes on one file -----------------------------------------------------------------------
class _Timeout(Exception):
    pass


def _session(path: str):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    opts.log_severity_level = 3
    opts.intra_op_num_threads = 1
    return ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])


def _run(sess, base: dict[str, np.ndarray]) -> np.ndarray:
    feeds = {}
    batch = next(iter(base.values())).shape[0]
    for i in sess.get_inputs():
        if i.name in base:
            feeds[i.name] = base[i.name]
        else:  # inputs a pass added (Re-ttention's step and state): zeros, step 0 = dense
            dims = [d if isinstance(d, int) else batch for d in i.shape]
            feeds[i.name] = np.zeros(dims, np.int64 if "int64" in i.type else np.float32)
    return sess.run(None, feeds)[0]


def _max_rel(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if a.shape != b.shape or not (np.isfinite(a).all() and np.isfinite(b).all()):
        return float("inf")
    return float(np.abs(a - b).max() / max(np.abs(a).max(), 1e-30))


def independent_check(original: str, rewritten: str, cache: Path) -> float:
    """Both files in plain ORT (optimizations off) on fresh seeded inputs: another batch / sequence
    where both files keep them dynamic, the example shape otherwise. Max relative error."""
    want_s, got_s = _session(original), _session(rewritten)
    dyn = dict(np.load(cache / "check_dyn.npz"))
    ok = all(all(isinstance(d, str) or d is None or d == dyn[i.name].shape[k] for k, d in enumerate(i.shape))
             for s in (want_s, got_s) for i in s.get_inputs() if i.name in dyn)
    base = dyn if ok else dict(np.load(cache / "check_static.npz"))
    names = {i.name for i in want_s.get_inputs()}
    return _max_rel(_run(want_s, {k: v for k, v in base.items() if k in names}), _run(got_s, base))


def attention_verdict(applied: int, truth: dict[str, Any], sites: list[str] = ()) -> str:
    """Empty when ``applied`` rewritten attention sites fit the ground truth (at most the model's
    unmasked self-attention sites, and none whose node name, where the exporter kept the module
    path as TorchScript does, is a cross-attention or masked module), else why not."""
    by_module = {}
    for s in truth.get("sites", []):
        by_module.setdefault(s["module"], []).append(s)
    for site in sites:
        path = site.split(":", 1)[0].strip("/").rsplit("/", 1)[0].replace("/", ".")
        bad = [s for s in by_module.get(path, []) if s["cross"] or s["masked"]]
        if bad and len(bad) == len(by_module[path]):
            kind = "cross-attention" if bad[0]["cross"] else "masked"
            return f"rewrote the {kind} site of module {path} ({site.split(':', 1)[0]})"
    if truth and applied > truth.get("self_unmasked", 0):
        return (f"rewrote {applied} attention sites, the model has {truth.get('self_unmasked', 0)} unmasked "
                f"self-attention sites ({truth.get('cross', 0)} cross, {truth.get('self_masked', 0)} masked)")
    return ""


def run_pass(file: str, cache: Path, p: str, inputs: dict[str, np.ndarray], truth: dict[str, Any]) -> dict[str, Any]:
    """One pass through ``rewriter.rewrite`` on ``file``, classified (see the module docstring)."""
    import rewriter
    from rewriter.errors import RewriterError

    row: dict[str, Any] = {"pass": p}
    t0 = time.perf_counter()
    try:
        with _quiet():
            res = rewriter.rewrite(file, [p], inputs=inputs)
        rec = res.report["passes"][0]
        row["applied"] = rec["applied"]
        row["declined"] = [f"{d.get('site', '')}: {d.get('reason') or ''}"[:300] for d in rec["declined"]]
        row["sites"] = [f"{s.get('site', '')}: {s.get('reason') or ''}"[:200] for s in rec["sites"]][:40]
        if rec["applied"] == 0:
            row["outcome"] = "declined" if row["declined"] else "none"
        elif not res.passed:
            v = res.verification
            row["outcome"], row["why"] = "wrong", (f"exit 1: tool verification failed, max rel "
                                                   f"{v.get('max_rel_error')} {v.get('error', '')}")[:300]
        else:
            with tempfile.TemporaryDirectory() as tmp:
                dst = str(Path(tmp) / "out.onnx")
                res.save(dst)
                try:
                    err = independent_check(file, dst, cache)
                except Exception as exc:  # noqa: BLE001
                    err = None
                    row["outcome"], row["why"] = "wrong", f"rewritten model does not run: {type(exc).__name__}: " \
                                                          f"{str(exc).splitlines()[0][:200]}"
            if err is not None:
                row["max_rel"] = err
                if p == "lns":  # architectural: the function changes on purpose; it must still run
                    row["outcome"] = "applied" if np.isfinite(err) else "wrong"
                    if row["outcome"] == "wrong":
                        row["why"] = "lns output not finite"
                elif err <= EXACT_TOL:
                    row["outcome"] = "applied"
                else:
                    row["outcome"], row["why"] = "wrong", f"not exact: max rel {err:.3g} > {EXACT_TOL:g}"
            if p == "rettention" and row.get("outcome") == "applied":
                why = attention_verdict(rec["applied"], truth, [x["site"] for x in rec["sites"]])
                if why:
                    row["outcome"], row["why"] = "wrong", why
    except _Timeout:
        row["outcome"], row["why"] = "timeout", f"over {PASS_TIMEOUT} s"
    except RewriterError as err:
        code = getattr(err, "exit_code", 2)
        row["outcome"] = "refused" if code == 2 else "wrong" if code == 1 else "declined"
        row["why"] = f"exit {code}: {type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"[:300]
    except Exception as err:  # noqa: BLE001 - exit 4
        tb = traceback.extract_tb(err.__traceback__)
        where = next((f"{Path(f.filename).name}:{f.lineno}" for f in reversed(tb)
                      if "/rewriter/" in f.filename or "/passes/" in f.filename), "")
        row["outcome"], row["why"] = "wrong", f"exit 4: internal error: {type(err).__name__}: " \
                                              f"{(str(err).splitlines() or [''])[0][:200]} ({where})"
    row["seconds"] = round(time.perf_counter() - t0, 2)
    return row


def worker_passes(file: str, cache: Path, passes: list[str], out: Path) -> None:
    """Each pass on ``file`` (``run_pass``) under an alarm; one JSON line per pass in ``out``."""
    inputs = dict(np.load(cache / "inputs.npz"))
    truth = json.loads((cache / "meta.json").read_text()).get("ground_truth", {})

    def alarm(signum, frame):
        raise _Timeout

    signal.signal(signal.SIGALRM, alarm)
    for p in passes:
        signal.alarm(PASS_TIMEOUT)
        try:
            row = run_pass(file, cache, p, inputs, truth)
        finally:
            signal.alarm(0)
        with open(out, "a") as f:
            f.write(json.dumps(row) + "\n")


# -- reasons: a limit of the model or of the tool -----------------------------------------------
# (pattern, kind, short label); first match wins; unmatched reasons are "tool?" (to be sorted)
REASON_KINDS: tuple[tuple[str, str, str], ...] = (
    (r"already an RMSNorm|is an RMSNorm on the stream|RMSNorm on the stream", "model", "already RMSNorm"),
    (r"post-LN", "model", "post-LN"),
    (r"final norm", "model", "final norm (no block after it)"),
    (r"data-dependent gate|gated", "model", "adaLN gate"),
    (r"causal", "model", "causal attention"),
    (r"attention mask|masked", "model", "attention mask"),
    (r"cross-attention", "model", "cross-attention"),
    (r"no norm reads a residual stream", "model", "no residual stream norm"),
    (r"not a pre-norm", "model", "not a pre-norm"),
    (r"no softmax|linear attention", "model", "no softmax attention"),
    (r"does not run", "model", "the exported file does not run in ONNX Runtime"),
    (r"its producer \S+ is other:Flatten\b|its producer \S+ is other:(Reshape|Transpose)\b(?!.*not into the readers)",
     "tool", "linear seen through a view"),
    (r"not into the producer.*not into the readers", "model", "no linear or conv beside it"),
    (r"graph output", "model", "the model returns the raw stream"),
    (r"migration needs linear readers|is read by|read by other|stream norms only", "model",
     "norm output not read by linears only"),
    (r"shape inference|must be static|unknown (shape|width|rank)|could not (infer|trace)|cannot decide|stopped at",
     "tool", "analysis limit"),
    (r"rank of its input is unknown|is unknown", "tool", "shape / rank unknown"),
    (r"builds its shape from the width", "tool", "a Reshape reads the stream's width"),
    (r"not supported|unsupported|not handled|not recogni[sz]ed", "tool", "unsupported pattern"),
)


def reason_kind(reason: str) -> tuple[str, str]:
    for pat, kind, label in REASON_KINDS:
        if re.search(pat, reason, re.I):
            return kind, label
    return "tool?", "unclassified"


# -- driver -----------------------------------------------------------------------------------
def _limits():
    os.nice(0)
    with contextlib.suppress(Exception):
        resource.setrlimit(resource.RLIMIT_AS, (MEM_CAP, MEM_CAP))


def _sub(args: list[str], timeout: int) -> tuple[int, str]:
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    try:
        p = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True, timeout=timeout,
                           env=env, preexec_fn=_limits)
        return p.returncode, (p.stderr or p.stdout)[-600:]
    except subprocess.TimeoutExpired:
        return -9, f"timeout after {timeout} s"


def cache_root() -> Path:
    return Path(os.environ.get("REWRITER_SWEEP_CACHE", Path.home() / ".cache/rewriter/sweep"))


def run_family(family: str, kind: str, root: Path, rebuild: bool | str, passes: list[str], log) -> dict[str, Any]:
    cache = root / re.sub(r"[^\w.-]", "_", family)
    meta_path = cache / "meta.json"
    t0 = time.perf_counter()
    if rebuild == "failed" and meta_path.exists() and json.loads(meta_path.read_text()).get("build_error"):
        meta_path.unlink()
    if rebuild is True or not meta_path.exists():
        code, tail = _sub(["--worker-build", family, "--cache", str(cache)], BUILD_TIMEOUT)
        if not meta_path.exists():
            cache.mkdir(parents=True, exist_ok=True)
            last = (tail.strip().splitlines() or ["?"])[-1]
            meta_path.write_text(json.dumps({"family": family, "files": {}, "export_errors": {},
                                             "build_error": f"build worker exit {code}: {last}"[:300]}))
    meta = json.loads(meta_path.read_text())
    if not meta.get("build_error") and meta.get("gt_version") != GT_VERSION:
        _sub(["--worker-gt", family, "--cache", str(cache)], BUILD_TIMEOUT)
        meta = json.loads(meta_path.read_text())
    build_s = time.perf_counter() - t0
    ansi = re.compile(r"\x1b\[[0-9;]*m")
    fam = {"family": family, "kind": kind, "build_error": meta.get("build_error"),
           "export_errors": {k: ansi.sub("", v) for k, v in meta.get("export_errors", {}).items()}, "notes": meta.get("notes", {}),
           "ground_truth": {k: v for k, v in meta.get("ground_truth", {}).items() if k != "sites"},
           "files": {}, "build_seconds": round(build_s, 1)}
    for exp, path in meta.get("files", {}).items():
        t1 = time.perf_counter()
        out = cache / f"{exp}.passes.jsonl"
        out.unlink(missing_ok=True)
        code, tail = _sub(["--worker-passes", path, "--cache", str(cache), "--passes", ",".join(passes),
                           "--out", str(out)], PASSES_TIMEOUT)
        rows = [json.loads(x) for x in out.read_text().splitlines()] if out.exists() else []
        done = {r["pass"] for r in rows}
        for p in passes:
            if p not in done:
                last = (tail.strip().splitlines() or ["?"])[-1]
                why = f"worker exit {code}: {last}"[:300]
                rows.append({"pass": p, "outcome": "wrong" if code not in (-9,) else "timeout", "why": why})
                break  # the pass that was running; the rest did not run
        fam["files"][exp] = {r["pass"]: r for r in rows}
        fam["files"][exp]["_seconds"] = round(time.perf_counter() - t1, 1)
        log(f"  {family}/{exp}: " + ", ".join(f"{r['pass']}={r['outcome']}" + (f"({r.get('applied')})" if r.get(
            "applied") else "") for r in rows))
    return fam


def coverage(fams: list[dict]) -> dict[str, Any]:
    """The issue's figures over built files (one per family and exporter)."""
    cov = {"pre_ln_files": 0, "pre_ln_rms": 0, "pre_ln_crms": 0, "rms_files": 0, "rms_lns": 0, "rms_osplus": 0,
           "dit_files": 0, "dit_self_sites": 0, "dit_found": 0, "tool_reasons": {}}
    for f in fams:
        gt = f["ground_truth"]
        norms = gt.get("norms", {})
        for exp, rows in f["files"].items():
            out = {p: r.get("outcome") for p, r in rows.items() if p != "_seconds"}
            if norms.get("pre_ln", 0) >= 2:
                cov["pre_ln_files"] += 1
                cov["pre_ln_rms"] += out.get("rms") == "applied"
                cov["pre_ln_crms"] += out.get("crms") == "applied"
            if norms.get("pre_rms", 0) >= 2:
                cov["rms_files"] += 1
                cov["rms_lns"] += out.get("lns") == "applied"
                cov["rms_osplus"] += out.get("osplus") == "applied"
            if f["kind"] == "diffusion" and "UNet" not in f["family"]:
                cov["dit_files"] += 1
                cov["dit_self_sites"] += gt.get("self_unmasked", 0)
                r = rows.get("rettention", {})
                cov["dit_found"] += r.get("applied", 0) if r.get("outcome") == "applied" else 0
            for p, r in rows.items():
                if p == "_seconds":
                    continue
                for d in r.get("declined", []) + ([r["why"]] if r.get("outcome") in ("declined", "refused")
                                                  and r.get("why") else []):
                    kind, label = reason_kind(d)
                    if kind != "model":
                        reason = _norm_reason(d)[:160]
                        key = f"{p}: {reason}"
                        cov["tool_reasons"].setdefault(key, []).append(f"{f['family']}/{exp}")
    cov["tool_reasons"] = {k: sorted(set(v)) for k, v in cov["tool_reasons"].items()}
    return cov


def _cell(r: dict | None) -> str:
    if not r:
        return ""
    o = r.get("outcome")
    if o == "applied":
        err = r.get("max_rel")
        return f"✓{r.get('applied')}" + (f" {err:.0e}" if isinstance(err, float) and r["pass"] != "lns" else "")
    if o == "none":
        return "·"
    if o == "declined":
        labels = sorted({lbl if lbl != "unclassified" else "`" + d.split(": ", 1)[-1][:50] + "…`"
                         for d in r.get("declined", []) for lbl in [reason_kind(d)[1]]})
        return "declined: " + ", ".join(labels)[:120]
    if o == "refused":
        return "refused"
    return f"**{o.upper()}**"


def table(doc: dict) -> str:
    fams = doc["families"]
    lines = ["| family | kind | exporter | " + " | ".join(PASSES) + " |", "|---|---|---|" + "---|" * len(PASSES)]
    for f in fams:
        if f["build_error"]:
            continue
        for exp in EXPORTERS:
            if exp in f["files"]:
                rows = f["files"][exp]
                lines.append(f"| {f['family']} | {f['kind']} | {exp} | " + " | ".join(_cell(rows.get(p)) for p in PASSES) + " |")
            else:
                lines.append(f"| {f['family']} | {f['kind']} | {exp} | export failed: "
                             f"{f['export_errors'].get(exp, '?')[:80]} |" + " |" * (len(PASSES) - 1))
    t = doc["totals"]
    lines += ["", f"Totals: {t['families']} families, {t['built']} built, {t['build_failed']} failed to build, "
                  f"{t['files']} files ({t['export_failed']} exports failed); (file, pass) cases: "
                  + ", ".join(f"{k} {v}" for k, v in t["outcomes"].items()) + f"; {doc['seconds']:.0f} s."]
    c = doc["coverage"]
    lines += ["", "Coverage (built files, one per family and exporter):", "",
              f"- pre-LN LayerNorm stack (eager forward: >= 2 LayerNorms whose input a residual add also reads): "
              f"{c['pre_ln_files']} files; `rms` applied on {c['pre_ln_rms']}, `crms` on {c['pre_ln_crms']}",
              f"- RMSNorm stack (same test on RMSNorm modules): {c['rms_files']} files; `lns` applied on "
              f"{c['rms_lns']}, `osplus` on {c['rms_osplus']}",
              f"- diffusion transformers: {c['dit_files']} files holding {c['dit_self_sites']} unmasked "
              f"self-attention sites (ground truth); `rettention` rewrote {c['dit_found']} of them"]
    if c["tool_reasons"]:
        lines += ["", "Decline reasons that are a limit of the tool (or not yet sorted, `REASON_KINDS`):", ""]
        lines += [f"- {k} ({', '.join(v[:4])}{', ...' if len(v) > 4 else ''})" for k, v in c["tool_reasons"].items()]
    if doc.get("wrong"):
        lines += ["", "Wrong:", ""] + [f"- {w.split(' -- repro')[0]}" for w in doc["wrong"]]
    fails = [f for f in fams if f["build_error"]]
    if fails:
        lines += ["", "Not built:", ""] + [f"- `{f['family']}` ({f['kind']}): {f['build_error'][:160]}" for f in fails]
    return "\n".join(lines)


def totals(fams: list[dict]) -> dict[str, Any]:
    outs: dict[str, int] = {}
    for f in fams:
        for rows in f["files"].values():
            for p, r in rows.items():
                if p != "_seconds":
                    outs[r["outcome"]] = outs.get(r["outcome"], 0) + 1
    return {"families": len(fams), "built": sum(not f["build_error"] for f in fams),
            "build_failed": sum(bool(f["build_error"]) for f in fams),
            "files": sum(len(f["files"]) for f in fams),
            "export_failed": sum(len(f["export_errors"]) for f in fams if not f["build_error"]),
            "outcomes": dict(sorted(outs.items()))}


def wrong_cases(fams: list[dict]) -> list[str]:
    out = []
    for f in fams:
        for exp, rows in f["files"].items():
            for p, r in rows.items():
                if p != "_seconds" and r.get("outcome") in ("wrong", "timeout"):
                    out.append(f"{f['family']}/{exp}/{p}: {r['outcome']}: {r.get('why', '')} -- repro: "
                               f"python benchmarks/arch_sweep.py --families {f['family']} --passes {p} (builds "
                               f"{f['family']}/{exp}.onnx and inputs.npz in the cache; then rewrite FILE --passes {p} "
                               f"--inputs inputs.npz)")
    return out


def _norm_reason(text: str) -> str:
    """A decline reason with node names elided (to group the same reason across sites)."""
    return re.sub(r"^(<node>: )+", "", re.sub(r"(/[\w.\-/]+|\bnode_\w+)", "<node>", text.split(": ", 1)[-1]))


def _compact(doc: dict) -> str:
    """The JSON document with each case's sites cut to 2 and its declines to one example per
    distinct reason (at most 6, each cut to 400 characters; ``declined_total`` keeps the count),
    one line per family."""
    for f in doc["families"]:
        for rows in f["files"].values():
            for p, r in rows.items():
                if p != "_seconds":
                    r["sites"] = r.get("sites", [])[:2]
                    seen: dict[str, str] = {}
                    for d in r.get("declined", []):
                        seen.setdefault(_norm_reason(d), d)
                    r["declined_total"] = r.get("declined_total", len(r.get("declined", [])))
                    r["declined"] = [d[:400] for d in list(seen.values())[:6]]
                    r["sites"] = [x[:160] for x in r["sites"]]
    # one line per family
    fams = ",\n  ".join(json.dumps(f, separators=(",", ":")) for f in doc["families"])
    rest = json.dumps({k: v for k, v in doc.items() if k != "families"}, indent=1)
    return rest[:-2] + ',\n "families": [\n  ' + fams + "\n ]\n}\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--families", default="default", help="comma list, 'default' or 'all'")
    ap.add_argument("--kinds", default="", help="only these kinds (decoder,encoder,vision,...)")
    ap.add_argument("--limit", type=int, default=0)
    ap.add_argument("--passes", default=",".join(PASSES))
    ap.add_argument("--json", default="")
    ap.add_argument("--table", action="store_true")
    ap.add_argument("--from-json", default="")
    ap.add_argument("--merge-into", default="", help="replace these families in a saved --json run, recount")
    ap.add_argument("--rebuild", action="store_true", help="rebuild the cached exports")
    ap.add_argument("--rebuild-failed", action="store_true", help="rebuild the families that failed to build")
    ap.add_argument("--worker-build", default="")
    ap.add_argument("--worker-passes", default="")
    ap.add_argument("--worker-gt", default="")
    ap.add_argument("--cache", default="")
    ap.add_argument("--out", default="")
    args = ap.parse_args()
    if args.worker_build:
        worker_build(args.worker_build, Path(args.cache))
        return
    if args.worker_gt:
        worker_ground_truth(args.worker_gt, Path(args.cache))
        return
    if args.worker_passes:
        worker_passes(args.worker_passes, Path(args.cache), args.passes.split(","), Path(args.out))
        return
    if args.from_json:
        print(table(json.loads(Path(args.from_json).read_text())))
        return
    os.nice(10)
    known = all_families()
    if args.families == "all":
        names = list(known)
    elif args.families == "default":
        names = [f for f in DEFAULT if f in known or f in DIFFUSERS]
    else:
        names = args.families.split(",")
    if args.kinds:
        names = [n for n in names if known.get(n, "?") in args.kinds.split(",")]
    if args.limit:
        names = names[:args.limit]
    root = cache_root() / _versions()
    root.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    fams = []

    def log(msg):
        print(msg, flush=True)

    for i, fam in enumerate(names):
        log(f"[{i + 1}/{len(names)}] {fam} ({known.get(fam, '?')}) {time.perf_counter() - t0:.0f}s")
        fams.append(run_family(fam, known.get(fam, "diffusion" if fam[0].isupper() else "?"), root, args.rebuild or ("failed" if args.rebuild_failed else False),
                               args.passes.split(","), log))
        if fams[-1]["build_error"]:
            log(f"  not built: {fams[-1]['build_error'][:200]}")
        doc = {"seconds": time.perf_counter() - t0, "versions": _versions(), "families": fams,
               "totals": totals(fams), "coverage": coverage(fams), "wrong": wrong_cases(fams)}
        if args.json:
            Path(args.json).write_text(_compact(doc))
    doc = {"seconds": time.perf_counter() - t0, "versions": _versions(), "families": fams,
           "totals": totals(fams), "coverage": coverage(fams), "wrong": wrong_cases(fams)}
    if args.merge_into:
        old = json.loads(Path(args.merge_into).read_text())
        mine = {f["family"]: f for f in fams}
        merged = [mine.pop(f["family"], f) for f in old["families"]] + list(mine.values())
        doc = {"seconds": old["seconds"] + doc["seconds"], "versions": doc["versions"], "families": merged,
               "totals": totals(merged), "coverage": coverage(merged), "wrong": wrong_cases(merged)}
        Path(args.merge_into).write_text(_compact(doc))
    if args.json:
        Path(args.json).write_text(_compact(doc))
    log(json.dumps(doc["totals"]))
    log(json.dumps({k: v for k, v in doc["coverage"].items() if k != "tool_reasons"}))
    for k, v in doc["coverage"]["tool_reasons"].items():
        log(f"tool-limit reason: {k} <- {', '.join(v[:6])}")
    for w in doc["wrong"]:
        log("WRONG " + w)
    if args.table:
        print(table(doc))


if __name__ == "__main__":
    main()
