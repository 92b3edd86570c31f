"""Layer 5, running: capture, verification inputs, sessions and comparison, latency
(docs/architecture.md)."""
