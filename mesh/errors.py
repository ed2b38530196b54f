"""Typed errors.

Two kinds (STYLE.md): a *local* error is the caller's mistake and is raised with a
message that says what to do (``CommandError`` and subclasses); a *remote* error is a
peer's or an input's fault (``EnvelopeError`` and subclasses): the receiver drops the
input, counts it under ``reason`` and keeps serving.
"""

from __future__ import annotations

__all__ = [
    "BadSignature",
    "BrokenChain",
    "CertificateError",
    "ClockSkew",
    "CommandError",
    "EnvelopeError",
    "Equivocation",
    "ExpiredCertificate",
    "Forbidden",
    "KeyPermissionError",
    "LedgerError",
    "Malformed",
    "NodeCertificateExpired",
    "NotEnrolled",
    "Oversized",
    "PendingFull",
    "RevokedCertificate",
    "SeqGap",
    "StorageFull",
    "TxnReused",
    "UnknownOrigin",
    "UnknownSku",
    "WrongStore",
]


class EnvelopeError(Exception):
    """An envelope (or message) from outside was refused.

    ``reason`` is a short stable label used as the metric/log key.
    """

    reason = "invalid"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def __str__(self) -> str:
        return f"{self.reason}: {self.message}"


class Malformed(EnvelopeError):
    reason = "malformed"


class Oversized(EnvelopeError):
    reason = "oversized"


class UnknownOrigin(EnvelopeError):
    reason = "unknown_origin"


class CertificateError(EnvelopeError):
    reason = "bad_certificate"


class NotEnrolled(CertificateError):
    reason = "not_enrolled"


class RevokedCertificate(CertificateError):
    reason = "revoked"


class ExpiredCertificate(CertificateError):
    reason = "expired"


class BadSignature(EnvelopeError):
    reason = "bad_signature"


class WrongStore(EnvelopeError):
    reason = "wrong_store"


class Forbidden(EnvelopeError):
    """The ops touch something the origin may not write."""

    reason = "forbidden"


class BrokenChain(EnvelopeError):
    """``prev`` does not match the hash of the origin's previous envelope."""

    reason = "broken_chain"


class SeqGap(EnvelopeError):
    """The envelope's seq is beyond what can be buffered (too far in the future)."""

    reason = "seq_gap"


class PendingFull(SeqGap):
    """Buffering the envelope would exceed the pending buffer's byte bounds
    (``MAX_PENDING_BYTES_PER_ORIGIN``, ``MAX_PENDING_BYTES``)."""

    reason = "pending_full"


class Equivocation(EnvelopeError):
    """Two different signed envelopes for the same (origin, seq): proof of a faulty node."""

    reason = "equivocation"

    def __init__(self, message: str, origin: str, seq: int, first: bytes, second: bytes) -> None:
        super().__init__(message)
        self.origin = origin
        self.seq = seq
        self.first = first
        self.second = second


class ClockSkew(EnvelopeError):
    """An HLC the clock cannot move past (the very end of its 63-bit range). Acceptance
    does not otherwise depend on the wall clock (``Replica`` invariant 8)."""

    reason = "clock_skew"


class CommandError(Exception):
    """A local command was refused (caller's mistake); nothing was changed.

    ``field`` names the offending input field, for 4xx JSON bodies.
    """

    def __init__(self, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.field = field


class NodeCertificateExpired(CommandError):
    """This node's own certificate has expired: no peer would accept what it signs
    (``mesh.core.envelope`` invariant 7), so a local command is refused before anything is
    written (the POS API answers 503). Renewal by the edge prevents it; past it, join
    again."""


class UnknownSku(CommandError):
    pass


class TxnReused(CommandError):
    """The txn id was already used for a different operation (the HTTP API's 422)."""


class KeyPermissionError(Exception):
    """A key file is readable by others; refuse to use it."""


class LedgerError(Exception):
    """The durable ledger failed (I/O error, corruption)."""


class StorageFull(LedgerError):
    """The disk is full: the write was not made durable and was not acknowledged."""
