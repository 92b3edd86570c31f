"""Generate a large Pre-LN transformer ONNX model with external data, directly with
``onnx.helper`` and numpy (no torch export), for the scale benchmark
(``benchmarks/scale_bench.py``). Nothing is written into the repository.

    python benchmarks/make_large_model.py [OUT.onnx] [--layers 24] [--d 1536] [--norm layer|batch]

The default (24 layers, d = 1536, vocab 4096) holds ~0.69 G fp32 parameters: a 2.7 GB
``OUT.onnx.data`` next to a small ``OUT.onnx``. Weights are written tensor by tensor, so
the generator needs only about one tensor of memory.

Graph (opset 18, ``ids [B, T] int64 -> logits [B, T, vocab]``): token ``Gather`` plus a
learned position constant; per block a pre-norm, q/k/v ``MatMul + Add`` linears, heads
by ``Reshape``/``Transpose``, ``MatMul -> Mul(1/sqrt(dh)) -> Add(causal mask) -> Softmax
-> MatMul``, the output projection and a residual ``Add``; a pre-norm, ``fc1``, GELU (the
``Erf`` form), ``fc2`` and a residual ``Add``; a final norm and the head. ``--norm layer``
uses ``LayerNormalization`` (the ``rms`` / ``crms`` target); ``--norm batch`` uses frozen
``BatchNormalization`` through transposes (``[B, T, d] -> [B, d, T]`` and back, the
``foldnorm`` target). Every intermediate value carries its static shape (``value_info``),
so nothing has to be inferred at load time.
"""

from __future__ import annotations

import argparse
import math
import os
import tempfile
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

_ALIGN = 4096  # external tensors start on page boundaries (mmap-friendly)
_INLINE = 1024  # tensors up to this many bytes are stored in the .onnx file


class _Builder:
    def __init__(self, data_path: Path, seed: int):
        self.data_path = data_path
        self.f = open(data_path, "wb")
        self.rng = np.random.default_rng(seed)
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self.infos: list[onnx.ValueInfoProto] = []
        self.count = 0

    def close(self) -> None:
        self.f.close()

    def tensor(self, name: str, array: np.ndarray) -> str:
        """An initializer: inline when tiny, else appended to the external data file."""
        array = np.ascontiguousarray(array)
        if array.nbytes <= _INLINE:
            self.inits.append(numpy_helper.from_array(array, name))
            return name
        pad = -self.f.tell() % _ALIGN
        if pad:
            self.f.write(b"\0" * pad)
        offset = self.f.tell()
        self.f.write(array.tobytes())
        t = TensorProto(name=name, data_type=helper.np_dtype_to_tensor_dtype(array.dtype), dims=array.shape)
        t.data_location = TensorProto.EXTERNAL
        for k, v in (("location", self.data_path.name), ("offset", str(offset)), ("length", str(array.nbytes))):
            e = t.external_data.add()
            e.key, e.value = k, v
        self.inits.append(t)
        return name

    def randn(self, name: str, shape, std: float, mean: float = 0.0) -> str:
        a = self.rng.standard_normal(shape, dtype=np.float32)
        a *= np.float32(std)
        if mean:
            a += np.float32(mean)
        return self.tensor(name, a)

    def node(self, op: str, inputs: list[str], shape, name: str, dtype=TensorProto.FLOAT, **attrs) -> str:
        out = f"{name}_out"
        self.nodes.append(helper.make_node(op, inputs, [out], name=name, **attrs))
        if shape is not None:
            self.infos.append(helper.make_tensor_value_info(out, dtype, list(shape)))
        return out


def _linear(b: _Builder, x: str, shape_in, d_in: int, d_out: int, name: str) -> str:
    w = b.randn(f"{name}.weight", (d_in, d_out), 1.0 / math.sqrt(d_in))
    bias = b.randn(f"{name}.bias", (d_out,), 0.02)
    out_shape = [*shape_in[:-1], d_out]
    h = b.node("MatMul", [x, w], out_shape, f"{name}_matmul")
    return b.node("Add", [h, bias], out_shape, f"{name}_add")


def _norm(b: _Builder, x: str, shape, kind: str, name: str) -> str:
    d = shape[-1]
    if kind == "layer":
        g = b.randn(f"{name}.weight", (d,), 0.2, 1.0)
        beta = b.randn(f"{name}.bias", (d,), 0.2)
        return b.node("LayerNormalization", [x, g, beta], shape, name, axis=-1, epsilon=1e-5)
    bt, tt, _ = shape
    t1 = b.node("Transpose", [x], [bt, d, tt], f"{name}_t_in", perm=[0, 2, 1])
    g = b.randn(f"{name}.scale", (d,), 0.2, 1.0)
    beta = b.randn(f"{name}.bias", (d,), 0.2)
    mean = b.randn(f"{name}.mean", (d,), 0.3)
    var = b.tensor(f"{name}.var", b.rng.random(d, dtype=np.float32) * 2 + 0.25)
    y = b.node("BatchNormalization", [t1, g, beta, mean, var], [bt, d, tt], name, epsilon=1e-5)
    return b.node("Transpose", [y], shape, f"{name}_t_out", perm=[0, 2, 1])


def _block(b: _Builder, x: str, i: int, *, batch: int, seq: int, d: int, heads: int, norm: str, consts) -> str:
    s3 = [batch, seq, d]
    dh = d // heads
    p = f"blocks.{i}"
    h = _norm(b, x, s3, norm, f"{p}.norm1")
    q, k, v = (_linear(b, h, s3, d, d, f"{p}.attn.{n}") for n in ("q", "k", "v"))
    s4 = [batch, seq, heads, dh]
    q, k, v = (b.node("Reshape", [t, consts["heads"]], s4, f"{p}.attn.{n}_heads")
               for t, n in ((q, "q"), (k, "k"), (v, "v")))
    q = b.node("Transpose", [q], [batch, heads, seq, dh], f"{p}.attn.q_t", perm=[0, 2, 1, 3])
    k = b.node("Transpose", [k], [batch, heads, dh, seq], f"{p}.attn.k_t", perm=[0, 2, 3, 1])
    v = b.node("Transpose", [v], [batch, heads, seq, dh], f"{p}.attn.v_t", perm=[0, 2, 1, 3])
    sc = [batch, heads, seq, seq]
    s = b.node("MatMul", [q, k], sc, f"{p}.attn.scores")
    s = b.node("Mul", [s, consts["scale"]], sc, f"{p}.attn.scaled")
    s = b.node("Add", [s, consts["mask"]], sc, f"{p}.attn.masked")
    a = b.node("Softmax", [s], sc, f"{p}.attn.softmax", axis=-1)
    y = b.node("MatMul", [a, v], [batch, heads, seq, dh], f"{p}.attn.mix")
    y = b.node("Transpose", [y], s4, f"{p}.attn.y_t", perm=[0, 2, 1, 3])
    y = b.node("Reshape", [y, consts["merge"]], s3, f"{p}.attn.merge")
    y = _linear(b, y, s3, d, d, f"{p}.attn.out")
    x = b.node("Add", [x, y], s3, f"{p}.resid1")
    h = _norm(b, x, s3, norm, f"{p}.norm2")
    hidden = 4 * d
    sh = [batch, seq, hidden]
    u = _linear(b, h, s3, d, hidden, f"{p}.mlp.fc1")
    e = b.node("Div", [u, consts["sqrt2"]], sh, f"{p}.mlp.gelu_div")
    e = b.node("Erf", [e], sh, f"{p}.mlp.gelu_erf")
    e = b.node("Add", [e, consts["one"]], sh, f"{p}.mlp.gelu_add")
    e = b.node("Mul", [u, e], sh, f"{p}.mlp.gelu_mul")
    e = b.node("Mul", [e, consts["half"]], sh, f"{p}.mlp.gelu")
    y = _linear(b, e, sh, hidden, d, f"{p}.mlp.fc2")
    return b.node("Add", [x, y], s3, f"{p}.resid2")


def build(out: str | os.PathLike, *, layers: int = 24, d: int = 1536, heads: int = 12, vocab: int = 4096,
          seq: int = 16, batch: int = 1, norm: str = "layer", seed: int = 0) -> dict:
    """Write ``out`` and ``out.data``; returns sizes (bytes, parameters)."""
    out = Path(out)
    if d % heads:
        raise ValueError(f"d={d} is not a multiple of heads={heads}")
    data = out.with_name(out.name + ".data")
    b = _Builder(data, seed)
    try:
        f32 = lambda v: np.asarray([v], dtype=np.float32)  # noqa: E731
        consts = {
            "heads": b.tensor("const.heads_shape", np.asarray([batch, seq, heads, d // heads], np.int64)),
            "merge": b.tensor("const.merge_shape", np.asarray([batch, seq, d], np.int64)),
            "scale": b.tensor("const.attn_scale", f32(1 / math.sqrt(d // heads))),
            "mask": b.tensor("const.causal_mask", np.triu(np.full((seq, seq), -1e4, np.float32), 1)),
            "sqrt2": b.tensor("const.sqrt2", f32(math.sqrt(2))),
            "one": b.tensor("const.one", f32(1)),
            "half": b.tensor("const.half", f32(0.5)),
        }
        tok = b.randn("tok.weight", (vocab, d), 1.0)
        pos = b.randn("pos.weight", (1, seq, d), 0.5)
        s3 = [batch, seq, d]
        x = b.node("Gather", [tok, "ids"], s3, "tok_gather", axis=0)
        x = b.node("Add", [x, pos], s3, "pos_add")
        for i in range(layers):
            x = _block(b, x, i, batch=batch, seq=seq, d=d, heads=heads, norm=norm, consts=consts)
        h = _norm(b, x, s3, norm, "norm_f")
        w = b.randn("head.weight", (d, vocab), 1.0 / math.sqrt(d))
        b.nodes.append(helper.make_node("MatMul", [h, w], ["logits"], name="head"))
    finally:
        b.close()
    graph = helper.make_graph(b.nodes, "large_prenorm_transformer",
                              [helper.make_tensor_value_info("ids", TensorProto.INT64, [batch, seq])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [batch, seq, vocab])],
                              b.inits, value_info=b.infos)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], producer_name="make_large_model")
    model.ir_version = 10
    with open(out, "wb") as f:
        f.write(model.SerializeToString())
    params = sum(int(np.prod(t.dims)) for t in b.inits)
    return {"onnx": str(out), "data": str(data), "bytes": out.stat().st_size + data.stat().st_size,
            "params": params, "layers": layers, "d": d, "norm": norm}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("out", nargs="?", default=str(Path(tempfile.gettempdir()) / "rewriter-large" / "large.onnx"))
    ap.add_argument("--layers", type=int, default=24)
    ap.add_argument("--d", type=int, default=1536)
    ap.add_argument("--heads", type=int, default=12)
    ap.add_argument("--vocab", type=int, default=4096)
    ap.add_argument("--seq", type=int, default=16)
    ap.add_argument("--norm", choices=["layer", "batch"], default="layer")
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args(argv)
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    info = build(a.out, layers=a.layers, d=a.d, heads=a.heads, vocab=a.vocab, seq=a.seq, norm=a.norm, seed=a.seed)
    print(f"wrote {info['onnx']} (+ {Path(info['data']).name}): {info['bytes'] / 1e9:.2f} GB, "
          f"{info['params'] / 1e6:.1f} M parameters, {info['layers']} layers, d={info['d']}, {info['norm']} norm")


if __name__ == "__main__":
    main()
