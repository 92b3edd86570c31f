"""ONNX Runtime backend: sessions (graph optimizations off for verification) and runs."""

from backends.ort.session import make_session, run_onnx

__all__ = ["make_session", "run_onnx"]
