"""End-user messages: stored in the outbox, then delivered exactly once."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, replace
from datetime import timedelta
from typing import TYPE_CHECKING

from hitl_service.codec import message_to_json
from hitl_service.core.sessions import earlier_request
from hitl_service.domain import (
    IdempotencyRecord,
    OutboxItem,
    OutboxKind,
    OutboxStatus,
    SessionState,
    new_id,
)
from hitl_service.errors import FailedPrecondition, NotFound, Unavailable
from providers.types import Author

if TYPE_CHECKING:
    from hitl_service.core.commands import SendUserMessage
    from hitl_service.core.context import CoreContext
    from hitl_service.core.outbox import Outbox
    from hitl_service.domain import Session
    from providers.types import ProviderUser

SEND_SCOPE = "SendMessage"
ACTIVITY_RESOLUTION = timedelta(seconds=1)
"""How stale ``last_activity_at`` may be: it only feeds the idle timeout
(minutes), and writing it on every message of a busy session costs a row
update per message."""


@dataclass(frozen=True, slots=True)
class SendOutcome:
    """A delivered message."""

    message_id: str
    external_message_id: str


async def send_message(
    ctx: CoreContext, outbox: Outbox, cmd: SendUserMessage, budget: float
) -> SendOutcome:
    """Stores the message, delivers it, and waits for the provider's answer.

    The message is committed before the provider is called, so it is
    delivered (once) even if this process dies right after. Retries with the
    same ``request_id`` wait on the same stored message.

    Raises:
        NotFound: Unknown session.
        FailedPrecondition: The session is not open, the provider refused
            the message, or the request id was used for another request.
        Unavailable: Not delivered within the budget (DELIVERY_PENDING); the
            message stays queued.
    """
    now = ctx.clock.now()
    request_hash = cmd.request_hash()
    claimed = False
    session: Session | None = None
    user: ProviderUser | None = None
    try:
        async with ctx.store.transaction() as tx:
            record = await earlier_request(tx, SEND_SCOPE, cmd.request_id, request_hash)
            if record is not None:
                item = await tx.get_outbox(record.resource_id)
                if item is None:
                    raise Unavailable("MESSAGE_EXPIRED", "the message record has expired")
            else:
                session = await tx.get_session(cmd.session_id)
                if session is None:
                    raise NotFound("session", cmd.session_id)
                if session.state is SessionState.STARTING:
                    raise FailedPrecondition(
                        "SESSION_STARTING",
                        f"session {session.id} is still starting",
                        session_id=session.id,
                    )
                if not session.state.is_open or session.stop_requested_at is not None:
                    raise FailedPrecondition(
                        "SESSION_ENDED",
                        f"session {session.id} has ended; start a new handoff",
                        session_id=session.id,
                    )
                # Stored without an id: the outbox item's id is the message's.
                message = replace(cmd.message, id="", author=Author.USER, created_at=now)
                item = OutboxItem(
                    id=new_id("msg"),
                    session_id=session.id,
                    kind=OutboxKind.SEND,
                    request_id=cmd.request_id,
                    payload={"message": message_to_json(message)},
                    status=OutboxStatus.PENDING,
                    created_at=now,
                    next_attempt_at=now,
                    attempts=1,  # claimed for an immediate attempt, if it heads the queue
                    lease_owner=ctx.owner,
                    lease_until=now + ctx.lease,
                )
                # Attempted at once if it heads its session's queue and an
                # attempt slot is free; else the background loop takes it.
                claimed = await tx.insert_outbox(item) and outbox.reserve()
                if claimed:
                    # Read here, in one go, for the attempt that starts below.
                    user = await tx.get_provider_user(session.user_id, ctx.provider_name)
                else:
                    item.attempts, item.lease_owner, item.lease_until = 0, "", None
                    await tx.update_outbox(item)
                await tx.put_idempotency(
                    IdempotencyRecord(SEND_SCOPE, cmd.request_id, request_hash, item.id, now)
                )
                last = session.last_activity_at
                if last is None or now - last >= ACTIVITY_RESOLUTION:
                    session.last_activity_at = now
                    await tx.update_session(session)
    except asyncio.CancelledError:
        if claimed and item is not None:  # the RPC went away while the COMMIT was under way
            outbox.start_when_committed(item.id)
        raise
    except BaseException:
        if claimed:  # not stored: its slot is free again
            outbox.unreserve()
        raise
    outbox.dispatch(item, claimed, session=session, user=user)
    item = await outbox.wait(item, budget)
    if item.status is OutboxStatus.DONE:
        return SendOutcome(item.id, str(item.result.get("external_message_id", "")))
    if item.status is OutboxStatus.FAILED:
        setting = item.result.get("setting")
        # DELIVERY_EXPIRED: retries gave up (an outage), not a refusal.
        expired = item.error_code == "DELIVERY_EXPIRED"
        why = "gave up on the message" if expired else "the provider did not accept the message"
        raise FailedPrecondition(
            item.error_code or "DELIVERY_FAILED",
            f"{why}: {item.last_error}",
            message_id=item.id,
            **({"setting": setting} if setting else {}),
        )
    raise Unavailable(
        "DELIVERY_PENDING",
        "the provider has not accepted the message yet; it stays queued and is retried. "
        "Retry with the same request_id to learn the outcome",
        message_id=item.id,
    )
