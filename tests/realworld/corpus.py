"""The real-world corpus: Hugging Face ``transformers`` and ``diffusers`` models built from tiny
configs with seeded random weights (no hub access), exported the ways people export them.

Architectures (``ARCHS``), each a small builder returning an ``Arch``: the module (wrapped to take
named tensors and return one tensor), its example inputs, and which input dims are dynamic.
Exporters (``EXPORTERS``):

* ``ts14`` / ``ts17``: the TorchScript exporter (``torch.onnx.export(..., dynamo=False)``) at
  opset 14 (LayerNorm decomposed into ReduceMean/Sub/Pow/...) and 17, with ``dynamic_axes``;
* ``dynamo18``: the dynamo exporter (``dynamo=True``, opset 18, its default optimizer on) with
  dynamic batch and sequence (``dynamic_shapes``);
* ``fx``: no file; the module is captured by ``torch.export`` (``rewriter``'s own capture, as
  ``rewriter.rewrite(module, passes, example_inputs=...)`` does).

``Corpus(tmpdir)`` builds each file once and caches it (and the ``fx`` capture) for the run.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import logging
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

EXPORTERS = ("ts14", "ts17", "dynamo18", "fx")

# the shapes of the example inputs and of the independent check (other batch / sequence where
# the file keeps them dynamic)
BATCH, SEQ = 2, 8
CHECK_BATCH, CHECK_SEQ = 3, 6
VOCAB = 96


@dataclasses.dataclass
class Arch:
    name: str
    module: torch.nn.Module
    inputs: dict[str, torch.Tensor]  # ordered as the wrapper's forward arguments
    dynamic: dict[str, dict[int, str]]  # input -> {axis: "batch" | "seq" | ...}
    layers: int = 2


class _Wrap(torch.nn.Module):
    """Named tensors in, the model's first output out (``use_cache=False``)."""

    def __init__(self, model: torch.nn.Module, names: tuple[str, ...], **extra: Any):
        super().__init__()
        self.model, self.names, self.extra = model, names, extra

    def forward(self, *args):
        out = self.model(**dict(zip(self.names, args)), **self.extra, return_dict=False)
        return out[0]


def _seeded(model: torch.nn.Module, seed: int = 1) -> torch.nn.Module:
    """Random, non-trivial weights everywhere (norm gammas/betas and biases too), seeded."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1:
                low = name.lower()
                is_gamma = name.endswith("weight") and ("norm" in low or "ln" in low or "layer_norm" in low)
                if is_gamma:
                    p.copy_(1 + 0.2 * torch.randn(p.shape, generator=gen))
                else:
                    p.copy_(0.1 * torch.randn(p.shape, generator=gen))
            elif "lambda" in name or "layer_scale" in name:
                p.copy_(0.5 + 0.2 * torch.randn(p.shape, generator=gen))
        for name, b in model.named_buffers():
            if name.endswith("running_mean"):
                b.copy_(0.2 * torch.randn(b.shape, generator=gen))
            elif name.endswith("running_var"):
                b.copy_(0.5 + torch.rand(b.shape, generator=gen))
    return model.eval()


def token_ids(batch: int, seq: int, seed: int) -> torch.Tensor:
    return torch.randint(2, VOCAB, (batch, seq), generator=torch.Generator().manual_seed(seed))


def attention_mask(batch: int, seq: int, seed: int) -> torch.Tensor:
    """0/1, right padding, at least the first token of every row kept (no row fully masked)."""
    gen = torch.Generator().manual_seed(seed + 100)
    keep = torch.randint(max(1, seq // 2), seq + 1, (batch,), generator=gen)
    keep[0] = seq
    return (torch.arange(seq)[None, :] < keep[:, None]).to(torch.int64)


def pixels(batch: int, seed: int, size: int = 32) -> torch.Tensor:
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))


def _text(name: str, model: torch.nn.Module) -> Arch:
    return Arch(name, _Wrap(_seeded(model), ("input_ids", "attention_mask"), use_cache=False),
                {"input_ids": token_ids(BATCH, SEQ, 0), "attention_mask": attention_mask(BATCH, SEQ, 0)},
                {"input_ids": {0: "batch", 1: "seq"}, "attention_mask": {0: "batch", 1: "seq"}})


def _vision(name: str, model: torch.nn.Module) -> Arch:
    return Arch(name, _Wrap(_seeded(model), ("pixel_values",)), {"pixel_values": pixels(BATCH, 0)},
                {"pixel_values": {0: "batch"}})


# -- architectures ----------------------------------------------------------------------------
def gpt2() -> Arch:
    import transformers as T

    return _text("gpt2", T.GPT2LMHeadModel(T.GPT2Config(
        n_embd=32, n_layer=2, n_head=4, vocab_size=VOCAB, n_positions=64, bos_token_id=0, eos_token_id=0)))


def opt() -> Arch:
    import transformers as T

    return _text("opt", T.OPTForCausalLM(T.OPTConfig(
        hidden_size=32, num_hidden_layers=2, ffn_dim=64, num_attention_heads=4, vocab_size=VOCAB,
        max_position_embeddings=64, word_embed_proj_dim=32, do_layer_norm_before=True,
        bos_token_id=0, eos_token_id=0, pad_token_id=1)))


def bloom() -> Arch:
    import transformers as T

    return _text("bloom", T.BloomForCausalLM(T.BloomConfig(
        hidden_size=32, n_layer=2, n_head=4, vocab_size=VOCAB, bos_token_id=0, eos_token_id=0, pad_token_id=1)))


def llama() -> Arch:
    import transformers as T

    return _text("llama", T.LlamaForCausalLM(T.LlamaConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=4, vocab_size=VOCAB, max_position_embeddings=64, bos_token_id=0,
        eos_token_id=0, pad_token_id=1, tie_word_embeddings=False)))


def qwen2() -> Arch:
    import transformers as T

    return _text("qwen2", T.Qwen2ForCausalLM(T.Qwen2Config(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=64, bos_token_id=0,
        eos_token_id=0, pad_token_id=1, tie_word_embeddings=True)))


def neox() -> Arch:
    import transformers as T

    return _text("neox", T.GPTNeoXForCausalLM(T.GPTNeoXConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        vocab_size=VOCAB, max_position_embeddings=64, use_parallel_residual=True, rotary_pct=0.5,
        bos_token_id=0, eos_token_id=0, pad_token_id=1)))


def bert() -> Arch:
    import transformers as T

    return _text("bert", T.BertForMaskedLM(T.BertConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
        vocab_size=VOCAB, max_position_embeddings=64, pad_token_id=1)))


def vit() -> Arch:
    import transformers as T

    return _vision("vit", T.ViTForImageClassification(T.ViTConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
        image_size=32, patch_size=8, num_labels=5)))


def deit() -> Arch:
    import transformers as T

    return _vision("deit", T.DeiTForImageClassificationWithTeacher(T.DeiTConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
        image_size=32, patch_size=8, num_labels=5)))


def dinov2() -> Arch:
    import transformers as T

    return _vision("dinov2", T.Dinov2Model(T.Dinov2Config(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=4, mlp_ratio=2,
        image_size=32, patch_size=8, layerscale_value=0.5)))


def convnext() -> Arch:
    import transformers as T

    return _vision("convnext", T.ConvNextForImageClassification(T.ConvNextConfig(
        num_channels=3, patch_size=4, num_stages=2, hidden_sizes=[16, 32], depths=[2, 2],
        image_size=32, num_labels=5, layer_scale_init_value=0.5)))


def resnet() -> Arch:
    import transformers as T

    return _vision("resnet", T.ResNetForImageClassification(T.ResNetConfig(
        num_channels=3, embedding_size=16, hidden_sizes=[16, 32], depths=[1, 1],
        layer_type="basic", num_labels=5)))


class _DiT(torch.nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, hidden_states, timestep, class_labels):
        return self.model(hidden_states, timestep=timestep, class_labels=class_labels, return_dict=False)[0]


class _PixArt(torch.nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, hidden_states, encoder_hidden_states, timestep):
        return self.model(hidden_states, encoder_hidden_states=encoder_hidden_states, timestep=timestep,
                          added_cond_kwargs={"resolution": None, "aspect_ratio": None}, return_dict=False)[0]


def latents(batch: int, seed: int) -> torch.Tensor:
    return torch.randn(batch, 4, 8, 8, generator=torch.Generator().manual_seed(seed))


def timesteps(batch: int, seed: int) -> torch.Tensor:
    return torch.randint(0, 1000, (batch,), generator=torch.Generator().manual_seed(seed + 7))


def dit() -> Arch:
    from diffusers import DiTTransformer2DModel

    torch.manual_seed(0)
    model = DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=16, in_channels=4, num_layers=2,
                                  sample_size=8, patch_size=2, num_embeds_ada_norm=10, norm_num_groups=4)
    labels = torch.tensor([1, 3])
    return Arch("dit", _DiT(_seeded(model)), {"hidden_states": latents(BATCH, 0), "timestep": timesteps(BATCH, 0),
                                              "class_labels": labels},
                {"hidden_states": {0: "batch"}, "timestep": {0: "batch"}, "class_labels": {0: "batch"}})


def pixart() -> Arch:
    from diffusers import PixArtTransformer2DModel

    torch.manual_seed(0)
    model = PixArtTransformer2DModel(num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=8,
                                     num_layers=2, sample_size=8, patch_size=2, cross_attention_dim=32,
                                     caption_channels=24, norm_num_groups=4, use_additional_conditions=False)
    text = torch.randn(BATCH, 5, 24, generator=torch.Generator().manual_seed(3))
    return Arch("pixart", _PixArt(_seeded(model)),
                {"hidden_states": latents(BATCH, 0), "encoder_hidden_states": text, "timestep": timesteps(BATCH, 0)},
                {})  # fixed shapes: with a dynamic batch both exporters write a Squeeze ORT rejects


ARCHS: dict[str, Callable[[], Arch]] = {
    "gpt2": gpt2, "opt": opt, "bloom": bloom, "llama": llama, "qwen2": qwen2, "neox": neox,
    "vit": vit, "deit": deit, "dinov2": dinov2, "convnext": convnext, "bert": bert,
    "dit": dit, "pixart": pixart, "resnet": resnet,
}


def check_inputs(arch: Arch, seed: int = 11, *, batch: int = CHECK_BATCH, seq: int = CHECK_SEQ) -> dict[str, np.ndarray]:
    """Seeded inputs of another batch (and sequence) than the example: masks 0/1 with at least
    one 1 per row, token ids in the vocabulary, labels and timesteps in range."""
    out = {}
    for name, x in arch.inputs.items():
        dyn = arch.dynamic.get(name, {})
        shape = [batch if dyn.get(i) == "batch" else seq if dyn.get(i) in ("seq", "text") else d
                 for i, d in enumerate(x.shape)]
        if name == "input_ids":
            v = token_ids(shape[0], shape[1], seed)
        elif name == "attention_mask":
            v = attention_mask(shape[0], shape[1], seed)
        elif name == "timestep":
            v = timesteps(shape[0], seed)
        elif name == "class_labels":
            v = torch.randint(0, 10, tuple(shape), generator=torch.Generator().manual_seed(seed))
        else:
            v = torch.randn(*shape, generator=torch.Generator().manual_seed(seed))
        out[name] = v.numpy().astype(x.numpy().dtype)
    return out


# -- exporters --------------------------------------------------------------------------------
@contextlib.contextmanager
def _quiet():
    sink = io.StringIO()
    with warnings.catch_warnings(), contextlib.redirect_stdout(sink), contextlib.redirect_stderr(sink):
        warnings.simplefilter("ignore")
        level = logging.getLogger("torch.onnx").level
        logging.getLogger("torch.onnx").setLevel(logging.ERROR)
        try:
            yield
        finally:
            logging.getLogger("torch.onnx").setLevel(level)


def export_torchscript(arch: Arch, path: Path, opset: int) -> Path:
    """``torch.onnx.export(dynamo=False)`` with ``dynamic_axes`` on batch / sequence."""
    with _quiet(), torch.no_grad():
        torch.onnx.export(arch.module, tuple(arch.inputs.values()), str(path), dynamo=False,
                          opset_version=opset, input_names=list(arch.inputs), output_names=["output"],
                          dynamic_axes={k: dict(v) for k, v in arch.dynamic.items()})
    return path


def export_dynamo(arch: Arch, path: Path, opset: int = 18) -> Path:
    """``torch.onnx.export(dynamo=True)`` (its default optimizer) with dynamic batch / sequence."""
    from torch.export import Dim

    dims: dict[str, Any] = {}
    shapes = {}
    for name in arch.inputs:
        spec = {}
        for axis, label in arch.dynamic.get(name, {}).items():
            spec[axis] = dims.setdefault(label, Dim.DYNAMIC)
        shapes[name] = spec or None
    with _quiet():
        prog = torch.onnx.export(arch.module, tuple(arch.inputs.values()), dynamo=True, opset_version=opset,
                                 input_names=list(arch.inputs), output_names=["output"],
                                 dynamic_shapes=_dynamic_shapes(arch, shapes))
        prog.save(str(path))
    return path


class Corpus:
    """Builds every (arch, exporter) artefact once; ``get`` returns a path (ONNX) or the
    captured ``torch.fx.GraphModule`` (``fx``). A failed export is cached as the exception."""

    def __init__(self, root: Path):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self._archs: dict[tuple[str, str], Arch] = {}
        self._built: dict[tuple[str, str], Any] = {}
        self.seconds: dict[tuple[str, str], float] = {}

    def arch(self, name: str, exporter: str = "fx") -> Arch:
        """A fresh module per exporter: the TorchScript exporter leaves a traced Hugging Face
        model computing other outputs afterwards (seen on GPT-2 with a padded mask)."""
        if (name, exporter) not in self._archs:
            torch.manual_seed(0)
            self._archs[name, exporter] = ARCHS[name]()
        return self._archs[name, exporter]

    def get(self, name: str, exporter: str) -> Any:
        key = (name, exporter)
        if key not in self._built:
            import time

            t0 = time.perf_counter()
            try:
                self._built[key] = self._build(name, exporter)
            except Exception as err:  # noqa: BLE001 - recorded, re-raised by the caller
                self._built[key] = err
            self.seconds[key] = time.perf_counter() - t0
        got = self._built[key]
        if isinstance(got, Exception):
            raise RuntimeError(f"{name}/{exporter}: export failed: {type(got).__name__}: {got}") from got
        return got

    def _build(self, name: str, exporter: str) -> Any:
        arch = self.arch(name, exporter)
        path = self.root / f"{name}.{exporter}.onnx"
        if exporter == "ts14":
            return export_torchscript(arch, path, 14)
        if exporter == "ts17":
            return export_torchscript(arch, path, 17)
        if exporter == "dynamo18":
            return export_dynamo(arch, path, 18)
        if exporter == "fx":
            from rewriter.ir.fx_view import capture

            with _quiet():
                return capture(arch.module, tuple(arch.inputs.values()))
        raise KeyError(exporter)


def _dynamic_shapes(arch: Arch, shapes: dict[str, Any]) -> tuple:
    """``dynamic_shapes`` in the layout of the module's ``forward``: one tuple for ``*args``."""
    if isinstance(arch.module, _Wrap):
        return (tuple(shapes.values()),)
    return tuple(shapes.values())


# -- one (file, pass) case --------------------------------------------------------------------
EXACT_TOL = 1e-5  # fp32, exact passes: max|a-b| / max|a|
RETTENTION_TOL = 1e-5  # the default (dense) step is dense attention: fp32 rounding of another op order


@dataclasses.dataclass
class Outcome:
    """What the tool did on one (arch, exporter, pass) and what the independent check found.

    ``status``: ``applied`` (the pass applied, the tool's verification passed and the
    independent ORT / torch check is within tolerance), ``declined`` (no site applied),
    ``broken`` (applied, but the tool's verification or the independent check failed),
    ``error`` (the tool raised), ``export-failed``."""

    status: str
    applied: int = 0
    declined: list[str] = dataclasses.field(default_factory=list)
    error: float | None = None  # the independent check's max relative error
    message: str = ""
    seconds: float = 0.0
    sites: list[str] = dataclasses.field(default_factory=list)  # reasons of the applied sites

    def summary(self) -> str:
        if self.status == "applied":
            more = f", {len(self.declined)} declined" if self.declined else ""
            return f"applied {self.applied}{more} (err {self.error:.1e})" if self.error is not None else f"applied {self.applied}{more}"
        if self.status == "declined":
            return f"declined: {self.declined[0] if self.declined else '?'}"
        return f"{self.status}: {self.message}"


def _max_rel(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if a.shape != b.shape:
        return float("inf")
    if not (np.isfinite(a).all() and np.isfinite(b).all()):
        return float("inf")
    return float(np.abs(a - b).max() / max(np.abs(a).max(), 1e-30))


def _ort_session(path: Path):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    opts.log_severity_level = 3
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def _feeds_for(sess, base: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """``base`` plus the inputs a pass added (Re-ttention's step = 0 and its zero state),
    their symbolic dims taken from ``base``'s batch."""
    import onnxruntime as ort  # noqa: F401

    feeds = {}
    batch = next(iter(base.values())).shape[0]
    for i in sess.get_inputs():
        if i.name in base:
            feeds[i.name] = base[i.name]
            continue
        dims = [d if isinstance(d, int) else batch for d in i.shape]
        dtype = np.int64 if "int64" in i.type else np.float32
        feeds[i.name] = np.zeros(dims, dtype)
    return feeds


def check_onnx(arch: Arch, original: Path, rewritten: Path) -> float:
    """Independent check: both files in plain ORT (optimizations off) on fresh seeded inputs of
    another batch (and sequence, where the file keeps it dynamic); max relative error of the
    first output."""
    want_s, got_s = _ort_session(original), _ort_session(rewritten)
    static = {i.name: i.shape for i in want_s.get_inputs()}
    dyn_ok = all(isinstance(d, str) or d is None for n, s in static.items()
                 for ax, d in enumerate(s) if ax in arch.dynamic.get(n, {}))
    base = check_inputs(arch) if dyn_ok else check_inputs(arch, batch=BATCH, seq=SEQ)
    # a rewritten file that fixed a dim (specialised shapes) is checked at that shape
    for i in got_s.get_inputs():
        if i.name in base and any(isinstance(d, int) and d != base[i.name].shape[k] for k, d in enumerate(i.shape)):
            base = check_inputs(arch, batch=BATCH, seq=SEQ)
            break
    want = want_s.run(None, {k: base[k] for k in static})[0]
    got = got_s.run(None, _feeds_for(got_s, base))[0]
    return _max_rel(want, got)


def check_fx(arch: Arch, gm: torch.nn.Module) -> float:
    """Independent check: the original nn.Module against the rewritten GraphModule on fresh
    seeded inputs of the example shape (``torch.export`` specialised it)."""
    feeds = check_inputs(arch, batch=BATCH, seq=SEQ)
    args = [torch.from_numpy(feeds[k]) for k in arch.inputs]
    if hasattr(gm, "rettention"):
        gm.rettention.set_step(0)
    with torch.no_grad():
        want = arch.module(*args)
        got = gm(*args)
    got = got[0] if isinstance(got, (tuple, list)) else got
    return _max_rel(want.numpy(), got.detach().float().numpy())


def _check_structure(path: Path, pass_name: str, applied: int) -> None:
    """What must appear in the saved file: one Re-ttention call per applied site; a CRMSNorm
    function call where ``crms`` applied; no LayerNormalization left where ``rms`` replaced
    every norm it applied to (the embedding LN of BLOOM is a writer and stays)."""
    import onnx

    ops = [n.op_type for n in onnx.load(str(path), load_external_data=False).graph.node]
    if pass_name == "rettention":
        assert sum("Rettention" in o for o in ops) == applied, f"{applied} sites, ops {sorted(set(ops))}"
    if pass_name == "crms":
        assert any("CRMSNorm" in o for o in ops), f"crms applied but no CRMSNorm node: {sorted(set(ops))}"


def run_case(corpus: Corpus, name: str, exporter: str, pass_name: str, out_dir: Path | None = None) -> Outcome:
    """Rewrite one corpus file with one pass through the Python API (as ``rewrite FILE
    --passes P --inputs F`` does), save it, and check the saved file independently."""
    import copy
    import time

    import rewriter
    from rewriter.errors import RewriterError

    try:
        model = corpus.get(name, exporter)
    except RuntimeError as err:
        return Outcome("export-failed", message=str(err).splitlines()[0][:200])
    arch = corpus.arch(name, exporter)
    feeds = {k: v.numpy() for k, v in arch.inputs.items()}
    t0 = time.perf_counter()
    try:
        with _quiet():
            if exporter == "fx":
                res = rewriter.rewrite(copy.deepcopy(model), [pass_name], example_inputs=tuple(arch.inputs.values()))
            else:
                res = rewriter.rewrite(model, [pass_name], inputs=feeds)
    except RewriterError as err:
        return Outcome("error", message=f"{type(err).__name__}: {err}"[:300], seconds=time.perf_counter() - t0)
    except Exception as err:  # noqa: BLE001 - an internal error is an outcome of the matrix
        return Outcome("error", message=f"internal {type(err).__name__}: {err}"[:300], seconds=time.perf_counter() - t0)
    seconds = time.perf_counter() - t0
    rec = res.report["passes"][0]
    declined = [d["reason"] or d["site"] for d in rec["declined"]]
    if rec["applied"] == 0:
        if not declined and pass_name == "foldnorm" and exporter != "fx":
            ops = {n.op_type for n in __import__("onnx").load(str(model), load_external_data=False).graph.node}
            assert "BatchNormalization" not in ops, "foldnorm found no site in a file holding BatchNormalization"
        return Outcome("declined", 0, declined, seconds=seconds)
    if not res.passed:
        v = res.verification
        return Outcome("broken", rec["applied"], declined, message=f"tool verification failed: max rel error "
                       f"{v.get('max_rel_error')}; {v.get('error', '')}"[:300], seconds=seconds)
    try:
        if exporter == "fx":
            err = check_fx(arch, res.model)
        else:
            out = Path(out_dir or corpus.root) / f"{name}.{exporter}.{pass_name}.onnx"
            res.save(out)
            _check_structure(out, pass_name, rec["applied"])
            err = check_onnx(arch, model, out)
    except Exception as exc:  # noqa: BLE001
        return Outcome("broken", rec["applied"], declined, message=f"independent check raised "
                       f"{type(exc).__name__}: {exc}"[:300], seconds=seconds)
    if pass_name == "lns":
        # architectural: the function changes on purpose (the tool checked each norm's output
        # was scaled by 1/sqrt(l)). Independently: both pre-norms of every block l = 1..L got
        # 1/sqrt(l), and the saved model runs, gives finite outputs, and differs from the original
        import re

        ls = sorted(int(m.group(1)) for s in rec["sites"] for m in [re.search(r"\bl=(\d+)", s.get("reason", ""))] if m)
        want = sorted(list(range(1, arch.layers + 1)) * 2)
        why = ("" if ls == want else f"lns scaled blocks l={ls}, expected {want} (both pre-norms of every block)")
        why = why or ("" if np.isfinite(err) and err > 0 else f"lns output unchanged or not finite (err {err})")
        return Outcome("broken" if why else "applied", rec["applied"], declined, err, why, seconds,
                       [s.get("reason", "") for s in rec["sites"]])
    tol = RETTENTION_TOL if pass_name == "rettention" else EXACT_TOL
    if not err <= tol:
        return Outcome("broken", rec["applied"], declined, err, f"independent check: max rel error {err:.3g} > {tol:g}",
                       seconds)
    return Outcome("applied", rec["applied"], declined, err, seconds=seconds)
