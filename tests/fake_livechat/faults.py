"""Scripted failures: per-method errors, delays, lost responses, bad JSON."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class Fault:
    """One scripted failure.

    Attributes:
        method: Method (or accounts endpoint ``customer_token``, or ``upload_file``)
            it applies to; ``"*"`` for all.
        kind: ``error`` (answer an error, the action does not run),
            ``lost_response`` (the action runs, then the connection drops
            before the answer), ``drop`` (the connection drops, the action does
            not run), ``delay`` (wait ``delay`` seconds, then act normally),
            ``bad_json`` (the action runs, the answer is not JSON), ``status``
            (answer ``status`` with ``body``, not LiveChat's error answer, as
            a proxy or load balancer would; the action does not run).
        api: Restrict to ``agent``, ``customer``, ``configuration`` or
            ``accounts``; None for any.
        error_type: For ``error``: the LiveChat error type (accounts: the
            ``oauth_exception``, answered in that API's format, 401 by default).
        message: For ``error``: the message.
        data: For ``error``: ``error.data`` (e.g. ``{"region": "fra"}``).
        status: HTTP status override (``error``/``status``).
        retry_after: ``Retry-After`` header value, if any.
        body: For ``status``: the answer's body.
        content_type: For ``status``: its ``Content-Type``.
        delay: For ``delay``: seconds (released early when the fake stops).
        times: How many requests it hits; None for all of them.
        hits: How many it has hit so far.
    """

    method: str
    kind: str = "error"
    api: str | None = None
    error_type: str = "internal"
    message: str = "Injected failure"
    data: dict[str, Any] | None = None
    status: int | None = None
    retry_after: str | None = None
    body: str = "upstream trouble"
    content_type: str = "text/plain"
    delay: float = 0.0
    times: int | None = 1
    hits: int = field(default=0)

    def matches(self, api: str, method: str) -> bool:
        """True if the fault applies to this call and is not used up."""
        if self.times is not None and self.hits >= self.times:
            return False
        return self.method in ("*", method) and self.api in (None, api)


class Faults:
    """The active faults, first match wins."""

    def __init__(self) -> None:
        self._faults: list[Fault] = []

    def add(self, fault: Fault) -> Fault:
        """Adds a fault; returns it (its ``hits`` count is live)."""
        self._faults.append(fault)
        return fault

    def clear(self) -> None:
        """Removes all faults."""
        self._faults.clear()

    def take(self, api: str, method: str) -> Fault | None:
        """The fault for this call, counting the hit."""
        for fault in self._faults:
            if fault.matches(api, method):
                fault.hits += 1
                return fault
        return None
