"""Malformed graphs (issue 13, point 7): a cycle, a node reading a tensor nothing defines,
and inputs too large to verify each get exit 2 and one line naming the problem, no output
file and an untouched input; a merely unsorted graph is sorted and rewritten."""

from __future__ import annotations

import hashlib
import os

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

import rewriter
from rewriter.cli import main
from rewriter.errors import BadInput
from rewriter.run.verify import InputSpec, load_inputs, make_inputs, parse_bytes
from tests.conftest import bn_inits, bn_node, init, max_rel, run_ort


def _model(nodes, x_shape=(2, 4), y_shape=(2, 3), inits=()):
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(x_shape))],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, list(y_shape))], list(inits))
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 18)])
    m.ir_version = 10
    return m


def _gemm_bn_nodes():
    return [helper.make_node("Gemm", ["x", "W"], ["h"], transB=1, name="g"), bn_node("bn", "h", "y")]


def _gemm_bn_inits(rng):
    return [init("W", rng.standard_normal((3, 4)))] + bn_inits("bn", 3, rng)


def _cycle(rng):
    # h = Gemm(x + c); c = Relu(h) feeds back into the Add that makes h
    nodes = [helper.make_node("Add", ["x", "c"], ["xc"], name="add"),
             helper.make_node("Gemm", ["xc", "W"], ["h"], transB=1, name="g"),
             helper.make_node("MatMul", ["h", "back"], ["h4"], name="back_mm"),
             helper.make_node("Relu", ["h4"], ["c"], name="relu"), bn_node("bn", "h", "y")]
    return _model(nodes, inits=_gemm_bn_inits(rng) + [init("back", rng.standard_normal((3, 4)))])


def _undefined(rng):
    nodes = [helper.make_node("Add", ["x", "ghost"], ["xg"], name="add"),
             helper.make_node("Gemm", ["xg", "W"], ["h"], transB=1, name="g"), bn_node("bn", "h", "y")]
    return _model(nodes, inits=_gemm_bn_inits(rng))


def _huge(rng):
    return _model([helper.make_node("Relu", ["x"], ["y"], name="r")], x_shape=(10**10, 10**10),
                  y_shape=(10**10, 10**10))


def _huge_symbolic(rng):
    return _model(_gemm_bn_nodes(), x_shape=("n", 4), y_shape=("n", 3), inits=_gemm_bn_inits(rng))


CASES = [
    ("cycle", _cycle, [], "the graph has a cycle (nodes 'add' -> 'g' -> 'back_mm' -> 'relu' -> 'add')"),
    ("undefined tensor", _undefined, [], "node 'add' (Add) reads tensor 'ghost', which no node, graph input or "
                                         "initializer defines"),
    ("input of [10^10, 10^10]", _huge, [], "over the 1 GiB limit: --max-input-bytes raises it"),
    ("--shape beyond the limit", _huge_symbolic, ["--shape", "x=100000000,4"],
     "verification inputs would need 1.49 GiB (x [100000000, 4] alone 1.49 GiB), over the 1 GiB limit"),
    ("--inputs beyond the limit", _huge_symbolic, ["--inputs", "big.npz", "--max-input-bytes", "1K"],
     "--inputs big.npz would need 4 KiB (x [256, 4] alone 4 KiB), over the 1 KiB limit: --max-input-bytes"),
    ("malformed --max-input-bytes", _huge_symbolic, ["--max-input-bytes", "lots"],
     "--max-input-bytes 'lots': expected a size such as"),
]


@pytest.mark.parametrize("build,extra,needle", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_malformed_graph_is_one_line_exit_2(build, extra, needle, tmp_path, monkeypatch, capsys, rng):
    """Each malformed file: exit 2, exactly one stderr line naming the problem, nothing written, input intact."""
    path = tmp_path / "m.onnx"
    onnx.save(build(rng), path)
    np.savez_compressed(tmp_path / "big.npz", x=np.zeros((256, 4), np.float32))
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    before = set(os.listdir(tmp_path))
    monkeypatch.chdir(tmp_path)
    rc = main(["m.onnx", "--passes", "foldnorm", *extra])
    err = capsys.readouterr().err
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    assert rc == 2, err
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err, err
    assert needle in lines[0], lines[0]
    assert set(os.listdir(tmp_path)) == before
    assert hashlib.sha256(path.read_bytes()).hexdigest() == digest


def test_huge_input_refused_by_bench_and_check(tmp_path, monkeypatch, capsys, rng):
    """`rewrite bench` and `rewrite check` refuse the [10^10, 10^10] input the same way (exit 2, one line)."""
    onnx.save(_huge(rng), tmp_path / "m.onnx")
    monkeypatch.chdir(tmp_path)
    for argv in (["bench", "m.onnx"], ["check", "m.onnx", "--passes", "foldnorm"]):
        rc = main(argv)
        err = capsys.readouterr().err
        assert rc == 2 and err.count("\n") == 1 and "--max-input-bytes raises it" in err, err


def test_limit_raised_by_the_flag(rng):
    """Inputs over the default limit verify once --max-input-bytes (API: max_input_bytes) allows them."""
    m = _huge_symbolic(rng)
    with pytest.raises(BadInput, match="over the 1 KiB limit"):
        rewriter.rewrite(m, ["foldnorm"], shapes={"x": [100, 4]}, max_input_bytes=1024)
    res = rewriter.rewrite(m, ["foldnorm"], shapes={"x": [100, 4]}, max_input_bytes=1600)
    assert res.passed and res.verification["inputs"]["x"] == [100, 4]


def test_size_checked_before_allocation():
    """The check runs on the declared shape: a [10^10, 10^10] spec is refused without any allocation attempt."""
    spec = InputSpec("x", [10**10, 10**10], np.dtype(np.float32))
    with pytest.raises(BadInput, match=r"3.64e\+08 TiB"):
        make_inputs([spec])


def test_npz_size_from_headers(tmp_path):
    """--inputs is checked from the .npz headers: a compressed file that would inflate past the limit is refused."""
    np.savez_compressed(tmp_path / "z.npz", x=np.zeros((1 << 12, 1 << 10), np.float32))  # 16 MiB, a few KiB on disk
    assert (tmp_path / "z.npz").stat().st_size < 100_000
    spec = InputSpec("x", ["n", 1 << 10], np.dtype(np.float32))
    with pytest.raises(BadInput, match="would need 16 MiB"):
        load_inputs(str(tmp_path / "z.npz"), [spec], max_bytes=1 << 20)
    assert load_inputs(str(tmp_path / "z.npz"), [spec], max_bytes=1 << 25)["x"].shape == (1 << 12, 1 << 10)


def test_parse_bytes():
    """Sizes parse in binary units; nonsense and zero are refused."""
    assert parse_bytes("1073741824") == 1 << 30
    assert parse_bytes("512M") == 512 << 20 and parse_bytes("4G") == 4 << 30 and parse_bytes("1.5k") == 1536
    assert parse_bytes("2GiB") == 2 << 30
    for bad in ("", "G", "-1", "0", "4X"):
        with pytest.raises(BadInput):
            parse_bytes(bad)


def test_unsorted_graph_is_sorted_and_rewritten(rng):
    """Nodes listed out of order (acyclic) are sorted, folded and verified: not mistaken for a cycle."""
    m = _model(list(reversed(_gemm_bn_nodes())), inits=_gemm_bn_inits(rng))
    res = rewriter.rewrite(m, ["foldnorm"])
    assert res.passed and len(res.records[0].applied) == 1
    out = res.model
    assert [n.op_type for n in out.graph] == ["Gemm"]
    x = rng.standard_normal((2, 4)).astype(np.float32)
    assert max_rel(run_ort(m, {"x": x})[0], run_ort(out, {"x": x})[0]) <= 1e-5


def test_subgraph_reading_outer_values_is_fine(rng):
    """An If branch reading a tensor of the enclosing graph is not an undefined tensor."""
    then = helper.make_graph([helper.make_node("Relu", ["h"], ["t"], name="then_relu")], "then", [],
                             [helper.make_tensor_value_info("t", TensorProto.FLOAT, [2, 3])])
    other = helper.make_graph([helper.make_node("Neg", ["h"], ["e"], name="else_neg")], "else", [],
                              [helper.make_tensor_value_info("e", TensorProto.FLOAT, [2, 3])])
    nodes = [helper.make_node("Gemm", ["x", "W"], ["h"], transB=1, name="g"),
             helper.make_node("ReduceSum", ["x"], ["s"], keepdims=0, name="sum"),
             helper.make_node("Greater", ["s", "zero"], ["cond"], name="gt"),
             helper.make_node("If", ["cond"], ["y"], then_branch=then, else_branch=other, name="if")]
    m = _model(nodes, inits=[init("W", rng.standard_normal((3, 4))), init("zero", np.zeros(()))])
    res = rewriter.rewrite(m, ["foldnorm"])
    assert not res.records[0].applied
    assert any("control flow (If)" in s.reason for s in res.records[0].declined)
