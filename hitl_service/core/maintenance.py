"""Background upkeep: timeouts, catch-up with the provider, pruning.

Everything here is driven from the store, so it survives restarts and works
the same on every replica (dedupe keys and the outbox make repeated work
harmless). Timeouts are checked by every replica; catch-up and pruning run in
turns the replicas take through the store (``Tx.take_turn``), so a cluster
makes one provider call per open chat per ``HITL_RECONCILE_INTERVAL``, not
one per replica. A process catches up once when it starts, whatever the
turn: that pass recovers what arrived while it was down.
"""

from __future__ import annotations

import asyncio
from datetime import timedelta
from typing import TYPE_CHECKING

import structlog

from hitl_service.clock import WallSteps
from hitl_service.core.ingest import apply_inbound, clean, first_sight
from hitl_service.core.provider_state import StateWatch
from hitl_service.core.sessions import START_SCOPE, abandon_later, request_stop
from hitl_service.core.state import finish, passes_over
from hitl_service.domain import SessionState
from hitl_service.errors import FailedPrecondition, StoreUnavailable
from providers.errors import ProviderError
from providers.types import AgentMessage, EndedBy, Failed, ProviderChat

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable
    from datetime import datetime

    from hitl_service.core.context import CoreContext
    from hitl_service.core.hub import EventHub
    from hitl_service.core.outbox import Outbox
    from hitl_service.domain import Session
    from providers.types import CatchUp, ProviderUser

log = structlog.get_logger(__name__)

IDEMPOTENCY_RETENTION = timedelta(hours=48)
DEDUPE_RETENTION = timedelta(days=7)
PARKED_RETENTION = timedelta(minutes=10)
REFUSED_STOP_BACKOFF = timedelta(minutes=10)
"""A timeout's stop the provider refused for good is asked again after this."""
_TIMED = (SessionState.REQUESTED, SessionState.QUEUED, SessionState.ASSIGNED)
_PRUNE_EVERY = 3600.0  # seconds
_CLOCK_EVERY = 60.0  # seconds between comparisons of this replica's clock with the database's
CLOCK_SKEW_WARNING = 5.0
"""Seconds this replica's clock may differ from the database's before
``maintenance.clock_skew``: replicas compare each other's times (outbox
leases of 26 s, upkeep turns, timeouts), so they need clocks in step."""
_PAGE = 500
_FAILURES_IN_A_ROW = 3  # store errors on consecutive sessions that end a sweep


def _words(seconds: float) -> str:
    if seconds >= 3600 and seconds % 3600 == 0:
        return f"{int(seconds // 3600)} h"
    if seconds >= 60 and seconds % 60 == 0:
        return f"{int(seconds // 60)} min"
    return f"{seconds:g} s"


class Maintenance:
    """Periodic sweeps over open sessions."""

    def __init__(self, ctx: CoreContext, outbox: Outbox, hub: EventHub | None = None) -> None:
        self._ctx = ctx
        self._outbox = outbox
        self._hub = hub
        self._last_prune = float("-inf")
        self._last_catch_up = float("-inf")
        self._last_clock_check = float("-inf")
        self._start_pass_done = False  # the start-up catch-up pass has completed
        self._steps = WallSteps(ctx.clock)
        # (session id, timer) -> (its stored start, the monotonic time that
        # stands for): see ``_waited``.
        self._timers: dict[tuple[str, str], tuple[datetime, float]] = {}

    @property
    def sweep_interval(self) -> float:
        """Seconds between sweeps: fine enough for the shortest timeout, and
        for catch-up every ``HITL_RECONCILE_INTERVAL`` (which only a sweep runs)."""
        settings = self._ctx.settings
        timeouts = [t for t in (settings.queue_timeout, settings.idle_timeout) if t > 0]
        intervals = [t / 4 for t in timeouts]
        if settings.reconcile_interval > 0:
            intervals.append(settings.reconcile_interval)
        return max(0.5, min([5.0, *intervals]))

    async def run(self) -> None:
        """Sweeps until cancelled: timeouts, pruning and catch-up each in its
        own loop, so that neither a long catch-up pass (one provider call per
        open chat) nor a long prune (HITL_RETENTION turned on over a large
        history) holds a timeout back."""
        await asyncio.gather(
            self._every(self.sweep_timeouts),
            self._every(self.sweep_prune),
            self._every(self.sweep_catch_up),
            self._every(self.sweep_clock),
        )

    async def _every(self, sweep: Callable[[], Awaitable[None]]) -> None:
        while True:
            try:
                await sweep()
            except StoreUnavailable as exc:
                log.warning("maintenance.store_unavailable", error=str(exc))
            except Exception:
                log.exception("maintenance.error")
            await self._ctx.clock.sleep(self.sweep_interval)

    async def sweep(self, *, force_catch_up: bool = False) -> None:
        """One pass of each: timeouts, pruning when due, catch-up when due."""
        await self.sweep_timeouts()
        await self.sweep_prune()
        await self.sweep_catch_up(force=force_catch_up)

    async def sweep_timeouts(self) -> None:
        """Times out the open sessions that are due."""
        ctx = self._ctx
        now = ctx.clock.now()
        step = self._steps.look()
        if step:
            # Timeouts count on the monotonic clock (``_waited``); the
            # outbox and upkeep turns bring in what a step back left ahead.
            log.warning("maintenance.clock_stepped", seconds=round(step, 3))
        seen: set[str] = set()

        async def check(session: Session) -> None:
            seen.add(session.id)
            await self._check_timeouts(session, now)

        open_sessions = await self._each_open(check)
        # Only the open sessions' timers are kept (all of them were read).
        self._timers = {key: value for key, value in self._timers.items() if key[0] in seen}
        ctx.metrics.active_sessions.set(open_sessions)
        if ctx.settings.retention > 0 and self._hub is not None:
            # On every replica, whichever prunes: what the prune deletes must
            # not stay on offer in this one's stream buffer.
            self._hub.forget_before(self._retention_cutoff(now))

    async def sweep_prune(self) -> None:
        """Prunes expired rows, when due and this replica's turn."""
        mono = self._ctx.clock.monotonic()
        if mono - self._last_prune >= _PRUNE_EVERY:
            self._last_prune = mono
            now = self._ctx.clock.now()
            if await self._take_turn("prune", now, _PRUNE_EVERY):
                await self._prune(now)

    async def sweep_clock(self, *, force: bool = False) -> None:
        """Compares this replica's clock with the database's, once a minute
        (``hitl_clock_skew_seconds``). A replica ahead takes upkeep turns
        early (an attempt's lease waits for the database's clock too: see
        ``PostgresTx.claim_outbox``), one behind retries late; NTP keeps
        clocks far closer than ``CLOCK_SKEW_WARNING``, so a warning means a
        clock to fix."""
        ctx = self._ctx
        mono = ctx.clock.monotonic()
        if mono - self._last_clock_check < _CLOCK_EVERY and not force:
            return
        self._last_clock_check = mono
        before = ctx.clock.now()
        database = await ctx.store.database_time()
        if database is None:
            return  # one process, one clock
        after = ctx.clock.now()
        skew = ((before + (after - before) / 2) - database).total_seconds()
        ctx.metrics.clock_skew.set(skew)
        if abs(skew) > CLOCK_SKEW_WARNING:
            log.warning(
                "maintenance.clock_skew",
                seconds=round(skew, 3),
                round_trip_ms=round((after - before).total_seconds() * 1000, 1),
            )

    async def sweep_catch_up(self, *, force: bool = False) -> None:
        """Catches up every open chat, when due and this replica's turn."""
        ctx = self._ctx
        if not ctx.provider.capabilities.catch_up:
            return
        mono = ctx.clock.monotonic()
        interval = ctx.settings.reconcile_interval
        # A process catches up when it starts, whatever the turn: that pass
        # recovers what the chats did while it was down (and is tried again
        # until it completes: the store may not be up yet). Later passes,
        # every `interval`, only in a turn no other replica holds.
        sure = force or not self._start_pass_done
        if not (sure or (interval > 0 and mono - self._last_catch_up >= interval)):
            return
        self._last_catch_up = mono
        if not (await self._take_turn("catch_up", ctx.clock.now(), interval, force=sure) or sure):
            return

        async def catch_up(session: Session) -> None:
            if session.external_chat_id and session.state.is_open:
                try:
                    await self.catch_up(session)
                except StoreUnavailable:
                    raise  # counted by _each_open
                except Exception:
                    # A provider's bug with this chat (anything but a
                    # ProviderError, a listing that cannot be applied)
                    # costs only this chat's catch-up; raised, it would end
                    # every pass here, the start-up pass included.
                    log.exception("catch_up.error", session_id=session.id)

        await self._each_open(catch_up)
        self._start_pass_done = True

    async def _each_open(self, action: Callable[[Session], Awaitable[object]]) -> int:
        """Runs ``action`` on every open session, page by page; returns how many."""
        count = 0
        failures = 0  # in a row
        after = ""
        while True:
            page = await self._ctx.store.list_open_sessions(after_id=after, limit=_PAGE)
            for session in page:
                count += 1
                try:
                    await action(session)
                    failures = 0
                except StoreUnavailable as exc:
                    # One session's row may be locked by a frozen replica
                    # (the statement timed out): the others still get their
                    # turn. Several in a row: the store is down; stop here.
                    failures += 1
                    if failures >= _FAILURES_IN_A_ROW:
                        raise
                    log.warning(
                        "maintenance.session_skipped", session_id=session.id, error=str(exc)
                    )
            if len(page) < _PAGE:
                return count
            after = page[-1].id

    def _retention_cutoff(self, now: datetime) -> datetime:
        return now - timedelta(seconds=self._ctx.settings.retention)

    async def _prune(self, now: datetime) -> None:
        removed = await self._ctx.store.prune(
            idempotency_before=now - IDEMPOTENCY_RETENTION,
            dedupe_before=now - DEDUPE_RETENTION,
            parked_before=now - PARKED_RETENTION,
            sessions_before=(
                self._retention_cutoff(now) if self._ctx.settings.retention > 0 else None
            ),
        )
        log.info("maintenance.pruned", rows=removed)

    async def _take_turn(
        self, job: str, now: datetime, every: float, *, force: bool = False
    ) -> bool:
        """Takes ``job``'s turn among the replicas; False if another one has it.

        ``force`` records a turn from ``now`` even while another lasts (unless
        that one lasts longer). A turn lasts 90 % of ``every``: the replica
        that took it finds the next one free when its own timer comes round,
        even if its wall clock ran a little slower than its monotonic one.
        A turn ending further ahead than one is taken to (clocks of replicas
        a little apart allowed for) was taken before a clock was stepped
        back: it is free, not held for as long as the step. On PostgreSQL,
        further ahead of the database's clock too: a replica whose clock is
        behind the database's does not take the others' turns.
        """
        until = now + timedelta(seconds=every * 0.9)
        database = await self._ctx.store.database_time()
        latest = max(now, database) if database is not None else now
        stale_after = latest + timedelta(seconds=every + CLOCK_SKEW_WARNING)
        async with self._ctx.store.transaction() as tx:
            # Forced, "now" is the turn's own end: past any shorter turn.
            return await tx.take_turn(job, until if force else now, until, stale_after=stale_after)

    def _waited(self, session: Session, timer: str, since: datetime, now: datetime) -> float:
        """Seconds since ``since``, a time the session stored (for ``timer``).

        Counted by the wall clock until a sweep first sees that time, then by
        the monotonic one: a step of the wall clock since (NTP, a VM resumed,
        the date set by hand) neither ends every handoff at once nor holds
        their timeouts back for as long as the step. A time ahead of the
        clock (stepped back before this process saw it) counts from then.
        """
        mono = self._ctx.clock.monotonic()
        key = (session.id, timer)
        known = self._timers.get(key)
        if known is None or known[0] != since:
            known = (since, mono - max(0.0, (now - since).total_seconds()))
            self._timers[key] = known
        return mono - known[1]

    async def _check_timeouts(self, session: Session, now: datetime) -> None:
        settings = self._ctx.settings
        if session.state is SessionState.STARTING:
            limit = settings.request_budget * 2 + settings.provider_timeout
            if self._waited(session, "start", session.created_at, now) > limit:
                await self.fail_interrupted_start(session.id, now)
            return
        due = self._due(session, now)
        if due is not None:
            await self._time_out(session, *due)

    def _due(self, session: Session, now: datetime) -> tuple[str, str] | None:
        """The timeout ``session`` has passed, as (kind, reason), if any."""
        settings = self._ctx.settings
        if session.stop_requested_at is not None or session.state not in _TIMED:
            return None
        if session.state.is_waiting and settings.queue_timeout > 0:
            waited = self._waited(
                session, "queue", session.waiting_since or session.created_at, now
            )
            if waited > settings.queue_timeout:
                return (
                    "queue",
                    f"no agent took the handoff within {_words(settings.queue_timeout)}",
                )
        idle_since = session.last_activity_at or session.created_at
        if (
            settings.idle_timeout > 0
            and self._waited(session, "idle", idle_since, now) > settings.idle_timeout
        ):
            return "idle", f"the user was silent for {_words(settings.idle_timeout)}"
        return None

    async def _time_out(self, session: Session, kind: str, reason: str) -> None:
        def still_due(current: Session, now: datetime) -> bool:
            # The sweep read its page earlier (catch-up calls the provider
            # per chat in between): an agent may have taken the chat, the
            # user written, or another replica's sweep stopped it since.
            due = self._due(current, now)
            return due is not None and due[0] == kind

        try:
            item, head = await request_stop(
                self._ctx,
                self._outbox,
                session.id,
                reason,
                EndedBy.TIMEOUT,
                check=still_due,
                refused_backoff=REFUSED_STOP_BACKOFF,
            )
        except FailedPrecondition:
            return  # changed meanwhile (still starting)
        if item is None:
            return
        if "retry_of" not in item.payload:  # a refused stop asked again is no new timeout
            self._ctx.metrics.timeouts.labels(kind).inc()
            log.info("session.timeout", session_id=session.id, kind=kind)
        self._outbox.dispatch(item, head)

    async def fail_interrupted_start(self, session_id: str, now: datetime | None = None) -> None:
        """Fails a start that no process carries on with any more (its
        process died, or stopped and cut it off), if it is still STARTING."""
        ctx = self._ctx
        now = now or ctx.clock.now()
        detail = "the service stopped while the handoff was starting"
        async with ctx.store.transaction() as tx:
            current = await tx.get_session(session_id)
            if current is None or current.state is not SessionState.STARTING:
                return
            finish(current, SessionState.FAILED, detail, EndedBy.UNSPECIFIED, now)
            await tx.update_session(current)
            await tx.append_event(
                current.id, current.user_id, now, Failed("START_INTERRUPTED", detail)
            )
            # The provider may have opened the chat before the process died:
            # as after an outage, the retry of the same request starts afresh
            # and the provider reuses the chat; without a retry, it is closed.
            if current.request_id:
                await tx.delete_idempotency(START_SCOPE, current.request_id)
            await abandon_later(tx, ctx, current, now)
        ctx.metrics.appended("failed")
        log.warning("session.start_interrupted", session_id=session_id)

    async def catch_up(
        self,
        session: Session,
        *,
        user: ProviderUser | None = None,
        messages_only: bool = False,
        budget: float | None = None,
    ) -> int:
        """Asks the provider what happened in the chat since the checkpoint.

        Args:
            session: An open session with a chat.
            user: Its provider user as a call just left it (not yet
                stored: a stop's renewed credentials), updated in place;
                read from the store when None.
            messages_only: Apply only the agent's messages, and keep the
                checkpoint (the catch-up before a provider's end: the end
                itself comes with the webhook, which says who closed); the
                read is retried within ``budget``.
            budget: At most this long for the provider call(s).

        Returns:
            How many log events this added (events webhooks never delivered).
        """
        ctx = self._ctx
        if user is None:
            user = await ctx.store.get_provider_user(session.user_id, ctx.provider_name)
        if user is None:
            return 0
        chat = ProviderChat(session.external_chat_id, dict(session.chat_state))
        watch = StateWatch(user, chat)

        def read(timeout: float) -> Awaitable[CatchUp]:
            return ctx.provider.catch_up(chat, user, session.catch_up_checkpoint, timeout=timeout)

        try:
            try:
                if messages_only and budget is not None:
                    # Before an end, the last read of the chat: a message
                    # whose webhook was lost is recovered now or never (a
                    # read is safe to repeat). Others wait for the next pass.
                    listing = await ctx.calls.with_retries("catch_up", read, budget=budget)
                else:
                    listing = await ctx.calls.once("catch_up", read, budget=budget)
            except ProviderError as exc:
                log.info("catch_up.failed", session_id=session.id, error=str(exc))
                await watch.save_after_failure(ctx, session.id, session.user_id)
                return 0
            return await self._apply_listing(session, listing, watch, messages_only)
        except StoreUnavailable:
            raise
        except BaseException as exc:
            # A provider's bug, or a listing the core cannot apply (its
            # transaction, rolled back, held the save), or the pass cut off
            # (the shutdown): what the provider changed on the way (a token
            # renewed, its refresh token spent) is kept all the same, as for
            # a send.
            await watch.save_after_failure(
                ctx, session.id, session.user_id, cut_off=not isinstance(exc, Exception)
            )
            raise

    async def _apply_listing(
        self, session: Session, listing: CatchUp, watch: StateWatch, messages_only: bool
    ) -> int:
        """Applies a catch-up's listing (see ``catch_up``); returns how many
        log events it added."""
        ctx = self._ctx
        now = ctx.clock.now()
        added: list[str] = []
        failed_items: list[str] = []
        held = False  # a message passed over: the checkpoint must not move past it
        async with ctx.store.transaction() as tx:
            await watch.save(tx, ctx, session.id, session.user_id)  # e.g. a token renewed
            current = await tx.get_session(session.id)
            if current is None:
                return 0
            for event in map(clean, listing.events):
                if event.external_chat_id != current.external_chat_id:
                    continue
                if messages_only and not isinstance(event.kind, AgentMessage):
                    continue
                if passes_over(current, event.kind, event.occurred_at or now):
                    # Its key stays free, as in ingest. A message written
                    # while our stop is pending belongs to the handoff if the
                    # provider refuses the stop for good, and only a later
                    # pass can bring it then (its webhook was answered).
                    held = held or isinstance(event.kind, AgentMessage)
                    continue
                if await first_sight(tx, ctx.provider_name, event, now):
                    added.extend(await apply_inbound(tx, ctx, current, event, now, failed_items))
            if (
                not messages_only
                and not held
                and listing.checkpoint
                and listing.checkpoint != current.catch_up_checkpoint
            ):
                current.catch_up_checkpoint = listing.checkpoint
                await tx.update_session(current)
        self._outbox.signal_many(failed_items)
        if added:
            ctx.metrics.catch_up_events.labels(ctx.provider_name).inc(len(added))
            for tag in added:
                ctx.metrics.appended(tag)
            log.info("catch_up.recovered", session_id=session.id, events=len(added))
        return len(added)
