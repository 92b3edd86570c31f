"""Pre-norm transformers whose norms use frozen statistics: Unified Normalization,
PowerNorm and BatchNorm (the ``foldnorm`` targets of transformer shape).

* ``UnifiedNorm`` at inference is ``gamma * x / sqrt(running_var + eps) + beta``: the
  running statistic is the raw second moment, there is no centring. In training it uses
  the batch second moment over tokens and updates ``running_var`` by an EMA.
* ``PowerNorm`` at inference is ``gamma * GS(x) / sqrt(running_phi + eps) + beta`` where
  ``GS`` (group scaling) divides by the RMS over channel groups of each token: that part
  is data-dependent and stays; only the affine after it folds.
* ``BatchNorm`` over ``[B, N, C]`` activations is applied the way such models do it:
  transpose to ``[B, C, N]``, ``BatchNorm1d``, transpose back.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from models_zoo import register


class UnifiedNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-5, momentum: float = 0.9):
        super().__init__()
        self.eps, self.momentum = eps, momentum
        self.weight = nn.Parameter(torch.ones(dim))
        self.bias = nn.Parameter(torch.zeros(dim))
        self.register_buffer("running_var", torch.ones(dim))

    def forward(self, x):
        if self.training:
            x2 = x.pow(2).reshape(-1, x.shape[-1]).mean(0)
            with torch.no_grad():
                self.running_var.mul_(self.momentum).add_((1 - self.momentum) * x2)
            var = x2
        else:
            var = self.running_var
        return x / torch.sqrt(var + self.eps) * self.weight + self.bias


class PowerNorm(nn.Module):
    def __init__(self, dim: int, groups: int = 4, eps: float = 1e-5):
        super().__init__()
        self.groups, self.eps = groups, eps
        self.weight = nn.Parameter(torch.ones(dim))
        self.bias = nn.Parameter(torch.zeros(dim))
        self.register_buffer("running_phi", torch.ones(dim))

    def group_scaling(self, x):
        shape = x.shape
        g = x.reshape(*shape[:-1], self.groups, shape[-1] // self.groups)
        g = g / torch.sqrt(g.pow(2).mean(-1, keepdim=True) + self.eps)
        return g.reshape(shape)

    def forward(self, x):
        x = self.group_scaling(x)
        return x / torch.sqrt(self.running_phi + self.eps) * self.weight + self.bias


class TransposedBatchNorm(nn.Module):
    """BatchNorm1d over the channel axis of ``[B, N, C]``, through transposes."""

    def __init__(self, dim: int):
        super().__init__()
        self.bn = nn.BatchNorm1d(dim)

    def forward(self, x):
        return self.bn(x.transpose(1, 2)).transpose(1, 2)


class Block(nn.Module):
    def __init__(self, dim: int, heads: int, norm):
        super().__init__()
        self.heads = heads
        self.norm1, self.norm2 = norm(dim), norm(dim)
        self.q, self.k, self.v = (nn.Linear(dim, dim) for _ in range(3))
        self.proj = nn.Linear(dim, dim)
        self.fc1, self.fc2 = nn.Linear(dim, 4 * dim), nn.Linear(4 * dim, dim)

    def forward(self, x):
        b, n, d = x.shape
        h = self.norm1(x)
        q, k, v = (f(h).reshape(b, n, self.heads, d // self.heads).transpose(1, 2) for f in (self.q, self.k, self.v))
        a = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, d)
        x = x + self.proj(a)
        return x + self.fc2(F.gelu(self.fc1(self.norm2(x))))


class NormTransformer(nn.Module):
    """Token embedding, learned positions, pre-norm blocks, final norm, head."""

    def __init__(self, norm, vocab: int = 97, dim: int = 64, depth: int = 2, heads: int = 4, seq: int = 16):
        super().__init__()
        self.tok = nn.Embedding(vocab, dim)
        self.pos = nn.Parameter(torch.randn(1, seq, dim) * 0.02)
        self.blocks = nn.ModuleList(Block(dim, heads, norm) for _ in range(depth))
        self.norm = norm(dim)
        self.head = nn.Linear(dim, vocab)
        _randomize_stats(self)

    def forward(self, ids):
        x = self.tok(ids) + self.pos[:, : ids.shape[1]]
        for blk in self.blocks:
            x = blk(x)
        return self.head(self.norm(x))


def _randomize_stats(model: nn.Module) -> None:
    """Frozen statistics and affine far from their initial values, as after training."""
    with torch.no_grad():
        for m in model.modules():
            for name in ("running_var", "running_phi"):
                if hasattr(m, name):
                    getattr(m, name).copy_(torch.rand_like(getattr(m, name)) * 2 + 0.25)
            if hasattr(m, "running_mean") and m.running_mean is not None:
                m.running_mean.copy_(torch.randn_like(m.running_mean) * 0.3)
            if isinstance(m, (UnifiedNorm, PowerNorm, nn.BatchNorm1d)):
                m.weight.copy_(torch.randn_like(m.weight) * 0.3 + 1)
                m.bias.copy_(torch.randn_like(m.bias) * 0.1)


def _ids(vocab=97, seq=16, batch=2):
    return (torch.randint(0, vocab, (batch, seq)),)


@register("un-transformer", "pre-norm transformer with Unified Normalization (frozen second moment)")
def un_transformer():
    return NormTransformer(UnifiedNorm), _ids()


@register("powernorm-transformer", "pre-norm transformer with PowerNorm (group scaling + frozen running_phi)")
def powernorm_transformer():
    return NormTransformer(PowerNorm), _ids()


@register("bn-transformer", "pre-norm transformer with BatchNorm1d applied through transposes")
def bn_transformer(dim: int = 64, depth: int = 2, seq: int = 16):
    return NormTransformer(TransposedBatchNorm, dim=dim, depth=depth, seq=seq, heads=4), _ids(seq=seq)
