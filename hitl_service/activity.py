"""Requests this process is handling right now (unary RPCs and webhooks).

The SQLite store reads ``current``: a transaction that ends while other
requests are at work leaves its COMMIT to the next loop turn, so that their
transactions join it (one COMMIT for several); alone, it commits at once.
The sidecar reads ``http`` against ``HITL_HTTP_MAX_IN_FLIGHT``.
"""

from __future__ import annotations


class Activity:
    """Counts of requests in progress, kept by the interceptor and the sidecar.

    ``current``: unary RPCs and webhooks (``/webhooks/{provider}``).
    ``http``: the sidecar's provider routes alone (webhooks and the
    provider's own routes, e.g. the console), each from its arrival until
    its answer starts; never ``/healthz``, ``/readyz`` or ``/metrics``.
    """

    __slots__ = ("current", "http")

    def __init__(self) -> None:
        self.current = 0
        self.http = 0

    def others(self) -> bool:
        """Whether another request is in progress besides the caller's own."""
        return self.current > 1
