"""A tiny diffusion transformer (DiT) trained on procedural shapes, in two variants.

Common part (``TinyDiT``)
    ``32 x 32 x 3`` images -> patchify (``nn.Conv2d``, patch 2, stride 2) -> 256 tokens
    of width ``d_model`` + fixed 2-D sin-cos positions -> ``n_layer`` blocks -> final
    norm + ``nn.Linear`` to ``patch * patch * 3`` values per token -> unpatchify. The
    timestep ``t`` in ``[0, 1]`` (float ``[B]``) goes through a sinusoidal embedding
    and a two-layer MLP to a vector ``c`` of width ``d_model``. Self-attention is
    ``F.scaled_dot_product_attention`` (full, non-causal) with separate q/k/v/out
    ``nn.Linear`` projections; ``SelfAttention.attention_probs`` recomputes the
    probabilities (see ``models_zoo.eval.attention_maps``).

    Objective: rectified flow / flow matching with velocity prediction. With data
    ``x0``, noise ``e`` and ``x_t = (1 - t) x0 + t e`` the model predicts ``v = e - x0``;
    ``models_zoo.eval.sample`` integrates ``dx/dt = v`` from ``t = 1`` to ``0`` with
    Euler steps (deterministic for a given seed).

``conditioning="adaln"`` (``AdaLNBlock``, zoo ``dit-trained``)
    DiT's adaLN-Zero: ``nn.LayerNorm`` without affine, then per-block shift/scale/gate
    vectors ``SiLU(c) -> nn.Linear(d, 6d)`` (zero-initialised) modulate the normalised
    input and gate each branch's output channel-wise. The gate makes the residual
    update data-dependent per channel, so the residual stream is not zero-mean.

``conditioning="additive"`` (``PreNormBlock``, zoo ``dit-trained-additive``)
    ``c`` is added to every token once, after patchify (``x = patch(x) + pos + c``); the
    blocks are plain pre-norm blocks with affine ``nn.LayerNorm``
    (``x + attn(ln_1(x))``, ``x + mlp(ln_2(x))``) and no modulation, and the head is
    ``nn.LayerNorm`` + ``nn.Linear``. Every write into the residual stream ends in an
    ``nn.Linear`` (patch conv, time MLP, out projections) or a constant (positions), so
    LayerNorm -> (C)RMSNorm rewrites that re-centre those writers apply.

``forward(x [B, 3, 32, 32] float, t [B] float)`` returns the velocity, same shape as
``x``; no control flow on tensor values, so both variants pass ``torch.export.export``.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn

from models_zoo import register
from models_zoo.gpt import MLP, SelfAttention

__all__ = [
    "AdaLNBlock",
    "DiTConfig",
    "PreNormBlock",
    "SelfAttention",
    "TimestepEmbedder",
    "TinyDiT",
    "load_trained_dit",
]

log = logging.getLogger(__name__)

WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"
VARIANT_FILES = {"adaln": "dit_trained", "additive": "dit_trained_additive"}


@dataclasses.dataclass(frozen=True)
class DiTConfig:
    image_size: int = 32
    channels: int = 3
    patch: int = 2
    d_model: int = 96
    n_layer: int = 4
    n_head: int = 4
    mlp_ratio: int = 4
    freq_dim: int = 128
    conditioning: str = "adaln"  # "adaln" (adaLN-Zero) or "additive"

    @property
    def grid(self) -> int:
        return self.image_size // self.patch

    @property
    def num_tokens(self) -> int:
        return self.grid**2


def sincos_2d(d_model: int, grid: int) -> torch.Tensor:
    """Fixed 2-D sin-cos position table ``[grid * grid, d_model]`` (rows then columns)."""
    if d_model % 4:
        raise ValueError("d_model must be divisible by 4")
    quarter = d_model // 4
    omega = 1.0 / 10000 ** (torch.arange(quarter, dtype=torch.float64) / quarter)
    coords = torch.arange(grid, dtype=torch.float64)
    yy, xx = torch.meshgrid(coords, coords, indexing="ij")

    def enc(pos):
        ang = pos.reshape(-1, 1) * omega[None]
        return torch.cat([ang.sin(), ang.cos()], dim=1)

    return torch.cat([enc(yy), enc(xx)], dim=1).float()


class TimestepEmbedder(nn.Module):
    """``t`` in ``[0, 1]`` -> sinusoidal features of ``1000 t`` -> Linear-SiLU-Linear."""

    def __init__(self, d_model: int, freq_dim: int = 128):
        super().__init__()
        half = freq_dim // 2
        freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float32) / half)
        self.register_buffer("freqs", freqs, persistent=False)
        self.fc_in = nn.Linear(freq_dim, d_model)
        self.act = nn.SiLU()
        self.fc_out = nn.Linear(d_model, d_model)

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        args = t.to(torch.float32)[:, None] * 1000.0 * self.freqs[None, :]
        return self.fc_out(self.act(self.fc_in(torch.cat([args.cos(), args.sin()], dim=-1))))


class AdaLNBlock(nn.Module):
    """adaLN-Zero block: ``x + gate * branch(LN(x) * (1 + scale) + shift)`` twice."""

    def __init__(self, cfg: DiTConfig):
        super().__init__()
        d = cfg.d_model
        self.norm1 = nn.LayerNorm(d, elementwise_affine=False, eps=1e-6)
        self.attn = SelfAttention(d, cfg.n_head)
        self.norm2 = nn.LayerNorm(d, elementwise_affine=False, eps=1e-6)
        self.mlp = MLP(d, cfg.mlp_ratio * d)
        self.ada_act = nn.SiLU()
        self.ada_proj = nn.Linear(d, 6 * d)

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        mod = self.ada_proj(self.ada_act(c))[:, None, :]
        shift1, scale1, gate1, shift2, scale2, gate2 = mod.chunk(6, dim=-1)
        x = x + gate1 * self.attn(self.norm1(x) * (1 + scale1) + shift1)
        return x + gate2 * self.mlp(self.norm2(x) * (1 + scale2) + shift2)


class PreNormBlock(nn.Module):
    """Plain pre-LN block (no conditioning): ``x + attn(ln_1(x))``, ``x + mlp(ln_2(x))``."""

    def __init__(self, cfg: DiTConfig):
        super().__init__()
        d = cfg.d_model
        self.ln_1 = nn.LayerNorm(d, eps=1e-6)
        self.attn = SelfAttention(d, cfg.n_head)
        self.ln_2 = nn.LayerNorm(d, eps=1e-6)
        self.mlp = MLP(d, cfg.mlp_ratio * d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class TinyDiT(nn.Module):
    """Velocity-prediction DiT; ``forward(x [B,C,H,W], t [B]) -> v [B,C,H,W]``."""

    def __init__(self, cfg: DiTConfig = DiTConfig()):
        super().__init__()
        if cfg.conditioning not in ("adaln", "additive"):
            raise ValueError(f"unknown conditioning {cfg.conditioning!r}")
        self.cfg = cfg
        d, p = cfg.d_model, cfg.patch
        self.patch_embed = nn.Conv2d(cfg.channels, d, kernel_size=p, stride=p)
        self.register_buffer("pos_embed", sincos_2d(d, cfg.grid)[None], persistent=False)
        self.t_embed = TimestepEmbedder(d, cfg.freq_dim)
        block = AdaLNBlock if cfg.conditioning == "adaln" else PreNormBlock
        self.blocks = nn.ModuleList(block(cfg) for _ in range(cfg.n_layer))
        if cfg.conditioning == "adaln":
            self.final_norm = nn.LayerNorm(d, elementwise_affine=False, eps=1e-6)
            self.final_act = nn.SiLU()
            self.final_ada = nn.Linear(d, 2 * d)
        else:
            self.final_norm = nn.LayerNorm(d, eps=1e-6)
        self.head = nn.Linear(d, p * p * cfg.channels)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """DiT init: Xavier linears, N(0, 0.02) time MLP, zero modulation and head."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        w = self.patch_embed.weight
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(self.patch_embed.bias)
        nn.init.normal_(self.t_embed.fc_in.weight, std=0.02)
        nn.init.normal_(self.t_embed.fc_out.weight, std=0.02)
        zero = [self.head]
        if self.cfg.conditioning == "adaln":
            zero += [blk.ada_proj for blk in self.blocks] + [self.final_ada]
        for lin in zero:
            nn.init.zeros_(lin.weight)
            nn.init.zeros_(lin.bias)

    def unpatchify(self, tokens: torch.Tensor) -> torch.Tensor:
        cfg = self.cfg
        b = tokens.shape[0]
        g, p, c = cfg.grid, cfg.patch, cfg.channels
        x = tokens.reshape(b, g, g, p, p, c).permute(0, 5, 1, 3, 2, 4)
        return x.reshape(b, c, g * p, g * p)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        tokens = self.patch_embed(x).flatten(2).transpose(1, 2) + self.pos_embed
        c = self.t_embed(t)
        if self.cfg.conditioning == "adaln":
            for block in self.blocks:
                tokens = block(tokens, c)
            shift, scale = self.final_ada(self.final_act(c))[:, None, :].chunk(2, dim=-1)
            h = self.final_norm(tokens) * (1 + scale) + shift
        else:
            tokens = tokens + c[:, None, :]
            for block in self.blocks:
                tokens = block(tokens)
            h = self.final_norm(tokens)
        return self.unpatchify(self.head(h))


def num_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def weight_paths(conditioning: str) -> tuple[Path, Path]:
    stem = VARIANT_FILES[conditioning]
    return WEIGHTS_DIR / f"{stem}.safetensors", WEIGHTS_DIR / f"{stem}.json"


def load_trained_dit(conditioning: str = "adaln") -> TinyDiT:
    """The committed trained DiT of the given variant (eval mode), loaded without pickle."""
    weights, meta = weight_paths(conditioning)
    info = json.loads(meta.read_text())
    model = TinyDiT(DiTConfig(**info["config"]))
    model.load_state_dict(load_file(str(weights)), strict=True)
    log.debug("loaded %s (%d parameters)", weights, num_params(model))
    return model.eval()


def _example_inputs(cfg: DiTConfig, batch: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(batch, cfg.channels, cfg.image_size, cfg.image_size, generator=gen)
    return x, torch.full((batch,), 0.5)


@register(
    "dit-trained",
    "adaLN-Zero DiT (4x96, 32x32x3, patch 2 = 256 tokens, SDPA) trained on procedural shapes",
    trained=True,
)
def dit_trained():
    model = load_trained_dit("adaln")
    return model, _example_inputs(model.cfg)


@register(
    "dit-trained-additive",
    "DiT with additive time embedding and plain pre-LN blocks (4x96, 256 tokens), trained on shapes",
    trained=True,
)
def dit_trained_additive():
    model = load_trained_dit("additive")
    return model, _example_inputs(model.cfg)
