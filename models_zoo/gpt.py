"""A tiny GPT language model (Pre-LN, learned positions), trained on Python source.

Architecture (``TinyGPT``)
    token ``nn.Embedding`` + learned position ``nn.Embedding`` -> ``n_layer`` Pre-LN
    blocks -> final ``nn.LayerNorm`` -> untied ``nn.Linear`` head. A block is::

        x = x + attn(ln_1(x))     # CausalSelfAttention: q/k/v/out nn.Linear + causal SDPA
        x = x + mlp(ln_2(x))      # MLP: nn.Linear(d, 4d) -> GELU(tanh) -> nn.Linear(4d, d)

    ``forward(ids)`` takes int64 token ids ``[B, T]`` (``T <= context``) and returns
    logits ``[B, T, 256]``: no cache, no dicts, no control flow on tensor values, so it
    passes ``torch.export.export``. Attention runs through
    ``F.scaled_dot_product_attention(..., is_causal=True)``; the probabilities it uses
    are available from ``CausalSelfAttention.attention_probs`` (see
    ``models_zoo.eval.attention_maps``).

Tokenizer and data
    Byte-level (``models_zoo.corpus``): vocabulary 256, so a uniform model has
    perplexity 256. Trained on the CPython standard library's source (PSF licence) by
    ``models_zoo/train_gpt.py``; the held-out split is committed.

Zoo entries
    ``gpt-trained``: the committed weights ``weights/gpt_trained.safetensors``
    (config and metrics in ``weights/gpt_trained.json``).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn

from models_zoo import register
from models_zoo.corpus import VOCAB_SIZE, load_split

__all__ = [
    "CausalSelfAttention",
    "SelfAttention",
    "GPTBlock",
    "GPTConfig",
    "MLP",
    "TinyGPT",
    "WEIGHTS_DIR",
    "load_trained_gpt",
]

log = logging.getLogger(__name__)

WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"
GPT_WEIGHTS = WEIGHTS_DIR / "gpt_trained.safetensors"
GPT_META = WEIGHTS_DIR / "gpt_trained.json"


@dataclasses.dataclass(frozen=True)
class GPTConfig:
    vocab_size: int = VOCAB_SIZE
    context: int = 128
    d_model: int = 160
    n_layer: int = 4
    n_head: int = 4
    mlp_ratio: int = 4
    ln_eps: float = 1e-5


class SelfAttention(nn.Module):
    """Multi-head self-attention (SDPA) with separate q/k/v/out projections; causal or full
    (the DiT's, ``models_zoo.dit``)."""

    def __init__(self, d_model: int, n_head: int, causal: bool = False):
        super().__init__()
        if d_model % n_head:
            raise ValueError("d_model must be divisible by n_head")
        self.n_head = n_head
        self.head_dim = d_model // n_head
        self.causal = causal
        self.q_proj = nn.Linear(d_model, d_model)
        self.k_proj = nn.Linear(d_model, d_model)
        self.v_proj = nn.Linear(d_model, d_model)
        self.out_proj = nn.Linear(d_model, d_model)

    def _heads(self, x: torch.Tensor, proj: nn.Linear) -> torch.Tensor:
        b, t, _ = x.shape
        return proj(x).view(b, t, self.n_head, self.head_dim).transpose(1, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self._heads(x, self.q_proj), self._heads(x, self.k_proj), self._heads(x, self.v_proj)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=self.causal)
        return self.out_proj(y.transpose(1, 2).reshape(b, t, d))

    def attention_probs(self, x: torch.Tensor) -> torch.Tensor:
        """Attention probabilities ``[B, H, T, T]`` that ``forward(x)`` uses."""
        q, k = self._heads(x, self.q_proj), self._heads(x, self.k_proj)
        scores = q @ k.transpose(-2, -1) / math.sqrt(self.head_dim)
        if self.causal:
            t = x.shape[1]
            mask = torch.ones(t, t, dtype=torch.bool, device=x.device).tril()
            scores = scores.masked_fill(~mask, float("-inf"))
        return scores.softmax(dim=-1)


class CausalSelfAttention(SelfAttention):
    """Multi-head causal self-attention with separate q/k/v/out projections."""

    def __init__(self, d_model: int, n_head: int):
        super().__init__(d_model, n_head, causal=True)


class MLP(nn.Module):
    def __init__(self, d_model: int, hidden: int):
        super().__init__()
        self.fc_in = nn.Linear(d_model, hidden)
        self.act = nn.GELU(approximate="tanh")
        self.fc_out = nn.Linear(hidden, d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc_out(self.act(self.fc_in(x)))


class GPTBlock(nn.Module):
    """Pre-LN transformer block: ``x + attn(ln_1(x))`` then ``x + mlp(ln_2(x))``."""

    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.ln_1 = nn.LayerNorm(cfg.d_model, eps=cfg.ln_eps)
        self.attn = CausalSelfAttention(cfg.d_model, cfg.n_head)
        self.ln_2 = nn.LayerNorm(cfg.d_model, eps=cfg.ln_eps)
        self.mlp = MLP(cfg.d_model, cfg.mlp_ratio * cfg.d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class TinyGPT(nn.Module):
    """Decoder-only byte-level language model; ``forward(ids [B,T]) -> logits [B,T,V]``."""

    def __init__(self, cfg: GPTConfig = GPTConfig()):
        super().__init__()
        self.cfg = cfg
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.pos_emb = nn.Embedding(cfg.context, cfg.d_model)
        self.blocks = nn.ModuleList(GPTBlock(cfg) for _ in range(cfg.n_layer))
        self.ln_f = nn.LayerNorm(cfg.d_model, eps=cfg.ln_eps)
        self.head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """GPT-2 style init: N(0, 0.02), residual output projections scaled by depth."""
        for name, p in self.named_parameters():
            if p.dim() == 1:
                if name.endswith("weight"):  # LayerNorm gains
                    nn.init.ones_(p)
                else:
                    nn.init.zeros_(p)
            elif name.endswith(("out_proj.weight", "fc_out.weight")):
                nn.init.normal_(p, std=0.02 / math.sqrt(2 * self.cfg.n_layer))
            else:
                nn.init.normal_(p, std=0.02)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        t = ids.shape[1]
        pos = torch.arange(t, device=ids.device)
        x = self.tok_emb(ids) + self.pos_emb(pos)
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln_f(x))


def num_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def load_trained_gpt(
    weights: Path | str = GPT_WEIGHTS, meta: Path | str = GPT_META
) -> TinyGPT:
    """The committed trained GPT (eval mode), loaded without pickle."""
    info = json.loads(Path(meta).read_text())
    model = TinyGPT(GPTConfig(**info["config"]))
    model.load_state_dict(load_file(str(weights)), strict=True)
    log.debug("loaded %s (%d parameters)", weights, num_params(model))
    return model.eval()


def _example_ids(cfg: GPTConfig, batch: int = 2) -> torch.Tensor:
    """``batch`` windows of real validation text, ``[batch, context]`` int64."""
    data = load_split("val")
    rows = [data[i * cfg.context : (i + 1) * cfg.context] for i in range(batch)]
    return torch.stack(rows).to(torch.int64)


@register(
    "gpt-trained",
    "byte-level Pre-LN GPT (4x160, ctx 128, 1.3M params) trained on CPython stdlib source",
    trained=True,
)
def gpt_trained():
    model = load_trained_gpt()
    return model, (_example_ids(model.cfg),)
