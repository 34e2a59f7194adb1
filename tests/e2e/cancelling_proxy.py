"""A gRPC proxy in front of the service that answers the first call of
chosen methods with ``CANCELLED``, as a replica's gRPC core does when more
calls wait than it queues (docs/errors.md): clients must retry or reconnect.
It can also answer the first few calls of a method ``UNAVAILABLE``, as a
service restarting behind a load balancer is.

Every other call is forwarded as raw bytes, and the service's status,
details and trailing metadata come back unchanged (UNAVAILABLE while the
service restarts, ErrorInfo on a refusal).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from types import TracebackType
from typing import Self

import grpc
from grpc import aio


def _raw(data: bytes) -> bytes:
    return data


class CancellingProxy:
    """``async with CancellingProxy(target, {"/hitl.v1.HitlService/CreateUser"})``;
    clients connect to ``proxy.target``; ``proxy.cancelled`` lists the
    methods it cancelled, in order."""

    def __init__(
        self, upstream: str, cancel_first: set[str], *, unavailable_first: int = 0
    ) -> None:
        self._to_cancel = set(cancel_first)
        self.cancelled: list[str] = []
        # The first ``unavailable_first`` calls of the methods in ``cancel_first``
        # are answered UNAVAILABLE instead (then one is cancelled, as above).
        self._unavailable_left = dict.fromkeys(cancel_first, unavailable_first)
        self.unavailable: list[str] = []
        self._server = aio.server()
        self._server.add_generic_rpc_handlers((_Handler(self),))
        self._port = self._server.add_insecure_port("127.0.0.1:0")
        self._channel = aio.insecure_channel(upstream)

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self._port}"

    async def __aenter__(self) -> Self:
        await self._server.start()
        return self

    async def __aexit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self._server.stop(None)
        await self._channel.close()

    async def cancel_first(self, method: str, context: aio.ServicerContext[bytes, bytes]) -> None:
        """Ends the call with UNAVAILABLE its first ``unavailable_first``
        times, then with CANCELLED once."""
        if self._unavailable_left.get(method, 0) > 0:
            self._unavailable_left[method] -= 1
            self.unavailable.append(method)
            await context.abort(grpc.StatusCode.UNAVAILABLE, "the service is restarting (test)")
        if method in self._to_cancel:
            self._to_cancel.discard(method)
            self.cancelled.append(method)
            await context.abort(grpc.StatusCode.CANCELLED, "cancelled by the test's proxy")

    def upstream_metadata(
        self, context: aio.ServicerContext[bytes, bytes]
    ) -> list[tuple[str, str | bytes]]:
        return [
            (key, value)
            for key, value in context.invocation_metadata() or ()
            if key != "user-agent"
        ]

    async def relay(
        self, error: aio.AioRpcError, context: aio.ServicerContext[bytes, bytes]
    ) -> None:
        context.set_trailing_metadata(error.trailing_metadata() or ())
        await context.abort(error.code(), error.details() or "")

    def unary(
        self, method: str
    ) -> Callable[[bytes, aio.ServicerContext[bytes, bytes]], Awaitable[bytes]]:
        call = self._channel.unary_unary(
            method, request_serializer=_raw, response_deserializer=_raw
        )

        async def handle(request: bytes, context: aio.ServicerContext[bytes, bytes]) -> bytes:
            await self.cancel_first(method, context)
            try:
                reply: bytes = await call(
                    request,
                    metadata=self.upstream_metadata(context),
                    timeout=context.time_remaining(),
                )
            except aio.AioRpcError as error:
                await self.relay(error, context)
                raise AssertionError("unreachable: abort raises") from None
            return reply

        return handle

    def stream(
        self, method: str
    ) -> Callable[[bytes, aio.ServicerContext[bytes, bytes]], AsyncIterator[bytes]]:
        call = self._channel.unary_stream(
            method, request_serializer=_raw, response_deserializer=_raw
        )

        async def handle(
            request: bytes, context: aio.ServicerContext[bytes, bytes]
        ) -> AsyncIterator[bytes]:
            await self.cancel_first(method, context)
            upstream = call(request, metadata=self.upstream_metadata(context))
            try:
                async for reply in upstream:
                    yield reply
            except aio.AioRpcError as error:
                await self.relay(error, context)
            finally:
                upstream.cancel()

        return handle


class _Handler(grpc.GenericRpcHandler):
    def __init__(self, proxy: CancellingProxy) -> None:
        self._proxy = proxy

    def service(
        self, details: grpc.HandlerCallDetails
    ) -> grpc.RpcMethodHandler[bytes, bytes] | None:
        method: str = details.method
        if method.endswith("/StreamEvents"):
            return grpc.unary_stream_rpc_method_handler(self._proxy.stream(method))
        return grpc.unary_unary_rpc_method_handler(self._proxy.unary(method))
