"""Backends: ``ort`` (ONNX emission and sessions) and ``triton`` (kernels + torch ops)."""
