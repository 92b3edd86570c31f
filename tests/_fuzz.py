"""A seeded generator of hostile ONNX files and the oracle ``rewrite`` must satisfy on each
(issue 21): exit 0 only when ONNX Runtime reads the file and the output computes what ORT
computes from the original; otherwise a verdict (2 for bad input; 1 or 3 for a valid file
that fails verification or has no site) in one stderr line, no output file; never exit 4;
the input's bytes unchanged.

Mutant classes, from small valid models (``tests._loader_cases``): ``structured`` (edits
through the protobuf API: raw_data lengths, dims, data types, duplicate names, external
data entries, graph outputs, ir_version), ``wire`` (length prefixes moved by a few bytes,
varints padded past 5 bytes, fields cut) and ``bytes`` (seeded byte flips, insertions,
deletions, truncations). ``run`` checks a batch in this process (the caller bounds time and
memory: ``python -m tests._fuzz`` sets RLIMIT_AS and a per-mutant alarm).
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import io
import json
import os
import resource
import signal
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper

from rewriter.ir.onnx_reader import _enc_varint, _fields
from tests import _loader_cases as lc

TOL = 1e-4  # foldnorm / rms in float32, folded in float64: far below this


def _seeds() -> list[tuple[str, onnx.ModelProto, str, bool]]:
    """(name, model, pass, uses external data) for each seed model."""
    return [("base", lc.base(), "foldnorm", False), ("ext", lc.base(1), "foldnorm", True),
            ("stream", lc.stream(), "rms", False)]


def _feeds(cls: str, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    if cls.startswith("stream"):
        return {"x": rng.standard_normal((2, 3, 16)).astype(np.float32), "c": np.array(True)}
    return {"x": rng.standard_normal((2, lc.N_IN)).astype(np.float32)}


def _structured(rng: np.random.Generator, m: onnx.ModelProto, external: bool) -> str:
    inits = list(m.graph.initializer)
    t = inits[rng.integers(len(inits))]
    k = int(rng.integers(12 if external else 9))
    if k == 0 and t.HasField("raw_data"):
        cut = int(rng.integers(1, 9))
        t.raw_data = t.raw_data[:-cut] if rng.random() < 0.5 else t.raw_data + bytes(cut)
        return "raw_data length"
    if k == 1:
        i = int(rng.integers(len(t.dims))) if len(t.dims) else None
        choice = rng.integers(4)
        if i is not None and choice == 0:
            t.dims[i] = -t.dims[i] or -1
        elif i is not None and choice == 1:
            t.dims[i] = t.dims[i] * 2
        elif choice == 2:
            t.dims.append(1)
        else:
            t.dims.extend([1] * int(rng.integers(60, 200)))
        return "dims"
    if k == 2:
        t.data_type = int(rng.choice([0, 2, 3, 6, 7, 8, 9, 10, 11, 16, 21, 22, 40]))
        return "data type"
    if k == 3:
        dup = m.graph.initializer.add()
        dup.CopyFrom(t)
        if dup.HasField("raw_data"):
            dup.raw_data = bytes(len(dup.raw_data))
        return "duplicate initializer"
    if k == 4:
        n = m.graph.node[rng.integers(len(m.graph.node))]
        n.output[0] = str(rng.choice(["x", "W", "h", "bn.var", "n", "r0", "p"]))
        return "output name collision"
    if k == 5:
        m.graph.output.add().CopyFrom(helper.make_tensor_value_info(f"ghost{rng.integers(9)}", TensorProto.FLOAT, [2]))
        return "unproduced output"
    if k == 6:
        m.ClearField("ir_version") if rng.random() < 0.5 else setattr(m, "ir_version", int(rng.integers(0, 20)))
        return "ir_version"
    if k == 7 and t.HasField("raw_data"):
        t.float_data.extend([0.0] * int(rng.integers(1, 4)))
        return "two data sources"
    if k == 8:
        t.name = ""
        return "empty name"
    # external data entries (the ext seed)
    if not external or t.data_location != TensorProto.EXTERNAL:
        return "none"
    key = ["location", "offset", "length", "checksum", "extra"][int(rng.integers(5))]
    value = rng.choice(["0", "4", "-1", "131072", "131076", "99999999", "+4", " 4", "1e3", "", "w.data", "../w.data",
                        "/tmp/w.data", "w.data\0", "nowhere.data", "m.onnx", "."])
    if rng.random() < 0.2:
        lc.set_entry(t, key, None)
    else:
        lc.set_entry(t, key, str(value))
    if rng.random() < 0.1:
        t.data_location = TensorProto.DEFAULT
    return f"external {key}"


def _wire(rng: np.random.Generator, data: bytes) -> tuple[bytes, str]:
    """Edit a length prefix or a varint of a field at the model or graph level."""
    fields = list(_fields(data, 0, len(data)))
    graph = next(((vs, ve) for n, w, b, vs, ve in fields if n == 7 and w == 2), None)
    if graph is not None and rng.random() < 0.7:
        fields = [f for f in _fields(data, *graph)] or fields
    number, wire, begin, vstart, vend = fields[int(rng.integers(len(fields)))]
    tag_end = len(_enc_varint(number << 3 | wire))
    head = data[:begin + tag_end]
    if wire != 2:
        return data[:vstart - 1] + b"\xff" + data[vstart - 1:], "varint overrun"
    length = vend - vstart
    kind = int(rng.integers(3))
    if kind == 0:
        new = max(0, length + int(rng.integers(-3, 4)))
        return head + _enc_varint(new) + data[vstart:], "length moved"
    if kind == 1:  # the same length, padded to 6..11 bytes
        pad = int(rng.integers(6, 12))
        enc = bytearray()
        n = length
        for _ in range(pad - 1):
            enc.append((n & 0x7F) | 0x80)
            n >>= 7
        enc.append(n & 0x7F)
        return head + bytes(enc) + data[vstart:], "padded length"
    return data[:vend - int(rng.integers(1, 4))] + data[vend:], "field cut"


def _bytes(rng: np.random.Generator, data: bytes) -> tuple[bytes, str]:
    b = bytearray(data)
    kind = int(rng.integers(4))
    for _ in range(int(rng.integers(1, 5))):
        i = int(rng.integers(len(b)))
        if kind == 0:
            b[i] ^= 1 << int(rng.integers(8))
        elif kind == 1:
            b[i:i] = bytes([int(rng.integers(256))])
        elif kind == 2:
            del b[i]
        else:
            del b[i:]
            break
    return bytes(b), ["flip", "insert", "delete", "truncate"][kind]


def make_mutant(seed: int, folder: Path) -> tuple[str, str, str]:
    """Write mutant ``seed`` into the empty ``folder``; returns (model file, pass, class)."""
    rng = np.random.default_rng(seed)
    name, m, passes, external = _seeds()[int(rng.integers(3))]
    if external:
        m = lc.external(folder, m)
    cls = ["structured", "wire", "bytes"][int(rng.integers(3))]
    if cls == "structured":
        what = _structured(rng, m, external)
        data = m.SerializeToString()
    else:
        raw = m.SerializeToString()
        data, what = _wire(rng, raw) if cls == "wire" else _bytes(rng, raw)
    (folder / "m.onnx").write_bytes(data)
    return "m.onnx", passes, f"{name}/{cls}/{what}"


def _digests(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir()) if p.is_file()}


def _ort_outputs(path: Path, feeds):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    opts.log_severity_level = 4
    try:
        s = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        return s.run(None, feeds)
    except Exception:  # noqa: BLE001 - ORT refuses the file
        return None


def _same(a, b) -> bool:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if a.shape != b.shape or not np.array_equal(np.isnan(a), np.isnan(b)):
        return False
    a, b = np.nan_to_num(a), np.nan_to_num(b)
    scale = max(float(np.abs(a).max()) if a.size else 0.0, 1e-30)
    return float(np.abs(a - b).max() if a.size else 0.0) / scale <= TOL


def check(seed: int, root: Path) -> dict:
    """Run ``rewrite`` on mutant ``seed`` (in a fresh folder under ``root``); returns its
    record: class, exit code and the broken rules (``violations``, empty when all hold)."""
    from rewriter.cli import main

    folder = Path(tempfile.mkdtemp(prefix=f"m{seed}-", dir=root))
    name, passes, cls = make_mutant(seed, folder)
    before = _digests(folder)
    err = io.StringIO()
    t0 = time.perf_counter()
    with contextlib.redirect_stderr(err):
        try:
            rc = main([str(folder / name), "--passes", passes, "-q", "-o", str(folder / "out.onnx")])
        except _Timeout:
            rc = "timeout"
        except MemoryError:
            rc = "memory"
    lines = [ln for ln in err.getvalue().splitlines() if ln.strip()]
    bad = []
    after = {k: v for k, v in _digests(folder).items() if k not in ("out.onnx", "out.onnx.data")}
    if after != before:
        bad.append("input modified")
    if rc in ("timeout", "memory", 4) or rc not in (0, 1, 2, 3):
        bad.append(f"exit {rc}")
    elif rc == 0:
        x = _feeds(cls, seed)
        ref = _ort_outputs(folder / name, x)
        got = _ort_outputs(folder / "out.onnx", x) if (folder / "out.onnx").exists() else None
        if ref is None:
            bad.append("exit 0 on a file ORT refuses")
        elif got is None or len(got) != len(ref) or not all(_same(a, b) for a, b in zip(ref, got)):
            bad.append("exit 0, output differs from ORT on the original")
    else:
        if len(lines) != 1:
            bad.append(f"{len(lines)} stderr lines")
        if (folder / "out.onnx").exists() or (folder / "out.onnx.data").exists():
            bad.append("output written")
    rec = {"seed": seed, "class": cls, "exit": rc, "seconds": round(time.perf_counter() - t0, 3),
           "violations": bad, "line": lines[0][:200] if lines else ""}
    for p in folder.iterdir():
        p.unlink()
    folder.rmdir()
    return rec


class _Timeout(Exception):
    pass


def _alarm(signum, frame):
    raise _Timeout()


def run(seeds: range, root: Path, per_mutant_s: int = 30) -> list[dict]:
    signal.signal(signal.SIGALRM, _alarm)
    out = []
    for s in seeds:
        signal.alarm(per_mutant_s)
        try:
            out.append(check(s, root))
        finally:
            signal.alarm(0)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--start", type=int, default=0)
    ap.add_argument("--count", type=int, default=100)
    ap.add_argument("--mem-gib", type=float, default=3.0, help="RLIMIT_AS of this process")
    ap.add_argument("--json", help="write the records here")
    args = ap.parse_args(argv)
    limit = int(args.mem_gib * (1 << 30))
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    with tempfile.TemporaryDirectory(prefix="rewriter-fuzz-") as root:
        recs = run(range(args.start, args.start + args.count), Path(root))
    if args.json:
        Path(args.json).write_text(json.dumps(recs))
    else:
        print(json.dumps(recs))
    return 0


if __name__ == "__main__":
    sys.exit(main())
