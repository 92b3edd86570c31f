"""Recognition (layer 2 of ``docs/architecture.md``): every exporter spelling of a
semantic op, as rules with a gloss and a test from real exporter output. The views
(``rewriter/ir``) take their semantic nodes from here and do not recognise anything.

* ``patterns``: a small pattern language (ops, value variables, constants with tests,
  named alternatives) matched backwards over either IR through an ``Adapter``.
* ``norms``: LayerNorm / RMSNorm chains, each rule with its gloss and the exporters that
  write it, and ``find_norms``; ``onnx_adapter`` / ``fx_adapter`` read each IR for them
  (``fx_adapter.canonicalize_norms`` rewrites a chain into ``aten.layer_norm`` /
  ``aten.rms_norm``).
* ``onnx_nodes`` / ``fx_nodes``: each IR node as the semantic node the passes see
  (linear as MatMul+Add or Gemm, aten linear / addmm / mm; embeddings; conv; batch
  norms; onnxruntime's skip-norms as a join and a norm; norm chains).
* ``linear``: a linear seen through Flatten / Reshape views that keep the feature axis.
* ``attention``: softmax attention sites in both IRs, what stops a rewrite, and whether
  a site is self- or cross-attention (decided by dataflow); linear attention.
* ``gates``: gated branches (adaLN-Zero), decided by data dependence on a conditioning input.
* ``embedding_norms``: a norm that starts the residual stream (CLIP's ``pre_layrnorm``).

Why not onnxscript's rewriter: its LayerNorm fusion rules find 0 of 7 norms on the
TorchScript GPT-2 / ViT files (``tests/canon/test_norms.py`` builds them); its pattern
machinery would need one pattern per combination of spellings (5 roots x 2 squares x
casts x affine), gives no reason for a near miss that ``rewrite explain`` could show, and
serves onnx-ir only, where one rule set here serves both IRs.
"""

from rewriter.canon.norms import NormMatch, NormSearch, find_norms


def near_miss_note(view) -> str:
    """``"; not recognised as norms: NODE (why), ..."`` for the norm-like chains of ``view``
    that a condition kept from being a norm, or ``""`` (for a pass's decline reason)."""
    misses = getattr(view, "canon_near_misses", None) or []
    if not misses:
        return ""
    head = ", ".join(f"{name} ({why})" for name, why in misses[:2])
    more = f" and {len(misses) - 2} more" if len(misses) > 2 else ""
    return f"; not recognised as norms: {head}{more}"


__all__ = ["NormMatch", "NormSearch", "find_norms", "near_miss_note"]
