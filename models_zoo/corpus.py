"""Byte-level tokenizer and the committed text corpus of the trained GPT.

Corpus
    Python source files of the CPython standard library (licence: Python Software
    Foundation License Version 2, a permissive BSD-style licence; it allows copying and
    redistribution with the licence notice, which ``data/LICENSE-PSF.txt`` carries).
    ``build_corpus()`` collects them from the running interpreter, drops tests, demos,
    generated tables and very large files, sorts them by path and splits them *by file*
    (a CRC32 of the relative path picks about 1 file in 20 for validation), so the
    validation text is code the model never saw. The two splits are committed
    xz-compressed under ``models_zoo/data/`` so that evaluation does not depend on the
    Python version of the machine; ``load_split()`` reads them back.

Tokenizer
    Bytes of the UTF-8 text, vocabulary 256, no special tokens. There is nothing to
    learn or store: ``encode``/``decode`` are the whole tokenizer. The uniform
    distribution over the vocabulary has perplexity 256.
"""

from __future__ import annotations

import functools
import logging
import lzma
import os
import sysconfig
import zlib
from pathlib import Path

import numpy as np
import torch

__all__ = [
    "DATA_DIR",
    "VOCAB_SIZE",
    "build_corpus",
    "decode",
    "encode",
    "load_split",
    "split_path",
]

log = logging.getLogger(__name__)

DATA_DIR = Path(__file__).resolve().parent / "data"
VOCAB_SIZE = 256

# Directory names (anywhere in the relative path) that are left out of the corpus:
# test suites, demos, GUI code, bundled third-party packages and generated tables.
_EXCLUDED_DIRS = frozenset(
    {
        "test",
        "tests",
        "idle_test",
        "idlelib",
        "turtledemo",
        "tkinter",
        "site-packages",
        "dist-packages",
        "__pycache__",
        "encodings",
        "pydoc_data",
        "ensurepip",
        "lib2to3",
        "config-3",
    }
)
_MAX_FILE_BYTES = 200_000
_VAL_MODULUS = 20  # about 1 file in 20 goes to validation
_FILE_SEPARATOR = b"\n\n"


def encode(text: str | bytes) -> torch.Tensor:
    """Token ids (int64, shape ``[len]``) of ``text``: its UTF-8 bytes."""
    data = text.encode("utf-8") if isinstance(text, str) else bytes(text)
    return torch.frombuffer(bytearray(data), dtype=torch.uint8).to(torch.int64)


def decode(ids: torch.Tensor | list[int]) -> str:
    """Text of token ids; invalid UTF-8 sequences become U+FFFD."""
    if isinstance(ids, torch.Tensor):
        ids = ids.reshape(-1).tolist()
    return bytes(int(i) for i in ids).decode("utf-8", errors="replace")


def split_path(split: str) -> Path:
    if split not in ("train", "val"):
        raise ValueError(f"split must be 'train' or 'val', not {split!r}")
    return DATA_DIR / f"pystdlib_{split}.txt.xz"


@functools.lru_cache(maxsize=2)
def _load_bytes(split: str) -> bytes:
    return lzma.decompress(split_path(split).read_bytes())


def load_split(split: str) -> torch.Tensor:
    """Token ids (uint8 tensor, read-only data) of the committed ``split``."""
    data = _load_bytes(split)
    return torch.from_numpy(np.frombuffer(data, dtype=np.uint8).copy())


def _stdlib_files(root: Path) -> list[Path]:
    files = []
    for dirpath, dirnames, filenames in os.walk(root):
        rel_parts = Path(dirpath).relative_to(root).parts
        if any(p in _EXCLUDED_DIRS or p.startswith("config-") for p in rel_parts):
            dirnames[:] = []
            continue
        dirnames.sort()
        for name in sorted(filenames):
            path = Path(dirpath) / name
            if name.endswith(".py") and path.stat().st_size <= _MAX_FILE_BYTES:
                files.append(path)
    return sorted(files, key=lambda p: p.relative_to(root).as_posix())


def build_corpus(
    out_dir: Path | str = DATA_DIR,
    *,
    stdlib: Path | str | None = None,
    max_train_bytes: int = 7_000_000,
    max_val_bytes: int = 500_000,
) -> dict[str, int]:
    """Collect the standard library's source into ``out_dir``; return bytes per split.

    Deterministic for a given standard library: files are taken in path order and
    assigned to a split by a CRC32 of their relative path. A file that would take its
    split past the split's byte budget is skipped.
    """
    root = Path(stdlib or sysconfig.get_paths()["stdlib"])
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    chunks: dict[str, list[bytes]] = {"train": [], "val": []}
    sizes = {"train": 0, "val": 0}
    limits = {"train": max_train_bytes, "val": max_val_bytes}
    for path in _stdlib_files(root):
        rel = path.relative_to(root).as_posix()
        split = "val" if zlib.crc32(rel.encode()) % _VAL_MODULUS == 0 else "train"
        text = path.read_bytes()
        try:
            text.decode("utf-8")
        except UnicodeDecodeError:
            continue
        piece = text.replace(b"\r\n", b"\n").rstrip() + _FILE_SEPARATOR
        if sizes[split] + len(piece) > limits[split]:
            continue
        chunks[split].append(piece)
        sizes[split] += len(piece)
    for split, parts in chunks.items():
        blob = b"".join(parts)
        (out_dir / f"pystdlib_{split}.txt.xz").write_bytes(
            lzma.compress(blob, preset=9 | lzma.PRESET_EXTREME)
        )
        log.info("wrote %s split: %d files, %d bytes", split, len(parts), len(blob))
    _load_bytes.cache_clear()
    return sizes
