"""Typed errors. Each carries the CLI exit code it maps to (see README, "Exit codes")."""

from __future__ import annotations


class RewriterError(Exception):
    """Base class: a problem the user can act on. ``str(err)`` is one line."""

    exit_code = 2


class BadInput(RewriterError):
    """Bad input or usage (exit 2): unreadable model, unknown pass, malformed option..."""

    exit_code = 2


class VerificationFailed(RewriterError):
    """The rewritten model does not match the original within tolerance (exit 1)."""

    exit_code = 1

    def __init__(self, message: str, result=None):
        super().__init__(message)
        self.result = result


class NothingApplied(RewriterError):
    """A requested pass applied to no site (exit 3)."""

    exit_code = 3

    def __init__(self, message: str, result=None):
        super().__init__(message)
        self.result = result


class UnsupportedModel(BadInput):
    """The model uses something the rewriter cannot handle safely."""
