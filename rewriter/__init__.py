"""rewriter: a verified graph-level rewriting compiler for ONNX and torch models.

>>> import rewriter
>>> result = rewriter.rewrite("model.onnx", passes=["foldnorm"])
>>> result.save("model.foldnorm.onnx")
"""

from rewriter.api import Result, rewrite
from rewriter.errors import BadInput, NothingApplied, RewriterError, VerificationFailed
from rewriter.pass_api import Kind, Pass, Site, all_passes, register

__all__ = [
    "BadInput", "Kind", "NothingApplied", "Pass", "Result", "RewriterError", "Site",
    "VerificationFailed", "all_passes", "register", "rewrite",
]
