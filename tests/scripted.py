"""A provider whose behaviour tests script: failures, uncertainty, delays.

It records every call, accepts webhooks in a tiny JSON format of its own
(so the generic webhook route can be tested without LiveChat), and lets a
test push events through the sink like a real backend would.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, TextIO

from providers.base import ProviderDeps
from providers.errors import (
    ChatInactive,
    ProviderAuthError,
    ProviderRejected,
    ProviderUnavailable,
    WebhookRejected,
)
from providers.types import (
    Agent,
    AgentAssigned,
    AgentMessage,
    Author,
    Capabilities,
    CatchUp,
    Ended,
    EndedBy,
    EventKind,
    InboundEvent,
    Message,
    ProviderChat,
    ProviderUser,
    Queued,
    SendResult,
    StartRequest,
    StartResult,
    UserProfile,
    WebhookBatch,
)

SECRET = "scripted-webhook-secret"


@dataclass
class Fault:
    """What the next call of an operation does instead of succeeding."""

    kind: str  # "unavailable", "uncertain", "rejected", "auth", "inactive", "hang"
    retry_after: float | None = None
    after_effect: bool = False  # "uncertain": the call took effect, then failed


@dataclass
class Recorded:
    """Everything the provider was asked to do."""

    starts: list[StartRequest] = field(default_factory=list)
    sends: list[tuple[str, Message, str, bool]] = field(default_factory=list)  # chat, msg, rid, unc
    stops: list[str] = field(default_factory=list)
    catch_ups: list[str] = field(default_factory=list)  # chat ids
    delivered: dict[str, Message] = field(default_factory=dict)  # request id → message


class ScriptedProvider:
    """``Provider`` for core tests."""

    name = "scripted"
    capabilities = Capabilities(transfers=True, queue_info=True, catch_up=True)

    def __init__(self, deps: ProviderDeps) -> None:
        self.deps = deps
        self.sink = deps.sink
        self.faults: dict[str, list[Fault]] = {}
        self.calls = Recorded()
        self.gates: dict[str, asyncio.Event] = {}
        self.waiting: dict[str, int] = {}  # calls currently held at a gate
        self.catch_up_events: dict[str, list[InboundEvent]] = {}
        self.next_chat = 0
        self.closed_chats: set[str] = set()
        self.problems: list[str] = []

    # --- scripting ------------------------------------------------------------------
    def fail(self, operation: str, *faults: Fault) -> None:
        """Queues faults for the next calls of ``operation``."""
        self.faults.setdefault(operation, []).extend(faults)

    def hold(self, operation: str) -> asyncio.Event:
        """Makes calls of ``operation`` wait until the returned event is set."""
        gate = asyncio.Event()
        self.gates[operation] = gate
        return gate

    async def _maybe_fail(self, operation: str, effect: Any = None) -> None:
        gate = self.gates.get(operation)
        if gate is not None:
            self.waiting[operation] = self.waiting.get(operation, 0) + 1
            try:
                await gate.wait()
            finally:
                self.waiting[operation] -= 1
        queue = self.faults.get(operation)
        if not queue:
            return
        fault = queue.pop(0)
        if fault.kind == "unavailable":
            raise ProviderUnavailable("scripted outage", retry_after=fault.retry_after)
        if fault.kind == "uncertain":
            if fault.after_effect and effect is not None:
                effect()
            raise ProviderUnavailable(
                "scripted lost response", retry_after=fault.retry_after, uncertain=True
            )
        if fault.kind == "rejected":
            raise ProviderRejected("SCRIPTED_REFUSAL", "scripted refusal")
        if fault.kind == "auth":
            raise ProviderAuthError("HITL_SCRIPTED_TOKEN", "the scripted token was refused")
        if fault.kind == "inactive":
            raise ChatInactive()
        if fault.kind == "hang":
            await asyncio.Event().wait()

    async def push(self, chat_id: str, kind: EventKind, key: str, author_id: str = "") -> int:
        """Reports an event like a backend would (committed when this returns)."""
        event = InboundEvent(chat_id, kind, key, author_id=author_id)
        return await self.sink.deliver(WebhookBatch(action="push", events=(event,)))

    # --- Provider ---------------------------------------------------------------------
    async def open(self) -> None:
        """See base class."""

    async def close(self) -> None:
        """See base class."""

    async def probe(self, *, timeout: float) -> Sequence[str]:
        """See base class."""
        await self._maybe_fail("probe")
        return list(self.problems)

    async def upsert_user(
        self, profile: UserProfile, user: ProviderUser | None, *, timeout: float
    ) -> ProviderUser:
        """See base class."""
        await self._maybe_fail("upsert_user")
        if user is not None:
            user.state["updates"] = int(user.state.get("updates", 0)) + 1
            return user
        return ProviderUser(f"cust-{profile.id}", {"updates": 0})

    async def start(
        self, request: StartRequest, user: ProviderUser, *, timeout: float
    ) -> StartResult:
        """See base class."""
        await self._maybe_fail("start")
        self.calls.starts.append(request)
        if request.previous_chat is not None:
            chat_id = request.previous_chat.external_chat_id
            self.closed_chats.discard(chat_id)
        else:
            self.next_chat += 1
            chat_id = f"CHAT{self.next_chat:04d}"
        queued = InboundEvent(
            chat_id, Queued(position=1, wait_seconds=30), f"{chat_id}:q:{self.next_chat}"
        )
        return StartResult(
            ProviderChat(chat_id, {"thread": "T1"}), request.group_id or "7", (queued,)
        )

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
        """See base class: delivers once per request id when told it is uncertain."""
        self.calls.sends.append((chat.external_chat_id, message, request_id, uncertain))

        def deliver() -> None:
            self.calls.delivered.setdefault(request_id, message)

        await self._maybe_fail("send", deliver)
        if chat.external_chat_id in self.closed_chats:
            raise ChatInactive()
        if uncertain and request_id in self.calls.delivered:
            return SendResult(f"ev-{request_id}")
        if request_id in self.calls.delivered:
            raise AssertionError(f"request {request_id} sent twice without an uncertain flag")
        deliver()
        return SendResult(f"ev-{request_id}")

    async def stop(
        self, chat: ProviderChat, user: ProviderUser, reason: str, *, timeout: float
    ) -> None:
        """See base class."""
        await self._maybe_fail("stop")
        self.calls.stops.append(chat.external_chat_id)
        self.closed_chats.add(chat.external_chat_id)

    def parse_webhook(self, headers: Mapping[str, str], body: bytes) -> WebhookBatch:
        """``{"secret", "chat_id", "key", "type": "message|assigned|ended", "text"}``."""
        try:
            data = json.loads(body)
        except ValueError:
            raise WebhookRejected(400, "body is not JSON") from None
        if not isinstance(data, dict):
            raise WebhookRejected(400, "body must be a JSON object")
        secret = data.get("secret")
        if not isinstance(secret, str) or secret != SECRET:
            raise WebhookRejected(401, "wrong or missing secret")
        chat_id, key, kind = data.get("chat_id"), data.get("key"), data.get("type")
        if not isinstance(chat_id, str) or not isinstance(key, str):
            raise WebhookRejected(400, "chat_id and key are required")
        agent = Agent(id="jane@acme.test", name="Jane")
        event: EventKind
        if kind == "message":
            event = AgentMessage(
                Message(body=str(data.get("text", "")), author=Author.AGENT), agent
            )
        elif kind == "assigned":
            event = AgentAssigned(agent)
        elif kind == "ended":
            event = Ended(by=EndedBy.AGENT)
        elif kind == "explode":
            event = _Explosive()  # type: ignore[assignment]  # makes the core fail
        else:
            return WebhookBatch(action=str(kind), ignored="unknown type")
        return WebhookBatch(action=str(kind), events=(InboundEvent(chat_id, event, key),))

    async def catch_up(
        self, chat: ProviderChat, user: ProviderUser, checkpoint: str, *, timeout: float
    ) -> CatchUp:
        """See base class: whatever the test queued for the chat."""
        self.calls.catch_ups.append(chat.external_chat_id)
        await self._maybe_fail("catch_up")
        events = self.catch_up_events.get(chat.external_chat_id, [])
        return CatchUp(tuple(events), checkpoint=f"cp{len(events)}")

    def routes(self) -> Sequence[Any]:
        """See base class."""
        return ()

    async def run_command(self, argv: Sequence[str], out: TextIO) -> int:
        """See SupportsCommands."""
        out.write(f"scripted {' '.join(argv)}\n")
        return 0


class _Explosive:
    """An event kind the core does not know: ingest raises."""


def create(deps: ProviderDeps) -> ScriptedProvider:
    """The factory, for ``build_app(provider_factory=...)``."""
    return ScriptedProvider(deps)
