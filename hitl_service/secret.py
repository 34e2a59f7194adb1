"""A string that never shows itself in logs, reprs or error messages."""

from __future__ import annotations

import hmac
from typing import Final

_MASK: Final = "**********"


class Secret:
    """Holds a secret value; ``str()`` and ``repr()`` are masked.

    Call ``reveal()`` only at the point of use (an HTTP header, a
    comparison). Equality is constant-time and only against other ``Secret``s.
    """

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value

    def reveal(self) -> str:
        """The secret itself."""
        return self._value

    def matches(self, candidate: str | bytes) -> bool:
        """Compares ``candidate`` with the secret in constant time.

        Works on UTF-8 bytes, since ``hmac.compare_digest`` raises on
        non-ASCII ``str``.
        """
        raw = (
            candidate.encode("utf-8", "surrogatepass") if isinstance(candidate, str) else candidate
        )
        return hmac.compare_digest(raw, self._value.encode("utf-8", "surrogatepass"))

    def __bool__(self) -> bool:
        return bool(self._value)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Secret):
            return NotImplemented
        return self.matches(other._value)

    def __hash__(self) -> int:
        return hash(Secret)

    def __repr__(self) -> str:
        return f"Secret('{_MASK}')" if self._value else "Secret('')"

    def __str__(self) -> str:
        return _MASK if self._value else ""

    def __reduce__(self) -> tuple[object, ...]:
        raise TypeError("Secret values cannot be pickled")


def matches_any(candidate: str | bytes, secrets: tuple[Secret, ...]) -> bool:
    """True if ``candidate`` equals any of ``secrets``; compares against all.

    Every secret is compared (no early exit), so timing does not reveal which
    one matched; several secrets allow rotation without downtime.
    """
    found = False
    for secret in secrets:
        found |= secret.matches(candidate)
    return found
