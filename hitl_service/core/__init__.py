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

if TYPE_CHECKING:
    from collections.abc import AsyncGenerator
    from datetime import datetime

    from hitl_service.core.commands import CreateUser, SendUserMessage, StartHandoff, StopHandoff
    from hitl_service.core.context import CoreContext
    from hitl_service.core.messages import SendOutcome
    from hitl_service.core.sessions import SessionPage
    from hitl_service.domain import LogEvent, Session, SessionState, User
    from providers.types import WebhookBatch

log = structlog.get_logger(__name__)


class HitlCore:
    """Business operations over the store and the provider."""

    def __init__(self, ctx: CoreContext) -> None:
        self.ctx = ctx
        self.outbox = Outbox(ctx)
        self.ingestor = Ingestor(ctx, self.outbox)
        self.hub = EventHub(ctx.store, ctx.clock, buffer_size=ctx.settings.stream_buffer)
        self.maintenance = Maintenance(ctx, self.outbox)
        self._tasks: list[asyncio.Task[None]] = []

    async def start(self) -> None:
        """Starts the background work: fan-out, outbox, maintenance."""
        await self.hub.start()
        for name, coro in (
            ("hub", self.hub.run()),
            ("outbox", self.outbox.run()),
            ("maintenance", self.maintenance.run()),
        ):
            self._tasks.append(asyncio.create_task(coro, name=f"core-{name}"))

    def close_streams(self) -> None:
        """Ends every StreamEvents subscription (first step of shutdown)."""
        self.hub.close()

    async def stop(self, grace: float) -> None:
        """Lets outbox attempts in flight finish (up to ``grace``), then stops."""
        self.hub.close()
        await self.outbox.stop(grace)
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks.clear()

    # --- operations -------------------------------------------------------------
    async def create_user(self, cmd: CreateUser) -> User:
        """See ``users.create_user``."""
        return await users.create_user(self.ctx, cmd)

    async def start_handoff(self, cmd: StartHandoff, budget: float) -> Session:
        """See ``sessions.start_handoff``."""
        return await sessions.start_handoff(self.ctx, cmd, budget)

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
