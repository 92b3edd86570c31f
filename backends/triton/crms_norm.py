"""RMSNorm and CRMSNorm forward: Triton kernels registered as torch custom ops, with a
plain-torch CPU kernel beside them.

Row-wise over the last axis ``n``, float32 accumulation, fp32/fp16/bf16 in and out::

    rms_norm(x)  = x / sqrt(sum(x^2) / n + eps)                      (* weight)
    crms_norm(x) = x / sqrt((sum(x^2) + sum(x)^2) / (n + 1) + eps)    (* weight)

CRMSNorm is RMSNorm of the zero-mean vector ``[x, -sum(x)]`` of width ``n + 1`` restricted
to its first ``n`` coordinates (Jiang et al., "Pre-RMSNorm and Pre-CRMSNorm Transformers",
section 3): the compressed residual stream of the ``crms`` pass. The fused variants take a
residual ``r`` and return ``(norm(x + r), x + r)``, the add of a pre-norm block.

Ops (``torch.ops.rewriter``): ``rms_norm(x, weight?, eps)``, ``crms_norm(x, weight?, eps)``,
``rms_norm_add(x, r, weight?, eps)``, ``crms_norm_add(x, r, weight?, eps)``. On CUDA
tensors they launch the Triton kernel (and compose with ``torch.compile`` through
``triton_op``); elsewhere the CPU kernel runs. The op bodies branch on the device, so
``torch.compile`` on CPU traces the plain-torch kernel (one fused Inductor kernel) and
never reaches Triton ("0 active drivers"). ``triton_*`` launch the kernel directly
(tests run them under ``TRITON_INTERPRET=1``).
"""

from __future__ import annotations

import logging

import torch

from backends.triton import lazy_kernel, load, next_power_of_2

log = logging.getLogger(__name__)


def reference(x: torch.Tensor, weight: torch.Tensor | None, eps: float, *, compressed: bool,
              residual: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The plain-torch kernel (float32 accumulation): ``(y, x + residual or None)``."""
    h = x if residual is None else x + residual
    xf = h.float()
    n = xf.shape[-1]
    ss = xf.square().sum(-1, keepdim=True)
    if compressed:
        ss = ss + xf.sum(-1, keepdim=True).square()
        n = n + 1
    y = xf * torch.rsqrt(ss / n + eps)
    if weight is not None:
        y = y * weight.float()
    return y.to(x.dtype), (None if residual is None else h)


@lazy_kernel
def _kernel(triton, tl):
    """The Triton kernel, defined on first use (None without triton)."""

    @triton.jit
    def norm_fwd(X, R, W, Y, H, stride_x, stride_r, stride_y, stride_h, n_cols, eps,
                  COMPRESSED: tl.constexpr, HAS_W: tl.constexpr, HAS_R: tl.constexpr,
                  BLOCK: tl.constexpr):
        row = tl.program_id(0)
        cols = tl.arange(0, BLOCK)
        mask = cols < n_cols
        xf = tl.load(X + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
        if HAS_R:
            xf = xf + tl.load(R + row * stride_r + cols, mask=mask, other=0.0).to(tl.float32)
            h = xf.to(H.dtype.element_ty)
            tl.store(H + row * stride_h + cols, h, mask=mask)
            xf = h.to(tl.float32)  # normalize the stored (rounded) sum, as the CPU kernel does
        ss = tl.sum(xf * xf, axis=0)
        if COMPRESSED:
            s = tl.sum(xf, axis=0)
            ms = (ss + s * s) / (n_cols + 1)
        else:
            ms = ss / n_cols
        y = xf * (1.0 / tl.sqrt(ms + eps))
        if HAS_W:
            y = y * tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
        tl.store(Y + row * stride_y + cols, y.to(Y.dtype.element_ty), mask=mask)

    return norm_fwd


def _launch(x: torch.Tensor, weight, eps: float, compressed: bool, residual=None, wrap=lambda k: k):
    kernel = _kernel()
    if kernel is None:
        raise RuntimeError("triton is not installed")
    n = x.shape[-1]
    x2 = x.reshape(-1, n).contiguous()
    y = torch.empty_like(x2)
    r2 = residual.reshape(-1, n).contiguous() if residual is not None else x2
    h = torch.empty_like(x2) if residual is not None else y
    block = next_power_of_2(n)
    wrap(kernel)[(x2.shape[0],)](
        x2, r2, weight if weight is not None else x2, y, h,
        x2.stride(0), r2.stride(0), y.stride(0), h.stride(0), n, float(eps),
        COMPRESSED=compressed, HAS_W=weight is not None, HAS_R=residual is not None, BLOCK=block)
    return y.reshape(x.shape), (h.reshape(x.shape) if residual is not None else None)


def triton_rms_norm(x, weight=None, eps=1e-5, residual=None):
    """Launch the Triton kernel directly (no dispatch): ``(y, h or None)``."""
    return _launch(x, weight, eps, False, residual)


def triton_crms_norm(x, weight=None, eps=1e-5, residual=None):
    """Launch the Triton kernel directly (no dispatch): ``(y, h or None)``."""
    return _launch(x, weight, eps, True, residual)


# -- torch custom ops -------------------------------------------------------------------
_OPS: dict[str, object] = {}


def _define() -> None:
    if _OPS:
        return
    # Triton-backed ops: importing them loads the Inductor (seconds), so only on first use
    from torch.library import triton_op, wrap_triton

    def make(name: str, compressed: bool):
        @triton_op(f"rewriter::{name}", mutates_args=())
        def op(x: torch.Tensor, weight: torch.Tensor | None, eps: float) -> torch.Tensor:
            # Also what torch.compile traces (triton_op decomposes into its body): off CUDA
            # the plain-torch kernel, which Inductor fuses into one kernel.
            if x.device.type != "cuda" or load() is None:
                return reference(x, weight, eps, compressed=compressed)[0]
            return _launch(x, weight, eps, compressed, wrap=wrap_triton)[0]

        @op.register_kernel("cpu")
        def _cpu(x, weight, eps):
            return reference(x, weight, eps, compressed=compressed)[0]

        @triton_op(f"rewriter::{name}_add", mutates_args=())
        def op_add(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor | None,
                   eps: float) -> tuple[torch.Tensor, torch.Tensor]:
            if x.device.type != "cuda" or load() is None:
                y, h = reference(x, weight, eps, compressed=compressed, residual=residual)
                return y, h
            y, h = _launch(x, weight, eps, compressed, residual, wrap=wrap_triton)
            return y, h

        @op_add.register_kernel("cpu")
        def _cpu_add(x, residual, weight, eps):
            y, h = reference(x, weight, eps, compressed=compressed, residual=residual)
            return y, h

        _OPS[name] = op
        _OPS[f"{name}_add"] = op_add

    make("rms_norm", False)
    make("crms_norm", True)



def crms_norm_op():
    """``torch.ops.rewriter.crms_norm.default`` (defined on first use)."""
    _define()
    return torch.ops.rewriter.crms_norm.default


def rms_norm_op():
    """``torch.ops.rewriter.rms_norm.default`` (defined on first use)."""
    _define()
    return torch.ops.rewriter.rms_norm.default


def crms_norm(x: torch.Tensor, weight: torch.Tensor | None = None, eps: float = 1e-5) -> torch.Tensor:
    return crms_norm_op()(x, weight, eps)


def rms_norm(x: torch.Tensor, weight: torch.Tensor | None = None, eps: float = 1e-5) -> torch.Tensor:
    return rms_norm_op()(x, weight, eps)
