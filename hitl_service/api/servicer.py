"""``hitl.v1.HitlService``: validates requests, calls the core, converts.

Errors are raised as domain errors; the interceptor turns them into gRPC
statuses with details.
"""

from __future__ import annotations

from contextlib import aclosing
from typing import TYPE_CHECKING, Any

import grpc

from hitl_service.api import validation
from hitl_service.api.convert import event_to_pb, fit_event, session_to_pb, user_to_pb
from hitl_service.core.hub import HubClosed
from hitl_service.errors import Code, FieldViolation, HitlError, InvalidArgument
from hitl_service.gen.hitl.v1 import hitl_service_pb2 as pb
from hitl_service.gen.hitl.v1 import hitl_service_pb2_grpc as pb_grpc

if TYPE_CHECKING:
    from collections.abc import AsyncIterator

    from hitl_service.core import HitlCore
    from hitl_service.domain import LogEvent

if TYPE_CHECKING:
    Context = grpc.aio.ServicerContext[Any, Any]

_MARGIN = 0.25  # seconds kept back from the caller's deadline to answer in time
MAX_MESSAGE_BYTES = 1024 * 1024  # media travels as URLs, so 1 MiB is plenty
_MAX_EVENT_BYTES = MAX_MESSAGE_BYTES - 1024  # room for gRPC's framing
_MAX_PAGE_BYTES = MAX_MESSAGE_BYTES - 4096  # room for the page token and framing


class EncodedEvents:
    """Serialized ``pb.Event`` by cursor, shared by every stream.

    An event fanned out to N streams is converted and serialized once, not
    N times; the server's StreamEvents serializer passes bytes through (see
    ``server.event_serializer``). Bounded: the oldest entries go first, and
    a stream behind the cache just encodes again.
    """

    def __init__(self, size: int) -> None:
        self._size = max(16, size)
        self._cache: dict[int, bytes] = {}

    def get(self, event: LogEvent) -> bytes:
        """The event's wire form (cursors are never reused, so the seq is the key)."""
        data = self._cache.get(event.seq)
        if data is None:
            data = event_to_pb(event).SerializeToString()
            if len(data) > _MAX_EVENT_BYTES:
                # Unsendable as it is: every stream reaching it would fail.
                data = fit_event(event_to_pb(event), _MAX_EVENT_BYTES).SerializeToString()
            cache = self._cache
            cache[event.seq] = data
            if len(cache) > self._size:
                del cache[next(iter(cache))]
        return data


class HitlServicer(pb_grpc.HitlServiceServicer):
    """The gRPC face of ``HitlCore``."""

    def __init__(self, core: HitlCore) -> None:
        self._core = core
        self._settings = core.ctx.settings
        self._encoded = EncodedEvents(2 * self._settings.stream_buffer)
        self._open_streams = 0

    def _budget(self, context: Context) -> float:
        """Seconds this RPC may spend: the caller's deadline, capped."""
        budget = self._settings.request_budget
        remaining = context.time_remaining()
        if remaining is not None:
            budget = min(budget, remaining - _MARGIN)
        return max(0.05, budget)

    async def CreateUser(
        self, request: pb.CreateUserRequest, context: Context
    ) -> pb.CreateUserResponse:
        """See proto."""
        user = await self._core.create_user(validation.parse_create_user(request))
        return pb.CreateUserResponse(user=user_to_pb(user))

    async def StartHitl(
        self, request: pb.StartHitlRequest, context: Context
    ) -> pb.StartHitlResponse:
        """See proto."""
        cmd = validation.parse_start(request, self._core.check_start)
        session = await self._core.start_handoff(cmd, self._budget(context))
        return pb.StartHitlResponse(session=session_to_pb(session))

    async def SendMessage(
        self, request: pb.SendMessageRequest, context: Context
    ) -> pb.SendMessageResponse:
        """See proto."""
        outcome = await self._core.send_message(
            validation.parse_send(request), self._budget(context)
        )
        return pb.SendMessageResponse(
            message_id=outcome.message_id, external_message_id=outcome.external_message_id
        )

    async def StopHitl(self, request: pb.StopHitlRequest, context: Context) -> pb.StopHitlResponse:
        """See proto."""
        session = await self._core.stop_handoff(
            validation.parse_stop(request), self._budget(context)
        )
        return pb.StopHitlResponse(session=session_to_pb(session))

    async def GetSession(
        self, request: pb.GetSessionRequest, context: Context
    ) -> pb.GetSessionResponse:
        """See proto."""
        session = await self._core.get_session(validation.parse_session_id(request))
        return pb.GetSessionResponse(session=session_to_pb(session))

    async def ListSessions(
        self, request: pb.ListSessionsRequest, context: Context
    ) -> pb.ListSessionsResponse:
        """See proto."""
        state, size, before = validation.parse_list(request)
        page = await self._core.list_sessions(
            user_id=request.user_id, state=state, before=before, limit=size
        )
        sessions: list[pb.Session] = []
        next_before = page.next_before
        total = 0
        for session in page.sessions:
            encoded = session_to_pb(session)
            total += encoded.ByteSize() + 8  # the field's tag and length
            if sessions and total > _MAX_PAGE_BYTES:
                # The rest of the page would not fit in one gRPC message:
                # they start the next page.
                last = page.sessions[len(sessions) - 1]
                next_before = (last.created_at, last.id)
                break
            sessions.append(encoded)
        token = validation.encode_page_token(request, next_before) if next_before else ""
        return pb.ListSessionsResponse(sessions=sessions, next_page_token=token)

    async def StreamEvents(  # type: ignore[override]  # yields pb.Event already serialized
        self, request: pb.StreamEventsRequest, context: Context
    ) -> AsyncIterator[bytes]:
        """See proto. Yields each event's wire form (``EncodedEvents``)."""
        violations: list[FieldViolation] = []
        try:
            after = validation.parse_after_cursor(request.after_cursor)
        except InvalidArgument as exc:
            violations.extend(exc.violations)
            after = None
        if request.session_id and not validation.ID_RE.fullmatch(request.session_id):
            violations.append(FieldViolation("session_id", "is not a session id"))
        if violations:
            raise InvalidArgument(violations)
        if request.session_id:
            await self._core.get_session(request.session_id)  # NOT_FOUND for unknown ids
        head = await self._core.ctx.store.head()
        if after is not None and after > head:
            raise InvalidArgument(
                [FieldViolation("after_cursor", f"is ahead of the log (newest cursor is {head})")]
            )
        clock = self._core.ctx.clock
        until = clock.monotonic() + self._settings.stream_max_seconds
        # "From now" means after the log's head as of this call, even if this
        # replica's fan-out has not read up to it yet.
        start = head if after is None else after
        if self._open_streams >= self._settings.stream_max_open:
            # Each open stream costs memory and a wake-up per event: one
            # client must not be able to open them without end.
            raise HitlError(
                Code.UNAVAILABLE,
                "TOO_MANY_STREAMS",
                "this server has as many streams open as HITL_STREAM_MAX_OPEN allows; "
                "close unused streams, or retry later (or on another replica)",
            )
        events = self._core.subscribe(start, request.session_id, until=until)
        metrics = self._core.ctx.metrics
        metrics.stream_subscribers.inc()
        self._open_streams += 1
        try:
            # The subscription's cursor is fixed: from here the client can
            # miss nothing, so tell it.
            await context.send_initial_metadata((("x-stream-head", str(head)),))
            encode = self._encoded.get
            async with aclosing(events):
                async for event in events:
                    yield encode(event)
        except HubClosed:
            raise HitlError(
                Code.UNAVAILABLE,
                "SERVER_SHUTTING_DOWN",
                "the server is shutting down; reconnect with the last cursor received",
            ) from None
        finally:
            self._open_streams -= 1
            metrics.stream_subscribers.dec()
