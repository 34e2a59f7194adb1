"""Requests this process is handling right now (unary RPCs and webhooks).

The SQLite store reads it: a transaction that ends while other requests are
at work leaves its COMMIT to the next loop turn, so that their transactions
join it (one COMMIT for several); alone, it commits at once.
"""

from __future__ import annotations


class Activity:
    """A count of requests in progress, kept by the interceptor and the sidecar."""

    __slots__ = ("current",)

    def __init__(self) -> None:
        self.current = 0

    def others(self) -> bool:
        """Whether another request is in progress besides the caller's own."""
        return self.current > 1
