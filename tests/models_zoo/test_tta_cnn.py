"""The trained tta-cnn: committed weights load without pickle and classify clean held-out
images as recorded; every corruption kind moves the data at every severity."""

from __future__ import annotations

import numpy as np
import torch

from models_zoo.tta_cnn import CORRUPTIONS, corrupt, labelled_batch, load_trained, metadata


def test_weights_reproduce_clean_accuracy():
    """Clean held-out accuracy of the committed weights (256 images) is within 2 points of
    the recorded one (2048 images)."""
    model = load_trained()
    x, y = labelled_batch(np.random.default_rng(123), 256)
    with torch.no_grad():
        acc = float((model(torch.from_numpy(x)).argmax(-1).numpy() == y).mean())
    assert acc >= metadata()["clean_accuracy_heldout_2048"] - 0.02


def test_corruptions_change_the_images():
    """Each corruption at each severity changes the images, stays in [-1, 1], and grows
    with severity (mean absolute change)."""
    x, _ = labelled_batch(np.random.default_rng(0), 8)
    for kind in CORRUPTIONS:
        d = [np.abs(corrupt(x, kind, s, np.random.default_rng(1)) - x).mean() for s in range(1, 6)]
        assert d[0] > 0 and all(b >= a for a, b in zip(d, d[1:])), kind
        assert corrupt(x, kind, 5, np.random.default_rng(1)).min() >= -1
