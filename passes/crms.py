"""``crms``: Pre-LN -> Pre-CRMSNorm, an exact rewrite that also narrows the residual stream
from ``d`` to ``d - 1`` channels (Jiang et al. 2023, section 3;
``shared/reference/normalization.md`` section 1, step D).

After ``rms`` (affines folded, writers re-centred, so every stream vector is zero-mean) the
last channel is redundant: ``x_d = -sum(x[:d-1])``. Store ``x~ = x[:d-1]``; then::

    RMSNorm(x)[:d-1] == CRMSNorm(x~) = x~ / sqrt((||x~||^2 + (sum x~)^2) / d + eps)

and a linear reading the normalized vector ``n`` (zero-mean, ``n_d = -sum(n~)``) reads::

    W n = W[:, :d-1] n~ + W[:, d-1] n_d = (W[:, :d-1] - W[:, d-1:d]) n~          # bias unchanged

So: writers drop their last output (``E[:, :d-1]``, ``W_o[:d-1]``, ``b_o[:d-1]``, constants
``c[..., :d-1]``; a writer without parameters gets ``x - mean(x)`` then ``x[..., :d-1]``),
readers fold the dropped column in, every LN on the stream becomes CRMSNorm, and every op
that carries the width on the stream (Reshape / view / Expand targets, shape annotations)
follows. A norm whose output is also read by something other than linears (data-dependent
modulation, a graph output) gets its dropped coordinate re-expanded
(``concat(y, -sum(y))``) and keeps ``gamma``/``beta`` after it.

ONNX: a model-local function ``rewriter::CRMSNormalization`` whose body is standard ops
(``backends/ort/functions.py``: fused RMSNormalization plus a row-wise correction at
opset 23, a ReduceSumSquare/ReduceSum chain below). FX: the custom op
``torch.ops.rewriter.crms_norm`` (Triton kernel on CUDA, plain torch on CPU;
``backends/triton/crms_norm.py``).

Declined, besides every reason of ``rms``: a norm on the stream that cannot be replaced
(every reader of the stream must take the narrow width), a width-carrying op on the
stream whose target cannot be narrowed.
"""

from __future__ import annotations

import logging

from passes.residual import ResidualStream
from passes.rms import _StreamPass
from rewriter.ir.view import GraphView
from rewriter.pass_api import Kind, register

log = logging.getLogger(__name__)


@register
class Crms(_StreamPass):
    name = "crms"
    kind = Kind.EXACT
    summary = "Pre-LN -> Pre-CRMSNorm: rms, then the residual stream narrowed from d to d-1 channels"
    compress = True

    def _extra_problems(self, view: GraphView, stream: ResidualStream) -> list[str]:
        d = stream.width
        out = []
        nodes = list(stream.layouts) + [n for sn in stream.norms for _, ch in sn.linears for n in ch]
        for node in nodes:
            lay = view.layout(node)
            if lay is not None and lay.target and lay.target[-1] not in (d, -1, 1):
                out.append(f"{node.name} reshapes the stream to {lay.target}: its width cannot be narrowed")
        for r in stream.shape_reads:
            out.append(f"{r}: narrowing the stream would change what it reads")
        for w in stream.writers:
            if w.kind == "input":
                out.append(f"{w.note}: cannot narrow it")
        return out

    def _apply_stream(self, view: GraphView, stream: ResidualStream) -> None:
        d = stream.width
        for node in stream.layouts:
            self._narrow_layout(view, node, -1, d)
        for v in stream.values:
            view.set_dim(v, -1, d - 1)
        for w in stream.writers:
            # a writer narrowed through its parameters; the others keep their width and are
            # followed by an inserted centring + slice (``_apply_writer``), already d - 1 wide
            if w.kind in ("embedding", "linear", "conv", "const"):
                view.set_dim(w.value, -1, d - 1)
