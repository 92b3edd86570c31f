"""Library classes that broke recognition (issue 20), at tiny configs with random weights,
exported the way users do: TorchScript (``dynamo=False``) at opset 17 with dynamic batch
axes, and dynamo at opset 18."""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch


@dataclasses.dataclass
class Built:
    module: torch.nn.Module
    args: tuple
    names: list[str]
    dynamic: dict  # TorchScript dynamic_axes

    def feeds(self, seed: int = 1) -> dict[str, np.ndarray]:
        """Fresh inputs of the example's shapes and dtypes (N(0, 1) floats, the example's
        integers / booleans)."""
        rng = np.random.default_rng(seed)
        out = {}
        for n, a in zip(self.names, self.args):
            x = a.numpy()
            out[n] = rng.standard_normal(x.shape).astype(x.dtype) if np.issubdtype(x.dtype, np.floating) else x
        return out


class _Call(torch.nn.Module):
    """Positional inputs -> ``model(**{key: input}, return_dict=False)[out]``."""

    def __init__(self, model, keys: list[str], out: int = 0):
        super().__init__()
        self.model, self.keys, self.out = model, keys, out

    def forward(self, *xs):
        return self.model(**dict(zip(self.keys, xs)), return_dict=False)[self.out]


def _seeded(model: torch.nn.Module) -> torch.nn.Module:
    """Random weights away from the init's zeros / ones (norm gains, zero-init gates)."""
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(0.3 * torch.randn(p.shape, generator=gen) + (1.0 if p.dim() == 1 and bool((p == 1).all()) else 0.0))
        for b_name, b in model.named_buffers():
            if "running_var" in b_name:
                b.copy_(0.5 + torch.rand(b.shape, generator=gen))
            elif "running_mean" in b_name:
                b.copy_(0.2 * torch.randn(b.shape, generator=gen))
    return model.eval()


def _randn(*shape, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def swin() -> Built:
    import transformers as T

    cfg = T.SwinConfig(image_size=32, patch_size=4, embed_dim=16, depths=[1, 1], num_heads=[2, 2], window_size=4,
                       mlp_ratio=2.0)
    m = _seeded(T.SwinModel(cfg))
    return Built(_Call(m, ["pixel_values"]), (_randn(2, 3, 32, 32),), ["pixels"], {"pixels": {0: "batch"}})


def clip_vision() -> Built:
    """The pooled image feature (``post_layernorm`` of the class token): what a user exports."""
    import transformers as T

    cfg = T.CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                             image_size=16, patch_size=4)
    cfg._attn_implementation = "eager"
    m = _seeded(T.CLIPVisionModel(cfg))
    return Built(_Call(m, ["pixel_values"], out=1), (_randn(2, 3, 16, 16),), ["pixels"], {"pixels": {0: "batch"}})


def clip_vision_hidden() -> Built:
    """The same model returning ``last_hidden_state`` (the raw residual stream, no final norm)."""
    b = clip_vision()
    b.module.out = 0
    return b


def levit() -> Built:
    import transformers as T

    cfg = T.LevitConfig(image_size=64, patch_size=16, hidden_sizes=[16, 32, 48], num_attention_heads=[1, 2, 3],
                        depths=[1, 1, 1], key_dim=[8, 8, 8], mlp_ratio=[2, 2, 2], attention_ratio=[2, 2, 2])
    m = _seeded(T.LevitModel(cfg))
    return Built(_Call(m, ["pixel_values"]), (_randn(2, 3, 64, 64),), ["pixels"], {"pixels": {0: "batch"}})


def hunyuan_dit() -> Built:
    """Text length (8 CLIP + 8 T5 tokens) == image tokens (8x8 latent, patch 2): 16."""
    import diffusers as D

    m = _seeded(D.HunyuanDiT2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=4, patch_size=2,
                                    sample_size=8, hidden_size=16, num_layers=2, mlp_ratio=2.0, learn_sigma=False,
                                    cross_attention_dim=16, cross_attention_dim_t5=16, pooled_projection_dim=16,
                                    text_len=8, text_len_t5=8, use_style_cond_and_image_meta_size=False))
    args = (_randn(2, 4, 8, 8), torch.tensor([3.0, 7.0]), _randn(2, 8, 16, seed=1), torch.ones(2, 8, dtype=torch.bool),
            _randn(2, 8, 16, seed=2), torch.ones(2, 8, dtype=torch.bool))
    keys = ["hidden_states", "timestep", "encoder_hidden_states", "text_embedding_mask",
            "encoder_hidden_states_t5", "text_embedding_mask_t5"]
    names = ["latents", "t", "text", "text_mask", "text_t5", "text_t5_mask"]
    return Built(_Call(m, keys), args, names, {n: {0: "batch"} for n in names})


def cogvideox() -> Built:
    """Joint attention over concat(text, video) tokens; adaLN-Zero gated branches."""
    import diffusers as D

    m = _seeded(D.CogVideoXTransformer3DModel(num_attention_heads=2, attention_head_dim=8, in_channels=4,
                                              out_channels=4, time_embed_dim=8, text_embed_dim=8, num_layers=2,
                                              sample_width=8, sample_height=8, sample_frames=1, patch_size=2,
                                              temporal_compression_ratio=4, max_text_seq_length=8))
    args = (_randn(2, 1, 4, 8, 8), _randn(2, 8, 8, seed=1), torch.tensor([3, 7]))
    names = ["latents", "text", "t"]
    return Built(_Call(m, ["hidden_states", "encoder_hidden_states", "timestep"]), args, names,
                 {n: {0: "batch"} for n in names})


def sana() -> Built:
    """Linear attention (ReLU kernels, no softmax) for the image tokens."""
    import diffusers as D

    m = _seeded(D.SanaTransformer2DModel(in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=4,
                                         num_layers=1, num_cross_attention_heads=2, cross_attention_head_dim=4,
                                         cross_attention_dim=8, caption_channels=8, sample_size=8, patch_size=1))
    args = (_randn(2, 4, 8, 8), _randn(2, 6, 8, seed=1), torch.tensor([3.0, 7.0]))
    names = ["latents", "text", "t"]
    return Built(_Call(m, ["hidden_states", "encoder_hidden_states", "timestep"]), args, names,
                 {n: {0: "batch"} for n in names})


def sd3() -> Built:
    """Joint attention: text and image tokens projected apart, Q / K / V concatenated."""
    import diffusers as D

    m = _seeded(D.SD3Transformer2DModel(sample_size=8, patch_size=2, in_channels=4, num_layers=2, attention_head_dim=8,
                                        num_attention_heads=2, joint_attention_dim=16, caption_projection_dim=16,
                                        pooled_projection_dim=16, out_channels=4, pos_embed_max_size=8))
    args = (_randn(2, 4, 8, 8), _randn(2, 6, 16, seed=1), _randn(2, 16, seed=2), torch.tensor([3.0, 7.0]))
    names = ["latents", "text", "pooled", "t"]
    return Built(_Call(m, ["hidden_states", "encoder_hidden_states", "pooled_projections", "timestep"]), args, names,
                 {n: {0: "batch"} for n in names})


def export(build: Callable[[], Built] | Built, path: Path, *, dynamo: bool) -> Path:
    """TorchScript at opset 17 with dynamic batch axes, or dynamo at opset 18."""
    b = build() if callable(build) else build
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        if dynamo:
            torch.onnx.export(b.module, b.args, str(path), dynamo=True, opset_version=18, input_names=b.names,
                              verbose=False, external_data=False)
        else:
            torch.onnx.export(b.module, b.args, str(path), dynamo=False, opset_version=17, input_names=b.names,
                              output_names=["out"], dynamic_axes=b.dynamic)
    return path
