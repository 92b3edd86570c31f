"""A small trained BatchNorm CNN and a covariate shift to measure test-time BatchNorm on.

Data (``labelled_batch``): the zoo's procedural flat-colour images (``models_zoo/shapes.py``
style, numpy only, seeded) with one shape each, labelled by kind and size: 6 classes
(disc / square / triangle x small / large radius). Colours of background and shape are
random, so the network must read shape, not colour. Training images carry mild pixel
noise (sigma 0.03) and a random brightness / contrast jitter of a few percent, as
natural training sets do.

Shift (``corrupt``): the four ImageNet-C kinds that act on the statistics BatchNorm
tracks, at five severities each, on images in ``[-1, 1]`` (clipped back to it):

* ``noise``:      ``x + N(0, s^2)``,  s = 0.08, 0.16, 0.26, 0.38, 0.55
* ``blur``:       Gaussian blur, sigma = 0.5, 0.8, 1.1, 1.5, 2.0 px (reflect padding)
* ``brightness``: ``x + b``,  b = 0.15, 0.3, 0.45, 0.6, 0.75
* ``contrast``:   ``(x - mean(x)) * c + mean(x)``,  c = 0.7, 0.5, 0.35, 0.25, 0.15

Model (``TtaCnn``, ``tta-cnn``): four 3x3 conv + BatchNorm2d + ReLU stages (16, 32, 64, 64
channels, stride 2 from the second), global average pool, a linear head; 61 k parameters.
Trained weights: ``weights/tta_cnn.safetensors`` (config, accuracy and the training record
in ``weights/tta_cnn.json``), made by ``python -m models_zoo.train_tta``.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from torch import nn
from safetensors.torch import load_file

from models_zoo import register
from models_zoo.shapes import PALETTE

WEIGHTS_DIR = Path(__file__).parent / "weights"
TTA_WEIGHTS = WEIGHTS_DIR / "tta_cnn.safetensors"
TTA_META = WEIGHTS_DIR / "tta_cnn.json"

CLASSES = 6
SIZE = 32
CORRUPTIONS = {
    "noise": (0.08, 0.16, 0.26, 0.38, 0.55),
    "blur": (0.5, 0.8, 1.1, 1.5, 2.0),
    "brightness": (0.15, 0.3, 0.45, 0.6, 0.75),
    "contrast": (0.7, 0.5, 0.35, 0.25, 0.15),
}


def labelled_batch(rng: np.random.Generator, n: int, size: int = SIZE, *, labels: np.ndarray | None = None,
                   jitter: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """``n`` images ``[n, 3, size, size]`` in ``[-1, 1]`` and their labels ``[n]`` (int64):
    ``label = 2 * kind + large``. ``labels`` fixes the classes (a label-shifted stream)."""
    k = len(PALETTE)
    y = rng.integers(0, CLASSES, n) if labels is None else np.asarray(labels, dtype=np.int64)
    kind, large = y // 2, y % 2
    yy, xx = np.meshgrid(np.arange(size) + 0.5, np.arange(size) + 0.5, indexing="ij")
    yy, xx = yy[None], xx[None]
    bg = rng.integers(0, k, n)
    colour = (bg + rng.integers(1, k, n)) % k
    r = np.where(large == 1, rng.uniform(0.25, 0.32, n), rng.uniform(0.12, 0.18, n)) * size
    cx = rng.uniform(0.35 * size, 0.65 * size, n)[:, None, None]
    cy = rng.uniform(0.35 * size, 0.65 * size, n)[:, None, None]
    r = r[:, None, None]
    dx, dy = xx - cx, yy - cy
    disc = dx**2 + dy**2 <= r**2
    square = (np.abs(dx) <= 0.8 * r) & (np.abs(dy) <= 0.8 * r)
    depth = (dy + r) / (1.8 * r)
    triangle = (depth >= 0) & (depth <= 1) & (np.abs(dx) <= depth * r)
    kk = kind[:, None, None]
    mask = np.where(kk == 0, disc, np.where(kk == 1, square, triangle))
    img = np.where(mask[:, None], PALETTE[colour][:, :, None, None], PALETTE[bg][:, :, None, None])
    img = img * 2.0 - 1.0
    if jitter:
        c = rng.uniform(0.9, 1.1, (n, 1, 1, 1))
        b = rng.uniform(-0.05, 0.05, (n, 1, 1, 1))
        img = img * c + b + rng.normal(0.0, 0.03, img.shape)
    return np.clip(img, -1, 1).astype(np.float32), y.astype(np.int64)


def _blur(x: np.ndarray, sigma: float) -> np.ndarray:
    r = max(1, int(np.ceil(3 * sigma)))
    t = np.arange(-r, r + 1)
    k = np.exp(-0.5 * (t / sigma) ** 2)
    k /= k.sum()
    pad = np.pad(x, ((0, 0), (0, 0), (r, r), (r, r)), mode="reflect")
    h = sum(k[i] * pad[:, :, :, i : i + x.shape[3]] for i in range(2 * r + 1))
    return sum(k[i] * h[:, :, i : i + x.shape[2], :] for i in range(2 * r + 1))


def corrupt(x: np.ndarray, kind: str, severity: int, rng: np.random.Generator) -> np.ndarray:
    """``x`` (``[-1, 1]``) under corruption ``kind`` at ``severity`` 1..5 (see the module doc)."""
    s = CORRUPTIONS[kind][severity - 1]
    if kind == "noise":
        y = x + rng.normal(0.0, s, x.shape)
    elif kind == "blur":
        y = _blur(x, s)
    elif kind == "brightness":
        y = x + s
    elif kind == "contrast":
        m = x.mean(axis=(1, 2, 3), keepdims=True)
        y = (x - m) * s + m
    else:
        raise ValueError(f"unknown corruption {kind!r}")
    return np.clip(y, -1, 1).astype(np.float32)


class TtaCnn(nn.Module):
    def __init__(self, classes: int = CLASSES, widths: tuple[int, ...] = (16, 32, 64, 64)):
        super().__init__()
        layers: list[nn.Module] = []
        cin = 3
        for i, w in enumerate(widths):
            layers += [nn.Conv2d(cin, w, 3, stride=1 if i == 0 else 2, padding=1, bias=False),
                       nn.BatchNorm2d(w), nn.ReLU()]
            cin = w
        self.features = nn.Sequential(*layers)
        self.head = nn.Linear(cin, classes)

    def forward(self, x):
        return self.head(self.features(x).mean(dim=(2, 3)))


def load_trained(weights: str | Path = TTA_WEIGHTS) -> TtaCnn:
    model = TtaCnn()
    model.load_state_dict(load_file(str(weights)))
    return model.eval()


def metadata() -> dict:
    return json.loads(TTA_META.read_text())


@register("tta-cnn", "trained 4-stage conv+BatchNorm CNN (6-class procedural shapes; test-time BN target)",
          trained=True)
def tta_cnn():
    model = load_trained() if TTA_WEIGHTS.exists() else TtaCnn()
    return model, (torch.from_numpy(labelled_batch(np.random.default_rng(0), 4)[0]),)
