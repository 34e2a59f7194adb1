"""Domain errors: what went wrong, in terms callers can act on.

The core raises these; the gRPC layer maps each ``Code`` to a status code
with ``ErrorInfo`` (reason + metadata) and, for bad input, ``BadRequest``
field violations. Messages never contain secrets or end-user text.
"""

from __future__ import annotations

import enum
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass


class Code(enum.Enum):
    """Error classes; each maps to one gRPC status code."""

    INVALID_ARGUMENT = "INVALID_ARGUMENT"
    NOT_FOUND = "NOT_FOUND"
    FAILED_PRECONDITION = "FAILED_PRECONDITION"
    UNAVAILABLE = "UNAVAILABLE"
    UNAUTHENTICATED = "UNAUTHENTICATED"
    INTERNAL = "INTERNAL"


@dataclass(frozen=True, slots=True)
class FieldViolation:
    """One bad request field: ``field`` is a dotted path (``message.media.url``)."""

    field: str
    description: str


class HitlError(Exception):
    """Base of every error the core reports to callers.

    Attributes:
        code: The class of error.
        reason: Stable UPPER_SNAKE reason for ``ErrorInfo``.
        message: Plain words for people.
        metadata: Extra ``ErrorInfo`` values (ids, setting names).
        violations: Field violations (INVALID_ARGUMENT only).
    """

    def __init__(
        self,
        code: Code,
        reason: str,
        message: str,
        *,
        metadata: Mapping[str, str] | None = None,
        violations: Sequence[FieldViolation] = (),
    ) -> None:
        super().__init__(message)
        self.code = code
        self.reason = reason
        self.message = message
        self.metadata = dict(metadata or {})
        self.violations = tuple(violations)


# UTF-8 bytes of field paths and descriptions one error reports. They go
# out twice, in the status message (percent-encoded: non-ASCII triples) and
# in the BadRequest (base64), and gRPC clients refuse trailers over 8 KiB
# (randomly; always over 16 KiB) with RESOURCE_EXHAUSTED and no details.
_VIOLATION_BYTES = 1500


class InvalidArgument(HitlError):
    """The request has bad fields (the first ones, if very many)."""

    def __init__(self, violations: Sequence[FieldViolation]) -> None:
        kept: list[FieldViolation] = []
        size = 0
        for violation in violations:
            size += len(violation.field.encode()) + len(violation.description.encode())
            if kept and size > _VIOLATION_BYTES:
                break
            kept.append(violation)
        fields = ", ".join(v.field for v in kept)
        if len(kept) < len(violations):
            fields += f" and {len(violations) - len(kept)} more"
        super().__init__(
            Code.INVALID_ARGUMENT,
            "INVALID_FIELDS",
            f"invalid request fields: {fields}",
            violations=kept,
        )


class NotFound(HitlError):
    """An id names nothing."""

    def __init__(self, kind: str, ident: str) -> None:
        super().__init__(
            Code.NOT_FOUND,
            f"{kind.upper()}_NOT_FOUND",
            f"no {kind} with id {ident!r}",
            metadata={f"{kind}_id": ident},
        )


class FailedPrecondition(HitlError):
    """The request is valid but not in the current state."""

    def __init__(self, reason: str, message: str, **metadata: str) -> None:
        super().__init__(Code.FAILED_PRECONDITION, reason, message, metadata=metadata)


class Unavailable(HitlError):
    """The provider (or the store) cannot be reached right now."""

    def __init__(self, reason: str, message: str, **metadata: str) -> None:
        super().__init__(Code.UNAVAILABLE, reason, message, metadata=metadata)


_REASON = re.compile(r"[A-Z][A-Z0-9_]{0,61}[A-Z0-9]")


def provider_reason(code: object, fallback: str) -> str:
    """A provider's error code as an ``ErrorInfo`` reason: the code if it is
    one (UPPER_SNAKE, at most 63 characters, as ``google.rpc.ErrorInfo``
    requires and clients branch on), else ``fallback``. Third-party
    providers may pass anything (``""``, ``"not found"``)."""
    return code if isinstance(code, str) and _REASON.fullmatch(code) else fallback


class StoreUnavailable(Exception):
    """The store cannot be reached (connection lost, database down)."""
