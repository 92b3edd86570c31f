"""torch <-> numpy for every dtype a model may hold: numpy has no bfloat16, so bfloat16
tensors become ``ml_dtypes.bfloat16`` arrays (same bits) and back."""

from __future__ import annotations

from typing import Any

import ml_dtypes
import numpy as np
import torch


def to_numpy(t: Any) -> np.ndarray:
    """A tensor as an array; bfloat16 as an ``ml_dtypes.bfloat16`` array."""
    t = torch.as_tensor(t).detach().cpu()
    if t.dtype == torch.bfloat16:
        return t.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    return t.numpy()


def to_torch(a: Any) -> torch.Tensor:
    """The inverse of ``to_numpy`` (a tensor passes through)."""
    if isinstance(a, torch.Tensor):
        return a
    a = np.ascontiguousarray(a)
    if a.dtype == ml_dtypes.bfloat16:
        return torch.from_numpy(a.view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(a)
