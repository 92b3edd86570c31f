"""Triton kernels, each registered as a torch custom op with a plain-torch CPU kernel
beside it (so rewritten GraphModules run anywhere).

Triton is imported on the first launch of a kernel, not when these modules are imported:
each module defines its ``@triton.jit`` kernels inside a factory wrapped by
:func:`lazy_kernel`, which calls :func:`load`. Importing triton costs a CPU-only run about 90 MB of resident memory and a
few tenths of a second at start-up (the ``rewrite`` CLI imports these modules for their
CPU kernels and op definitions)."""

from __future__ import annotations

import functools
from collections.abc import Callable
from types import ModuleType
from typing import Any


@functools.cache
def load() -> ModuleType | None:
    """The ``triton`` module, imported now, or None where it is not installed."""
    try:
        import triton
    except ImportError:  # pragma: no cover - depends on the platform
        return None
    return triton


def lazy_kernel(define: Callable[[ModuleType, ModuleType], Any]) -> Callable[[], Any]:
    """``define(triton, triton.language)`` -> a kernel, run once on the first call of the
    returned function; that function returns the kernel, or None without triton."""

    @functools.cache
    def kernel():
        triton = load()
        return None if triton is None else define(triton, triton.language)

    kernel.__doc__ = define.__doc__
    return kernel


def next_power_of_2(n: int) -> int:
    """The smallest power of two >= ``n`` (1 for ``n <= 1``), as ``triton.next_power_of_2``."""
    return 1 << max(n - 1, 0).bit_length()


def cdiv(a: int, b: int) -> int:
    """``ceil(a / b)`` for positive ``b``, as ``triton.cdiv``."""
    return -(-a // b)
