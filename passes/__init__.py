"""The passes. Each module registers one pass with ``rewriter.pass_api.register``;
importing this package loads them all. A new pass is a new module plus a line here."""

from passes import alphabn, crms, foldnorm, lns, osplus, rettention, rms, shiftadd, unmixtns  # noqa: F401
