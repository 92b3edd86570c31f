"""The IR-neutral graph view and its two adapters (ONNX through onnx-ir, torch through fx)."""

from rewriter.ir.view import Affine, GraphView, LinearParams, ConvParams, Node, Value

__all__ = ["Affine", "ConvParams", "GraphView", "LinearParams", "Node", "Value"]
