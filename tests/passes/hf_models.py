"""Hugging Face models built from small configs with random weights (no hub access), each
wrapped to take token ids (or pixels) and return one tensor: ``(module, example_inputs)``."""

from __future__ import annotations

import torch


class _Wrap(torch.nn.Module):
    def __init__(self, model, key: str):
        super().__init__()
        self.model, self.key = model, key

    def forward(self, x):
        kw = {self.key: x, "return_dict": False}
        if self.key == "input_ids":
            kw["use_cache"] = False
        return self.model(**kw)[0]


def _ids(vocab: int, seq: int = 8) -> torch.Tensor:
    return torch.randint(0, vocab, (2, seq), generator=torch.Generator().manual_seed(0))


def _randomize(model: torch.nn.Module) -> torch.nn.Module:
    from models_zoo.prenorm import randomize_norms

    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1 and "norm" not in name.lower() and "ln" not in name.lower():
                p.copy_(0.05 * torch.randn(p.shape, generator=gen))
    return randomize_norms(model).eval()


def _eager(cfg):
    cfg._attn_implementation = "eager"
    return cfg


def gpt2():
    import transformers as T

    cfg = _eager(T.GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=64, n_positions=32,
                              bos_token_id=0, eos_token_id=0, use_cache=False))
    return _Wrap(_randomize(T.GPT2LMHeadModel(cfg)), "input_ids").eval(), (_ids(64),)


def opt(pre: bool = True):
    import transformers as T

    cfg = _eager(T.OPTConfig(hidden_size=32, num_hidden_layers=2, ffn_dim=64, num_attention_heads=4,
                             vocab_size=64, max_position_embeddings=32, word_embed_proj_dim=32,
                             do_layer_norm_before=pre, bos_token_id=0, eos_token_id=0, pad_token_id=1,
                             use_cache=False))
    return _Wrap(_randomize(T.OPTForCausalLM(cfg)), "input_ids").eval(), (_ids(64) + 2,)


def bloom():
    import transformers as T

    cfg = _eager(T.BloomConfig(hidden_size=32, n_layer=2, n_head=4, vocab_size=64, bos_token_id=0,
                               eos_token_id=0, pad_token_id=1, use_cache=False))
    return _Wrap(_randomize(T.BloomForCausalLM(cfg)), "input_ids").eval(), (_ids(64),)


def vit():
    import transformers as T

    cfg = _eager(T.ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                             image_size=16, patch_size=4, num_labels=5))
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    return _Wrap(_randomize(T.ViTForImageClassification(cfg)), "pixel_values").eval(), (x,)


def bert():
    import transformers as T

    cfg = _eager(T.BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                              vocab_size=64, max_position_embeddings=32))
    return _Wrap(_randomize(T.BertForMaskedLM(cfg)), "input_ids").eval(), (_ids(64),)


MODELS = {"gpt2": gpt2, "opt": opt, "opt-post": lambda: opt(False), "bloom": bloom, "vit": vit, "bert": bert}
