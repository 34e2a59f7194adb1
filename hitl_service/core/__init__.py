"""The core: sessions, users, the event log, the outbox and stream fan-out.

``HitlCore`` is the one object the API layer and the sidecar talk to; it
never knows which provider or store backend runs.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

import structlog

from hitl_service.core import messages, sessions, users
from hitl_service.core.hub import EventHub
from hitl_service.core.ingest import Ingestor, IngestResult
from hitl_service.core.maintenance import Maintenance
from hitl_service.core.outbox import Outbox
from hitl_service.errors import StoreUnavailable

if TYPE_CHECKING:
    from collections.abc import AsyncGenerator, Callable
    from datetime import datetime

    from hitl_service.core.commands import CreateUser, SendUserMessage, StartHandoff, StopHandoff
    from hitl_service.core.context import CoreContext
    from hitl_service.core.messages import SendOutcome
    from hitl_service.core.sessions import SessionPage
    from hitl_service.domain import LogEvent, Session, SessionState, User
    from hitl_service.errors import FieldViolation
    from providers.types import ProviderUser, StartFields, WebhookBatch

log = structlog.get_logger(__name__)

CATCH_UP_BEFORE_END_BUDGET = 4.0  # seconds
FAIL_CUT_STARTS_SECONDS = 5.0
"""The most a shutdown spends failing the starts it cut off (a slow store)."""


class HitlCore:
    """Business operations over the store and the provider."""

    def __init__(self, ctx: CoreContext) -> None:
        self.ctx = ctx
        self.outbox = Outbox(ctx)
        self.hub = EventHub(ctx.store, ctx.clock, buffer_size=ctx.settings.stream_buffer)
        self.maintenance = Maintenance(ctx, self.outbox, self.hub)
        # Only a provider that keeps a history can be read before an end.
        before_end = self._catch_up_before_end if ctx.provider.capabilities.catch_up else None
        self.ingestor = Ingestor(ctx, self.outbox, before_end=before_end)
        self.outbox.before_end = before_end
        self._tasks: list[asyncio.Task[None]] = []
        self._outbox_loop: asyncio.Task[None] | None = None
        # Starts running (see start_handoff), each with its session's id once stored.
        self._starts: dict[asyncio.Task[Session], list[str]] = {}

    async def start(self) -> None:
        """Starts the background work: fan-out, outbox, maintenance."""
        await self.hub.start()
        self._outbox_loop = asyncio.create_task(self.outbox.run(), name="core-outbox")
        self._tasks = [
            asyncio.create_task(self.hub.run(), name="core-hub"),
            self._outbox_loop,
            asyncio.create_task(self.maintenance.run(), name="core-maintenance"),
        ]

    def close_streams(self) -> None:
        """Ends every StreamEvents subscription (first step of shutdown)."""
        self.hub.close()

    async def stop(self, grace: float) -> None:
        """Lets starts and outbox attempts in flight finish (up to ``grace``
        in all), cuts off the rest, then stops.

        A start cut off is failed (START_INTERRUPTED) here, as the upkeep
        would fail it a minute later: the caller's retry with its request id
        then starts afresh on the next replica at once, instead of being
        told START_IN_PROGRESS meanwhile. (Left running, a start went on with
        the provider and the store closed under it.)
        """
        self.hub.close()
        deadline = self.ctx.clock.monotonic() + grace
        if self._starts:
            _, running = await asyncio.wait(self._starts, timeout=grace)
            cut = [session_id for start in running for session_id in self._starts[start]]
            for start in running:
                start.cancel()
            if running:
                await asyncio.wait(running)
            try:
                async with asyncio.timeout(FAIL_CUT_STARTS_SECONDS):
                    for session_id in cut:
                        await self.maintenance.fail_interrupted_start(session_id)
            except (StoreUnavailable, TimeoutError):
                pass  # the upkeep of the next replica fails them
        # The loops end before the outbox drains: the upkeep ran on through
        # the drain, and an attempt it started meanwhile (a timeout's stop)
        # was neither waited for nor cut off: it ran on with the provider
        # and the store closed under it. The outbox's own loop ends after
        # its pass (a claim under way starts its attempts, which the drain
        # then waits for); cut off, it would leave what it claimed unstarted.
        self.outbox.stop_claiming()
        for task in self._tasks:
            if task is not self._outbox_loop:
                task.cancel()
        left = max(0.0, deadline - self.ctx.clock.monotonic())
        await asyncio.wait(self._tasks, timeout=left)
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks.clear()
        await self.outbox.stop(max(0.0, deadline - self.ctx.clock.monotonic()))

    # --- operations -------------------------------------------------------------
    async def create_user(self, cmd: CreateUser) -> User:
        """See ``users.create_user``."""
        return await users.create_user(self.ctx, cmd)

    def check_start(self, fields: StartFields) -> list[FieldViolation]:
        """See ``sessions.check_start``."""
        return sessions.check_start(self.ctx, fields)

    async def start_handoff(self, cmd: StartHandoff, budget: float) -> Session:
        """See ``sessions.start_handoff``.

        Runs in a task of its own: a caller that goes away (cancelled, past
        its deadline) must not cut a start in half, with the session left
        STARTING, its request id answering START_IN_PROGRESS, and perhaps a
        chat opened at the provider. The start finishes or fails as if the
        caller had waited, and a retry with the same request id gets that.
        """
        stored: list[str] = []
        task = asyncio.create_task(
            sessions.start_handoff(self.ctx, cmd, budget, stored=stored.append)
        )
        self._starts[task] = stored
        task.add_done_callback(_forget_start(self._starts))
        return await asyncio.shield(task)

    async def send_message(self, cmd: SendUserMessage, budget: float) -> SendOutcome:
        """See ``messages.send_message``."""
        return await messages.send_message(self.ctx, self.outbox, cmd, budget)

    async def stop_handoff(self, cmd: StopHandoff, budget: float) -> Session:
        """See ``sessions.stop_handoff``."""
        return await sessions.stop_handoff(self.ctx, self.outbox, cmd, budget)

    async def get_session(self, session_id: str) -> Session:
        """See ``sessions.get_session``."""
        return await sessions.get_session(self.ctx, session_id)

    async def list_sessions(
        self,
        *,
        user_id: str,
        state: SessionState | None,
        before: tuple[datetime, str] | None,
        limit: int,
    ) -> SessionPage:
        """See ``sessions.list_sessions``."""
        return await sessions.list_sessions(
            self.ctx, user_id=user_id, state=state, before=before, limit=limit
        )

    def subscribe(
        self, after: int | None, session_id: str = "", *, until: float | None = None
    ) -> AsyncGenerator[LogEvent]:
        """See ``EventHub.subscribe``."""
        return self.hub.subscribe(after, session_id, until=until)

    async def ingest(self, batch: WebhookBatch) -> IngestResult:
        """See ``Ingestor.ingest``."""
        return await self.ingestor.ingest(batch)

    async def _catch_up_before_end(self, session: Session, user: ProviderUser | None = None) -> int:
        """The agent's messages the provider has and we do not, read before
        the provider's end of the chat or our stop is applied (see
        ``core.ingest``). Bounded well inside a webhook sender's patience
        (LiveChat's: ~10 s). ``user``: see ``Maintenance.catch_up``."""
        try:
            return await self.maintenance.catch_up(
                session, user=user, messages_only=True, budget=CATCH_UP_BEFORE_END_BUDGET
            )
        except StoreUnavailable:
            raise  # the webhook is answered 503 (redelivered), the stop retried
        except Exception:
            # A provider's bug (anything but a ProviderError) costs only what
            # the read would have found, as a failed call does: the end
            # applies. Raised, it would refuse the end's webhook every time
            # and retry a stop the provider already made for 24 hours.
            log.exception("catch_up.before_end_failed", session_id=session.id)
            return 0


def _forget_start(
    starts: dict[asyncio.Task[Session], list[str]],
) -> Callable[[asyncio.Task[Session]], None]:
    def done(task: asyncio.Task[Session]) -> None:
        starts.pop(task, None)
        if not task.cancelled():
            task.exception()  # its caller may be gone: retrieved here, not reported as lost

    return done
