"""Errors providers raise; the core maps them to retries and gRPC codes.

A provider translates its backend's failures into exactly these classes, so
the core's retry policy and error mapping work the same for every backend.
Messages must never contain secrets (tokens, webhook secrets, passwords).
"""

from __future__ import annotations


class ProviderError(Exception):
    """Base class of every error a provider raises on purpose."""


class ProviderUnavailable(ProviderError):
    """A transient failure: the call may succeed if retried.

    Attributes:
        retry_after: Seconds the backend asked us to wait, if it said; or,
            with ``uncertain``, how long it may still be carrying the
            request out (the retry, by any process, waits that long).
        uncertain: True when the request may have reached the backend and
            taken effect (timeout after sending, connection lost before the
            response). A retry of a send must then check before resending.
    """

    def __init__(
        self, message: str, *, retry_after: float | None = None, uncertain: bool = False
    ) -> None:
        super().__init__(message)
        self.retry_after = retry_after
        self.uncertain = uncertain


class ProviderRejected(ProviderError):
    """A permanent refusal of this request; retrying it will not help.

    Attributes:
        code: Stable UPPER_SNAKE code (for example ``CHAT_INACTIVE``), at
            most 63 characters: callers get it as the ``ErrorInfo`` reason.
            Any other code is replaced by the operation's generic one
            (``START_REFUSED``, ``DELIVERY_FAILED``, ``STOP_FAILED``).
    """

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


class ChatInactive(ProviderRejected):
    """The chat is closed at the provider, so it takes no more messages."""

    def __init__(self, message: str = "the chat is no longer active at the provider") -> None:
        super().__init__("CHAT_INACTIVE", message)


class ProviderAuthError(ProviderRejected):
    """The provider refused our credentials or configuration.

    Attributes:
        setting: The configuration variable to fix (for example
            ``HITL_LIVECHAT_AGENT_TOKEN``).
    """

    def __init__(self, setting: str, message: str) -> None:
        super().__init__("PROVIDER_CREDENTIALS", message)
        self.setting = setting


class ProviderConfigError(ProviderError):
    """A provider setting is missing or malformed (raised at start-up).

    Attributes:
        setting: The configuration variable to fix.
    """

    def __init__(self, setting: str, message: str) -> None:
        super().__init__(f"{setting}: {message}")
        self.setting = setting


class WebhookRejected(ProviderError):
    """An inbound webhook is refused; nothing of it is recorded.

    Attributes:
        status: HTTP status to answer (400 malformed, 401 bad secret, 413 too
            large).
        reason: Short explanation for the JSON body; never contains secrets.
    """

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason
