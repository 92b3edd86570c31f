"""Pre-LN transformers with random weights: the targets (and the negative controls) of the
``rms`` / ``crms`` rewrites.

* ``PreLNGPT``: token ``nn.Embedding`` + learned position ``nn.Embedding`` -> ``n_layer``
  blocks -> final ``nn.LayerNorm`` -> head. Options: ``tied`` (the head reuses the token
  table, GPT-2 style), ``parallel`` (``x + attn(ln(x)) + mlp(ln(x))``, GPT-J / Phi-2
  style), ``post_ln`` (``x = ln(x + f(x))``, BERT style: must be declined),
  ``output_hidden`` (the stream before the final norm is a second output: must be
  declined).
* ``PreLNViT``: patch ``nn.Conv2d`` -> flatten/transpose -> cls token concatenated ->
  learned position parameter added -> blocks -> final norm -> the cls row -> head.
* ``AdaLNTransformer``: adaLN-Zero blocks (``x + gate * branch(LN(x) * (1 + scale) +
  shift)``) on float tokens: its data-dependent channel-wise gate makes the stream
  non-zero-mean, so ``rms`` must decline it. Without gates (``adaln-nogate-transformer``)
  only the norm outputs are modulated: fine for ``rms``, ``crms`` re-expands.

LayerNorm gains and biases are random (not 1 and 0), so that a pass that forgets to fold
them is caught. Sizes go from tiny (tests) to GPT-2-small scale (``prenorm-gpt-12x768``,
for benchmarks).
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from torch import nn

from models_zoo import register
from models_zoo.gpt import MLP, SelfAttention

__all__ = ["AdaLNTransformer", "PreLNConfig", "PreLNGPT", "PreLNViT", "randomize_norms"]


@dataclasses.dataclass(frozen=True)
class PreLNConfig:
    vocab_size: int = 96
    context: int = 32
    d_model: int = 32
    n_layer: int = 2
    n_head: int = 4
    mlp_ratio: int = 4
    ln_eps: float = 1e-5
    tied: bool = True
    parallel: bool = False
    post_ln: bool = False
    output_hidden: bool = False


class Block(nn.Module):
    def __init__(self, d: int, n_head: int, hidden: int, eps: float, *, causal: bool = True,
                 parallel: bool = False, post_ln: bool = False):
        super().__init__()
        self.parallel, self.post_ln = parallel, post_ln
        self.ln_1 = nn.LayerNorm(d, eps=eps)
        self.attn = SelfAttention(d, n_head, causal)
        self.ln_2 = nn.LayerNorm(d, eps=eps)
        self.mlp = MLP(d, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.post_ln:
            x = self.ln_1(x + self.attn(x))
            return self.ln_2(x + self.mlp(x))
        if self.parallel:
            return x + self.attn(self.ln_1(x)) + self.mlp(self.ln_2(x))
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


def randomize_norms(module: nn.Module, seed: int = 0) -> nn.Module:
    """Give every LayerNorm a random gain around 1 and a random bias (in place)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, nn.LayerNorm) and m.elementwise_affine:
                m.weight.copy_(1 + 0.2 * torch.randn(m.weight.shape, generator=gen))
                if m.bias is not None:
                    m.bias.copy_(0.2 * torch.randn(m.bias.shape, generator=gen))
    return module


class PreLNGPT(nn.Module):
    """``forward(ids [B, T] int64) -> logits [B, T, V]`` (plus the stream if ``output_hidden``)."""

    def __init__(self, cfg: PreLNConfig = PreLNConfig()):
        super().__init__()
        self.cfg = cfg
        d = cfg.d_model
        self.tok = nn.Embedding(cfg.vocab_size, d)
        self.pos = nn.Embedding(cfg.context, d)
        self.blocks = nn.ModuleList(
            Block(d, cfg.n_head, cfg.mlp_ratio * d, cfg.ln_eps, parallel=cfg.parallel, post_ln=cfg.post_ln)
            for _ in range(cfg.n_layer))
        self.ln_f = nn.LayerNorm(d, eps=cfg.ln_eps)
        self.head = nn.Linear(d, cfg.vocab_size, bias=False)
        for p in self.parameters():
            if p.dim() > 1:
                nn.init.normal_(p, std=0.1)
        if cfg.tied:
            self.head.weight = self.tok.weight
        randomize_norms(self)

    def forward(self, ids: torch.Tensor):
        pos = torch.arange(ids.shape[1], device=ids.device)
        x = self.tok(ids) + self.pos(pos)
        for blk in self.blocks:
            x = blk(x)
        logits = self.head(x if self.cfg.post_ln else self.ln_f(x))
        if self.cfg.output_hidden:
            return logits, x
        return logits


class PreLNViT(nn.Module):
    """``forward(images [B, 3, H, W]) -> logits [B, classes]``: patch conv, cls token,
    learned positions, pre-LN blocks, final norm, cls row, head."""

    def __init__(self, image: int = 16, patch: int = 4, d: int = 32, n_layer: int = 2, n_head: int = 4,
                 classes: int = 10, eps: float = 1e-6):
        super().__init__()
        n = (image // patch) ** 2
        self.patch = nn.Conv2d(3, d, patch, stride=patch)
        self.cls = nn.Parameter(0.1 * torch.randn(1, 1, d))
        self.pos = nn.Parameter(0.1 * torch.randn(1, n + 1, d))
        self.blocks = nn.ModuleList(Block(d, n_head, 4 * d, eps, causal=False) for _ in range(n_layer))
        self.norm = nn.LayerNorm(d, eps=eps)
        self.head = nn.Linear(d, classes)
        randomize_norms(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls.expand(x.shape[0], -1, -1), x], dim=1) + self.pos
        for blk in self.blocks:
            x = blk(x)
        return self.head(self.norm(x)[:, 0])


class AdaLNTransformer(nn.Module):
    """adaLN-Zero blocks over float tokens ``x [B, N, d]`` conditioned on ``c [B, d]``;
    ``gated=False`` drops the gates and keeps the modulation of the norm outputs."""

    def __init__(self, d: int = 32, n_layer: int = 2, n_head: int = 4, gated: bool = True):
        super().__init__()
        self.gated = gated
        self.blocks = nn.ModuleList(Block(d, n_head, 4 * d, 1e-6, causal=False) for _ in range(n_layer))
        self.ada = nn.ModuleList(nn.Linear(d, 6 * d) for _ in range(n_layer))
        for blk in self.blocks:
            blk.ln_1 = nn.LayerNorm(d, elementwise_affine=False, eps=1e-6)
            blk.ln_2 = nn.LayerNorm(d, elementwise_affine=False, eps=1e-6)
        self.inp = nn.Linear(d, d)
        self.norm = nn.LayerNorm(d, eps=1e-6)
        self.head = nn.Linear(d, d)
        randomize_norms(self)

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        x = self.inp(x)
        for blk, ada in zip(self.blocks, self.ada):
            sh1, sc1, g1, sh2, sc2, g2 = ada(F.silu(c))[:, None, :].chunk(6, dim=-1)
            if not self.gated:
                g1 = g2 = 1.0
            x = x + g1 * blk.attn(blk.ln_1(x) * (1 + sc1) + sh1)
            x = x + g2 * blk.mlp(blk.ln_2(x) * (1 + sc2) + sh2)
        return self.head(self.norm(x))


def _ids(cfg: PreLNConfig, batch: int = 2, seq: int | None = None) -> torch.Tensor:
    gen = torch.Generator().manual_seed(1)
    return torch.randint(0, cfg.vocab_size, (batch, seq or cfg.context), generator=gen)


def gpt(**kw) -> tuple[nn.Module, tuple]:
    """A ``PreLNGPT`` with ``PreLNConfig(**kw)`` and example ids ``[2, context]``."""
    cfg = PreLNConfig(**kw)
    return PreLNGPT(cfg).eval(), (_ids(cfg),)


@register("prenorm-gpt", "Pre-LN GPT (2x32, learned positions, tied head), random weights")
def prenorm_gpt():
    return gpt()


@register("prenorm-gpt-untied", "Pre-LN GPT (2x32, learned positions, untied head), random weights")
def prenorm_gpt_untied():
    return gpt(tied=False)


@register("prenorm-gpt-parallel", "Pre-LN GPT with parallel attention/MLP blocks (2x32), random weights")
def prenorm_gpt_parallel():
    return gpt(parallel=True, tied=False)


@register("postnorm-gpt", "Post-LN GPT (2x32, BERT-style norms on the stream), random weights")
def postnorm_gpt():
    return gpt(post_ln=True, tied=False)


@register("prenorm-gpt-hidden", "Pre-LN GPT that also outputs the residual stream, random weights")
def prenorm_gpt_hidden():
    return gpt(output_hidden=True, tied=False)


@register("prenorm-gpt-12x768", "Pre-LN GPT at GPT-2-small scale (12x768, ctx 1024, tied), random weights")
def prenorm_gpt_12x768():
    cfg = PreLNConfig(vocab_size=256, context=1024, d_model=768, n_layer=12, n_head=12)
    model = PreLNGPT(cfg)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(std=0.02)
    return model.eval(), (_ids(cfg, 1, 128),)


@register("prenorm-vit", "Pre-LN ViT (patch conv, cls token, learned positions, 2x32), random weights")
def prenorm_vit():
    gen = torch.Generator().manual_seed(2)
    return PreLNViT().eval(), (torch.randn(2, 3, 16, 16, generator=gen),)


@register("adaln-transformer", "adaLN-Zero transformer (data-dependent gates on the stream), random weights")
def adaln_transformer():
    gen = torch.Generator().manual_seed(3)
    return AdaLNTransformer().eval(), (torch.randn(2, 8, 32, generator=gen), torch.randn(2, 32, generator=gen))


@register("adaln-nogate-transformer", "adaLN modulation (data-dependent scale/shift of the norm outputs), no gates")
def adaln_nogate_transformer():
    gen = torch.Generator().manual_seed(3)
    return AdaLNTransformer(gated=False).eval(), (torch.randn(2, 8, 32, generator=gen), torch.randn(2, 32, generator=gen))
