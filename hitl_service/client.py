"""A small typed asyncio client for ``hitl.v1.HitlService``.

For internal Python services; other languages use stubs generated from
``proto/`` (see ``examples/``). What it adds to the generated stub:

* a deadline on every unary call (``default_timeout``, or ``timeout=``),
  which covers all its attempts: no retry goes past it;
* retries with jittered exponential backoff on ``UNAVAILABLE``,
  ``DEADLINE_EXCEEDED`` and the server's ``CANCELLED`` (a replica short of
  CPU drops calls it has not handled yet so) for calls that are safe to repeat: ``GetSession``,
  ``ListSessions``, ``StopHitl`` (stopping an ended session is a no-op),
  ``CreateUser`` when it has an ``external_id`` (an upsert), and
  ``StartHitl``/``SendMessage``, which always carry a ``request_id`` (one is
  generated when the caller gives none) and repeat it on every attempt, so
  the service never acts twice; by default for 12.5 to 25 s (a
  restart of a one-process deployment: ``RetryPolicy``);
* ``events()``, an event iterator that reconnects when a stream ends or the
  service is briefly unreachable, and resumes after the last cursor it
  returned: no event is missed and none is returned twice;
* errors as ``HitlRpcError`` subclasses carrying the ``ErrorInfo`` reason
  and metadata and the ``BadRequest`` field violations.

Example::

    async with HitlClient("127.0.0.1:50051") as hitl:
        user = await hitl.create_user("Ada", external_id="crm-42")
        session = await hitl.start_hitl(user.id, title="Refund")
        await hitl.send_message(session.id, "Hello?")
        async for event in hitl.events(session_id=session.id):
            print(event.cursor, event.WhichOneof("kind"))
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import re
import uuid
import weakref
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import TYPE_CHECKING, TypeVar

import grpc
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from hitl_service.gen.hitl.v1 import hitl_service_pb2 as pb
from hitl_service.gen.hitl.v1 import hitl_service_pb2_grpc as pb_grpc

if TYPE_CHECKING:
    from hitl_service.gen.hitl.v1.hitl_service_pb2_grpc import HitlServiceAsyncStub

__all__ = [
    "DEFAULT_TIMEOUT",
    "DeadlineExceededError",
    "EventStream",
    "FailedPreconditionError",
    "FieldViolation",
    "HitlClient",
    "HitlRpcError",
    "InvalidArgumentError",
    "NotFoundError",
    "RetryPolicy",
    "UnauthenticatedError",
    "UnavailableError",
]

DEFAULT_TIMEOUT = 30.0  # the longest deadline the proto documents (StartHitl, SendMessage)
_RETRYABLE = frozenset(
    {
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        # Never this client's own cancellation (that raises CancelledError,
        # and a closed stream ends): the server's gRPC core drops calls it
        # has not handed to the service yet once about 1000 wait (a replica
        # short of CPU, or thousands of streams reconnecting at once).
        grpc.StatusCode.CANCELLED,
    }
)
_CHANNEL_OPTIONS = (
    # StreamEvents can be idle for long: keep the connection alive through NATs.
    ("grpc.keepalive_time_ms", 30_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.max_receive_message_length", 1024 * 1024),
    # gRPC's own reconnect backoff grows 1.6 times per failed connect, to
    # 120 s: after a 7 s restart the channel came back 3 s after the server
    # (measured), and later in a longer one, failing every retry meanwhile.
    ("grpc.max_reconnect_backoff_ms", 2_000),
)
# UNAVAILABLE that no retry changes (docs/errors.md): the message's record
# was pruned, so the same request_id can never be answered again.
_FINAL_REASONS = frozenset({"MESSAGE_EXPIRED"})
_REQUEST_ID_RE = re.compile(r"[\x21-\x7e]{1,128}")  # the contract's request_id
# What a header value can carry, without the surrounding blanks the service
# strips from its HITL_API_TOKENS entries.
_TOKEN_RE = re.compile(r"[\x21-\x7e](?:[\x20-\x7e]*[\x21-\x7e])?")
T = TypeVar("T")


# --- errors ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class FieldViolation:
    """One ``google.rpc.BadRequest`` field violation."""

    field: str
    description: str


class HitlRpcError(Exception):
    """A failed call, with the service's rich error details decoded.

    Attributes:
        code: The gRPC status code.
        message: The status message (for people; branch on ``reason``).
        reason: ``ErrorInfo.reason``, a stable UPPER_SNAKE string; empty if
            the error carried none (for example a transport failure).
        domain: ``ErrorInfo.domain`` (``hitl.v1`` for the service's errors).
        metadata: ``ErrorInfo.metadata`` (for example ``session_id``).
        violations: ``BadRequest`` field violations (INVALID_ARGUMENT).
        request_id: The ``request_id`` the call carried on every attempt
            (StartHitl, SendMessage: the one generated when the caller gave
            none); empty for other calls. After ``DEADLINE_EXCEEDED`` or
            ``DELIVERY_PENDING`` the call may still take effect: call again
            with ``request_id=exc.request_id`` to learn its outcome without
            acting twice.
    """

    def __init__(
        self,
        code: grpc.StatusCode,
        message: str,
        *,
        reason: str = "",
        domain: str = "",
        metadata: Mapping[str, str] | None = None,
        violations: Sequence[FieldViolation] = (),
        request_id: str = "",
    ) -> None:
        super().__init__(f"{code.name}: {message}" + (f" ({reason})" if reason else ""))
        self.code = code
        self.message = message
        self.reason = reason
        self.domain = domain
        self.metadata = dict(metadata or {})
        self.violations = tuple(violations)
        self.request_id = request_id

    @property
    def fields(self) -> dict[str, str]:
        """Violations by field name (the last one wins for a repeated field)."""
        return {v.field: v.description for v in self.violations}


class InvalidArgumentError(HitlRpcError):
    """INVALID_ARGUMENT: see ``violations``."""


class NotFoundError(HitlRpcError):
    """NOT_FOUND: an unknown user or session id."""


class FailedPreconditionError(HitlRpcError):
    """FAILED_PRECONDITION: wrong state, reused request id, refused credentials."""


class UnavailableError(HitlRpcError):
    """UNAVAILABLE: the service or its provider could not be reached."""


class DeadlineExceededError(HitlRpcError):
    """DEADLINE_EXCEEDED: the call did not finish within its deadline."""


class UnauthenticatedError(HitlRpcError):
    """UNAUTHENTICATED: missing or wrong API token."""


_ERROR_CLASSES: dict[grpc.StatusCode, type[HitlRpcError]] = {
    grpc.StatusCode.INVALID_ARGUMENT: InvalidArgumentError,
    grpc.StatusCode.NOT_FOUND: NotFoundError,
    grpc.StatusCode.FAILED_PRECONDITION: FailedPreconditionError,
    grpc.StatusCode.UNAVAILABLE: UnavailableError,
    grpc.StatusCode.DEADLINE_EXCEEDED: DeadlineExceededError,
    grpc.StatusCode.UNAUTHENTICATED: UnauthenticatedError,
}


def decode_error(exc: grpc.aio.AioRpcError, *, request_id: str = "") -> HitlRpcError:
    """Turns a raw gRPC error into the matching ``HitlRpcError`` subclass
    (``request_id``: the one the failed call carried)."""
    reason = domain = ""
    metadata: dict[str, str] = {}
    violations: list[FieldViolation] = []
    try:
        # AioRpcError offers the sync Call accessors from_call reads.
        status = rpc_status.from_call(exc)  # type: ignore[arg-type]
    except ValueError:  # details inconsistent with the status: keep the plain status
        status = None
    for detail in status.details if status is not None else ():
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
            reason, domain, metadata = info.reason, info.domain, dict(info.metadata)
        elif detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad = error_details_pb2.BadRequest()
            detail.Unpack(bad)
            violations.extend(FieldViolation(v.field, v.description) for v in bad.field_violations)
    cls = _ERROR_CLASSES.get(exc.code(), HitlRpcError)
    return cls(
        exc.code(),
        exc.details() or "",
        reason=reason,
        domain=domain,
        metadata=metadata,
        violations=violations,
        request_id=request_id,
    )


# --- retries --------------------------------------------------------------------------


@dataclass(frozen=True)
class RetryPolicy:
    """How retryable calls and stream reconnects back off.

    The default rides out a restart of a one-process deployment (a few
    seconds at every deploy): its 15 pauses add up to 12.5-25 s (18.75 s on
    average; the jitter takes half to all of each bound: 0.2, 0.4, 0.8, 1.6,
    then 2 s), within the call's deadline (``default_timeout``, 30 s), which
    no retry goes past.

    Attributes:
        attempts: Tries of one unary call in all (1 means no retries).
        initial_backoff: Upper bound of the first pause, in seconds.
        max_backoff: Upper bound of any pause, in seconds.
        multiplier: Growth of the bound per consecutive failure.
    """

    attempts: int = 16
    initial_backoff: float = 0.2
    max_backoff: float = 2.0
    multiplier: float = 2.0

    def backoff(self, failures: int) -> float:
        """The pause after ``failures`` consecutive failures (1 or more).

        "Equal jitter": between half and all of the exponential bound, so
        clients that failed together do not come back together.
        """
        try:
            # float(): an int multiplier makes an int power, whose product
            # with a float overflows instead of the power itself.
            bound = min(
                self.max_backoff, self.initial_backoff * float(self.multiplier) ** (failures - 1)
            )
        except OverflowError:  # a long outage (1025 failures at 2.0): the cap anyway
            bound = self.max_backoff
        return bound / 2 + random.uniform(0, bound / 2)


# --- the client -----------------------------------------------------------------------


class HitlClient:
    """An async client for ``hitl.v1.HitlService``; use as an async context manager.

    Args:
        target: ``host:port`` of the service's gRPC address.
        token: API token, sent as ``authorization: Bearer <token>`` (needed
            when the service has ``HITL_API_TOKENS`` set); printable ASCII
            without surrounding blanks, else ``ValueError``.
        default_timeout: Deadline in seconds of each unary call, all its
            attempts and pauses together.
        tls: ``False`` for a plaintext channel, ``True`` for TLS with the
            system roots, or ``grpc.ChannelCredentials`` (for example with a
            private CA or a client certificate).
        retry: Retry and reconnect backoff.
        options: Extra gRPC channel options; they take precedence over the
            client's defaults (keepalive, a 1 MiB receive limit, reconnect
            backoff).
        interceptors: Client interceptors (tracing, logging); they see every
            attempt of a retried call.
    """

    def __init__(
        self,
        target: str,
        *,
        token: str | None = None,
        default_timeout: float = DEFAULT_TIMEOUT,
        tls: bool | grpc.ChannelCredentials = False,
        retry: RetryPolicy | None = None,
        options: Sequence[tuple[str, str | int]] = (),
        interceptors: Sequence[grpc.aio.ClientInterceptor] = (),
    ) -> None:
        self.target = target
        self.default_timeout = default_timeout
        self.retry = retry or RetryPolicy()
        if token and not _TOKEN_RE.fullmatch(token):
            # gRPC would fail every call with an internal ExecuteBatchError
            # (no HitlRpcError); say why here, without the token itself.
            raise ValueError(
                "token: printable ASCII only, without leading or trailing blanks"
                " (a token read from a file keeps its trailing newline: strip it)"
            )
        self._metadata: tuple[tuple[str, str], ...] = (
            (("authorization", f"Bearer {token}"),) if token else ()
        )
        # gRPC takes the first of repeated options: the caller's come first,
        # so they replace the defaults above rather than being ignored.
        all_options = (*options, *_CHANNEL_OPTIONS)
        if tls is False:
            self._channel = grpc.aio.insecure_channel(
                target, options=all_options, interceptors=interceptors
            )
        else:
            credentials = grpc.ssl_channel_credentials() if tls is True else tls
            self._channel = grpc.aio.secure_channel(
                target, credentials, options=all_options, interceptors=interceptors
            )
        self._stub: HitlServiceAsyncStub = pb_grpc.HitlServiceStub(self._channel)
        self._streams: weakref.WeakSet[EventStream] = weakref.WeakSet()

    @property
    def stub(self) -> HitlServiceAsyncStub:
        """The generated stub on this client's channel, for anything not wrapped here."""
        return self._stub

    async def __aenter__(self) -> HitlClient:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def close(self) -> None:
        """Closes the channel; calls still running are cancelled, and event
        iterators end (as with ``EventStream.aclose()``)."""
        for stream in list(self._streams):
            await stream.aclose()
        await self._channel.close()

    # --- RPCs ---------------------------------------------------------------------------

    async def create_user(
        self,
        name: str,
        *,
        email: str = "",
        picture_url: str = "",
        external_id: str = "",
        timeout: float | None = None,
    ) -> pb.User:
        """Registers (or, by ``external_id``, updates) an end user.

        Retried only with an ``external_id``: without one a lost response
        followed by a retry would register the user twice.
        """
        request = pb.CreateUserRequest(
            name=name, email=email, picture_url=picture_url, external_id=external_id
        )
        response = await self._unary(
            self._stub.CreateUser, request, timeout, retry=bool(external_id)
        )
        return response.user

    async def start_hitl(
        self,
        user_id: str,
        *,
        title: str = "",
        description: str = "",
        history: Sequence[pb.Message] = (),
        group_id: str = "",
        metadata: Mapping[str, str] | None = None,
        request_id: str | None = None,
        timeout: float | None = None,
    ) -> pb.Session:
        """Opens a handoff; retried with the same ``request_id`` (generated if None)."""
        request = pb.StartHitlRequest(
            user_id=user_id,
            title=title,
            description=description,
            history=list(history),
            group_id=group_id,
            metadata=dict(metadata or {}),
            request_id=request_id or new_request_id(),
        )
        return (await self._unary(self._stub.StartHitl, request, timeout)).session

    async def send_message(
        self,
        session_id: str,
        message: pb.Message | str,
        *,
        request_id: str | None = None,
        timeout: float | None = None,
    ) -> pb.SendMessageResponse:
        """Sends an end-user message (a ``str`` is a text message).

        Retried with the same ``request_id`` (generated if None): the agent
        sees the message once however many attempts it took.
        """
        body = pb.Message(text=message) if isinstance(message, str) else message
        request = pb.SendMessageRequest(
            session_id=session_id, message=body, request_id=request_id or new_request_id()
        )
        return await self._unary(self._stub.SendMessage, request, timeout)

    async def stop_hitl(
        self, session_id: str, reason: str = "", *, timeout: float | None = None
    ) -> pb.Session:
        """Ends a handoff (stopping an ended one returns it unchanged)."""
        request = pb.StopHitlRequest(session_id=session_id, reason=reason)
        return (await self._unary(self._stub.StopHitl, request, timeout)).session

    async def get_session(self, session_id: str, *, timeout: float | None = None) -> pb.Session:
        """One session."""
        request = pb.GetSessionRequest(session_id=session_id)
        return (await self._unary(self._stub.GetSession, request, timeout)).session

    async def list_sessions(
        self,
        *,
        user_id: str = "",
        state: pb.SessionState.ValueType = pb.SESSION_STATE_UNSPECIFIED,
        page_size: int = 0,
        page_token: str = "",
        timeout: float | None = None,
    ) -> pb.ListSessionsResponse:
        """One page of sessions, newest first (``next_page_token`` is empty on the last)."""
        request = pb.ListSessionsRequest(
            user_id=user_id, state=state, page_size=page_size, page_token=page_token
        )
        return await self._unary(self._stub.ListSessions, request, timeout)

    def events(self, session_id: str = "", after: str = "0") -> EventStream:
        """Follows the event log; see ``EventStream``.

        Args:
            session_id: Only this session's events; empty for every session.
            after: Start after this cursor: ``"0"`` from the beginning, a
                cursor saved earlier (``EventStream.cursor``) to resume, or
                ``""`` for live events only (the iterator then resumes from
                the log head the server reported when it subscribed; live
                means from that first subscription: while the service cannot
                be reached at first, what it commits meanwhile is not
                returned. Pass the head you know, or ``"0"``, to have it).
        """
        stream = EventStream(self, session_id=session_id, after=after)
        self._streams.add(stream)
        return stream

    # --- plumbing -----------------------------------------------------------------------

    async def _unary(
        self,
        method: Callable[..., Awaitable[T]],
        request: object,
        timeout: float | None,
        *,
        retry: bool = True,
    ) -> T:
        """Calls ``method`` with a deadline, retrying retryable failures.

        The request object is sent unchanged on every attempt, so a
        ``request_id`` in it is repeated, never regenerated. Each attempt
        gets what is left of the deadline, and a pause that would end past
        it is not taken: the last attempt's error is raised instead.
        """
        attempts = self.retry.attempts if retry else 1
        metadata = self._metadata
        request_id = getattr(request, "request_id", "")
        # The service logs it: every attempt shows up under one id. Only a
        # valid one (1-128 visible ASCII, as the contract says): anything
        # else is no legal header, or a long one that breaks gRPC's metadata
        # limit (RESOURCE_EXHAUSTED); the service's INVALID_FIELDS says why.
        if request_id and _REQUEST_ID_RE.fullmatch(request_id):
            metadata = (*metadata, ("x-request-id", request_id))
        loop = asyncio.get_running_loop()
        deadline = loop.time() + (self.default_timeout if timeout is None else timeout)
        failures = 0
        while True:
            try:
                return await method(
                    request, timeout=max(0.0, deadline - loop.time()), metadata=metadata
                )
            except grpc.aio.AioRpcError as exc:
                failures += 1
                pause = self.retry.backoff(failures)
                error = decode_error(exc, request_id=request_id)
                if (
                    exc.code() not in _RETRYABLE
                    or error.reason in _FINAL_REASONS
                    or failures >= attempts
                    or loop.time() + pause >= deadline
                ):
                    raise error from None
            await asyncio.sleep(pause)


class EventStream:
    """Events in cursor order, across reconnects; an async iterator.

    A stream ends when the service's ``HITL_STREAM_MAX_SECONDS`` pass (status
    OK), on shutdown or restart (UNAVAILABLE), or when the connection drops.
    Each time, this iterator reconnects (backing off while the service is
    unreachable) with ``after_cursor`` set to the last cursor it returned,
    and drops anything at or below that cursor, so every event comes out
    exactly once. It never ends by itself: break out of the loop (or call
    ``aclose()``) when done. Other errors (NOT_FOUND for an unknown session,
    INVALID_ARGUMENT for a bad cursor, UNAUTHENTICATED) raise ``HitlRpcError``.

    Attributes:
        cursor: The cursor of the last event returned (the ``after`` given at
            first); save it to resume in another process.
        reconnects: How many times the stream was opened again.
    """

    def __init__(self, client: HitlClient, *, session_id: str, after: str) -> None:
        self._client = client
        self._session_id = session_id
        self.cursor = after
        self.reconnects = 0
        self._call: grpc.aio.UnaryStreamCall[pb.StreamEventsRequest, pb.Event] | None = None
        self._failures = 0
        self._closed = False

    def __aiter__(self) -> EventStream:
        return self

    async def __aenter__(self) -> EventStream:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Cancels the open call; the iterator then stops."""
        self._closed = True
        if self._call is not None:
            self._call.cancel()
            self._call = None

    def __del__(self) -> None:
        # ``async for ...: break`` drops the iterator without aclose(), and
        # grpc keeps a reference to the call itself, so its own finalizer
        # never runs: cancel here, or the server stream stays open.
        call = getattr(self, "_call", None)
        if call is not None:
            with contextlib.suppress(RuntimeError):  # the event loop is already closed
                call.cancel()

    def _is_closed(self) -> bool:
        # A method, not the attribute: aclose() may run in another task while
        # this one awaits, which attribute narrowing would not allow for.
        return self._closed

    async def __anext__(self) -> pb.Event:
        while not self._is_closed():
            if self._call is None:
                self._call = self._client._stub.StreamEvents(
                    pb.StreamEventsRequest(session_id=self._session_id, after_cursor=self.cursor),
                    metadata=self._client._metadata,
                )
            # Held here: aclose() from another task drops ``self._call``
            # while this one awaits, and the read then raises on the
            # cancelled call instead of on None.
            call = self._call
            try:
                if not self.cursor:
                    # Live only: the server names the head its subscription
                    # starts after; resuming from it loses nothing.
                    head = (await call.initial_metadata()).get("x-stream-head")
                    if isinstance(head, str) and head.isdigit():
                        self.cursor = head
                event = await call.read()
            except asyncio.CancelledError:
                # aclose() from another task cancels the call, and grpc raises
                # CancelledError in the reader: that is the end of iteration,
                # unless this task itself is being cancelled.
                task = asyncio.current_task()
                if self._is_closed() and (task is None or not task.cancelling()):
                    break
                # This read was cancelled (a timeout around it, or its task):
                # grpc cancelled the call with it, so the next read opens a
                # new one after the last cursor returned.
                if self._call is not None:
                    self._call.cancel()
                    self._call = None
                raise
            except grpc.aio.AioRpcError as exc:
                self._call = None
                if exc.code() is grpc.StatusCode.CANCELLED and self._is_closed():
                    break
                if exc.code() not in _RETRYABLE:
                    raise decode_error(exc) from None
                self._failures += 1
                self.reconnects += 1
                await asyncio.sleep(self._client.retry.backoff(self._failures))
                continue
            if event is grpc.aio.EOF:  # the server ended the stream (status OK)
                self._call = None
                self.reconnects += 1
                continue
            assert isinstance(event, pb.Event)
            self._failures = 0
            if self.cursor and int(event.cursor) <= int(self.cursor):
                continue  # already returned before a reconnect
            self.cursor = event.cursor
            return event
        raise StopAsyncIteration


def new_request_id() -> str:
    """A fresh idempotency key."""
    return str(uuid.uuid4())
