"""``alphabn``: frozen BatchNorm -> alpha-BN, a normalization that mixes the frozen source
statistics with the current batch's (test-time batch statistics calibration for covariate
shift). Architectural: the function changes on purpose; ``alpha = 1`` is the original.

BatchNorm at inference normalizes channel ``c`` with the statistics frozen in training,
``y = gamma (x - mu_s) / sqrt(var_s + eps) + beta``. Under a covariate shift (noise, blur,
a change of brightness or contrast) the activations no longer have those statistics.
Test-time BatchNorm replaces them by the current batch's, ``mu_b = mean(x)`` and the biased
``var_b = mean((x - mu_b)^2)`` over the batch and spatial axes; with small batches those
estimates are noisy and the network's later layers, fitted to source statistics, see a
different distribution. alpha-BN calibrates between the two: with ``a = alpha`` the weight
on the source::

    mu  = a mu_s + (1 - a) mu_b

and for the variance two forms, both equal to ``var_s`` at ``a = 1`` and ``var_b`` at
``a = 0`` (option ``variance``):

* ``mix`` (form 0): ``var = a var_s + (1 - a) var_b``, a mix of the two variances;
* ``mixture`` (form 1, the default): the variance of the two-component mixture whose parts
  have the source and the batch statistics, each measured around the mixed mean ``mu``::

      var = a (var_s + (mu_s - mu)^2) + (1 - a)(var_b + (mu_b - mu)^2)
          = a var_s + (1 - a) var_b + a (1 - a)(mu_s - mu_b)^2

  since ``mu_s - mu = (1 - a)(mu_s - mu_b)`` and ``mu_b - mu = a (mu_b - mu_s)``. The extra
  term widens the normalization when the batch's mean has moved away from the source's,
  which is the case a shift produces.

Then ``y = gamma (x - mu) / sqrt(var + eps) + beta``. The default ``alpha = 0.9`` puts 10 %
of the weight on the batch; ``benchmarks/tta_eval.py`` sweeps it (README, "Test-time
BatchNorm"). At ``alpha = 1`` both forms compute the frozen BatchNorm (the product of the
batch terms by ``1 - alpha = 0`` vanishes), which the tests check in both IRs.

Statistics of a conv activation ``[N, C, H, W]`` are over ``(N, H, W)``: a single image
still has ``H x W`` samples per channel. A BatchNorm over ``[N, C]`` (BatchNorm1d after a
linear) has one sample per channel at batch 1 (``var_b = 0``, ``mu_b = x``): such sites are
declined unless ``flat=true``.

Rewrite. ONNX: the ``BatchNormalization`` node becomes one ``rewriter::AlphaBatchNormalization``
call (a model-local function of standard ops, ``backends/ort/tta.py``) whose ``Alpha`` is an
initializer (``<bn>.alpha``): another alpha is an edit of that tensor, not a new rewrite.
FX: ``aten.batch_norm`` becomes ``torch.ops.rewriter.alpha_batch_norm`` (``backends/tta.py``;
one node, decomposed into differentiable aten ops when run), reading its statistics and
alpha as buffers.

Declined, with the reason: a BatchNorm in training mode; one whose statistics are not
constant; a non-float32 ONNX BatchNorm; a rank-2 one without ``flat``; and a model whose
BatchNorms were folded into the convolutions at export (the exporters' default): the
batch statistics of a folded norm cannot be recovered from the conv weights, so the pass
names each such conv and says how to export without folding (``optimize=False`` with the
dynamo exporter, ``do_constant_folding=False`` or ``training=TrainingMode.TRAINING`` with
the TorchScript one: the ``--no-fold`` kind of export).
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Literal

import numpy as np

from backends.ort.tta import MIN_OPSET, alpha_function
from backends.tta import alpha_batch_norm_op, alpha_reference
from rewriter.ir.view import Declined, GraphView, LinearOp, Node
from rewriter import lower
from rewriter.pass_api import Kind, Pass, Site, register
from rewriter.run.capture import capture

log = logging.getLogger(__name__)

EXACT_TOL = 1e-5  # the exact-pass tolerance for float32 (max |a - b| / max |a|)

FOLDED_HINT = ("a BatchNorm folded into a conv cannot be recovered (its batch statistics need the "
               "pre-norm activations): export without folding, the --no-fold kind of export "
               "(torch.onnx.export(dynamo=True, optimize=False), or the TorchScript exporter with "
               "do_constant_folding=False / training=TrainingMode.TRAINING)")


@dataclasses.dataclass
class BnParams:
    """A frozen BatchNorm's parameters (float64 ``[C]``), ``eps``, its input rank and dtype."""

    gamma: np.ndarray
    beta: np.ndarray
    mean: np.ndarray
    var: np.ndarray
    eps: float
    rank: int
    dtype: np.dtype


def bn_params(view: GraphView, node: Node, *, flat: bool = False) -> BnParams:
    """The parameters of a ``batch_norm`` node, or ``Declined`` with the reason it cannot
    take batch statistics. ``eps`` is read back from the frozen affine ``k = gamma /
    sqrt(var + eps)`` (float64: ``(gamma / k)^2 - var``, the median over channels with
    ``gamma != 0``), since the view presents a frozen norm as its affine."""
    if len(node.raw) != 1:
        raise Declined(f"{node.name}: a BatchNorm spelled over {len(node.raw)} nodes (not supported)")
    affine = view.affine(node)  # raises Declined for training mode / missing statistics
    ops = view.operands(node)
    consts = [view.const_value(v) for v in ops[1:]]
    if any(c is None for c in consts):
        raise Declined(f"{node.name} has non-constant parameters")
    if len(consts) == 4:
        gamma, beta, mean, var = consts
    elif len(consts) == 2:  # FX batch_norm without affine parameters
        mean, var = consts
        gamma, beta = np.ones_like(mean), np.zeros_like(mean)
    else:
        raise Declined(f"{node.name}: {len(consts)} parameter inputs (expected gamma, beta, mean, var)")
    rank = view.rank(node.inputs[0])
    if rank is None:
        raise Declined(f"{node.name}: the rank of its input is unknown")
    if rank == 2 and not flat:
        raise Declined(f"{node.name}: a BatchNorm over [N, C] has one sample per channel at batch 1 "
                       "(var_b = 0); set flat=true to rewrite it anyway")
    if rank < 2:
        raise Declined(f"{node.name}: input of rank {rank}")
    dtype = np.dtype(mean.dtype)
    g64, b64, m64, v64 = (np.asarray(a, np.float64).reshape(-1) for a in (gamma, beta, mean, var))
    k = np.broadcast_to(affine.scale, g64.shape)
    ok = (g64 != 0) & (k != 0)
    if not ok.any():
        raise Declined(f"{node.name}: every gamma is 0 (epsilon cannot be read back)")
    eps = float(np.median((g64[ok] / k[ok]) ** 2 - v64[ok]))
    return BnParams(g64, b64, m64, v64, max(eps, 0.0), rank, dtype)


def folded_sites(view: GraphView) -> list[Site]:
    """When a model has convolutions and no BatchNorm: one declined site per conv, saying
    that a folded BatchNorm cannot be un-folded and how to export without folding."""
    nodes = view.nodes()
    if any(n.op == "batch_norm" for n in nodes):
        return []
    return [Site(n.name, False, f"{n.name}: no BatchNorm reads this conv; if one was folded into it at "
                                f"export, {FOLDED_HINT}") for n in nodes if n.op == "conv"]


@register
class AlphaBN(Pass):
    name = "alphabn"
    kind = Kind.ARCHITECTURAL
    summary = ("frozen BatchNorm -> alpha-BN: normalize with alpha * source + (1 - alpha) * current-batch "
               "statistics (test-time adaptation to covariate shift)")

    @dataclasses.dataclass
    class Options:
        alpha: float = 0.9  # weight of the frozen source statistics (1: original, 0: test-time BN)
        variance: Literal["mixture", "mix"] = "mixture"  # mixture: variance of the mixture; mix: mix of variances
        flat: bool = False  # also rewrite BatchNorms over [N, C] (one sample per channel at batch 1)

    def match(self, view: GraphView) -> list[Site]:
        sites: list[Site] = []
        if not 0.0 <= self.options.alpha <= 1.0:
            return [Site(n.name, False, f"alpha={self.options.alpha} must be in [0, 1]")
                    for n in view.nodes() if n.op == "batch_norm"]
        onnx = view.ir == "onnx"
        opset = getattr(view, "opset", MIN_OPSET) if onnx else MIN_OPSET
        for node in view.nodes():
            if node.op != "batch_norm":
                continue
            try:
                p = bn_params(view, node, flat=self.options.flat)
            except Declined as why:
                sites.append(Site(node.name, False, str(why)))
                continue
            if onnx and p.dtype != np.float32:
                sites.append(Site(node.name, False, f"{node.name}: a {p.dtype} BatchNorm (the ONNX body is float32)"))
                continue
            if onnx and opset < MIN_OPSET:
                sites.append(Site(node.name, False, f"{node.name}: opset {opset} is below {MIN_OPSET} "
                                                    "(ReduceSum with axes as an input)"))
                continue
            axes = "(N)" if p.rank == 2 else "(N, " + ", ".join("HWD"[: p.rank - 2]) + ")"
            sites.append(Site(node.name, True, f"{len(p.mean)} channels, batch statistics over {axes}, "
                                               f"eps {p.eps:.3g}", plan=p))
        return sites + folded_sites(view)

    def __init__(self, options=None, context=None):
        super().__init__(options, context)
        self.applied: list[dict] = []

    def apply(self, view: GraphView, sites: list[Site]) -> None:
        form = 1 if self.options.variance == "mixture" else 0
        for site in sites:
            p: BnParams = site.plan
            node = next(n for n in view.nodes() if n.name == site.site and n.op == "batch_norm")
            dt = p.dtype if view.ir == "torch" else np.float32
            consts = {"weight": p.gamma, "bias": p.beta, "mean": p.mean, "var": p.var,
                      "alpha": np.array([self.options.alpha]), "eps": np.array([p.eps])}
            op = LinearOp(consts={k: v.astype(dt) for k, v in consts.items()}, attrs={"form": form},
                          onnx_function=alpha_function, torch_op=alpha_batch_norm_op)
            new = lower.replace_linear(view, node, op, None)
            view.tag(new, self.name, [site.site])
            self.applied.append({"site": site.site, "input": new.inputs[0], "output": new.output, "params": p,
                                 "form": form})

    def check(self, before: GraphView, after: GraphView, feeds) -> dict:
        """Each rewritten site's output == alpha-BN of the input it receives in the rewritten
        model, computed in float64 from the site's original parameters. Tolerance: the
        statistics are float32 sums of ``n`` samples per channel, so ``n`` x float32 eps
        (at least the exact-pass tolerance)."""
        values = [v for a in self.applied for v in (a["input"], a["output"])]
        got = capture(after, values, feeds)
        outputs, worst_abs, worst_rel = [], 0.0, 0.0
        a_ = self.options.alpha
        for i, a in enumerate(self.applied):
            x, y = got[2 * i], np.asarray(got[2 * i + 1], np.float64)
            p: BnParams = a["params"]
            want = alpha_reference(x, p.gamma, p.beta, p.mean, p.var, a_, p.eps, a["form"])
            n = x.size // max(x.shape[1], 1) if x.ndim > 1 else x.size
            tol = max(EXACT_TOL, n * float(np.finfo(np.float32).eps))
            diff = float(np.abs(y - want).max()) if want.size else 0.0
            scale = float(np.abs(want).max()) if want.size else 0.0
            rel = diff / scale if scale > 0 else diff
            worst_abs, worst_rel = max(worst_abs, diff), max(worst_rel, rel)
            outputs.append({"name": f"{a['site']} (alpha={a_})", "max_abs_error": diff, "max_rel_error": rel,
                            "tolerance": tol, "passed": rel <= tol})
        return {"passed": all(o["passed"] for o in outputs), "max_abs_error": worst_abs,
                "max_rel_error": worst_rel, "outputs": outputs,
                "check": "each site's output equals alpha-BN (float64) of the input it receives"}
