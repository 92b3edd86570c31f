"""A rewritten transformer in a diffusers pipeline: the denoising step advanced from the
pipeline's own calls and reset per generation, for the torch path (a rewritten
GraphModule with ``RettentionState.set_step``) and the ONNX path (an onnxruntime session
fed ``rettention_step`` and the state inputs / outputs).

Torch::

    from rewriter import diffusers as rd

    example = rd.capture_call(pipe, prompt_embeds=..., ...)   # or a dict of the transformer's kwargs
    rw = rd.rewrite_transformer(pipe.transformer, example, options={"rettention": {"mask": "auto"}})
    with rd.installed(pipe, rw):
        images = pipe(prompt_embeds=..., num_inference_steps=20).images

ONNX::

    path = rd.export_onnx(pipe.transformer, example, "transformer.onnx")
    res = rewriter.rewrite(str(path), ["rettention"], options=...)
    rw = rd.OnnxTransformer(res.model, pipe.transformer.config)
    with rd.installed(pipe, rw):
        ...

``example`` is the keyword call the pipeline makes (``hidden_states``, ``timestep``,
``encoder_hidden_states``, ...), at the shapes it will make it: the rewritten graph is
specialised to them (the classifier-free-guidance batch, the resolution, the frames).
Tensor arguments become the graph's inputs in the example's order; everything else
(``None``, flags, the ``added_cond_kwargs`` of PixArt, a precomputed rotary embedding) is
fixed at rewrite time and must not change between calls.

The step. ``PipelineTransformer`` counts its calls: call ``i`` since the last reset is
denoising step ``i`` of the Re-ttention schedule (``backends/rettention_spec.py``).
``installed(pipe, rw)`` puts it in the place of ``pipe.transformer`` and wraps
``pipe.scheduler.set_timesteps``, which every diffusers pipeline calls once at the start of
a generation, so the count and the carried state restart per generation. This holds for
pipelines that make one transformer call per denoising step with the guidance halves
batched (PixArt-alpha / Sigma, CogVideoX, DiT, Hunyuan-DiT); a sampler that evaluates the
model several times per step (Heun) or guidance run as separate calls would need the
step set by hand (``rw.step = i`` before the call; ``rw.reset()``).

diffusers itself is an optional dependency: only ``Transformer2DModelOutput`` (for
``return_dict=True``) is taken from it when it is installed.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import logging
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from backends.ort.rettention import RettentionRunner
from passes.rettention_runtime import state_module
from rewriter.api import rewrite

log = logging.getLogger(__name__)


def split_call(example: Mapping[str, Any]) -> tuple[list[str], tuple[torch.Tensor, ...], dict[str, Any]]:
    """``(names, tensors, fixed)``: the tensor keyword arguments of ``example`` (the graph's
    inputs, in order) and the rest (fixed at rewrite time)."""
    names, tensors, fixed = [], [], {}
    for k, v in example.items():
        if k == "return_dict":
            continue
        if isinstance(v, torch.Tensor):
            names.append(k)
            tensors.append(v)
        else:
            fixed[k] = v
    return names, tuple(tensors), fixed


class _Captured(Exception):
    pass


def capture_call(pipe: Any, **call_kwargs) -> dict[str, Any]:
    """The keyword call ``pipe(**call_kwargs)`` makes to its transformer at the first
    denoising step (the pipeline is stopped there): the ``example`` of ``rewrite_transformer``
    and ``export_onnx``, at the shapes of that generation."""
    transformer = pipe.transformer
    forward = transformer.forward
    seen: dict[str, Any] = {}

    sig = inspect.signature(forward)

    def spy(*args, **kwargs):
        seen.update(sig.bind_partial(*args, **kwargs).arguments)
        raise _Captured

    transformer.forward = spy
    try:
        pipe(**call_kwargs)
    except _Captured:
        pass
    finally:
        del transformer.forward
    if not seen:
        raise ValueError("the pipeline did not call its transformer")
    return {k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in seen.items()}


class CallAdapter(nn.Module):
    """``transformer(**kwargs)`` as a positional module: ``forward(*tensors) -> sample``."""

    def __init__(self, transformer: nn.Module, names: Sequence[str], fixed: Mapping[str, Any]):
        super().__init__()
        self.transformer = transformer
        self.names = list(names)
        self.fixed = dict(fixed)

    def forward(self, *tensors):
        out = self.transformer(**dict(zip(self.names, tensors)), **self.fixed, return_dict=False)
        return out[0] if isinstance(out, (tuple, list)) else out


def rewrite_transformer(transformer: nn.Module, example: Mapping[str, Any], passes: Sequence[str] = ("rettention",),
                        **rewrite_kwargs) -> TorchTransformer:
    """Rewrite ``transformer`` (torch path) at the call ``example`` and wrap the result for a
    pipeline. ``rewrite_kwargs`` go to ``rewriter.rewrite`` (``options``, ``verify``, ...);
    the ``Result`` is kept as ``.result``."""
    names, tensors, fixed = split_call(example)
    adapter = CallAdapter(transformer.eval(), names, fixed)
    result = rewrite(adapter, list(passes), example_inputs=tensors, **rewrite_kwargs)
    wrapped = TorchTransformer(result.model, transformer.config, names, dtype=transformer.dtype,
                               device=transformer.device)
    wrapped.result = result
    return wrapped


def export_onnx(transformer: nn.Module, example: Mapping[str, Any], path: str | Path, *, opset: int = 17) -> Path:
    """Export ``transformer`` at the call ``example`` with the TorchScript exporter (fixed
    shapes; the inputs are named after the keyword arguments)."""
    names, tensors, fixed = split_call(example)
    adapter = CallAdapter(transformer.eval(), names, fixed)
    path = Path(path)
    with torch.no_grad():
        torch.onnx.export(adapter, tensors, str(path), dynamo=False, opset_version=opset, input_names=names,
                          output_names=["sample"])
    return path


class PipelineTransformer(nn.Module):
    """What a pipeline sees in the place of its transformer: ``config``, ``dtype``,
    ``device``, ``cache_context`` and a call with the transformer's keywords that returns
    ``(sample,)``. Subclasses run one denoising step at ``self.step``; each call advances it."""

    def __init__(self, config: Any, names: Sequence[str], *, dtype: torch.dtype = torch.float32,
                 device: torch.device | str = "cpu"):
        super().__init__()
        self.config = config
        self.names = list(names)
        self._dtype, self._device = dtype, torch.device(device)
        self.step = 0
        self.calls = 0  # every call, over all generations (for reports and tests)

    @property
    def dtype(self) -> torch.dtype:
        return self._dtype

    @property
    def device(self) -> torch.device:
        return self._device

    @contextlib.contextmanager
    def cache_context(self, name: str) -> Iterator[None]:  # diffusers' cache hooks: nothing to do here
        yield

    def reset(self) -> None:
        """Start a new generation: step 0, no carried state."""
        self.step = 0

    def _run(self, tensors: list[torch.Tensor], step: int) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, *args, return_dict: bool = True, **kwargs):
        if args:
            kwargs = {**dict(zip(self.names, args)), **kwargs}
        missing = [n for n in self.names if n not in kwargs]
        if missing:
            raise TypeError(f"the rewritten transformer needs {', '.join(missing)} (it was rewritten with them)")
        out = self._run([kwargs[n] for n in self.names], self.step)
        self.step += 1
        self.calls += 1
        if not return_dict:
            return (out,)
        try:
            from diffusers.models.modeling_outputs import Transformer2DModelOutput
        except ImportError:  # pragma: no cover - diffusers is optional
            return (out,)
        return Transformer2DModelOutput(sample=out)


class TorchTransformer(PipelineTransformer):
    """A rewritten GraphModule (``rewrite_transformer``): ``set_step`` before each call."""

    def __init__(self, gm: nn.Module, config: Any, names: Sequence[str], **kw):
        super().__init__(config, names, **kw)
        self.gm = gm

    def reset(self) -> None:
        super().reset()
        state_module(self.gm).reset()

    @torch.no_grad()
    def _run(self, tensors, step):
        state_module(self.gm).set_step(step)
        return self.gm(*tensors)


_ORT_DTYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(double)": np.float64,
               "tensor(int64)": np.int64, "tensor(int32)": np.int32, "tensor(bool)": np.bool_}


class OnnxTransformer(PipelineTransformer):
    """A rewritten ONNX transformer (a path, ``onnx.ModelProto`` or ``onnx_ir.Model``) run by
    onnxruntime through ``RettentionRunner``; ``names`` default to the model's inputs
    other than the Re-ttention protocol's."""

    def __init__(self, model: Any, config: Any, names: Sequence[str] | None = None, *, optimize: bool = True,
                 threads: int | None = None, **kw):
        runner = RettentionRunner(str(model) if isinstance(model, Path) else model, optimize=optimize,
                                  threads=threads)
        inputs = [i for i in runner.session.get_inputs() if not i.name.startswith("rettention_")]
        super().__init__(config, names or [i.name for i in inputs], **kw)
        self.runner = runner
        self._types = {i.name: _ORT_DTYPES.get(i.type, np.float32) for i in inputs}

    def reset(self) -> None:
        super().reset()
        self.runner.reset()

    def _run(self, tensors, step):
        feeds = {n: np.ascontiguousarray(t.detach().cpu().numpy().astype(self._types.get(n, np.float32)))
                 for n, t in zip(self.names, tensors) if n in self._types}
        out = self.runner(feeds, step)
        return torch.from_numpy(next(iter(out.values()))).to(self.dtype)


@contextlib.contextmanager
def installed(pipe: Any, transformer: PipelineTransformer) -> Iterator[PipelineTransformer]:
    """``pipe.transformer`` is ``transformer`` inside the block, and each generation (each
    ``pipe.scheduler.set_timesteps``) starts it from step 0 with no state; both undone on exit."""
    original, scheduler = pipe.transformer, pipe.scheduler
    set_timesteps = scheduler.set_timesteps

    @functools.wraps(set_timesteps)
    def restart(*args, **kwargs):
        transformer.reset()
        return set_timesteps(*args, **kwargs)

    scheduler.set_timesteps = restart
    pipe.transformer = transformer
    try:
        yield transformer
    finally:
        pipe.transformer = original
        del scheduler.set_timesteps  # the instance attribute; the class method shows again
