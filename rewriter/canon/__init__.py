"""Canonicalization: exporter spellings of one op recognised as the semantic op the passes
use, in both IRs (docs/architecture.md, layer 2).

* ``patterns``: a small pattern language (ops, value variables, constants with tests,
  named alternatives) matched backwards over either IR through an ``Adapter``.
* ``norms``: the rules for LayerNorm / RMSNorm chains, each with its gloss and the
  exporters that write it, and ``find_norms``.
* ``onnx_adapter``: onnx-ir. The ONNX view (``OnnxView``) groups a recognised chain into
  one ``layer_norm`` / ``rms_norm`` node over the chain's IR nodes without changing the
  graph; an edit of the norm edits or replaces the chain.
* ``fx_adapter``: torch.fx. ``canonicalize_norms`` rewrites a recognised chain into
  ``aten.layer_norm`` / ``aten.rms_norm`` (exact within float rounding).

Why not onnxscript's rewriter: its LayerNorm fusion rules find 0 of 7 norms on the
TorchScript GPT-2 / ViT files (measured on the project's exports, docs/architecture.md); its pattern machinery would need
one pattern per combination of spellings (5 roots x 2 squares x casts x affine), gives no
reason for a near miss that ``rewrite explain`` could show, and serves onnx-ir only, where
one rule set here serves both IRs.
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
