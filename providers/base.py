"""The Provider contract: what a backend implements to serve handoffs.

The core owns persistence, idempotency, dedupe, the retry policy, event
numbering and fan-out; a provider only translates to and from its backend.
Providers never touch the store or generated protobuf code; they may import
the leaf utilities ``hitl_service.clock`` and ``hitl_service.secret``.

A third-party provider is a distribution that registers a factory under the
entry-point group ``hitl_service.providers``::

    [project.entry-points."hitl_service.providers"]
    acme = "acme_hitl:create_provider"

The factory is called with a :class:`ProviderDeps` and returns a
:class:`Provider`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Protocol, TextIO, runtime_checkable

if TYPE_CHECKING:
    import httpx
    from prometheus_client import CollectorRegistry
    from starlette.routing import BaseRoute

    from hitl_service.clock import Clock
    from providers.types import (
        Capabilities,
        CatchUp,
        InvalidField,
        Message,
        ProviderChat,
        ProviderUser,
        SendResult,
        StartFields,
        StartRequest,
        StartResult,
        UserProfile,
        WebhookBatch,
    )


@runtime_checkable
class EventSink(Protocol):
    """Where a provider pushes events it learns outside a webhook.

    The local console and any provider that holds a socket to its backend
    use it; webhook providers are called through ``parse_webhook`` instead.
    """

    async def deliver(self, batch: WebhookBatch) -> int:
        """Commits the batch's events; returns how many were new.

        Returns only after the events are durably stored. Call it on the
        service's event loop (from a task of the provider's, or within one
        of its calls: a start, send or stop may report events at once).
        Events of a chat the core does not know are dropped, or, while a
        start is in flight, kept and applied when that start returns its
        chat: neither counts as new.

        Raises:
            ProviderUnavailable: The store is unavailable; nothing was
                stored: deliver the batch again later.
            Exception: Anything else (an event the core cannot apply): the
                whole batch is refused, nothing of it stored.
        """
        ...


@dataclass(frozen=True, slots=True)
class ProviderDeps:
    """What the composition root hands a provider factory.

    Attributes:
        env: The process environment merged with ``.env``; providers read
            their own ``HITL_<NAME>_*`` settings from it. Name secret settings
            with ``TOKEN``, ``SECRET``, ``PASSWORD``, ``API_KEY``,
            ``PRIVATE_KEY`` or ``CREDENTIAL`` in them: the log redactor masks
            those values wherever they appear.
        sink: Where to push events that do not come through a webhook.
            ``hitl-service check`` and provider commands build and open the
            provider with no service running: their sink refuses every
            batch (``ProviderUnavailable``), so keep the events for the
            service and do not acknowledge them to the backend.
        clock: Time source; use it instead of ``datetime.now``/``sleep``.
        registry: Prometheus registry for the provider's own metrics.
        data_dir: A directory the provider may keep local files in.
        http_transport: httpx transport to use (tests inject fakes); None
            means the default network transport.
    """

    env: Mapping[str, str] = field(repr=False)  # holds tokens, secrets, the store URL
    sink: EventSink
    clock: Clock
    registry: CollectorRegistry
    data_dir: Path
    http_transport: httpx.AsyncBaseTransport | None = None


@runtime_checkable
class Provider(Protocol):
    """A backend that serves handoffs. All network calls take a timeout.

    Errors: raise ``ProviderUnavailable`` for transient failures (the core
    retries), ``ProviderRejected`` (or ``ChatInactive``/``ProviderAuthError``)
    for permanent ones, ``WebhookRejected`` from ``parse_webhook``. Anything
    else a call raises is taken for a provider bug: ``StartHitl`` answers
    INTERNAL, and a send or stop is retried as uncertain (a send until it
    expires with ``DELIVERY_EXPIRED``).

    ``ProviderUser.state`` and ``ProviderChat.state`` may be updated in place
    during a call; the core persists them afterwards, also when the call
    then fails (a token renewed before an outage is kept).

    ``name`` is the entry-point name, and must never change: webhooks are
    served at ``/webhooks/{name}``, and stored identities, sessions and
    dedupe keys are keyed by it. A provider that receives no webhooks sets
    ``webhooks = False`` (the start-up banner then lists no webhook route);
    ``/webhooks/{name}`` still reaches its ``parse_webhook``, which refuses
    every delivery (``WebhookRejected(404, ...)``).
    """

    name: str
    capabilities: Capabilities

    async def open(self) -> None:
        """Prepares clients and background work; called once at start-up.

        Keep it short: ``hitl-service check`` gives it
        ``HITL_PROVIDER_TIMEOUT``, and the service serves nothing until it
        returns.

        Raises ``ProviderConfigError`` for a setting it cannot use (the
        process stops with that one line); any other error also stops the
        start with one line naming the provider.
        """
        ...

    async def close(self) -> None:
        """Releases clients; called once at shutdown, within
        ``HITL_PROVIDER_TIMEOUT`` (errors are logged, never raised on)."""
        ...

    async def probe(self, *, timeout: float) -> Sequence[str]:
        """Checks settings and reachability.

        Returns:
            Problems in plain words, each naming the setting to fix; empty
            when everything works.

        Raises:
            ProviderUnavailable: The backend cannot be reached.
        """
        ...

    async def upsert_user(
        self, profile: UserProfile, user: ProviderUser | None, *, timeout: float
    ) -> ProviderUser:
        """Creates the user's identity at the backend, or updates it.

        Args:
            profile: Name, e-mail and picture as the caller registered them.
            user: The identity from an earlier call, to reuse; None the
                first time.
        """
        ...

    async def start(
        self, request: StartRequest, user: ProviderUser, *, timeout: float
    ) -> StartResult:
        """Opens a chat for the handoff with the transcript, routed to a group.

        Resume ``request.previous_chat`` when the backend keeps one chat per
        user. Must be safe to call again for the same ``request.request_id``
        after an uncertain failure (reuse an already open chat). Raising
        ``ProviderRejected`` is an answer: close what the call opened first.
        """
        ...

    async def send(
        self,
        chat: ProviderChat,
        user: ProviderUser,
        message: Message,
        *,
        request_id: str,
        uncertain: bool,
        timeout: float,
    ) -> SendResult:
        """Delivers an end-user message to the agent side.

        Args:
            request_id: The idempotency key; pass it to the backend as its
                own (LiveChat ``custom_id``).
            uncertain: An earlier attempt of this request may have reached the
                backend: look for ``request_id`` in the chat first and send
                only what is missing.

        Bodies the backend cannot carry natively go as readable text.

        Raises:
            ChatInactive: The chat is closed.
        """
        ...

    async def stop(
        self, chat: ProviderChat, user: ProviderUser, reason: str, *, timeout: float
    ) -> None:
        """Closes the chat at the backend. Closing a closed chat is a no-op."""
        ...

    def parse_webhook(self, headers: Mapping[str, str], body: bytes) -> WebhookBatch:
        """Verifies and normalizes one inbound webhook delivery.

        Pure and fast: no network calls. Raises ``WebhookRejected`` (and only
        that) for anything it refuses.
        """
        ...

    async def catch_up(
        self, chat: ProviderChat, user: ProviderUser, checkpoint: str, *, timeout: float
    ) -> CatchUp:
        """Lists what happened in the chat after ``checkpoint`` ("" = start).

        Returned events carry the same dedupe keys their webhooks would, so
        overlap with delivered webhooks is harmless. Called only when
        ``capabilities.catch_up`` is set; providers without a history API
        leave it unset and return an empty ``CatchUp``.
        """
        ...

    def routes(self) -> Sequence[BaseRoute]:
        """Extra HTTP routes the sidecar serves for this provider (may be empty).

        Called once, while the service is built: after the factory, before
        ``open``. An error here stops the start with one line naming the
        provider, as one in the factory does.

        A route with a long-lived (streamed) answer ends it once the
        ``asyncio.Event`` ``request.app.state.draining`` is set: the service
        is shutting down, and waits for open answers before cancelling them.
        """
        ...


@runtime_checkable
class SupportsAbandon(Protocol):
    """A provider that can close what a start given up on may have opened.

    A ``StartHitl`` that ends without an answer from the backend (it was
    unreachable, the service restarted mid-start, a bug) may still have
    opened a chat, which would wait in the agents' queue with nobody
    listening. The caller is told to retry with the same ``request_id``
    (``start`` then reuses that chat); if no handoff of the user is open
    ``HITL_ABANDON_AFTER`` later, the core calls ``abandon`` through its
    outbox (retried like a stop while the backend is unreachable).
    """

    async def abandon(
        self, user: ProviderUser, *, session_id: str, request_id: str, timeout: float
    ) -> bool:
        """Closes the chat the start with this request (and session) id
        opened, if it is still open; leaves any other chat alone.

        Returns:
            True if it closed a chat.
        """
        ...


@runtime_checkable
class SupportsValidation(Protocol):
    """A provider with rules of its own for StartHitl's fields (LiveChat:
    group ids are numbers).

    ``start`` runs after the session is stored and the user's identity is
    upserted at the backend, so a refusal there leaves a FAILED session and
    reaches the caller as FAILED_PRECONDITION. A field the provider can
    judge from its value alone is refused here instead: the core calls
    ``validate_start`` with the service's own checks, before anything is
    stored, idempotency records included, or sent, and the caller gets one
    INVALID_ARGUMENT with every violation. A retry of the refused request
    (the same ``request_id``) is refused the same way; the corrected
    request may reuse the id. ``start`` should still refuse what this
    refuses (``ProviderRejected``): a service older than this hook does not
    call it.
    """

    def validate_start(self, fields: StartFields) -> Sequence[InvalidField]:
        """The fields the provider cannot take; empty when it can.

        Synchronous, fast and free of side effects: it runs on the event
        loop for every StartHitl, before the idempotency lookup, so its
        answer must depend only on the fields and the provider's settings
        (no network, nothing it learned since). An exception, or an answer
        other than ``InvalidField`` items whose ``field`` starts with a name
        of ``StartFields``, is taken for a provider bug: StartHitl answers
        INTERNAL, with nothing stored. Descriptions over 300 characters are
        cut.
        """
        ...


@runtime_checkable
class SupportsCommands(Protocol):
    """A provider with its own CLI subcommands (``hitl-service <name> ...``).

    The CLI builds and opens the configured provider, then hands it the
    arguments after the provider name.
    """

    async def run_command(self, argv: Sequence[str], out: TextIO) -> int:
        """Runs one subcommand; writes plain-words output to ``out``.

        Returns:
            The process exit status.
        """
        ...


class ProviderFactory(Protocol):
    """Builds a provider; what the entry point names."""

    def __call__(self, deps: ProviderDeps) -> Provider:
        """Reads the provider's settings from ``deps.env`` and builds it.

        Raises:
            ProviderConfigError: A setting is missing or malformed.
        """
        ...


__all__ = [
    "EventSink",
    "Provider",
    "ProviderDeps",
    "ProviderFactory",
    "SupportsAbandon",
    "SupportsCommands",
    "SupportsValidation",
]
