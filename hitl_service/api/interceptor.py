"""One server interceptor: request context, authentication, metrics, one
canonical log line per RPC, and domain errors mapped to gRPC statuses.

``intercept_service`` runs before the handler exists, so it wraps the
returned handler's behaviour to see the outcome.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TYPE_CHECKING, Any, cast

import grpc
import structlog
from structlog.contextvars import bind_contextvars, clear_contextvars

from hitl_service.api.status import internal_error, to_status
from hitl_service.errors import Code, HitlError, StoreUnavailable
from hitl_service.secret import matches_any

if TYPE_CHECKING:
    from hitl_service.metrics import Metrics
    from hitl_service.secret import Secret

log = structlog.get_logger(__name__)

if TYPE_CHECKING:
    Context = grpc.aio.ServicerContext[Any, Any]
    Handler = grpc.RpcMethodHandler[Any, Any]
_OPEN_SERVICES = frozenset({"grpc.health.v1.Health"})  # probes carry no token


def _split(method: str) -> tuple[str, str]:
    service, _, name = method.lstrip("/").partition("/")
    return service, name


class ServiceInterceptor(grpc.aio.ServerInterceptor):
    """Wraps every handler of the server."""

    def __init__(self, metrics: Metrics, api_tokens: tuple[Secret, ...] = ()) -> None:
        self._metrics = metrics
        self._tokens = api_tokens

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[Handler | None]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> Handler | None:
        """See base class."""
        handler: Any = await continuation(handler_call_details)  # aio handlers are async
        if handler is None:
            return None
        method = handler_call_details.method
        metadata = dict(handler_call_details.invocation_metadata or ())
        service, name = _split(method)
        needs_token = bool(self._tokens) and service not in _OPEN_SERVICES
        if handler.unary_unary is not None:
            inner = handler.unary_unary

            async def unary(request: Any, context: Context) -> Any:
                rpc = _Rpc(self, "unary", service, name, metadata, context)
                async with rpc:
                    if needs_token:
                        await rpc.authenticate()
                    self._metrics.grpc_msg_received.labels("unary", service, name).inc()
                    response = await inner(request, context)
                    self._metrics.grpc_msg_sent.labels("unary", service, name).inc()
                    return response

            return grpc.unary_unary_rpc_method_handler(
                unary, handler.request_deserializer, handler.response_serializer
            )
        if handler.unary_stream is not None:
            inner_stream = handler.unary_stream

            async def server_stream(request: Any, context: Context) -> AsyncIterator[Any]:
                rpc = _Rpc(self, "server_stream", service, name, metadata, context)
                async with rpc:
                    if needs_token:
                        await rpc.authenticate()
                    self._metrics.grpc_msg_received.labels("server_stream", service, name).inc()
                    sent = self._metrics.grpc_msg_sent.labels("server_stream", service, name)
                    async for response in inner_stream(request, context):
                        sent.inc()
                        yield response

            return grpc.unary_stream_rpc_method_handler(
                server_stream, handler.request_deserializer, handler.response_serializer
            )
        if handler.stream_stream is not None:
            inner_bidi = handler.stream_stream

            async def bidi(requests: Any, context: Context) -> AsyncIterator[Any]:
                rpc = _Rpc(self, "bidi_stream", service, name, metadata, context)
                async with rpc:
                    if needs_token:
                        await rpc.authenticate()
                    async for response in inner_bidi(requests, context):
                        yield response

            return grpc.stream_stream_rpc_method_handler(
                bidi, handler.request_deserializer, handler.response_serializer
            )
        return cast("Handler", handler)


class _Rpc:
    """Context manager around one RPC: logs, metrics, error mapping."""

    def __init__(
        self,
        owner: ServiceInterceptor,
        kind: str,
        service: str,
        name: str,
        metadata: dict[str, str | bytes],
        context: Context,
    ) -> None:
        self._owner = owner
        self._kind = kind
        self._service = service
        self._name = name
        self._metadata = metadata
        self._context = context
        self._started = 0.0
        raw_id = metadata.get("x-request-id")
        self.request_id = (
            raw_id[:128] if isinstance(raw_id, str) and raw_id.isprintable() and raw_id else ""
        ) or secrets.token_hex(8)

    async def authenticate(self) -> None:
        header = self._metadata.get("authorization", "")
        token = header[7:] if isinstance(header, str) and header.startswith("Bearer ") else ""
        if not token or not matches_any(token, self._owner._tokens):
            raise HitlError(
                Code.UNAUTHENTICATED,
                "UNAUTHENTICATED",
                "missing or wrong API token; send 'authorization: Bearer <token>' "
                "with a token from HITL_API_TOKENS",
            )

    async def __aenter__(self) -> _Rpc:
        clear_contextvars()
        bind_contextvars(request_id=self.request_id, rpc=self._name)
        self._started = time.perf_counter()
        self._owner._metrics.grpc_started.labels(self._kind, self._service, self._name).inc()
        return self

    async def __aexit__(self, exc_type: Any, exc: BaseException | None, tb: Any) -> bool:
        code = grpc.StatusCode.OK
        status: grpc.Status | None = None
        suppress = False
        if exc is None:
            code = _code(self._context, grpc.StatusCode.OK)
        elif isinstance(exc, HitlError):
            status = to_status(exc)
        elif isinstance(exc, StoreUnavailable):
            status = to_status(HitlError(Code.UNAVAILABLE, "STORE_UNAVAILABLE", str(exc)))
        elif isinstance(exc, grpc.aio.AbortError):
            code = _code(self._context, grpc.StatusCode.UNKNOWN)
        elif isinstance(exc, Exception):
            error_id = secrets.token_hex(6)
            log.error("rpc.internal_error", error_id=error_id, exc_info=exc)
            status = internal_error(error_id)
        else:  # cancellation: the client went away, or the server is stopping
            code = grpc.StatusCode.CANCELLED
        if status is not None:
            code = status.code
        elapsed = time.perf_counter() - self._started
        metrics = self._owner._metrics
        labels = (self._kind, self._service, self._name)
        metrics.grpc_handled.labels(*labels, code.name).inc()
        metrics.grpc_seconds.labels(*labels).observe(elapsed)
        log.info(
            "rpc.done",
            code=code.name,
            duration_ms=round(elapsed * 1000, 3),
            **({"reason": exc.reason} if isinstance(exc, HitlError) else {}),
        )
        if status is not None:
            trailers = (*status.trailing_metadata, ("x-request-id", self.request_id))
            await self._context.abort(status.code, status.details, trailers)
        if exc is None:
            self._context.set_trailing_metadata((("x-request-id", self.request_id),))
        return suppress


def _code(context: Context, default: grpc.StatusCode) -> grpc.StatusCode:
    """The code a handler set on the context (None at run time if unset)."""
    code: grpc.StatusCode | None = context.code()
    return code if code is not None else default
