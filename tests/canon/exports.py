"""Real exporter output of real library classes (small configs, random weights), built once
per test session: what ``rewriter.canon`` must recognise."""

from __future__ import annotations

import warnings
from pathlib import Path

import torch


class _LM(torch.nn.Module):
    """ids, mask -> logits (transformers 5 traces torch.diff unless a mask is passed)."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, ids, mask):
        return self.model(input_ids=ids, attention_mask=mask, use_cache=False, return_dict=False)[0]


class _Vision(torch.nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, pixels):
        return self.model(pixel_values=pixels, return_dict=False)[0]


def _random_norm_weights(model: torch.nn.Module, gemma: bool = False) -> torch.nn.Module:
    """Norm gains away from 1 (RMSNorm classes start at ones, Gemma's at zeros)."""
    from tests.passes.hf_models import _randomize

    model = _randomize(model)
    gen = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name.lower() and p.dim() == 1 and not isinstance(p, torch.nn.UninitializedParameter):
                base = 0.0 if gemma else 1.0
                p.copy_(base + 0.2 * torch.randn(p.shape, generator=gen))
    return model.eval()


def _ids(vocab: int = 64, batch: int = 2, seq: int = 8):
    g = torch.Generator().manual_seed(0)
    return torch.randint(0, vocab, (batch, seq), generator=g), torch.ones(batch, seq, dtype=torch.int64)


def gpt2():
    import transformers as T

    cfg = T.GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=64, n_positions=32, use_cache=False,
                       bos_token_id=0, eos_token_id=0)
    cfg._attn_implementation = "eager"
    return _LM(_random_norm_weights(T.GPT2LMHeadModel(cfg))), _ids()


def vit():
    import transformers as T

    cfg = T.ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                      image_size=16, patch_size=4, num_labels=5)
    cfg._attn_implementation = "eager"
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    return _Vision(_random_norm_weights(T.ViTForImageClassification(cfg))), (x,)


def llama(dtype=torch.float32):
    import transformers as T

    cfg = T.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                        num_key_value_heads=2, vocab_size=64, max_position_embeddings=32, use_cache=False,
                        bos_token_id=0, eos_token_id=0, pad_token_id=0)
    cfg._attn_implementation = "eager"
    return _LM(_random_norm_weights(T.LlamaForCausalLM(cfg)).to(dtype)), _ids()


def gemma():
    import transformers as T

    cfg = T.GemmaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                        num_key_value_heads=2, head_dim=8, vocab_size=64, max_position_embeddings=32,
                        use_cache=False, bos_token_id=0, eos_token_id=0, pad_token_id=0)
    cfg._attn_implementation = "eager"
    return _LM(_random_norm_weights(T.GemmaForCausalLM(cfg), gemma=True)), _ids()


def export(build, path: Path, *, dynamo: bool, opset: int, dynamic: bool = False) -> Path:
    """``torch.onnx.export`` of ``build()``: TorchScript (``dynamo=False``) or dynamo."""
    module, args = build()
    names = ["ids", "mask"] if len(args) == 2 else ["pixels"]
    kw = {}
    if dynamic and not dynamo:
        kw["dynamic_axes"] = {n: {0: "batch", 1: "seq"} if n != "pixels" else {0: "batch"} for n in names}
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        if dynamo:
            torch.onnx.export(module, args, str(path), dynamo=True, opset_version=opset, input_names=names,
                              verbose=False, external_data=False)
        else:
            torch.onnx.export(module, args, str(path), dynamo=False, opset_version=opset, input_names=names,
                              output_names=["out"], **kw)
    return path
