"""The outbox: provider calls (sends, stops) stored before they are made,
delivered in order per session, once.

Each attempt is recorded before the call (``attempts``) and settled after;
an attempt that may have reached the provider but whose outcome we never
learned (timeout, lost response, crash) makes the next attempt *uncertain*,
and the provider then checks for the request id before sending again. A
crashed replica's claims expire (``lease_until``) and any replica takes
them over. RPCs wait on their item; a background loop retries the rest.
"""

from __future__ import annotations

import asyncio
import dataclasses
from datetime import datetime, timedelta
from typing import TYPE_CHECKING

import structlog

from hitl_service.clock import WallSteps
from hitl_service.codec import message_from_json
from hitl_service.core.provider_state import StateWatch
from hitl_service.core.retry import CallTimedOut
from hitl_service.core.state import finish
from hitl_service.domain import (
    ABANDONED_START,
    OutboxItem,
    OutboxKind,
    OutboxStatus,
    SessionState,
)
from hitl_service.errors import StoreUnavailable, provider_reason
from providers.base import SupportsAbandon
from providers.errors import (
    ChatInactive,
    ProviderAuthError,
    ProviderRejected,
    ProviderUnavailable,
)
from providers.fallback import fit_to
from providers.types import Ended, EndedBy, ProviderChat, ProviderUser

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable

    from hitl_service.core.context import CoreContext
    from hitl_service.domain import Session
    from hitl_service.store.base import Tx

log = structlog.get_logger(__name__)

_OUTBOX_FIELDS = tuple(f.name for f in dataclasses.fields(OutboxItem))
SEND_TTL = timedelta(minutes=15)
"""A message not delivered within this time fails with DELIVERY_EXPIRED."""
STOP_TTL = timedelta(hours=24)
"""A stop keeps being retried this long."""
LATE_CLAIM = timedelta(minutes=1)
"""Claimed this long after it was due and past its TTL, an item is given up."""
UNQUEUE_EVERY = 60.0
"""Seconds between looks for queued items with nothing pending ahead of them
any more, which only an older release leaves (``unqueue_stranded_outbox``),
and for times a clock stepped back since (``pull_in_outbox``)."""


class Outbox:
    """Delivers outbox items: inline for RPCs, in the background for retries."""

    def __init__(
        self, ctx: CoreContext, *, concurrency: int = 64, poll_interval: float = 1.0
    ) -> None:
        self._ctx = ctx
        # Attempts in flight at once, the writers' own included: a slow or
        # hung provider holds at most this many calls (and tasks) here; the
        # items beyond it wait in the store until a slot frees.
        self.concurrency = concurrency
        # Seconds between looks at the store when nothing wakes the loop
        # (items of other replicas); also how often waiting RPCs re-read.
        self.poll_interval = poll_interval
        self._wake = asyncio.Event()
        self._finished: dict[str, asyncio.Event] = {}
        self._inflight: dict[str, _Attempt] = {}
        self._chores: set[asyncio.Task[None]] = set()  # start_when_committed
        self._reserved = 0  # slots writers took (``reserve``) for attempts not yet started
        self._stopping = False
        # Whether the loop last saw due items it could not claim (queued
        # behind their session's head, or beyond the concurrency): only then
        # does a settle need to wake it.
        self._backlog = False
        self._steps = WallSteps(ctx.clock)
        # Reads the agent's messages the provider has and we lack, before a
        # stop ends the session (set by ``HitlCore``; see ``core.ingest``),
        # with the provider user as the stop left it (renewed credentials
        # not yet stored: the read must use them, and the settle keeps what
        # the read renewed in turn).
        self.before_end: Callable[[Session, ProviderUser], Awaitable[object]] | None = None

    def kick(self) -> None:
        """Makes the background loop look for due items now."""
        self._wake.set()

    def _count(self, item: OutboxItem, outcome: str) -> None:
        metrics = self._ctx.metrics
        metrics.child(metrics.outbox_outcomes, item.kind.value, outcome).inc()

    # --- attempts ------------------------------------------------------------
    def reserve(self) -> bool:
        """Takes a slot for the attempt of an item its writer is claiming
        (started by ``dispatch``, or ``start_when_committed``, which give the
        slot back; so does ``unreserve`` if the write fails).

        False when every slot is taken: the writer then leaves its item to
        the background loop, which claims it once an attempt ends.
        """
        if len(self._inflight) + self._reserved >= self.concurrency:
            return False
        self._reserved += 1
        return True

    def unreserve(self) -> None:
        """Gives back a slot whose item was not stored (the write failed)."""
        self._reserved -= 1

    def dispatch(
        self,
        item: OutboxItem,
        claimed: bool,
        *,
        session: Session | None = None,
        user: ProviderUser | None = None,
    ) -> None:
        """Gets a just-stored item going.

        An item its writer claimed (it heads its session's queue, and the
        writer reserved a slot) is attempted at once, with the session and
        provider user the writer's transaction read, if it passes them; any
        other pending one is left to the background loop.
        """
        if claimed:
            self._reserved -= 1  # the attempt takes the writer's slot
            self.start_attempt(item, session, user)
        elif item.status is OutboxStatus.PENDING:
            self._backlog = True
            self.kick()

    def start_when_committed(self, item_id: str) -> None:
        """Starts the attempt of an item its writer claimed, once committed.

        For a writer cancelled (its RPC went away) while its transaction
        committed, before it could ``dispatch``: nothing else would attempt
        the item, nor the items queued behind it in its session, until its
        lease ran out.
        """
        task = asyncio.create_task(self._start_when_committed(item_id), name=f"outbox-{item_id}")
        self._chores.add(task)
        task.add_done_callback(self._chores.discard)

    async def _start_when_committed(self, item_id: str) -> None:
        ctx = self._ctx
        try:
            # A transaction: on SQLite it joins the batch that holds the item
            # (if still open) and ends once that batch has committed.
            async with ctx.store.transaction() as tx:
                item = await tx.get_outbox(item_id)
        except StoreUnavailable as exc:
            log.warning("outbox.store_unavailable", error=str(exc))
            return  # the lease runs out and the loop takes the item
        finally:
            self._reserved -= 1  # given to the attempt below, if it starts
        if (
            item is not None  # None: the writer's transaction rolled back
            and item.status is OutboxStatus.PENDING
            and item.lease_owner == ctx.owner
            and item.lease_until is not None
            and item.lease_until > ctx.clock.now()
            and item_id not in self._inflight
        ):
            self.start_attempt(item)

    def start_attempt(
        self, item: OutboxItem, session: Session | None = None, user: ProviderUser | None = None
    ) -> None:
        """Runs one attempt of a claimed item in its own task.

        The task outlives a cancelled RPC, so an attempt is never cut off
        half-way by a caller going away.
        """
        attempt = _Attempt()
        attempt.task = asyncio.create_task(
            self._attempt(item, attempt, session, user), name=f"outbox-{item.id}"
        )
        attempt.task.add_done_callback(lambda _: self._inflight.pop(item.id, None))
        self._inflight[item.id] = attempt

    async def _attempt(
        self,
        item: OutboxItem,
        attempt: _Attempt,
        session: Session | None,
        user: ProviderUser | None,
    ) -> OutboxItem:
        ctx = self._ctx
        try:
            if item.abandons_start:
                return await self._abandon(item)
            if session is None:
                session = await ctx.store.get_session(item.session_id)
            if user is None and session is not None:
                user = await ctx.store.get_provider_user(session.user_id, ctx.provider_name)
            if session is None or user is None or not session.external_chat_id:
                return await self._settle_failed(
                    item, "SESSION_NOT_READY", "the session has no chat"
                )
            ended = item.kind is OutboxKind.SEND and not session.state.is_open
            if ended and (not item.earlier_attempt_uncertain or await self._chat_reused(session)):
                # (A later handoff that reopened the chat would get this
                # message: the provider sends what it does not find.)
                return await self._settle_failed(item, "SESSION_ENDED", "the session has ended")
            # Ended, but an earlier attempt may have reached the provider (a
            # crash before its settle): ask it, uncertain, whether it has the
            # message; a closed chat takes nothing new (ChatInactive).
            if item.kind is OutboxKind.STOP and not session.state.is_open:
                return await self._settle_done(item, session, None, {})
            if _claimed_late(item, ctx.clock.now()):
                # A backlog beyond the attempts' concurrency through an
                # outage: as late as a retry would be.
                detail = _expired(item, _ttl(item), item.last_error or "not attempted in time")
                return await self._settle_failed(item, "DELIVERY_EXPIRED", detail)
            chat = ProviderChat(session.external_chat_id, dict(session.chat_state))
            watch = StateWatch(user, chat)
            try:
                result = await self._call_keeping_state(item, session, watch)
            except ChatInactive as exc:
                if item.kind is OutboxKind.STOP:
                    result = {}  # already closed: the stop is done
                elif ended:
                    return await self._settle_failed(
                        item, "SESSION_ENDED", "the session ended before delivery"
                    )
                else:
                    return await self._settle_failed(item, exc.code, str(exc))
            except ProviderAuthError as exc:
                return await self._settle_failed(item, exc.code, str(exc), setting=exc.setting)
            except ProviderRejected as exc:
                fallback = "DELIVERY_FAILED" if item.kind is OutboxKind.SEND else "STOP_FAILED"
                return await self._settle_failed(
                    item, provider_reason(exc.code, fallback), str(exc)
                )
            except ProviderUnavailable as exc:
                retry_after = exc.retry_after
                if isinstance(exc, CallTimedOut) and item.kind is OutboxKind.SEND:
                    # The provider may still be carrying the send out: no
                    # attempt looks for it before then, whichever process
                    # (another replica, this one restarted) claims it next.
                    settle = ctx.provider.capabilities.settle_seconds
                    retry_after = max(retry_after or 0.0, settle)
                return await self._settle_retry(item, str(exc), retry_after, exc.uncertain)
            changed_user = user if watch.user_changed else None
            chat_changed = watch.chat_changed
            if chat_changed:
                session.chat_state = chat.state
            if item.kind is OutboxKind.STOP and self.before_end is not None:
                # What the agent wrote before the stop was requested, whose
                # webhook is still on its way (or lost), goes before the end.
                await self.before_end(session, user)
            if item.kind is OutboxKind.SEND:
                # The provider has the message: its sender answers now, in
                # the loop turn the settle's transaction yields; if this
                # process dies before the settle commits, the item is
                # attempted again as uncertain and the provider finds it.
                _mark_done(item, result, ctx.clock.now())
                attempt.resolve(item)
            return await self._settle_done(
                item, session, changed_user, result, chat_changed=chat_changed
            )
        except StoreUnavailable:
            log.warning("outbox.store_unavailable", item_id=item.id)
            return item  # the lease expires and the item is retried
        except Exception:
            log.exception("outbox.attempt_error", item_id=item.id, kind=item.kind.value)
            return await self._settle_retry(item, "internal error", None, uncertain=True)
        finally:
            attempt.resolve(item)
            self._signal(item.id)
            # A retry changes when the loop must look next; a settled head
            # frees the items queued behind it (if the loop saw any).
            if self._backlog or item.status is OutboxStatus.PENDING:
                self.kick()

    async def _abandon(self, item: OutboxItem) -> OutboxItem:
        """Has the provider close the chat a given-up start may have opened,
        unless the user has a handoff open again: a retry of the start that
        reused the chat, or another one."""
        ctx = self._ctx
        provider = ctx.provider
        async with ctx.store.transaction() as tx:
            session = await tx.get_session(item.session_id)
            user = open_now = None
            if session is not None:  # None: pruned
                user = await tx.get_provider_user(session.user_id, ctx.provider_name)
                open_now = await tx.find_open_session(session.user_id, ctx.provider_name)
        if open_now is not None and open_now.state is SessionState.STARTING:
            # No proof yet that it took the chat over: its start may still
            # fail before it reaches the provider (an identity refused, the
            # same outage), and then nothing else closes the chat. Look
            # again once it is over (it is, within the upkeep's limit).
            return await self._settle_retry(
                item, f"the user's handoff {open_now.id} is still starting", None, False
            )
        if open_now is not None:
            return await self._settle_abandon(item, {"superseded_by": open_now.id})
        if session is None or user is None or not isinstance(provider, SupportsAbandon):
            return await self._settle_abandon(item, {"closed": "no"})
        watch = StateWatch(user, ProviderChat(""))  # the call has no chat of ours
        request_id = str(item.payload[ABANDONED_START])
        try:
            closed = await ctx.calls.once(
                "abandon",
                lambda t: provider.abandon(
                    user, session_id=item.session_id, request_id=request_id, timeout=t
                ),
            )
        except (ProviderUnavailable, ProviderRejected) as exc:
            await watch.save_after_failure(ctx, session.id, session.user_id)
            if isinstance(exc, ProviderUnavailable):
                return await self._settle_retry(item, str(exc), exc.retry_after, exc.uncertain)
            if isinstance(exc, ChatInactive):  # closed meanwhile
                return await self._settle_abandon(item, {"closed": "no"})
            setting = exc.setting if isinstance(exc, ProviderAuthError) else ""
            code = provider_reason(exc.code, "STOP_FAILED")
            return await self._settle_failed(item, code, str(exc), setting=setting)
        log.info("session.abandoned_start", session_id=item.session_id, closed=closed)
        changed = (session.user_id, user) if watch.user_changed else None
        return await self._settle_abandon(item, {"closed": "yes" if closed else "no"}, changed)

    async def _settle_abandon(
        self,
        item: OutboxItem,
        result: dict[str, str],
        changed_user: tuple[str, ProviderUser] | None = None,
    ) -> OutboxItem:
        """Marks a close done, with the provider user it changed (id, state)."""
        ctx = self._ctx
        async with ctx.store.transaction() as tx:
            if changed_user is not None:
                await tx.put_provider_user(changed_user[0], ctx.provider_name, changed_user[1])
            _mark_done(item, result, ctx.clock.now())
            await tx.update_outbox(item)
        self._count(item, "done")
        return item

    async def _chat_reused(self, session: Session) -> bool:
        """Whether a later session took over the session's provider chat."""
        async with self._ctx.store.transaction() as tx:
            newest = await tx.find_session_by_chat(
                self._ctx.provider_name, session.external_chat_id
            )
        return newest is not None and newest.id != session.id

    async def _call_keeping_state(
        self, item: OutboxItem, session: Session, watch: StateWatch
    ) -> dict[str, str]:
        """``_call``; what the provider changed in its state before failing
        or being cut off is kept too (a token renewed, its refresh token
        spent, before a 503)."""
        try:
            return await self._call(item, watch.chat, watch.user)
        except BaseException as exc:
            # Cut off too (the shutdown's grace period ended): the call may
            # have spent the credentials it renewed.
            await watch.save_after_failure(
                self._ctx, session.id, session.user_id, cut_off=not isinstance(exc, Exception)
            )
            raise

    async def _call(
        self, item: OutboxItem, chat: ProviderChat, user: ProviderUser
    ) -> dict[str, str]:
        ctx = self._ctx
        provider = ctx.provider
        uncertain = item.earlier_attempt_uncertain
        if item.kind is OutboxKind.SEND:
            message = fit_to(message_from_json(item.payload["message"]), provider.capabilities)
            sent = await ctx.calls.once(
                "send",
                lambda t: provider.send(
                    chat, user, message, request_id=item.request_id, uncertain=uncertain, timeout=t
                ),
            )
            # Returned, the call delivered the message, whatever it returned
            # (a third party's forgotten ``return``): taken for an error, the
            # message would be sent again, or given up as DELIVERY_EXPIRED.
            external = getattr(sent, "external_message_id", "")
            return {"external_message_id": external if isinstance(external, str) else ""}
        reason = str(item.payload.get("reason", ""))
        await ctx.calls.once("stop", lambda t: provider.stop(chat, user, reason, timeout=t))
        return {}

    # --- outcomes ------------------------------------------------------------
    async def _settle_done(
        self,
        item: OutboxItem,
        session: Session,
        user: ProviderUser | None,
        result: dict[str, str],
        *,
        chat_changed: bool = False,
    ) -> OutboxItem:
        ctx = self._ctx
        now = ctx.clock.now()
        ended_items: list[str] = []
        # A delivered message's sender has had its answer (``_attempt``):
        # nobody waits on this COMMIT, unless sends are queued behind it.
        lazy = item.kind is OutboxKind.SEND and not self._backlog
        async with ctx.store.transaction(lazy=lazy) as tx:
            if user is not None:
                await tx.put_provider_user(session.user_id, ctx.provider_name, user)
            # A delivered message changes the session only if the provider
            # updated its chat state; a stop always does.
            needs_session = item.kind is OutboxKind.STOP or chat_changed
            current = await tx.get_session(session.id) if needs_session else None
            if current is not None:
                current.chat_state = session.chat_state
                if item.kind is OutboxKind.STOP and current.state.is_open:
                    by = EndedBy(item.payload.get("by", EndedBy.CALLER.value))
                    reason = str(item.payload.get("reason", "")) or "stopped by the caller"
                    finish(current, SessionState.ENDED, reason, by, now)
                    await tx.append_event(
                        current.id, current.user_id, now, Ended(reason=reason, by=by)
                    )
                    ended_items = await tx.fail_pending_outbox(
                        current.id, now, "SESSION_ENDED", "the session ended before delivery"
                    )
                await tx.update_session(current)
            _mark_done(item, result, item.done_at or now)
            await tx.update_outbox(item)
        self.signal_many(ended_items)
        self._count(item, "done")
        if item.kind is OutboxKind.STOP:
            ctx.metrics.appended("ended")
        return item

    async def _settle_failed(
        self,
        item: OutboxItem,
        code: str,
        message: str,
        *,
        setting: str = "",
    ) -> OutboxItem:
        ctx = self._ctx
        now = ctx.clock.now()
        # A copy until committed: if the COMMIT fails, the waiters must not
        # be told "failed" about an item the store still retries.
        failed = dataclasses.replace(
            item,
            status=OutboxStatus.FAILED,
            error_code=code,
            last_error=f"{message} (setting: {setting})" if setting else message,
            done_at=now,
            lease_owner="",
            lease_until=None,
            result={"setting": setting} if setting else {},
        )
        async with ctx.store.transaction() as tx:
            if not await tx.update_outbox(failed, leased_by=ctx.owner):
                return await self._lease_lost(tx, item)
            if item.kind is OutboxKind.STOP:
                # The stop failed for good: let the provider's own end events
                # apply again instead of being ignored as "ours".
                session = await tx.get_session(item.session_id)
                if session is not None and session.stop_requested_at is not None:
                    session.stop_requested_at = None
                    await tx.update_session(session)
        for name in _OUTBOX_FIELDS:
            setattr(item, name, getattr(failed, name))
        self._count(item, "failed")
        log.warning("outbox.failed", item_id=item.id, kind=item.kind.value, code=code)
        return item

    async def _settle_retry(
        self, item: OutboxItem, error: str, retry_after: float | None, uncertain: bool
    ) -> OutboxItem:
        ctx = self._ctx
        now = ctx.clock.now()
        ttl = _ttl(item)
        delay = ctx.calls.backoff.delay(item.attempts, retry_after)
        if uncertain and retry_after:
            # Not the backend's wish, which the backoff caps, but how long it
            # may still carry the request out: no retry looks for it sooner.
            delay = max(delay, retry_after)
        if now + timedelta(seconds=delay) > item.created_at + ttl:
            detail = _expired(item, ttl, error, uncertain=uncertain)
            return await self._settle_failed(item, "DELIVERY_EXPIRED", detail)
        async with ctx.store.transaction() as tx:
            if not uncertain:
                item.attempts_settled += 1
            item.next_attempt_at = now + timedelta(seconds=delay)
            item.lease_owner, item.lease_until = "", None
            item.last_error = error
            if not await tx.update_outbox(item, leased_by=ctx.owner):
                return await self._lease_lost(tx, item)
        self._count(item, "retry")
        log.info(
            "outbox.retry",
            item_id=item.id,
            kind=item.kind.value,
            attempt=item.attempts,
            wait=round(delay, 3),
            uncertain=uncertain,
        )
        return item

    async def _lease_lost(self, tx: Tx, item: OutboxItem) -> OutboxItem:
        """An attempt outlived its lease and another replica holds the item
        now: its outcome (failed, or retry later) is not ours to write. The
        item (as the RPCs waiting on it see it) becomes what is stored.

        A delivered message is still recorded as done (``_settle_done``):
        that is a fact whoever holds the lease, and the new holder's attempt
        is uncertain, so it finds the message rather than sending it again.
        """
        log.warning("outbox.lease_lost", item_id=item.id, kind=item.kind.value)
        stored = await tx.get_outbox(item.id)
        if stored is not None:
            for name in _OUTBOX_FIELDS:
                setattr(item, name, getattr(stored, name))
        return item

    # --- waiting ---------------------------------------------------------------
    def _signal(self, item_id: str) -> None:
        event = self._finished.pop(item_id, None)
        if event is not None:
            event.set()

    def signal_many(self, item_ids: list[str]) -> None:
        """Wakes RPCs waiting on items another path settled (session ended)."""
        for item_id in item_ids:
            self._signal(item_id)

    async def wait(self, item: OutboxItem, timeout: float) -> OutboxItem:
        """Waits until the item is settled or ``timeout`` passes.

        An attempt running in this process hands over its settled item
        directly; otherwise the store is re-read on a settle signal and at
        least every poll interval, so an item another replica settles is
        seen too.
        """
        ctx = self._ctx
        deadline = ctx.clock.monotonic() + timeout
        seen: _Attempt | None = None
        try:
            while item.status is OutboxStatus.PENDING:
                remaining = deadline - ctx.clock.monotonic()
                if remaining <= 0:
                    break
                attempt = self._inflight.get(item.id)
                if attempt is not None and attempt is not seen:
                    # Take each attempt's outcome once, then wait for the next one.
                    seen = attempt
                    outcome = await attempt.outcome(min(remaining, self.poll_interval))
                    if outcome is not None:
                        item = outcome
                        continue  # settled, or rescheduled: then wait for the retry
                else:
                    event = self._finished.setdefault(item.id, asyncio.Event())
                    try:
                        async with asyncio.timeout(min(remaining, self.poll_interval)):
                            await event.wait()
                    except TimeoutError:
                        pass
                latest = await ctx.store.get_outbox(item.id)
                if latest is None:
                    break
                item = latest
        finally:
            # The item's event is dropped here too, not only by a local
            # settle: one settled elsewhere (another replica), or before this
            # waiter made its event, would leave it forever, and so would an
            # RPC cancelled while it waits (its caller went away). Other RPCs
            # waiting on it are woken to re-read and make a new one.
            self._signal(item.id)
        return item

    # --- background loop ---------------------------------------------------------
    async def run(self) -> None:
        """Claims due items and attempts them until ``stop()``."""
        ctx = self._ctx
        counted_at = unqueued_at = float("-inf")  # monotonic
        while not self._stopping:
            self._wake.clear()
            claimed = 0
            pending: int | None = None  # unknown while the store cannot be read
            try:
                looked_at = ctx.clock.monotonic()
                stepped = self._steps.look()
                if looked_at - unqueued_at >= UNQUEUE_EVERY or stepped:
                    unqueued_at = looked_at
                    freed = await ctx.store.unqueue_stranded_outbox()
                    if freed:
                        log.info("outbox.unqueued", items=freed)
                    await self._pull_in()
                # The count (the depth gauge) reads every pending item: once
                # a poll interval, not once per settle of a long backlog.
                if looked_at - counted_at >= self.poll_interval:
                    counted_at = looked_at
                    pending, next_due = await ctx.store.outbox_stats()
                else:
                    next_due = await ctx.store.outbox_next_due(ctx.clock.now())
                now = ctx.clock.now()
                if next_due is not None and next_due <= now:
                    claimed = await self._claim_and_start()
            except StoreUnavailable as exc:
                log.warning("outbox.store_unavailable", error=str(exc))
                next_due, now = None, ctx.clock.now()
            except Exception:
                # Anything else (a disk error the store did not translate):
                # the loop must outlive it, or retries would stop for good.
                log.exception("outbox.error")
                next_due, now = None, ctx.clock.now()
            if pending is not None:
                # Unread, the gauge keeps its last value: a 0 would say
                # "all delivered" while the store is down.
                ctx.metrics.outbox_depth.set(pending)
            if claimed:
                continue  # more may be due
            self._backlog = next_due is not None and next_due <= now
            # Nothing claimable now: sleep until the next item falls due (or
            # a lease ends), a settle kicks us, or the poll interval passes
            # (other replicas' settles). Items due but not claimed are queued
            # behind their session's head or beyond our concurrency; their
            # head's settle kicks the loop, so there is no need to spin.
            wait = self.poll_interval
            if next_due is not None and next_due > now:
                wait = min(wait, (next_due - now).total_seconds())
            try:
                async with asyncio.timeout(wait):
                    await self._wake.wait()
            except TimeoutError:
                pass

    async def _pull_in(self) -> None:
        """Brings in due times and leases further ahead than any this code
        sets: a clock stepped back since they were written (this process's,
        noticed at once; another's, or before a restart, within a minute)
        would hold their items up for as long as the step. Slack of a lease
        for clocks of replicas a little apart (``maintenance.clock_skew``)."""
        ctx = self._ctx
        now = ctx.clock.now()
        database = await ctx.store.database_time()
        if database is not None and database > now:
            # This replica's clock is behind the database's (stepped back
            # from right, or off): by it, the other replicas' leases of
            # attempts in flight would look far ahead. Only times far ahead
            # of both clocks were set by a clock that is right no more.
            now = database
        slack = ctx.lease
        # A retry waits at most the backoff's cap on a backend's Retry-After;
        # after an uncertain attempt, as long as the provider says it may
        # still act, but a send waiting past its TTL is given up at once (a
        # stop asked again early closes nothing twice).
        retry = timedelta(seconds=ctx.calls.backoff.cap * 4)
        scheduled_to = now + timedelta(seconds=ctx.settings.abandon_after)  # see abandon_later
        leases, due = await ctx.store.pull_in_outbox(
            now,
            lease_by=now + ctx.lease + slack,
            due_by=now + retry + slack,
            uncertain_by=now + max(retry, SEND_TTL) + slack,
            scheduled_by=scheduled_to + slack,
            scheduled_to=scheduled_to,
        )
        if leases or due:
            log.warning("outbox.clock_stepped_back", leases=leases, due=due)

    async def _claim_and_start(self) -> int:
        """Claims due items and starts their attempts; returns how many."""
        free = self.concurrency - len(self._inflight) - self._reserved
        if free <= 0:
            return 0
        ctx = self._ctx
        now = ctx.clock.now()
        # Held while the claim commits: a writer reserving meanwhile would
        # take a slot that the items claimed here are about to fill.
        self._reserved += free
        held = free
        try:
            async with ctx.store.transaction() as tx:
                items = await tx.claim_outbox(ctx.owner, now, now + ctx.lease, free)
                self._reserved -= held - len(items)  # only those claimed stay held
                held = len(items)
                for item in items:
                    item.attempts += 1  # recorded before the call: a crash leaves it uncertain
                    await tx.update_outbox(item)
        finally:
            self._reserved -= held
        for item in items:
            # Ours still running (it outlived its lease, say on a slow
            # store): one attempt at a time; it settles what it learns.
            if item.id not in self._inflight:
                self.start_attempt(item)
        return len(items)

    def stop_claiming(self) -> None:
        """Has the background loop end after its current pass."""
        self._stopping = True
        self.kick()

    async def stop(self, timeout: float) -> None:
        """Stops claiming and waits up to ``timeout`` for attempts in flight."""
        self.stop_claiming()
        deadline = self._ctx.clock.monotonic() + timeout
        if self._chores:
            await asyncio.wait(self._chores, timeout=timeout)  # they may start attempts
        tasks = [attempt.task for attempt in self._inflight.values()]
        if tasks:
            left = max(0.0, deadline - self._ctx.clock.monotonic())
            _, still = await asyncio.wait(tasks, timeout=left)
            for task in still:
                task.cancel()
            if still:
                await asyncio.wait(still)


class _Attempt:
    """An attempt in flight, and the RPCs waiting for its outcome.

    Each waiter awaits a future of its own that ``resolve`` completes
    directly: the waiter then runs in the next loop turn, before the
    attempt's settle (whose transaction yields once first), so it answers
    without waiting for that COMMIT. (``asyncio.wait`` or a shield would put
    a callback in between and let the settle go first.)
    """

    __slots__ = ("_waiters", "item", "task")

    task: asyncio.Task[OutboxItem]

    def __init__(self) -> None:
        self.item: OutboxItem | None = None
        self._waiters: list[asyncio.Future[None]] = []

    def resolve(self, item: OutboxItem) -> None:
        """Records the outcome (once) and wakes the waiters."""
        if self.item is not None:
            return
        self.item = item
        for waiter in self._waiters:
            if not waiter.done():
                waiter.set_result(None)
        self._waiters.clear()

    async def outcome(self, timeout: float) -> OutboxItem | None:
        """The outcome, waiting up to ``timeout`` for it; None if not known yet."""
        if self.item is None:
            loop = asyncio.get_running_loop()
            waiter: asyncio.Future[None] = loop.create_future()
            self._waiters.append(waiter)
            expiry = loop.call_later(timeout, _expire, waiter)
            try:
                await waiter
            finally:
                expiry.cancel()
                if self.item is None:
                    self._waiters.remove(waiter)
        return self.item


def _ttl(item: OutboxItem) -> timedelta:
    return SEND_TTL if item.kind is OutboxKind.SEND else STOP_TTL


def _claimed_late(item: OutboxItem, now: datetime) -> bool:
    """Whether ``item`` is past its time and was claimed long after it was
    due: a retry due just before its time still goes out, and an item an
    earlier attempt may have delivered still asks the provider (which then
    confirms the delivery, or sends it late) rather than end unknown."""
    return (
        now > item.created_at + _ttl(item)
        and now - item.next_attempt_at > LATE_CLAIM
        and not item.earlier_attempt_uncertain
    )


def _expired(item: OutboxItem, ttl: timedelta, error: str, *, uncertain: bool = False) -> str:
    """Why ``item`` is given up (DELIVERY_EXPIRED), saying what is known."""
    within = f"{ttl.total_seconds() / 60:g} min"
    if uncertain or item.earlier_attempt_uncertain:
        return (
            f"not confirmed within {within}: an attempt's outcome is unknown, so the "
            f"agent may have it; last error: {error}"
        )
    return f"not delivered within {within}; last error: {error}"


def _expire(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_result(None)


def _mark_done(item: OutboxItem, result: dict[str, str], now: datetime) -> None:
    item.status = OutboxStatus.DONE
    item.result = result
    item.done_at = now
    item.lease_owner, item.lease_until = "", None
    item.last_error = item.error_code = ""
