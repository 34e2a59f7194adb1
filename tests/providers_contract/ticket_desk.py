"""A minimal third provider ("ticketdesk"), written from the contract alone.

An in-memory "ticket desk": one ticket per handoff, text only (no media,
locations or cards), no transfers, no queue reports, no history to catch up
from, no webhooks and no ``abandon``; its ``validate_start`` (``SupportsValidation``)
refuses nothing unless a test sets ``Desk.validate``. The desk pushes what its agents do
through ``ProviderDeps.sink``, as a backend holding a socket would.

The desk (``Desk``) outlives the service: tests restart the service on the
same desk, as a real backend outlives a process. The provider finds its desk
by ``HITL_TICKETDESK_DESK`` in ``DESKS``, so it is installed the documented
way (an entry point) and built by the registry. Its operations can be
scripted (``Desk.hooks``) to misbehave: raise, hang, return wrong values.
"""

from __future__ import annotations

import itertools
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from providers import (
    Agent,
    AgentAssigned,
    AgentMessage,
    Author,
    Capabilities,
    CatchUp,
    ChatInactive,
    Ended,
    EndedBy,
    EventKind,
    EventSink,
    InboundEvent,
    InvalidField,
    Message,
    ProviderChat,
    ProviderConfigError,
    ProviderDeps,
    ProviderUser,
    SendResult,
    StartFields,
    StartRequest,
    StartResult,
    UserProfile,
    WebhookBatch,
    WebhookRejected,
)
from providers.fallback import body_text

if TYPE_CHECKING:
    from starlette.routing import BaseRoute

DESK_SETTING = "HITL_TICKETDESK_DESK"

Hook = Callable[..., Awaitable[Any]]
"""Runs instead of an operation's own work; gets the operation's arguments."""


@dataclass
class Ticket:
    """One handoff at the desk."""

    id: str
    customer: str
    subject: str
    group: str
    request_id: str
    transcript: list[Message]
    messages: list[tuple[str, Message]] = field(default_factory=list)  # request id, message
    open: bool = True


@dataclass
class Desk:
    """The backend: tickets, and what the test scripts."""

    name: str = ""  # its key in ``DESKS``
    tickets: dict[str, Ticket] = field(default_factory=dict)
    sink: EventSink | None = None  # the running service's, set by ``open``
    hooks: dict[str, Hook] = field(default_factory=dict)
    validate: Callable[[StartFields], Any] | None = None  # ``validate_start``'s answer
    calls: list[str] = field(default_factory=list)  # operation names, in order
    capabilities: Capabilities = field(default_factory=Capabilities)  # text only
    routes_error: Exception | None = None  # what ``routes()`` raises, if set
    _ids: itertools.count[int] = field(default_factory=lambda: itertools.count(1))
    _events: itertools.count[int] = field(default_factory=lambda: itertools.count(1))

    def new_ticket_id(self) -> str:
        return f"TD-{next(self._ids)}"

    def messages(self, ticket_id: str) -> list[Message]:
        """The end user's messages the ticket holds, in order."""
        return [message for _rid, message in self.tickets[ticket_id].messages]

    def received(self, ticket_id: str) -> list[str]:
        """See ``contract.AgentSide``."""
        return [body_text(message) for message in self.messages(ticket_id)]

    # --- what the desk's agents do ------------------------------------------------
    async def push(self, ticket_id: str, kind: EventKind, key: str = "") -> int:
        """Reports an event the way the desk's client library calls back."""
        assert self.sink is not None, "the provider is not open"
        event = InboundEvent(ticket_id, kind, key or f"td-ev-{next(self._events)}")
        return await self.sink.deliver(WebhookBatch(action="desk", events=(event,)))

    async def take(self, ticket_id: str, agent: Agent) -> int:
        """See ``contract.AgentSide``."""
        return await self.push(ticket_id, AgentAssigned(agent))

    async def reply(self, ticket_id: str, agent: Agent, text: str) -> int:
        """See ``contract.AgentSide``."""
        message = Message(body=text, author=Author.AGENT)
        return await self.push(ticket_id, AgentMessage(message, agent))

    async def close(self, ticket_id: str, agent: Agent) -> int:
        """See ``contract.AgentSide``."""
        return await self.solve(ticket_id)

    async def solve(self, ticket_id: str) -> int:
        self.tickets[ticket_id].open = False
        return await self.push(ticket_id, Ended(by=EndedBy.AGENT), key=f"{ticket_id}:solved")


DESKS: dict[str, Desk] = {}
"""Desks by ``HITL_TICKETDESK_DESK``: what tests hand the provider."""


class TicketDeskProvider:
    """See the module docstring."""

    name = "ticketdesk"
    webhooks = False
    capabilities: Capabilities

    def __init__(self, deps: ProviderDeps) -> None:
        key = deps.env.get(DESK_SETTING, "")
        desk = DESKS.get(key)
        if desk is None:
            raise ProviderConfigError(DESK_SETTING, f"no desk named {key!r}")
        self.desk = desk
        # Text only; no transfers, queue info or catch-up unless a test says.
        self.capabilities = desk.capabilities
        self._sink = deps.sink

    async def _hooked(self, operation: str, *args: Any, **kwargs: Any) -> tuple[bool, Any]:
        self.desk.calls.append(operation)
        hook = self.desk.hooks.get(operation)
        if hook is None:
            return False, None
        return True, await hook(*args, **kwargs)

    async def open(self) -> None:
        """See base class."""
        self.desk.sink = self._sink
        await self._hooked("open")

    async def close(self) -> None:
        """See base class."""

    async def probe(self, *, timeout: float) -> Sequence[str]:
        """See base class."""
        return []

    def validate_start(self, fields: StartFields) -> Sequence[InvalidField]:
        """See ``SupportsValidation``: what ``Desk.validate`` answers, if set."""
        self.desk.calls.append("validate_start")
        if self.desk.validate is None:
            return ()
        return self.desk.validate(fields)  # type: ignore[no-any-return]

    async def upsert_user(
        self, profile: UserProfile, user: ProviderUser | None, *, timeout: float
    ) -> ProviderUser:
        """See base class."""
        hooked, value = await self._hooked("upsert_user", profile, user)
        if hooked:
            return value  # type: ignore[no-any-return]
        return user or ProviderUser(f"cust-{profile.id}")

    async def start(
        self, request: StartRequest, user: ProviderUser, *, timeout: float
    ) -> StartResult:
        """See base class: a new ticket per handoff; a retry of the same
        request reuses the ticket it opened."""
        hooked, value = await self._hooked("start", request, user)
        if hooked:
            return value  # type: ignore[no-any-return]
        for ticket in self.desk.tickets.values():
            if ticket.request_id == request.request_id and ticket.customer == user.external_user_id:
                break
        else:
            ticket = Ticket(
                id=self.desk.new_ticket_id(),
                customer=user.external_user_id,
                subject=request.title,
                group=request.group_id or "support",
                request_id=request.request_id,
                transcript=list(request.history),
            )
            self.desk.tickets[ticket.id] = ticket
        return StartResult(ProviderChat(ticket.id), ticket.group)

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
        """See base class: a request id the ticket holds is not added again."""
        hooked, value = await self._hooked("send", chat, message, request_id, uncertain)
        if hooked:
            return value  # type: ignore[no-any-return]
        ticket = self.desk.tickets[chat.external_chat_id]
        if not ticket.open:
            raise ChatInactive()
        if not any(rid == request_id for rid, _m in ticket.messages):
            ticket.messages.append((request_id, message))
        return SendResult(f"{ticket.id}/{request_id}")

    async def stop(
        self, chat: ProviderChat, user: ProviderUser, reason: str, *, timeout: float
    ) -> None:
        """See base class."""
        hooked, _value = await self._hooked("stop", chat, reason)
        if hooked:
            return
        self.desk.tickets[chat.external_chat_id].open = False

    def parse_webhook(self, headers: Mapping[str, str], body: bytes) -> WebhookBatch:
        """See base class: the desk pushes instead."""
        raise WebhookRejected(404, "the ticket desk takes no webhooks")

    async def catch_up(
        self, chat: ProviderChat, user: ProviderUser, checkpoint: str, *, timeout: float
    ) -> CatchUp:
        """See base class: the desk keeps no history we could read."""
        hooked, value = await self._hooked("catch_up", chat, checkpoint)
        if hooked:
            return value  # type: ignore[no-any-return]
        return CatchUp()

    def routes(self) -> Sequence[BaseRoute]:
        """See base class."""
        if self.desk.routes_error is not None:
            raise self.desk.routes_error
        return ()


def create(deps: ProviderDeps) -> TicketDeskProvider:
    """The entry point's factory."""
    return TicketDeskProvider(deps)
