"""Issue 21's findings, one test each: a file ONNX Runtime refuses, or reads otherwise than a
naive reader, is refused by ``rewrite`` in one line (exit 2) before anything is written, the
input left as it was; a valid file that used to crash (exit 4) is rewritten; no output file
is ever a file the input reads."""

from __future__ import annotations

import hashlib
import os
import resource
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from rewriter.cli import main
from tests import _loader_cases as lc


def _digests(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in folder.iterdir()
            if p.is_file() and not p.is_symlink() and not p.is_fifo()}


def _cli(folder: Path, name: str, *extra: str, passes: str = "foldnorm", capfd=None):
    """Run the CLI in ``folder``; returns (exit code, non-empty stderr lines)."""
    cwd = os.getcwd()
    os.chdir(folder)
    try:
        rc = main([name, "--passes", passes, "-q", *extra])
    finally:
        os.chdir(cwd)
    err = capfd.readouterr().err
    return rc, [ln for ln in err.splitlines() if ln.strip()]


def _refused(tmp_path: Path, name: str, needle: str, capfd, *extra: str, passes: str = "foldnorm"):
    before = _digests(tmp_path)
    names = set(os.listdir(tmp_path))
    rc, lines = _cli(tmp_path, name, "-o", "out.onnx", *extra, passes=passes, capfd=capfd)
    assert rc == 2, lines
    assert len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], lines
    assert set(os.listdir(tmp_path)) == names and _digests(tmp_path) == before


def _raw_short(d):
    m = lc.base()
    lc.W(m).raw_data = lc.W(m).raw_data[:-4]
    return lc.write(d, m), "'W': 131068 bytes of raw_data"


def _raw_long(d):
    m = lc.base()
    lc.W(m).raw_data = lc.W(m).raw_data + b"\0\0\0\0"
    return lc.write(d, m), "'W': 131076 bytes of raw_data"


def _raw_short_small(d):
    m = lc.base()
    t = next(t for t in m.graph.initializer if t.name == "bn.var")
    t.raw_data = t.raw_data[:-1]
    return lc.write(d, m), "'bn.var': 1023 bytes of raw_data"


def _dup_init(d):
    m = lc.base()
    m.graph.initializer.append(lc._init("bn.var", np.full(lc.N_OUT, 9.0)))
    return lc.write(d, m), "initializer 'bn.var' is defined twice"


def _ext(edit, needle):
    def build(d):
        m = lc.external(d, lc.base())
        edit(d, m)
        return lc.write(d, m), needle
    build.__name__ = needle
    return build


def _symlink(d, m):
    os.rename(d / "w.data", d / "real.data")
    os.symlink("real.data", d / "w.data")


def _fifo(d, m):
    lc.set_entry(lc.W(m), "location", "pipe.data")
    os.mkfifo(d / "pipe.data")


def _default_location(d, m):
    lc.W(m).data_location = TensorProto.DEFAULT


EXTERNAL = {
    "length 0": _ext(lambda d, m: lc.set_entry(lc.W(m), "length", "0"), "external data length 0 bytes"),
    "length too long": _ext(lambda d, m: lc.set_entry(lc.W(m), "length", "131076"), "length 131076 bytes"),
    "length too short": _ext(lambda d, m: lc.set_entry(lc.W(m), "length", "131068"), "length 131068 bytes"),
    "absolute location": _ext(lambda d, m: lc.set_entry(lc.W(m), "location", str(d / "w.data")), "is absolute"),
    "symlink": _ext(_symlink, "is a symbolic link"),
    "hard link": _ext(lambda d, m: os.link(d / "w.data", d / "w2.data"), "is a hard link"),
    "DEFAULT location with entries": _ext(_default_location, "data_location is not EXTERNAL"),
    "unknown key": _ext(lambda d, m: lc.set_entry(lc.W(m), "sha", "x"), "unknown external data key 'sha'"),
    "NUL in location": _ext(lambda d, m: lc.set_entry(lc.W(m), "location", "w.data\0x"), "holds a NUL byte"),
    "empty side file": _ext(lambda d, m: (d / "w.data").write_bytes(b""), "runs past the file's end (0 bytes)"),
    "offset past the end": _ext(lambda d, m: lc.set_entry(lc.W(m), "offset", str(1 << 20)), "runs past the file's end"),
    "named pipe": _ext(_fifo, "is not a regular file"),
}


def _varint_past_message(d):
    """The graph's last field is a varint whose bytes run into the model's next field."""
    m = lc.base()
    graph = m.graph.SerializeToString() + lc._enc_varint(127 << 3) + b"\x80"
    return lc.write_bytes(d, lc.field(7, graph) + lc.without_graph(m)), "not a valid ONNX model"


def _long_length_prefix(d):
    """The graph's length written as an 11-byte varint."""
    m = lc.base()
    graph = m.graph.SerializeToString()
    n = len(graph)
    enc = bytearray()
    for _ in range(10):
        enc.append((n & 0x7F) | 0x80)
        n >>= 7
    enc.append(0)
    return lc.write_bytes(d, lc._enc_varint(7 << 3 | 2) + bytes(enc) + graph + lc.without_graph(m)), "not a valid ONNX model"


def _unproduced_output(d):
    m = lc.base(outputs_extra=[helper.make_tensor_value_info("ghost", TensorProto.FLOAT, [2])])
    return lc.write(d, m), "output 'ghost' is produced by no node"


def _shadowing_if(d):
    then = helper.make_graph([helper.make_node("Identity", ["x"], ["h"], name="shadow")], "then", [],
                             [helper.make_tensor_value_info("h", TensorProto.FLOAT, [2, lc.N_IN])])
    other = helper.make_graph([helper.make_node("Identity", ["x"], ["e"], name="e")], "else", [],
                              [helper.make_tensor_value_info("e", TensorProto.FLOAT, [2, lc.N_IN])])
    m = lc.base(nodes_extra=[helper.make_node("Constant", [], ["c"], name="c", value=helper.make_tensor("c", TensorProto.BOOL, [], [True])),
                             helper.make_node("If", ["c"], ["z"], name="if", then_branch=then, else_branch=other)],
                outputs_extra=[helper.make_tensor_value_info("z", TensorProto.FLOAT, [2, lc.N_IN])])
    return lc.write(d, m), "tensor 'h' is defined twice"


def _undefined_type(d):
    m = lc.base()
    m.graph.initializer.append(TensorProto(name="u", data_type=0, dims=[1], raw_data=b"\0"))
    return lc.write(d, m), "'u': data type UNDEFINED"


def _string_wrong(d):
    m = lc.base()
    m.graph.initializer.append(TensorProto(name="s", data_type=TensorProto.STRING, dims=[2], raw_data=b"ab"))
    return lc.write(d, m), "'s': a STRING tensor holds its values in string_data"


def _huge_rank(d):
    m = lc.base()
    t = TensorProto(name="big", data_type=TensorProto.FLOAT, raw_data=b"\0" * 4)
    t.dims.extend([1] * 2_000_002)
    m.graph.initializer.append(t)
    return lc.write(d, m), "2000002 dims, over the rank limit"


def _no_ir_version(d):
    m = lc.base()
    m.ClearField("ir_version")
    return lc.write(d, m), "has no ir_version"


def _dup_function(d):
    m = lc.base()
    f = helper.make_function("local", "f", ["a"], ["b"], [helper.make_node("Relu", ["a"], ["b"])],
                             [helper.make_opsetid("", 18)])
    m.functions.extend([f, f])
    m.opset_import.append(helper.make_opsetid("local", 1))
    return lc.write(d, m), "local function local::f is defined twice"


def _sparse(d):
    m = lc.base()
    values = lc._init("sv", [1.0])
    idx = onnx.numpy_helper.from_array(np.array([0], np.int64), "si")
    m.graph.sparse_initializer.append(helper.make_sparse_tensor(values, idx, [4]))
    return lc.write(d, m), "sparse initializers (not supported)"


def _segment(d):
    m = lc.base()
    t = next(t for t in m.graph.initializer if t.name == "bn.var")
    t.segment.begin, t.segment.end = 0, 256
    return lc.write(d, m), "TensorProto.segment is not supported"


REFUSED = {
    "raw_data short (mapped)": _raw_short,
    "raw_data long (mapped)": _raw_long,
    "raw_data short (inline)": _raw_short_small,
    "duplicate initializer": _dup_init,
    **{f"external: {k}": v for k, v in EXTERNAL.items() if k != "named pipe"},  # that one: a subprocess
    "varint past its message": _varint_past_message,
    "11-byte length prefix": _long_length_prefix,
    "unproduced graph output": _unproduced_output,
    "If branch shadows an outer name": _shadowing_if,
    "UNDEFINED initializer": _undefined_type,
    "STRING initializer in raw_data": _string_wrong,
    "2,000,002 dims": _huge_rank,
    "unset ir_version": _no_ir_version,
    "duplicate local function": _dup_function,
    "sparse initializer": _sparse,
    "segment": _segment,
}


@pytest.mark.parametrize("case", list(REFUSED), ids=list(REFUSED))
@pytest.mark.parametrize("verify", [True, False], ids=["verify", "no-verify"])
def test_refused_in_one_line(case, verify, tmp_path, capfd):
    """A file the runtime refuses or reads otherwise: exit 2, one line naming the tensor and
    the rule, no output, every input file unchanged (with and without verification)."""
    name, needle = REFUSED[case](tmp_path)
    _refused(tmp_path, name, needle, capfd, *([] if verify else ["--no-verify"]))


def test_fifo_never_hangs(tmp_path):
    """An external location that is a named pipe is refused without opening it (no hang)."""
    name, _ = EXTERNAL["named pipe"](tmp_path)
    p = subprocess.run([sys.executable, "-m", "rewriter.cli", name, "--passes", "foldnorm", "-o", "out.onnx"],
                       cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert p.returncode == 2 and "is not a regular file" in p.stderr, p.stderr


def test_huge_rank_bounded_memory(tmp_path):
    """A 5 MB file declaring a 2,000,002-dim tensor is refused before anything is built:
    the child's peak RSS stays within 256 MiB of a child that rewrites a small valid model
    (the same imports; the tensor's shape alone was 2.2 GB more)."""
    name, _ = _huge_rank(tmp_path)
    small = lc.write(tmp_path, lc.base(), "small.onnx")
    code = ("import resource, sys; from rewriter.cli import main; rc = main(sys.argv[1:]); "
            "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss); sys.exit(rc)")

    def peak_kib(model: str, out: str):
        p = subprocess.run([sys.executable, "-c", code, model, "--passes", "foldnorm", "-o", out],
                           cwd=tmp_path, capture_output=True, text=True, timeout=300)
        return p, int(p.stdout.split()[-1])

    p, huge = peak_kib(name, "out.onnx")
    assert p.returncode == 2 and "rank limit" in p.stderr, p.stderr
    _, base = peak_kib(small, "small.out.onnx")
    assert huge < base + (256 << 10), (huge, base)  # KiB


def test_side_file_named_like_the_output_is_refused(tmp_path, capfd):
    """An input whose weights file is out.onnx.data, rewritten to -o out.onnx: refused before
    anything is written (it used to replace the input's weights)."""
    m = lc.external(tmp_path, lc.base(), location="out.onnx.data")
    name = lc.write(tmp_path, m)
    _refused(tmp_path, name, "refusing to write over the input's external data file 'out.onnx.data'", capfd)


def test_hard_link_of_the_input_as_output_is_refused(tmp_path, capfd):
    """-o naming a hard link of the input model: refused (compared by inode, not by name)."""
    name = lc.write(tmp_path, lc.base())
    os.link(tmp_path / name, tmp_path / "out.onnx")
    before = _digests(tmp_path)
    rc, lines = _cli(tmp_path, name, "-o", "out.onnx", capfd=capfd)
    assert rc == 2 and len(lines) == 1 and "refusing to overwrite the input model" in lines[0], lines
    assert _digests(tmp_path) == before


def test_reference_is_the_runtime_reading(tmp_path, capfd, monkeypatch):
    """Verification's reference is ORT's run of the user's file, not the tool's parse: a
    parse that misreads a weight (simulated) fails verification instead of passing."""
    from rewriter.ir import onnx_reader

    name = lc.write(tmp_path, lc.base())
    real = onnx_reader._build

    def misread(proto, path, mapped):
        for t in proto.graph.initializer:
            if t.name == "bn.bias":
                a = onnx.numpy_helper.to_array(t) + 1
                t.CopyFrom(onnx.numpy_helper.from_array(a, "bn.bias"))
        return real(proto, path, mapped)

    monkeypatch.setattr(onnx_reader, "_build", misread)
    rc, lines = _cli(tmp_path, name, "-o", "out.onnx", capfd=capfd)
    assert rc == 1, lines
    assert not (tmp_path / "out.onnx").exists()


def test_runtime_load_error_is_one_line(tmp_path, capfd):
    """A file the reader accepts but ORT cannot load (a Gemm whose weight does not fit): exit 2,
    one stderr line quoting ORT (its own logging silenced)."""
    m = lc.base()
    w = lc.W(m)
    w.dims[:] = [lc.N_OUT // 2, lc.N_IN * 2]
    name = lc.write(tmp_path, m)
    _refused(tmp_path, name, "ONNX Runtime cannot load the file", capfd)


def test_valid_file_still_rewritten(tmp_path, capfd):
    """The base model (mapped weight) and its external-data form: exit 0, output matches ORT
    on the original."""
    from tests.conftest import max_rel, run_ort

    for i, m in enumerate([lc.base(), lc.external(tmp_path, lc.base(), location=f"e{0}.data")]):
        name = lc.write(tmp_path, m, f"m{i}.onnx")
        rc, lines = _cli(tmp_path, name, "-o", f"o{i}.onnx", capfd=capfd)
        assert rc == 0, lines
        x = {"x": np.random.default_rng(1).standard_normal((2, lc.N_IN)).astype(np.float32)}
        want = run_ort(onnx.load(tmp_path / name), x)[0]
        got = run_ort(onnx.load(tmp_path / f"o{i}.onnx"), x)[0]
        assert max_rel(want, got) <= 1e-5


_stream_model = lc.stream


def _if_reading_norm() -> onnx.ModelProto:
    then = helper.make_graph([helper.make_node("Identity", ["n"], ["t"], name="tid")], "then", [],
                             [helper.make_tensor_value_info("t", TensorProto.FLOAT, [2, 3, 16])])
    other = helper.make_graph([helper.make_node("Identity", ["x"], ["e"], name="eid")], "else", [],
                              [helper.make_tensor_value_info("e", TensorProto.FLOAT, [2, 3, 16])])
    return _stream_model([helper.make_node("If", ["c"], ["z"], name="if", then_branch=then, else_branch=other)],
                         [helper.make_tensor_value_info("z", TensorProto.FLOAT, [2, 3, 16])])


@pytest.mark.parametrize("case", ["If branch reads the norm", "10,000-long Identity chain"])
@pytest.mark.parametrize("passes", ["rms", "foldnorm"])
def test_valid_models_that_crashed(case, passes, tmp_path, capfd):
    """Two valid models that used to exit 4 (an Identity in an If branch reading a
    LayerNorm output; a 10,000-long Identity chain, RecursionError): now a verdict (0 or 3)
    in at most one line."""
    m = _if_reading_norm() if case.startswith("If") else _stream_model(chain=10_000)
    name = lc.write(tmp_path, m)
    rc, lines = _cli(tmp_path, name, "-o", "out.onnx", passes=passes, capfd=capfd)
    assert rc in (0, 3), lines
    assert len(lines) <= 1 and not any("internal error" in ln for ln in lines), lines


def test_compare_is_silent_on_inf_and_nan():
    """Outputs holding inf / NaN (a hostile file's weights) are compared without numpy
    warnings, which the CLI would print as stray stderr lines (fuzz seed 101622)."""
    import warnings

    from rewriter.run.verify import compare

    a = {"y": np.array([np.inf, np.nan, 1.0, -np.inf], np.float32)}
    b = {"y": np.array([np.inf, np.nan, 1.0, np.inf], np.float32)}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        rec = compare(a, b, None)
        compare({"y": np.full(3, np.nan, np.float32)}, {"y": np.full(3, np.nan, np.float32)}, None)
    assert not rec["passed"]


def test_library_warnings_never_add_stderr_lines(tmp_path):
    """A library's Python warning (onnx-ir's 'Ignoring unknown external data key' on main)
    is no second stderr line: the CLI prints exactly its own one line (a child process,
    where no pytest capture hides the warning)."""
    name, needle = _raw_short(tmp_path)
    code = ("import sys, warnings; from rewriter.ir import onnx_reader as r; real = r.check_proto\n"
            "def noisy(*a):\n    warnings.warn('a library speaking', UserWarning); return real(*a)\n"
            "r.check_proto = noisy\nfrom rewriter.cli import main; sys.exit(main(sys.argv[1:]))")
    p = subprocess.run([sys.executable, "-c", code, name, "--passes", "foldnorm", "-o", "out.onnx"],
                       cwd=tmp_path, capture_output=True, text=True, timeout=300)
    lines = [ln for ln in p.stderr.splitlines() if ln.strip()]
    assert p.returncode == 2 and len(lines) == 1 and needle in lines[0], p.stderr
