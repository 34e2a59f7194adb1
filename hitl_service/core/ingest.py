"""Inbound events: verified batches from providers become log events.

One transaction per batch: dedupe keys, session state and log events commit
together, before the webhook is answered. Events for chats that are not
ours are dropped, except while a start is in flight: the provider may
report on a chat before we have recorded its id, so such events are parked
and applied when the start commits.

A provider's end of a chat can overtake the webhooks of the agent's last
messages (LiveChat does not order deliveries, and a failed one comes back up
to a minute later); once the session has ended they would be refused. So
before an end is applied to an open session, the chat's history is read
once more (``before_end``: a catch-up of its messages) when the provider
keeps one.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from datetime import UTC
from typing import TYPE_CHECKING

import structlog

from hitl_service.codec import kind_tag
from hitl_service.core.links import with_web_urls
from hitl_service.core.state import Ignored, apply_event, passes_over
from hitl_service.domain import SessionState
from providers.types import (
    THREAD_STATE_KEY,
    AgentLeft,
    AgentMessage,
    Ended,
    EventKind,
    Failed,
    InboundEvent,
    Transferred,
)

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable
    from datetime import datetime

    from hitl_service.core.context import CoreContext
    from hitl_service.core.outbox import Outbox
    from hitl_service.domain import Session
    from hitl_service.store.base import Tx
    from providers.types import WebhookBatch

log = structlog.get_logger(__name__)


@dataclass(slots=True)
class IngestResult:
    """What happened to a batch's events."""

    added: int = 0
    duplicates: int = 0
    foreign: int = 0
    parked: int = 0
    ignored: int = 0

    @property
    def outcome(self) -> str:
        """One word for logs and metrics."""
        if self.added:
            return "accepted"
        if self.duplicates:
            return "duplicate"
        return "ignored"


class Ingestor:
    """Commits provider events; also the ``EventSink`` providers push to."""

    def __init__(
        self,
        ctx: CoreContext,
        outbox: Outbox,
        before_end: Callable[[Session], Awaitable[object]] | None = None,
    ) -> None:
        self._ctx = ctx
        self._outbox = outbox
        self._before_end = before_end

    async def deliver(self, batch: WebhookBatch) -> int:
        """See ``providers.base.EventSink``."""
        return (await self.ingest(batch)).added

    async def ingest(self, batch: WebhookBatch) -> IngestResult:
        """Commits the batch's new events; returns after the commit."""
        result = IngestResult()
        if not batch.events:
            return result
        ctx = self._ctx
        provider = ctx.provider_name
        now = ctx.clock.now()
        failed_items: list[str] = []
        kinds: list[str] = []
        events = [clean(event) for event in batch.events]
        if self._before_end is not None:
            await self._catch_up_before_ends(events, self._before_end)
        async with ctx.store.transaction() as tx:
            sessions = await self._lock_sessions(tx, events)
            for event in events:
                session = sessions[event.external_chat_id]
                if session is None or other_thread(session, event):
                    # Not ours, or about another conversation of the chat: an
                    # earlier one (ignored), or one a start in flight is
                    # opening (parked until the start commits).
                    if await tx.has_starting_sessions(provider) and await first_sight(
                        tx, provider, event, now
                    ):
                        await tx.park_event(provider, event, now)
                        result.parked += 1
                    else:
                        result.foreign += 1
                    continue
                why = passes_over(session, event.kind, event.occurred_at or now)
                if why:
                    log.info(
                        "ingest.ignored",
                        session_id=session.id,
                        kind=kind_tag(event.kind),
                        reason=why,
                    )
                    result.ignored += 1
                    continue
                if not await first_sight(tx, provider, event, now):
                    result.duplicates += 1
                    continue
                added = await apply_inbound(tx, ctx, session, event, now, failed_items)
                kinds.extend(added)
                result.added += len(added)
                result.ignored += 0 if added else 1
        self._outbox.signal_many(failed_items)
        for kind in kinds:
            ctx.metrics.appended(kind)
        return result

    async def _lock_sessions(self, tx: Tx, events: list[InboundEvent]) -> dict[str, Session | None]:
        """The session of each chat of the batch, locked.

        Every session is locked first, in a fixed order (by chat), so that
        two batches spanning the same chats cannot deadlock on PostgreSQL;
        each is read once: the events of a chat change its one copy.

        A chat whose events may be another session's than the one read
        (none, one that is over, or one in another thread of the chat) is
        read again: while a start is in flight after holding the chat
        (``Tx.lock_chat``), since that start may be recording the chat, its
        parked events taken already (what this batch parked would never be
        applied); and whenever a session was read, since a read that waited
        on the lock of the chat's previous session, held by the start that
        gave the chat a new one, returns the previous session (PostgreSQL
        re-checks the row it had picked, not which row is now the newest).
        """
        provider = self._ctx.provider_name
        sessions: dict[str, Session | None] = {}
        starting: bool | None = None
        for chat_id in sorted({event.external_chat_id for event in events}):
            found = await tx.find_session_by_chat(provider, chat_id)
            if (
                found is None
                or not found.state.is_open
                or any(other_thread(found, e) for e in events if e.external_chat_id == chat_id)
            ):
                if starting is None:
                    starting = await tx.has_starting_sessions(provider)
                if starting:
                    await tx.lock_chat(provider, chat_id)
                if starting or found is not None:
                    found = await tx.find_session_by_chat(provider, chat_id)
            sessions[chat_id] = found
        return sessions

    async def _catch_up_before_ends(
        self, events: list[InboundEvent], before_end: Callable[[Session], Awaitable[object]]
    ) -> None:
        """Runs ``before_end`` for each open session the batch ends (see the
        module docstring). A provider failure there costs only what it would
        have found (``Maintenance.catch_up`` logs it): the end applies."""
        ctx = self._ctx
        ends = {e.external_chat_id: e for e in events if isinstance(e.kind, Ended)}
        for chat_id in sorted(ends):
            async with ctx.store.transaction() as tx:
                session = await tx.find_session_by_chat(ctx.provider_name, chat_id)
            if (
                session is None
                or not session.state.is_open
                or session.state is SessionState.STARTING
                or session.stop_requested_at is not None  # the stop reads it (``Outbox``)
                or other_thread(session, ends[chat_id])
            ):
                continue
            await before_end(session)


async def first_sight(tx: Tx, provider: str, event: InboundEvent, now: datetime) -> bool:
    """Records the event's dedupe key; False if it was recorded before.

    A repeatable ``AgentLeft`` (see ``InboundEvent.repeatable``) is never
    recorded: it applies only while its agent holds the session, so that
    guard alone keeps a redelivery from applying twice. Other kinds have no
    such guard, and are recorded whatever the provider says.
    """
    if event.repeatable and isinstance(event.kind, AgentLeft):
        return True
    return await tx.claim_dedupe_key(provider, event.dedupe_key, now)


def clean(event: InboundEvent) -> InboundEvent:
    """The event as the core can use it: ids, and what the session keeps of
    a transfer, an end or a failure (its group, its reason), as the store
    can keep them (PostgreSQL text refuses NUL: the batch failed on every
    retry, the events beside it with it), a naive ``occurred_at`` taken as UTC
    (compared with the session's times, it failed the whole batch), and
    links as the contract promises them (``core.links``).

    Raises:
        ValueError: The event has no dedupe key (a provider bug): its batch
            is refused whole, as any batch the core cannot apply.
    """
    if not event.dedupe_key and not (event.repeatable and isinstance(event.kind, AgentLeft)):
        # Recorded once per provider, an empty key would make every later
        # event without one a duplicate: dropped without a word.
        raise ValueError(f"an event of chat {event.external_chat_id!r} has no dedupe key")
    when = event.occurred_at
    if when is not None and when.tzinfo is None:
        event = replace(event, occurred_at=when.replace(tzinfo=UTC))
    kind = _kept(with_web_urls(event.kind))
    if kind is not event.kind:
        event = replace(event, kind=kind)
    if "\x00" not in event.external_chat_id + event.dedupe_key + event.author_id:
        return event
    return replace(
        event,
        external_chat_id=_no_nul(event.external_chat_id),
        dedupe_key=_no_nul(event.dedupe_key),
        author_id=_no_nul(event.author_id),
    )


def _kept(kind: EventKind) -> EventKind:
    """``kind`` without NUL in the fields the session's columns take."""
    if isinstance(kind, Transferred):
        if "\x00" in kind.to_group_id:
            return replace(kind, to_group_id=_no_nul(kind.to_group_id))
    elif isinstance(kind, Ended):
        if "\x00" in kind.reason:
            return replace(kind, reason=_no_nul(kind.reason))
    elif isinstance(kind, Failed) and "\x00" in kind.code + kind.detail:
        return Failed(code=_no_nul(kind.code), detail=_no_nul(kind.detail))
    return kind


def _no_nul(text: str) -> str:
    return text.replace("\x00", "\ufffd")


def other_thread(session: Session, event: InboundEvent) -> bool:
    """True when the event is about another conversation of the session's chat.

    A returning LiveChat customer's new session lives in a new thread of the
    same chat; the previous thread's late webhooks (its end, above all) must
    not act on the new session. See ``providers.types.THREAD_STATE_KEY``.
    """
    current = session.chat_state.get(THREAD_STATE_KEY)
    return bool(
        event.thread_id and isinstance(current, str) and current and current != event.thread_id
    )


async def apply_inbound(
    tx: Tx,
    ctx: CoreContext,
    session: Session,
    event: InboundEvent,
    now: datetime,
    failed_items: list[str],
) -> list[str]:
    """Applies one event to a locked session inside ``tx``.

    Returns:
        The kinds of the log events appended (empty if ignored).
    """
    if other_thread(session, event):
        log.info(
            "ingest.ignored",
            session_id=session.id,
            kind=kind_tag(event.kind),
            reason="about another thread of the chat",
        )
        return []
    if isinstance(event.kind, AgentMessage) and event.author_id:
        own = await tx.get_provider_user(session.user_id, ctx.provider_name)
        if own is not None and own.external_user_id == event.author_id:
            log.debug("ingest.echo", session_id=session.id)
            return []
    try:
        kinds = apply_event(session, event.kind, now, event.occurred_at)
    except Ignored as why:
        log.info(
            "ingest.ignored",
            session_id=session.id,
            kind=kind_tag(event.kind),
            reason=str(why),
        )
        return []
    tags = []
    for kind in kinds:
        await tx.append_event(session.id, session.user_id, event.occurred_at or now, kind)
        tags.append(kind_tag(kind))
    await tx.update_session(session)
    if not session.state.is_open:
        failed_items.extend(
            await tx.fail_pending_outbox(
                session.id, now, "SESSION_ENDED", "the session ended before delivery"
            )
        )
    return tags
