"""Triton kernels, each registered as a torch custom op with a plain-torch CPU kernel
beside it (so rewritten GraphModules run anywhere). Later passes add kernels here."""
