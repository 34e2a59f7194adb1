"""Handoffs: start, stop, read and list sessions."""

from __future__ import annotations

import asyncio
import dataclasses
import re
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import TYPE_CHECKING

import structlog

from hitl_service.codec import kind_tag
from hitl_service.core.ingest import apply_inbound, clean, first_sight
from hitl_service.core.state import finish
from hitl_service.domain import (
    ABANDONED_START,
    IdempotencyRecord,
    OutboxItem,
    OutboxKind,
    OutboxStatus,
    Session,
    SessionState,
    new_id,
)
from hitl_service.errors import (
    FailedPrecondition,
    FieldViolation,
    HitlError,
    NotFound,
    StoreUnavailable,
    Unavailable,
    provider_reason,
)
from hitl_service.store.base import OpenSessionExists
from providers.base import SupportsAbandon, SupportsValidation
from providers.errors import ProviderAuthError, ProviderRejected, ProviderUnavailable
from providers.fallback import fit_to
from providers.types import (
    EndedBy,
    Failed,
    InvalidField,
    ProviderChat,
    ProviderUser,
    Started,
    StartFields,
    StartRequest,
    StartResult,
    UserProfile,
)

if TYPE_CHECKING:
    from collections.abc import Callable, Iterable

    from hitl_service.core.commands import StartHandoff, StopHandoff
    from hitl_service.core.context import CoreContext
    from hitl_service.core.outbox import Outbox
    from hitl_service.domain import User
    from hitl_service.store.base import Tx

log = structlog.get_logger(__name__)

START_SCOPE = "StartHitl"
STOP_SCOPE = "StopHitl"


async def get_session(ctx: CoreContext, session_id: str) -> Session:
    """The session, or ``NotFound``."""
    session = await ctx.store.get_session(session_id)
    if session is None:
        raise NotFound("session", session_id)
    return session


@dataclass(frozen=True, slots=True)
class SessionPage:
    """One page of ``ListSessions``."""

    sessions: list[Session]
    next_before: tuple[datetime, str] | None


async def list_sessions(
    ctx: CoreContext,
    *,
    user_id: str,
    state: SessionState | None,
    before: tuple[datetime, str] | None,
    limit: int,
) -> SessionPage:
    """Newest first; ``next_before`` is None on the last page.

    Raises:
        NotFound: ``user_id`` names no user.
    """
    if user_id and await ctx.store.get_user(user_id) is None:
        raise NotFound("user", user_id)
    rows = await ctx.store.list_sessions(
        user_id=user_id, state=state, before=before, limit=limit + 1
    )
    page = rows[:limit]
    more = len(rows) > limit
    return SessionPage(page, (page[-1].created_at, page[-1].id) if more and page else None)


# A provider's violation names a field it was given (``group_id``,
# ``metadata['plan']``, ``history[3].text``), never one it was not.
_START_FIELD = re.compile(
    rf"(?:{'|'.join(f.name for f in dataclasses.fields(StartFields))})(?:[.\[].{{0,190}})?",
    re.DOTALL,
)
# Violations travel in the status trailers, which clients refuse over 8 KiB
# (``InvalidArgument`` keeps the first one whatever its size).
_MAX_DESCRIPTION = 300


def check_start(ctx: CoreContext, start: StartFields) -> list[FieldViolation]:
    """The fields of a StartHitl the provider cannot take (``SupportsValidation``);
    empty for a provider without the hook. Runs before anything is stored.

    Raises:
        TypeError: The provider answered something else than violations of
            the fields it was given (a provider bug, as any exception of
            its hook).
    """
    provider = ctx.provider
    if not isinstance(provider, SupportsValidation):
        return []
    violations: list[FieldViolation] = []
    answer: Iterable[object] = provider.validate_start(start)
    for item in answer:
        # A third party's answer, checked: it goes to the caller.
        path = getattr(item, "field", None)
        description = getattr(item, "description", None)
        if not (
            isinstance(item, InvalidField)
            and isinstance(path, str)
            and _START_FIELD.fullmatch(path)
            and isinstance(description, str)
            and description.strip()
        ):
            raise TypeError(
                f"{provider.name}.validate_start returned {type(item).__name__}, "
                "not an InvalidField naming a field of StartFields, with a description"
            )
        description = description.strip()
        if len(description) > _MAX_DESCRIPTION:
            description = description[: _MAX_DESCRIPTION - 1] + "…"
        violations.append(FieldViolation(path, description))
    return violations


async def start_handoff(
    ctx: CoreContext,
    cmd: StartHandoff,
    budget: float,
    *,
    stored: Callable[[str], None] | None = None,
) -> Session:
    """Opens a handoff at the provider; idempotent by ``request_id``.

    ``stored`` is told the new session's id once it is committed (STARTING),
    before the provider is called.

    Raises:
        NotFound: Unknown user.
        FailedPrecondition: The user has another open session
            (SESSION_ALREADY_OPEN), the request id was used for another
            request (REQUEST_ID_REUSED), or the provider refused.
        Unavailable: The provider stayed unreachable within the budget.
    """
    deadline = ctx.clock.monotonic() + budget
    async with ctx.store.transaction() as tx:
        request_hash = cmd.request_hash()
        record = await earlier_request(tx, START_SCOPE, cmd.request_id, request_hash)
        if record is not None:
            existing = await tx.get_session(record.resource_id)
            if existing is not None and (
                existing.state is not SessionState.FAILED
                # Read committed (PostgreSQL) reads each statement at its own
                # time: a failed start that forgot this request id (another
                # replica's upkeep) may have committed between the two reads.
                # The session read waited for it, so reading the record again
                # tells whether the retry starts afresh.
                or await tx.get_idempotency(START_SCOPE, cmd.request_id) is not None
            ):
                return _replay(existing)
            # HITL_RETENTION pruned its session, which ended over 48 h ago (a
            # prune deletes sessions before records, and a replica's clock may
            # date an end before its start): the record is past its window.
            await tx.delete_idempotency(START_SCOPE, cmd.request_id)
        user, session = await _insert_session(tx, ctx, cmd, request_hash)
        provider_user = await tx.get_provider_user(cmd.user_id, ctx.provider_name)
        previous = await tx.last_session_with_chat(cmd.user_id, ctx.provider_name)
    if stored is not None:
        stored(session.id)
    # Once the provider's start was called, a chat may be open: a start
    # given up without an answer also schedules closing it (``abandon_later``).
    called = False
    try:
        profile = _profile(user)
        identity = await _upsert_user(ctx, user, profile, provider_user, deadline)
        called = True
        result = await _call_start(ctx, profile, identity, previous, session, cmd, deadline)
    except ProviderAuthError as exc:
        await _fail_start(ctx, session, exc.code, str(exc))
        raise FailedPrecondition(exc.code, str(exc), setting=exc.setting) from None
    except ProviderRejected as exc:
        # A refusal is an answer: the provider closed what it opened (e.g.
        # a chat no agent can take), and the request id keeps its answer.
        code = provider_reason(exc.code, "START_REFUSED")
        await _fail_start(ctx, session, code, str(exc))
        raise FailedPrecondition(code, str(exc), session_id=session.id) from None
    except ProviderUnavailable as exc:
        # Nothing was opened for sure: forget the request id, so retrying
        # the same request starts afresh (the provider reuses an open chat).
        await _fail_start(
            ctx, session, "PROVIDER_UNAVAILABLE", str(exc), forget=cmd.request_id, abandon=called
        )
        raise Unavailable("PROVIDER_UNAVAILABLE", f"the provider is unreachable: {exc}") from None
    except Exception:
        # Our own bug: do not leave the session STARTING (and the user
        # blocked) until the sweeper notices; the interceptor reports it.
        await _fail_start(
            ctx,
            session,
            "INTERNAL",
            "the start failed unexpectedly",
            forget=cmd.request_id,
            abandon=called,
        )
        raise
    try:
        return await _commit_start(ctx, session, identity, result)
    except (HitlError, StoreUnavailable):
        raise  # START_INTERRUPTED; a store that is down (the upkeep fails the start)
    except Exception as exc:
        # The provider's answer could not be recorded (a bug of ours or the
        # provider's, e.g. an event it reported with the start): as above,
        # the session must not stay STARTING, blocking the user.
        taken = isinstance(exc, ChatTaken)
        await _fail_start(
            ctx,
            session,
            "INTERNAL",
            str(exc) if taken else "the start failed unexpectedly",
            forget=cmd.request_id,
            # A chat another session holds is not this start's to close.
            abandon=not taken,
        )
        raise


class ChatTaken(Exception):
    """A provider's start returned a chat another open session holds (a
    provider bug: taken over, that session would lose its events)."""


async def _insert_session(
    tx: Tx, ctx: CoreContext, cmd: StartHandoff, request_hash: str
) -> tuple[User, Session]:
    """Inserts the STARTING session and its idempotency record."""
    user = await tx.get_user(cmd.user_id)
    if user is None:
        raise NotFound("user", cmd.user_id)
    now = ctx.clock.now()
    session = Session(
        id=new_id("ses"),
        user_id=cmd.user_id,
        provider=ctx.provider_name,
        state=SessionState.STARTING,
        created_at=now,
        updated_at=now,
        request_id=cmd.request_id,
        title=cmd.title,
        description=cmd.description,
        group_id=cmd.group_id,
        metadata=dict(cmd.metadata),
        last_activity_at=now,
    )
    try:
        await tx.insert_session(session)
    except OpenSessionExists as exc:
        raise FailedPrecondition(
            "SESSION_ALREADY_OPEN",
            f"user {cmd.user_id} already has an open session {exc.session_id}; stop it first",
            session_id=exc.session_id,
        ) from None
    await tx.put_idempotency(
        IdempotencyRecord(START_SCOPE, cmd.request_id, request_hash, session.id, now)
    )
    return user, session


def _replay(session: Session) -> Session:
    """The answer to a repeated StartHitl."""
    if session.state is SessionState.STARTING:
        raise Unavailable(
            "START_IN_PROGRESS",
            f"session {session.id} is still starting; retry shortly",
            session_id=session.id,
        )
    if session.state is SessionState.FAILED and session.ended_by is EndedBy.UNSPECIFIED:
        raise FailedPrecondition(
            "START_FAILED",
            f"this handoff failed to start: {session.end_reason}",
            session_id=session.id,
        )
    return session


def _profile(user: User) -> UserProfile:
    return UserProfile(
        id=user.id,
        name=user.name,
        email=user.email,
        picture_url=user.picture_url,
        external_id=user.external_id,
    )


async def _upsert_user(
    ctx: CoreContext,
    user: User,
    profile: UserProfile,
    provider_user: ProviderUser | None,
    deadline: float,
) -> ProviderUser:
    provider = ctx.provider
    identity = await ctx.calls.with_retries(
        "upsert_user",
        lambda t: provider.upsert_user(profile, provider_user, timeout=t),
        budget=max(0.1, deadline - ctx.clock.monotonic()),
    )
    async with ctx.store.transaction() as tx:  # keep the identity even if the start fails
        await tx.put_provider_user(user.id, ctx.provider_name, identity)
    return identity


async def _call_start(
    ctx: CoreContext,
    profile: UserProfile,
    identity: ProviderUser,
    previous: Session | None,
    session: Session,
    cmd: StartHandoff,
    deadline: float,
) -> StartResult:
    provider = ctx.provider
    request = StartRequest(
        session_id=session.id,
        user=profile,
        title=cmd.title,
        description=cmd.description,
        history=tuple(fit_to(m, provider.capabilities) for m in cmd.history),
        group_id=cmd.group_id,
        metadata=cmd.metadata,
        request_id=cmd.request_id,
        previous_chat=(
            ProviderChat(previous.external_chat_id, dict(previous.chat_state))
            if previous is not None
            else None
        ),
    )
    state_before = dict(identity.state)
    try:
        result = await ctx.calls.with_retries(
            "start",
            lambda t: provider.start(request, identity, timeout=t),
            budget=max(0.1, deadline - ctx.clock.monotonic()),
        )
        # A third party's answer, checked: stored as is, a bad one would
        # fail the commit and leave the session STARTING.
        chat = getattr(result, "chat", None)
        chat_id = getattr(chat, "external_chat_id", None)
        if not (isinstance(chat, ProviderChat) and isinstance(chat_id, str) and chat_id):
            raise TypeError(f"{provider.name}.start returned no chat: {type(result).__name__}")
        return result
    finally:
        if identity.state != state_before:  # e.g. a refreshed token
            async with ctx.store.transaction() as tx:
                await tx.put_provider_user(session.user_id, ctx.provider_name, identity)


async def _commit_start(
    ctx: CoreContext, session: Session, identity: ProviderUser, result: StartResult
) -> Session:
    now = ctx.clock.now()
    tags: list[str] = []
    async with ctx.store.transaction() as tx:
        current = await tx.get_session(session.id)
        assert current is not None  # ours; only sessions ended days ago are deleted
        if current.state is not SessionState.STARTING:
            # An upkeep (on a replica whose clock runs ahead) gave the start
            # up as interrupted and forgot its request id: a late answer
            # must not revive the FAILED session; the retry starts afresh
            # and the provider reuses the chat it just opened.
            raise Unavailable(
                "START_INTERRUPTED",
                "the start took longer than allowed and was given up; retry with the same "
                "request_id",
            )
        holder = await tx.find_session_by_chat(ctx.provider_name, result.chat.external_chat_id)
        if holder is not None and holder.id != current.id and holder.state.is_open:
            raise ChatTaken(
                f"the provider returned chat {result.chat.external_chat_id!r}, "
                "which another open session holds"
            )
        # Webhooks about the chat that found no session for it park their
        # events before this takes them, or wait and find this session.
        await tx.lock_chat(ctx.provider_name, result.chat.external_chat_id)
        current.state = SessionState.REQUESTED
        current.external_chat_id = result.chat.external_chat_id
        current.chat_state = dict(result.chat.state)
        current.group_id = result.group_id or current.group_id
        current.updated_at = now
        await tx.put_provider_user(current.user_id, ctx.provider_name, identity)
        started = Started(ctx.provider_name, current.external_chat_id, current.group_id)
        await tx.append_event(current.id, current.user_id, now, started)
        await tx.update_session(current)
        tags.append(kind_tag(started))
        fresh = [
            event
            for event in map(clean, result.events)
            if await first_sight(tx, ctx.provider_name, event, now)
        ]
        # Parked events had their dedupe keys claimed when they were parked.
        parked = await tx.take_parked_events(ctx.provider_name, current.external_chat_id)
        for event in (*fresh, *parked):
            tags.extend(await apply_inbound(tx, ctx, current, event, now, []))
        session = current
    for tag in tags:
        ctx.metrics.appended(tag)
    log.info("session.started", session_id=session.id, parked=len(parked))
    return session


async def _fail_start(
    ctx: CoreContext,
    session: Session,
    code: str,
    detail: str,
    *,
    forget: str = "",
    abandon: bool = False,
) -> None:
    now = ctx.clock.now()
    async with ctx.store.transaction() as tx:
        current = await tx.get_session(session.id)
        assert current is not None  # as in _commit_start
        if current.state is not SessionState.STARTING:
            # The upkeep gave this start up already (START_INTERRUPTED) and
            # forgot its request id, which a retry may have taken since.
            return
        finish(current, SessionState.FAILED, detail, EndedBy.UNSPECIFIED, now)
        await tx.update_session(current)
        await tx.append_event(current.id, current.user_id, now, Failed(code=code, detail=detail))
        if forget:
            await tx.delete_idempotency(START_SCOPE, forget)
        if abandon:
            await abandon_later(tx, ctx, current, now)
    ctx.metrics.appended("failed")
    log.warning("session.start_failed", session_id=session.id, code=code)


async def abandon_later(tx: Tx, ctx: CoreContext, session: Session, now: datetime) -> None:
    """Schedules closing the chat the given-up start of ``session`` may have
    opened (``providers.base.SupportsAbandon``), ``HITL_ABANDON_AFTER`` from
    now: a retry of the start within that time reuses the chat instead.

    Its attempt (``Outbox``) does nothing if the user has a handoff open by
    then. Within ``tx``, which fails the session.
    """
    after = ctx.settings.abandon_after
    if after <= 0 or not isinstance(ctx.provider, SupportsAbandon):
        return
    await tx.insert_outbox(
        OutboxItem(
            id=new_id("stp"),
            session_id=session.id,
            kind=OutboxKind.STOP,
            request_id=f"abandon-{session.id}",
            payload={ABANDONED_START: session.request_id},
            status=OutboxStatus.PENDING,
            created_at=now,
            next_attempt_at=now + timedelta(seconds=after),
        )
    )


async def stop_handoff(
    ctx: CoreContext, outbox: Outbox, cmd: StopHandoff, budget: float
) -> Session:
    """Closes the chat at the provider; returns the ENDED session.

    Stopping an ended or failed session returns it unchanged.

    Raises:
        NotFound: Unknown session.
        FailedPrecondition: The session is still starting, or the provider
            refused to close the chat.
        Unavailable: The provider has not confirmed within the budget; the
            stop stays queued and is retried (STOP_PENDING).
    """
    item, head = await request_stop(ctx, outbox, cmd.session_id, cmd.reason, EndedBy.CALLER)
    if item is None:
        return await get_session(ctx, cmd.session_id)
    outbox.dispatch(item, head)
    item = await outbox.wait(item, budget)
    if item.status is OutboxStatus.PENDING:
        # The session first, then the item again: a settle committed after the
        # wait's last read changes both, and a refusal for good leaves the
        # session open (read the other way round, it was told STOP_PENDING).
        session = await get_session(ctx, cmd.session_id)
        if not session.state.is_open:
            return session
        item = await ctx.store.get_outbox(item.id) or item
        if item.status is OutboxStatus.PENDING:
            raise Unavailable(
                "STOP_PENDING",
                "the provider has not confirmed the stop yet; it is retried in the background",
                session_id=cmd.session_id,
            )
    if item.status is OutboxStatus.FAILED:
        raise FailedPrecondition(
            item.error_code or "STOP_FAILED",
            f"the provider did not close the chat: {item.last_error}",
            session_id=cmd.session_id,
            **({"setting": item.result["setting"]} if item.result.get("setting") else {}),
        )
    return await get_session(ctx, cmd.session_id)


async def request_stop(
    ctx: CoreContext,
    outbox: Outbox,
    session_id: str,
    reason: str,
    by: EndedBy,
    *,
    check: Callable[[Session, datetime], bool] | None = None,
    refused_backoff: timedelta | None = None,
) -> tuple[OutboxItem | None, bool]:
    """Records the intent to stop a session (once) in the outbox.

    ``check`` is asked about the session as this transaction locked it (a
    timeout decided on an earlier read must still hold); ``refused_backoff``
    keeps a stop the provider refused from being asked again sooner.

    Returns:
        The stop item (None if the session is already over, ``check`` said
        no, or the last refusal is too recent) and whether this call claimed
        it for an immediate attempt (``outbox.dispatch`` it).
    """
    now = ctx.clock.now()
    head = False
    retry_of = ""
    try:
        async with ctx.store.transaction() as tx:
            session = await tx.get_session(session_id)
            if session is None:
                raise NotFound("session", session_id)
            if not session.state.is_open:
                return None, False
            if session.state is SessionState.STARTING:
                raise FailedPrecondition(
                    "SESSION_STARTING",
                    f"session {session_id} is still starting; stop it once StartHitl returned",
                    session_id=session_id,
                )
            if check is not None and not check(session, now):
                return None, False
            record = await tx.get_idempotency(STOP_SCOPE, session_id)
            if record is not None:
                existing = await tx.get_outbox(record.resource_id)
                if existing is not None and existing.status is not OutboxStatus.FAILED:
                    return existing, False
                if existing is not None:  # refused for good: ask again, later
                    refused_at = existing.done_at or existing.created_at
                    # Dated further ahead than the backoff, by a clock stepped
                    # back since: no recent refusal, or it would hold an hour's
                    # step longer.
                    if (
                        refused_backoff is not None
                        and -refused_backoff < now - refused_at < refused_backoff
                    ):
                        return None, False
                    if existing.payload.get("by") == by.value:  # the same stop, asked again
                        retry_of = existing.id
                await tx.delete_idempotency(STOP_SCOPE, session_id)
            item = OutboxItem(
                id=new_id("stp"),
                session_id=session_id,
                kind=OutboxKind.STOP,
                request_id=f"stop-{session_id}",
                payload={
                    "reason": reason,
                    "by": by.value,
                    **({"retry_of": retry_of} if retry_of else {}),
                },
                status=OutboxStatus.PENDING,
                created_at=now,
                next_attempt_at=now,
                attempts=1,
                lease_owner=ctx.owner,
                lease_until=now + ctx.lease,
            )
            head = await tx.insert_outbox(item) and outbox.reserve()  # see send_message
            if not head:
                item.attempts, item.lease_owner, item.lease_until = 0, "", None
                await tx.update_outbox(item)
            session.stop_requested_at = now
            session.updated_at = now
            await tx.update_session(session)
            await tx.put_idempotency(IdempotencyRecord(STOP_SCOPE, session_id, "", item.id, now))
    except asyncio.CancelledError:
        if head:  # the caller went away while the COMMIT was under way
            outbox.start_when_committed(item.id)
        raise
    except BaseException:
        if head:  # not stored: its slot is free again
            outbox.unreserve()
        raise
    return item, head


async def earlier_request(
    tx: Tx, scope: str, request_id: str, request_hash: str
) -> IdempotencyRecord | None:
    """The record of an earlier request with this id, if any.

    Raises:
        FailedPrecondition: The id was used for a different request
            (REQUEST_ID_REUSED).
    """
    record = await tx.get_idempotency(scope, request_id)
    if record is not None and record.request_hash != request_hash:
        raise FailedPrecondition(
            "REQUEST_ID_REUSED",
            f"request_id {request_id!r} was already used for a different request",
            request_id=request_id,
        )
    return record
