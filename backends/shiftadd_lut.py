"""The lookup-table CPU kernel of the packed shift-add linear (BCQ), in C with AVX-512
(``backends/csrc/shiftadd_lut.c``), compiled on first use and called through ``ctypes``.

Per token and per 4 input columns the kernel builds a table of the 16 signed sums
``sum_i (+-x[4g + i])`` and looks up each 4-bit piece of a plane's word in it, 16 output
rows per instruction (``vpermps``); the weight is read as its bits and never decoded to
float. The result equals ``x @ dequantize(W)^T`` to float32 rounding (tables of 4 terms,
one sum per scale block, one ``fma`` per block and plane).

Built with ``COMPILER`` (``gcc``) and ``FLAGS`` (``-fopenmp``: more than one thread is an
OpenMP team on the runtime torch has already loaded, so the kernel's threads are the ones
torch's own ops just used; ``POOL_FLAGS`` without it, the kernel's own thread pool, where
that build fails) into ``cache_dir()`` (``$REWRITER_CACHE/kernels``,
by default ``~/.cache/rewriter/kernels``) under a name keyed by the hash of the source, the
flags and the compiler path, written to a temporary name and renamed, so concurrent processes
never load a half-written library; a later process loads the cached file. Available only
on x86 with AVX-512 (``avx512f``, ``avx512bw``, ``avx512vl`` in ``/proc/cpuinfo``) and a
working compiler; otherwise ``library()`` is None (logged once at debug level) and the
callers run their other kernels.

``MAX_TOKENS``: the kernel's work grows with the tokens (one table set and one pass over
the bits per token) while a dense matmul's barely does at small batches; above it the
callers use their matmul paths (``benchmarks/shiftadd_layer_bench.py``, README "Memory at
run time").
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch

log = logging.getLogger(__name__)

SOURCE = Path(__file__).resolve().parent / "csrc" / "shiftadd_lut.c"
COMPILER = shutil.which("gcc") or "/usr/bin/gcc"
FLAGS = ("-O3", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mfma", "-pthread", "-shared", "-fPIC", "-fopenmp")
# Without OpenMP (a compiler without libgomp): the kernel's own thread pool.
POOL_FLAGS = tuple(f for f in FLAGS if f != "-fopenmp")
CPU_FLAGS = ("avx512f", "avx512bw", "avx512vl")
MAX_TOKENS = 8  # crossover against F.linear: 16-24 tokens at 1 thread on the loaded machine, ~10 quiet

CALLS = {"lut": 0, "compiles": 0}  # counters the tests read: kernel calls, compilations
_STATE: dict[str, object] = {}  # "lib": the loaded library or None once tried


def cache_dir() -> Path:
    return Path(os.environ.get("REWRITER_CACHE") or Path.home() / ".cache" / "rewriter") / "kernels"


def cpu_supported() -> bool:
    """x86-64 with the AVX-512 subsets the kernel uses (Linux ``/proc/cpuinfo``)."""
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return False
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    return all(c in flags for c in CPU_FLAGS)
    except OSError:
        pass
    return False


def library_path(flags: tuple[str, ...] | None = None) -> Path:
    """Where the compiled library for this source, these flags (default ``FLAGS``) and this
    compiler lives."""
    h = hashlib.sha256(SOURCE.read_bytes())
    h.update(" ".join((COMPILER, *(FLAGS if flags is None else flags))).encode())
    return cache_dir() / f"shiftadd_lut-{h.hexdigest()[:16]}.so"


def _compile(target: Path, flags: tuple[str, ...]) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=target.name + ".", suffix=".tmp", dir=target.parent)
    os.close(fd)
    try:
        subprocess.run([COMPILER, *flags, str(SOURCE), "-o", tmp], check=True, capture_output=True, timeout=120)
        CALLS["compiles"] += 1
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _load():
    if not cpu_supported():
        log.debug("shiftadd LUT kernel: this CPU lacks %s", "/".join(CPU_FLAGS))
        return None
    lib = None
    for flags in (FLAGS, POOL_FLAGS):  # OpenMP where the compiler has it, else the pool
        try:
            path = library_path(flags)
            if not path.exists():
                _compile(path, flags)
            lib = ctypes.CDLL(str(path))
            break
        except (OSError, subprocess.SubprocessError) as e:
            log.debug("shiftadd LUT kernel unavailable with %s: %s", " ".join(flags), e)
    if lib is None:
        return None
    fn = lib.shiftadd_lut_linear
    fn.restype = ctypes.c_int
    i, p = ctypes.c_int, ctypes.c_void_p
    fn.argtypes = [p, i, i, p, i, i, i, p, i, i, i, i, p, i]
    lib.shiftadd_alpha.restype = None
    lib.shiftadd_alpha.argtypes = [p, p, i, ctypes.c_long, p]
    lib.shiftadd_lut_threading.restype = ctypes.c_int
    lib.shiftadd_lut_threading.argtypes = []
    return lib


def library():
    """The loaded kernel library, or None where the CPU or the compiler does not allow it
    (tried once per process; ``reset()`` forgets)."""
    if "lib" not in _STATE:
        _STATE["lib"] = _load()
    return _STATE["lib"]


def reset() -> None:
    _STATE.clear()


def available() -> bool:
    return library() is not None


def thread_mode() -> str | None:
    """How the loaded kernel runs more than one thread: ``"openmp"`` (the team of the calling
    thread, on the OpenMP runtime torch has loaded) or ``"pool"`` (its own workers); None
    where the kernel is unavailable."""
    lib = library()
    if lib is None:
        return None
    return "openmp" if lib.shiftadd_lut_threading() else "pool"


def supports(x: torch.Tensor, planes: torch.Tensor, alpha: torch.Tensor, block_cols: int,
             group_rows: int, max_tokens: int = MAX_TOKENS) -> bool:
    """Whether ``lut_linear`` runs this call: CPU tensors, ``x`` 2-D with at most
    ``max_tokens`` rows (a caller whose other kernel is slower than ``F.linear`` passes a
    larger cap), scale blocks a multiple of 4 columns, shapes consistent."""
    if x.device.type != "cpu" or planes.device.type != "cpu" or alpha.device.type != "cpu":
        return False
    if x.dim() != 2 or planes.dim() != 3 or alpha.dim() != 3 or not 1 <= x.shape[0] <= max_tokens:
        return False
    q, kw, n = planes.shape
    k = x.shape[1]
    return (block_cols >= 4 and block_cols % 4 == 0 and group_rows >= 1 and k >= 1 and kw * 32 >= k
            and alpha.shape[0] == q and alpha.shape[1] * block_cols >= k and alpha.shape[2] * group_rows >= n
            and max(x.numel(), planes.numel(), alpha.numel()) < 2**31 and available())


def scales(exps: torch.Tensor, signs: torch.Tensor) -> torch.Tensor | None:
    """``alpha = sum_t signs_t 2^exps_t`` (float32 ``[qa, Kb, Ng]``) from the op's int8 scale
    terms ``[T, qa, Kb, Ng]``, in one single-threaded pass (the same bits as
    ``backends.triton.shiftadd.alpha``, whose few small torch ops cost more than the kernel
    on a busy machine at 2 threads); None where the library is unavailable."""
    lib = library()
    if lib is None or exps.device.type != "cpu" or exps.dim() != 4 or exps.shape != signs.shape:
        return None
    e = exps.to(torch.int8).contiguous()
    s = signs.to(torch.int8).contiguous()
    out = torch.empty(exps.shape[1:], dtype=torch.float32)
    lib.shiftadd_alpha(e.data_ptr(), s.data_ptr(), int(exps.shape[0]), int(out.numel()), out.data_ptr())
    return out


def lut_linear(x: torch.Tensor, planes: torch.Tensor, alpha: torch.Tensor, block_cols: int,
               group_rows: int, threads: int | None = None) -> torch.Tensor:
    """``x @ W^T`` (float32 ``[M, N]``) for ``x`` ``[M, K]`` (computed in float32), planes
    int32 ``[q, Kw, N]``, alpha ``[q, Kb, Ng]``; ``threads`` defaults to
    ``torch.get_num_threads()``. Callers check ``supports`` first."""
    lib = library()
    if lib is None:
        raise RuntimeError("the shiftadd LUT kernel is not available on this machine")
    xf = x.to(torch.float32).contiguous()
    pl = planes.to(torch.int32).contiguous()
    al = alpha.to(torch.float32).contiguous()
    m, k = xf.shape
    q, kw, n = pl.shape
    y = torch.empty(m, n, dtype=torch.float32)
    rc = lib.shiftadd_lut_linear(xf.data_ptr(), m, k, pl.data_ptr(), q, kw, n, al.data_ptr(), al.shape[1],
                                 al.shape[2], block_cols, group_rows, y.data_ptr(),
                                 int(threads or torch.get_num_threads()))
    if rc != 0:
        raise RuntimeError(f"shiftadd LUT kernel rejected the shapes x {tuple(x.shape)}, planes {tuple(planes.shape)}, "
                           f"alpha {tuple(alpha.shape)}, block_cols {block_cols}, group_rows {group_rows}")
    CALLS["lut"] += 1
    return y
