"""One server interceptor: request context, authentication, metrics, one
canonical log line per RPC, and domain errors mapped to gRPC statuses.

``intercept_service`` runs before the handler exists, so it wraps the
returned handler's behaviour to see the outcome. The wrapped handler of a
method is built once and reused: per-call data (metadata, the request id)
comes from the servicer context, so nothing per call is captured.
"""

from __future__ import annotations

import asyncio
import inspect
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TYPE_CHECKING, Any, cast

import grpc
import structlog
from google.protobuf.message import DecodeError
from structlog.contextvars import bind_contextvars, clear_contextvars

from hitl_service.activity import Activity
from hitl_service.api.status import internal_error, to_status, unchanged
from hitl_service.errors import Code, HitlError, StoreUnavailable
from hitl_service.gen.hitl.v1 import hitl_service_pb2 as pb
from hitl_service.secret import matches_any

if TYPE_CHECKING:
    from prometheus_client import Counter, Histogram

    from hitl_service.metrics import Metrics
    from hitl_service.secret import Secret

    Context = grpc.aio.ServicerContext[Any, Any]
    Handler = grpc.RpcMethodHandler[Any, Any]

log = structlog.get_logger(__name__)

_OPEN_SERVICES = frozenset({"grpc.health.v1.Health"})  # probes carry no token
_HITL_SERVICE = pb.DESCRIPTOR.services_by_name["HitlService"].full_name
STORE_DOWN = "the store is unavailable; retry later"
_UNAUTHENTICATED = (
    "missing or wrong API token; send 'authorization: Bearer <token>' "
    "with a token from HITL_API_TOKENS"
)


def _split(method: str) -> tuple[str, str]:
    service, _, name = method.lstrip("/").partition("/")
    return service, name


def _new_id() -> str:
    return os.urandom(8).hex()


class _Method:
    """What every call of one method shares: names and metric children."""

    def __init__(self, metrics: Metrics, kind: str, method: str, needs_token: bool) -> None:
        self.service, self.name = _split(method)
        labels = (kind, self.service, self.name)
        self.needs_token = needs_token
        self.started: Counter = metrics.grpc_started.labels(*labels)
        self.received: Counter = metrics.grpc_msg_received.labels(*labels)
        self.sent: Counter = metrics.grpc_msg_sent.labels(*labels)
        self.seconds: Histogram = metrics.grpc_seconds.labels(*labels)
        self._metrics = metrics
        self._labels = labels

    def handled(self, code: grpc.StatusCode) -> Counter:
        """The ``grpc_server_handled_total`` child for ``code``."""
        metrics = self._metrics
        return metrics.child(metrics.grpc_handled, *self._labels, code.name)

    def unavailable(self, reason: str) -> Counter:
        """The ``hitl_rpc_unavailable_total`` child for ``reason``."""
        metrics = self._metrics
        return metrics.child(metrics.rpc_unavailable, self.name, reason)


class ServiceInterceptor(grpc.aio.ServerInterceptor):
    """Wraps every handler of the server."""

    def __init__(
        self,
        metrics: Metrics,
        api_tokens: tuple[Secret, ...] = (),
        activity: Activity | None = None,
        *,
        max_in_flight: int = 1000,
        scrub: Callable[[str], str] = unchanged,
    ) -> None:
        self._metrics = metrics
        # Masks the configured secrets in error texts callers get (logs
        # have the redactor; a status's message went out as it was).
        self._scrub = scrub
        self._tokens = api_tokens
        self._activity = activity or Activity()
        self._max_in_flight = max_in_flight
        self._in_flight = 0  # unary HitlService calls being handled
        self._wrapped: dict[tuple[str, int], Handler] = {}

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[Handler | None]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> Handler | None:
        """See base class."""
        handler: Any = await continuation(handler_call_details)  # aio handlers are async
        if handler is None:
            return None
        key = (handler_call_details.method, id(handler))
        wrapped = self._wrapped.get(key)
        if wrapped is None:
            wrapped = self._wrapped[key] = self._wrap(handler_call_details.method, handler)
        return wrapped

    def _wrap(self, method: str, handler: Any) -> Handler:
        service, _ = _split(method)
        needs_token = bool(self._tokens) and service not in _OPEN_SERVICES
        if handler.unary_unary is not None:
            inner = handler.unary_unary
            info = _Method(self._metrics, "unary", method, needs_token)

            activity = self._activity
            bounded = service == _HITL_SERVICE  # not health nor reflection

            async def unary(request: Any, context: Context) -> Any:
                activity.current += 1  # streams are not counted: they only read
                self._in_flight += bounded
                try:
                    async with _Rpc(self, info, context):
                        info.received.inc()
                        if type(request) is _Undecodable:
                            raise request.error()
                        if bounded and self._in_flight > self._max_in_flight:
                            raise _too_many_requests()
                        response = await inner(request, context)
                        info.sent.inc()
                        return response
                finally:
                    activity.current -= 1
                    self._in_flight -= bounded

            return grpc.unary_unary_rpc_method_handler(
                unary, _decoding(handler.request_deserializer), handler.response_serializer
            )
        if handler.unary_stream is not None:
            inner_stream = handler.unary_stream
            stream_info = _Method(self._metrics, "server_stream", method, needs_token)

            async def server_stream(request: Any, context: Context) -> AsyncIterator[Any]:
                async with _Rpc(self, stream_info, context):
                    stream_info.received.inc()
                    if type(request) is _Undecodable:
                        raise request.error()
                    sent = stream_info.sent
                    async for response in inner_stream(request, context):
                        sent.inc()
                        yield response

            async def server_stream_writing(request: Any, context: Context) -> None:
                # A handler that sends with context.write() (grpc's own
                # Health.Watch): awaited, not iterated; its messages uncounted.
                async with _Rpc(self, stream_info, context):
                    stream_info.received.inc()
                    if type(request) is _Undecodable:
                        raise request.error()
                    await inner_stream(request, context)

            return grpc.unary_stream_rpc_method_handler(
                server_stream
                if inspect.isasyncgenfunction(inner_stream)
                else server_stream_writing,
                _decoding(handler.request_deserializer),
                handler.response_serializer,
            )
        if handler.stream_stream is not None:
            inner_bidi = handler.stream_stream
            bidi_info = _Method(self._metrics, "bidi_stream", method, needs_token)

            async def bidi(requests: Any, context: Context) -> AsyncIterator[Any]:
                async with _Rpc(self, bidi_info, context):
                    async for response in inner_bidi(requests, context):
                        yield response

            async def bidi_writing(requests: Any, context: Context) -> None:
                async with _Rpc(self, bidi_info, context):
                    await inner_bidi(requests, context)

            return grpc.stream_stream_rpc_method_handler(
                bidi if inspect.isasyncgenfunction(inner_bidi) else bidi_writing,
                handler.request_deserializer,
                handler.response_serializer,
            )
        return cast("Handler", handler)


def _too_many_requests() -> HitlError:
    # Refused before anything is stored: nothing to learn by retrying with
    # the same request_id but the outcome of a later attempt.
    return HitlError(
        Code.UNAVAILABLE,
        "TOO_MANY_REQUESTS",
        "this server is handling as many calls as HITL_RPC_MAX_IN_FLIGHT allows (the "
        "provider may be slow); nothing was done: retry with back-off, or on another replica",
    )


class _Undecodable:
    """A request body its message type cannot parse (bad UTF-8 in a string,
    a truncated field): answered INVALID_ARGUMENT by the interceptor, with
    its log line and metrics, instead of gRPC's bare UNKNOWN."""

    __slots__ = ("problem",)

    def __init__(self, problem: str) -> None:
        self.problem = problem

    def error(self) -> HitlError:
        return HitlError(
            Code.INVALID_ARGUMENT,
            "MALFORMED_REQUEST",
            f"the request is not a valid message of its type: {self.problem[:200]}",
        )


def _decoding(deserialize: Callable[[bytes], Any] | None) -> Callable[[bytes], Any] | None:
    if deserialize is None:
        return None

    def decode(data: bytes) -> Any:
        try:
            return deserialize(data)
        except DecodeError as exc:
            return _Undecodable(str(exc))

    return decode


class _Rpc:
    """Context manager around one call: auth, logs, metrics, error mapping."""

    __slots__ = ("_context", "_info", "_owner", "_started", "request_id")

    def __init__(self, owner: ServiceInterceptor, info: _Method, context: Context) -> None:
        self._owner = owner
        self._info = info
        self._context = context
        self._started = 0.0
        self.request_id = ""

    def _authenticate(self, metadata: dict[str, Any]) -> None:
        header = metadata.get("authorization", "")
        # The scheme is case-insensitive (RFC 7235): "bearer" is a Bearer token too.
        bearer = isinstance(header, str) and header[:7].lower() == "bearer "
        token = header[7:] if bearer else ""
        if not token or not matches_any(token, self._owner._tokens):
            raise HitlError(Code.UNAUTHENTICATED, "UNAUTHENTICATED", _UNAUTHENTICATED)

    async def __aenter__(self) -> _Rpc:
        self._started = time.perf_counter()
        metadata = dict(self._context.invocation_metadata() or ())
        raw_id = metadata.get("x-request-id")
        self.request_id = (
            raw_id[:128] if isinstance(raw_id, str) and raw_id and raw_id.isprintable() else ""
        ) or _new_id()
        clear_contextvars()
        bind_contextvars(request_id=self.request_id, rpc=self._info.name)
        self._info.started.inc()
        if self._info.needs_token:
            try:
                self._authenticate(metadata)
            except HitlError as exc:
                await self.__aexit__(type(exc), exc, None)
        return self

    async def __aexit__(self, exc_type: Any, exc: BaseException | None, tb: Any) -> bool:
        code = grpc.StatusCode.OK
        status: grpc.Status | None = None
        reason = ""  # the ErrorInfo reason the caller gets, for the log line
        if exc is None:
            code = _code(self._context, grpc.StatusCode.OK)
        elif isinstance(exc, HitlError):
            status, reason = to_status(exc, self._owner._scrub), exc.reason
        elif isinstance(exc, StoreUnavailable):
            # The detail names the database (host, user): logs only.
            log.warning("rpc.store_unavailable", error=str(exc))
            status = to_status(HitlError(Code.UNAVAILABLE, "STORE_UNAVAILABLE", STORE_DOWN))
            reason = "STORE_UNAVAILABLE"
        elif isinstance(exc, grpc.aio.AbortError):
            code = _code(self._context, grpc.StatusCode.UNKNOWN)
        elif isinstance(exc, Exception):
            error_id = _new_id()[:12]
            log.error("rpc.internal_error", error_id=error_id, exc_info=exc)
            status, reason = internal_error(error_id), "INTERNAL_ERROR"
        else:  # cancellation: the client went away, or the server is stopping
            code = grpc.StatusCode.CANCELLED
        if status is not None:
            code = status.code
        elapsed = time.perf_counter() - self._started
        # The log line and metrics are written in the next loop turn, once
        # gRPC has the response (call_soon keeps the request's log context).
        asyncio.get_running_loop().call_soon(_done, self._info, code, elapsed, reason)
        if status is not None:
            trailers = (*status.trailing_metadata, ("x-request-id", self.request_id))
            await self._context.abort(status.code, status.details, trailers)
        if exc is None:
            self._context.set_trailing_metadata((("x-request-id", self.request_id),))
        return False


def _done(info: _Method, code: grpc.StatusCode, elapsed: float, reason: str) -> None:
    info.handled(code).inc()
    if reason and code is grpc.StatusCode.UNAVAILABLE:
        info.unavailable(reason).inc()
    info.seconds.observe(elapsed)
    duration_ms = round(elapsed * 1000, 3)
    if reason:
        log.info("rpc.done", code=code.name, duration_ms=duration_ms, reason=reason)
    else:
        log.info("rpc.done", code=code.name, duration_ms=duration_ms)


def _code(context: Context, default: grpc.StatusCode) -> grpc.StatusCode:
    """The code a handler set on the context (None at run time if unset)."""
    code: grpc.StatusCode | None = context.code()
    return code if code is not None else default
