"""A Hugging Face Llama from a small config (random weights, no hub access) for the
``lns`` / ``osplus`` tests: ``llama() -> (module, example_inputs)``.

HF's ``LlamaRMSNorm`` is written as elementwise ops, which torch.export and the opset-18
ONNX export keep decomposed (not recognised as a norm); the model here swaps each one for
``torch.nn.RMSNorm`` with the same weight and epsilon, which export as ``aten.rms_norm``
and, at opset 23, ``RMSNormalization``. Export it to ONNX with batch 1 (the opset-23
rotary export fails with batch > 1)."""

from __future__ import annotations

import torch

from tests.passes.hf_models import _eager, _Wrap


def _swap_rms(module: torch.nn.Module, gen: torch.Generator) -> None:
    for name, child in list(module.named_children()):
        if type(child).__name__.endswith("RMSNorm") and hasattr(child, "variance_epsilon"):
            new = torch.nn.RMSNorm(child.weight.shape[0], eps=child.variance_epsilon)
            with torch.no_grad():
                new.weight.copy_(1 + 0.2 * torch.randn(new.weight.shape, generator=gen))
            setattr(module, name, new)
        else:
            _swap_rms(child, gen)


def llama(batch: int = 2):
    import transformers as T

    cfg = _eager(T.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                               num_key_value_heads=2, vocab_size=64, max_position_embeddings=32, use_cache=False))
    torch.manual_seed(0)
    model = T.LlamaForCausalLM(cfg)
    _swap_rms(model, torch.Generator().manual_seed(1))
    ids = torch.randint(0, 64, (batch, 8), generator=torch.Generator().manual_seed(0))
    return _Wrap(model, "input_ids").eval(), (ids,)
