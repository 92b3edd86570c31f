"""Evaluation helpers for the trained zoo models (used by tests and by later passes).

GPT
    ``perplexity(model, split)``: exp of the mean next-byte cross-entropy over a fixed
    set of ``n_windows`` evenly spaced, non-random windows of the committed ``split``
    (``"train"`` or ``"val"``). Deterministic and takes about a second.

DiT
    ``sample(model, seed, steps)``: deterministic Euler sampler of the rectified-flow
    ODE from pure noise (``t = 1``) to data (``t = 0``); the model predicts the velocity
    ``noise - x0``. ``psnr(a, b)`` and ``ssim(a, b)`` compare two batches of samples in
    ``[-1, 1]``; ``palette_error(images)`` measures how far pixels are from the flat
    colours of the training images (a cheap, label-free structure score).

Attention
    ``attention_maps(model, *inputs)`` returns the attention probabilities ``[B, H, N,
    N]`` of every attention module (any module with an ``attention_probs`` method) for
    one forward pass; ``attention_entropy(maps)`` averages the Shannon entropy of their
    rows and returns it with the value for uniform attention (``log N`` when full).
"""

from __future__ import annotations

import math
import struct
import zlib
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from models_zoo.corpus import load_split
from models_zoo.shapes import PALETTE

__all__ = [
    "attention_entropy",
    "attention_maps",
    "palette_error",
    "perplexity",
    "png_grid",
    "psnr",
    "sample",
    "save_png_grid",
    "ssim",
]


# --------------------------------------------------------------------------- GPT


@torch.no_grad()
def perplexity(
    model: nn.Module,
    split: str = "val",
    *,
    n_windows: int = 64,
    context: int | None = None,
    batch: int = 16,
) -> float:
    """Byte-level perplexity of ``model`` on ``n_windows`` fixed windows of ``split``."""
    if context is None:
        context = model.cfg.context
    data = load_split(split).to(torch.int64)
    last = data.numel() - context - 1
    starts = torch.linspace(0, last, n_windows).round().to(torch.int64)
    idx = starts[:, None] + torch.arange(context + 1)
    total, count = 0.0, 0
    was_training = model.training
    model.eval()
    for i in range(0, n_windows, batch):
        chunk = data[idx[i : i + batch]]
        logits = model(chunk[:, :-1])
        nll = F.cross_entropy(
            logits.reshape(-1, logits.shape[-1]).double(), chunk[:, 1:].reshape(-1), reduction="sum"
        )
        total += nll.item()
        count += chunk[:, 1:].numel()
    model.train(was_training)
    return math.exp(total / count)


# --------------------------------------------------------------------------- DiT


@torch.no_grad()
def sample(
    model: nn.Module,
    seed: int = 0,
    steps: int = 25,
    *,
    n: int = 8,
    return_trajectory: bool = False,
):
    """``n`` images ``[n, C, H, W]`` (about ``[-1, 1]``) drawn with a fixed ``seed``.

    Euler steps of ``dx/dt = v(x, t)`` on the uniform grid ``t = 1, 1 - 1/steps, ..., 0``.
    The noise comes from a CPU ``torch.Generator`` seeded with ``seed``, so the result
    depends only on the model, ``seed``, ``steps`` and ``n``. With
    ``return_trajectory=True`` also returns the list of ``(x_t, t)`` model inputs.
    """
    cfg = model.cfg
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, cfg.channels, cfg.image_size, cfg.image_size, generator=gen)
    ts = torch.linspace(1.0, 0.0, steps + 1)
    trajectory = []
    was_training = model.training
    model.eval()
    for i in range(steps):
        t = ts[i].expand(n).contiguous()
        if return_trajectory:
            trajectory.append((x.clone(), t.clone()))
        v = model(x, t)
        x = x + (ts[i + 1] - ts[i]) * v
    model.train(was_training)
    return (x, trajectory) if return_trajectory else x


def psnr(a: torch.Tensor, b: torch.Tensor, data_range: float = 2.0) -> float:
    """Peak signal-to-noise ratio in dB between two image batches (range ``[-1, 1]``)."""
    mse = F.mse_loss(a.double(), b.double()).item()
    if mse == 0.0:
        return math.inf
    return 10.0 * math.log10(data_range**2 / mse)


def _gaussian_window(size: int = 11, sigma: float = 1.5) -> torch.Tensor:
    coords = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-(coords**2) / (2 * sigma**2))
    g = g / g.sum()
    return g[:, None] * g[None, :]


def ssim(a: torch.Tensor, b: torch.Tensor, data_range: float = 2.0) -> float:
    """Mean structural similarity (Gaussian window 11, sigma 1.5, per channel)."""
    a, b = a.double(), b.double()
    c = a.shape[1]
    win = _gaussian_window().expand(c, 1, 11, 11).contiguous()

    def blur(x):
        return F.conv2d(x, win, groups=c)

    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    mu_a, mu_b = blur(a), blur(b)
    var_a = blur(a * a) - mu_a**2
    var_b = blur(b * b) - mu_b**2
    cov = blur(a * b) - mu_a * mu_b
    num = (2 * mu_a * mu_b + c1) * (2 * cov + c2)
    den = (mu_a**2 + mu_b**2 + c1) * (var_a + var_b + c2)
    return (num / den).mean().item()


def palette_error(images: torch.Tensor) -> float:
    """Mean distance (RGB, ``[-1, 1]`` units) of each pixel to its nearest palette colour.

    Training images of ``models_zoo.shapes`` are flat regions of palette colours, so
    they score 0 (up to anti-aliasing); Gaussian noise scores about 1; blurry or
    unstructured samples score in between.
    """
    pal = torch.as_tensor(PALETTE, dtype=torch.float64) * 2 - 1  # [K, 3]
    px = images.double().clamp(-1, 1).permute(0, 2, 3, 1).reshape(-1, 3)
    return torch.cdist(px, pal).min(dim=1).values.mean().item()


# --------------------------------------------------------------------------- attention


@torch.no_grad()
def attention_maps(model: nn.Module, *inputs) -> list[torch.Tensor]:
    """Attention probabilities ``[B, H, N, N]`` of each attention module, in order.

    Hooks every submodule that has an ``attention_probs(x)`` method, records its input
    during one forward pass and recomputes the probabilities the forward pass used.
    """
    modules = [m for m in model.modules() if callable(getattr(m, "attention_probs", None))]
    captured: list[torch.Tensor | None] = [None] * len(modules)

    def make_hook(i):
        def hook(_mod, args):
            captured[i] = args[0].detach()

        return hook

    handles = [m.register_forward_pre_hook(make_hook(i)) for i, m in enumerate(modules)]
    was_training = model.training
    model.eval()
    try:
        model(*inputs)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return [m.attention_probs(x) for m, x in zip(modules, captured, strict=True)]


def attention_entropy(
    maps: list[torch.Tensor] | torch.Tensor, *, causal: bool = False
) -> tuple[float, float]:
    """``(mean entropy, uniform reference)`` of attention rows, in nats.

    The mean runs over layers, batch, heads and query rows. The reference is the same
    mean for uniform attention: ``log N`` for full attention, the mean over rows ``r``
    of ``log(r + 1)`` for causal attention (``causal=True``).
    """
    if isinstance(maps, torch.Tensor):
        maps = [maps]
    values, refs = [], []
    for p in maps:
        p = p.double()
        n = p.shape[-1]
        ent = -(p * torch.log(p.clamp_min(1e-300))).sum(-1)  # [B, H, N]
        values.append(ent.mean())
        if causal:
            refs.append(torch.log(torch.arange(1, n + 1, dtype=torch.float64)).mean())
        else:
            refs.append(torch.tensor(math.log(n), dtype=torch.float64))
    return torch.stack(values).mean().item(), torch.stack(refs).mean().item()


# --------------------------------------------------------------------------- images


def save_png_grid(images: torch.Tensor, path, *, nrow: int = 8, scale: int = 2, pad: int = 2) -> None:
    """Write ``images`` (``[N, 3, H, W]`` in ``[-1, 1]``) as one PNG grid (stdlib only)."""
    Path(path).write_bytes(png_grid(images, nrow=nrow, scale=scale, pad=pad))


def png_grid(images: torch.Tensor, *, nrow: int = 8, scale: int = 2, pad: int = 2) -> bytes:
    """``images`` (``[N, 3, H, W]`` in ``[-1, 1]``) as the bytes of one PNG grid, ``nrow``
    images a row, each pixel ``scale`` x ``scale``, white ``pad`` between (stdlib only)."""
    imgs = ((images.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    imgs = imgs.repeat_interleave(scale, dim=2).repeat_interleave(scale, dim=3)
    n, c, h, w = imgs.shape
    ncol = min(nrow, n)
    nrows = (n + ncol - 1) // ncol
    grid = torch.full((c, nrows * (h + pad) + pad, ncol * (w + pad) + pad), 255, dtype=torch.uint8)
    for i in range(n):
        r, col = divmod(i, ncol)
        y0, x0 = pad + r * (h + pad), pad + col * (w + pad)
        grid[:, y0 : y0 + h, x0 : x0 + w] = imgs[i]
    height, width = grid.shape[1:]
    rows = grid.permute(1, 2, 0).reshape(height, width * c).numpy()
    raw = b"".join(b"\x00" + row.tobytes() for row in rows)

    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw, 9)) + chunk(b"IEND", b"")
