"""Layer 4, lowering: emitting new ops in each IR (RMSNorm, CRMSNorm, Re-ttention,
shift-add, scales) and opset upgrades, through the views' edit primitives
(docs/architecture.md)."""
