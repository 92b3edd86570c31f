"""Calibration data for the passes that need activations (``osplus``; usable by others).

``calibration_feeds(pass_name, view, context)`` returns model inputs by name, from, in
order of preference:

1. ``--calib FILE.npz`` / ``rewrite(..., calib=...)`` (``context.calib``): arrays named
   after the model's inputs (a single array for a single-input model may have any name);
2. ``context.example_inputs``, then the example inputs a torch model was captured with
   (for the zoo models these are real data, e.g. validation text for ``gpt-trained``);
3. seeded random inputs from the model's signature (token ids uniform over the table),
   with a logged warning: the rewrite stays exact, but statistics of random inputs say
   little about real activations.

``capture_rows(view, values, feeds, max_rows)`` runs the model once and returns every
requested activation flattened to ``[tokens, channels]`` in float64, evenly subsampled to
at most ``max_rows`` rows.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from rewriter.errors import BadInput
from rewriter.ir.view import GraphView
from rewriter.pass_api import Context
from rewriter.run.capture import capture
from rewriter.run.verify import input_specs, make_inputs

log = logging.getLogger(__name__)


def _input_names(view: GraphView) -> list[str]:
    return [s.name for s in input_specs(view)]


def calibration_feeds(pass_name: str, view: GraphView, context: Context) -> tuple[dict[str, np.ndarray], str]:
    """Model inputs for calibration and where they came from (``calib``, ``example``, ``random``)."""
    names = _input_names(view)
    if context.calib:
        data = {k: np.asarray(v) for k, v in dict(context.calib).items()}
        missing = [n for n in names if n not in data]
        if missing and len(names) == 1 and len(data) == 1:
            (arr,) = data.values()
            log.info("%s: calibration array %r used as model input %r", pass_name, next(iter(data)), names[0])
            return {names[0]: arr}, "calib"
        if missing:
            raise BadInput(f"--calib: missing model input(s) {missing}; calibration arrays are named after the "
                           f"model inputs {names} (got {sorted(data)})")
        return {n: data[n] for n in names}, "calib"
    example = context.example_inputs
    if not example and getattr(view, "example_inputs", None):
        example = dict(zip(names, view.example_inputs))
    if example:
        feeds = {}
        for n in names:
            if n in example:
                x = example[n]
                feeds[n] = x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)
        if len(feeds) == len(names):
            log.info("%s: no --calib data: calibrating on the model's example inputs", pass_name)
            return feeds, "example"
    log.warning("%s: no calibration data (--calib FILE.npz): calibrating on seeded random inputs; the rewrite "
                "stays exact, but its statistics do not describe real activations", pass_name)
    feeds, _ = make_inputs(input_specs(view), seed=1234)
    return feeds, "random"


def capture_rows(view: GraphView, values: Sequence[Any], feeds: dict[str, np.ndarray],
                 max_rows: int | None = None) -> list[np.ndarray]:
    """The activations ``values`` take on ``feeds``, each ``[rows, channels]`` float64."""
    unique = list({id(v): v for v in values}.values())  # capture each value once
    by_id = dict(zip([id(v) for v in unique], capture(view, unique, feeds)))
    arrays = [by_id[id(v)] for v in values]
    out = []
    for a in arrays:
        a = np.asarray(a, dtype=np.float64)
        a = a.reshape(-1, a.shape[-1])
        if max_rows is not None and len(a) > max_rows:
            idx = np.linspace(0, len(a) - 1, max_rows).round().astype(np.int64)
            a = a[idx]
        out.append(a)
    return out
