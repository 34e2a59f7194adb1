"""The floor: what the service's own stack costs with no service in it.

One process, one event loop, like hitl-service: a bare ``grpc.aio`` server
with the service's ``GRPC_OPTIONS`` and a bare Starlette app on uvicorn
built by the service's own ``build_http_server`` (same uvicorn settings),
and the same event loop choice (``HITL_EVENT_LOOP``).

- gRPC ``hitl.v1.HitlService/SendMessage`` and ``/GetSession``: unary echo
  handlers (real request/response messages, a canned answer; no
  interceptor, no logging, no store).
- ``POST /webhooks/{provider}``: reads the same JSON body the service gets,
  checks its secret, turns it into a ``pb.Event`` and pushes it to every
  open stream, then answers 200 with the same JSON shape. Nothing is
  stored: the floor of a webhook is HTTP + JSON + one protobuf.
- gRPC ``StreamEvents``: one queue per stream; each event is serialized
  once and the same bytes go to every stream (as the service does).
- ``grpc.health.v1.Health`` says SERVING once both servers listen; then,
  like the service, the process freezes its start-up heap out of the
  garbage collector's full passes.

Run: ``python -m bench.floor --grpc-addr 127.0.0.1:P --http-addr 127.0.0.1:Q``.
"""

from __future__ import annotations

import argparse
import asyncio
import hmac
import json
import os
import signal
import socket
from collections.abc import AsyncIterator
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from hitl_service.cli import freeze_startup_heap, run_with_loop
from hitl_service.gen.hitl.v1 import hitl_service_pb2 as pb
from hitl_service.server import GRPC_OPTIONS, SERVICE_NAME
from hitl_service.sidecar import build_http_server

SECRETS = (b"whsec-test-0123456789", b"scripted-webhook-secret", b"bench-webhook-secret")


class Fanout:
    """Open streams, each with its own queue."""

    def __init__(self) -> None:
        self.queues: set[asyncio.Queue[bytes]] = set()
        self.cursor = 0

    def publish(self, event: bytes) -> None:
        for queue in self.queues:
            queue.put_nowait(event)


def _session() -> pb.Session:
    return pb.Session(
        id="ses_000000000000000000000000",
        user_id="usr_000000000000000000000000",
        provider="local",
        state=pb.SESSION_STATE_QUEUED,
        external_chat_id="lc_000000000000",
        group_id="general",
    )


def grpc_handlers(fanout: Fanout) -> grpc.GenericRpcHandler:
    """Echo handlers for SendMessage/GetSession, a bare StreamEvents."""
    session = _session()

    async def send_message(
        request: pb.SendMessageRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.SendMessageResponse:
        return pb.SendMessageResponse(
            message_id="msg_" + request.request_id[-24:], external_message_id=request.session_id
        )

    async def get_session(
        request: pb.GetSessionRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.GetSessionResponse:
        found = pb.Session()
        found.CopyFrom(session)
        found.id = request.session_id
        return pb.GetSessionResponse(session=found)

    async def stream_events(
        request: pb.StreamEventsRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[bytes]:
        queue: asyncio.Queue[bytes] = asyncio.Queue()
        fanout.queues.add(queue)
        try:
            await context.send_initial_metadata((("x-stream-head", str(fanout.cursor)),))
            while True:
                yield await queue.get()
        finally:
            fanout.queues.discard(queue)

    return grpc.method_handlers_generic_handler(
        SERVICE_NAME,
        {
            "SendMessage": grpc.unary_unary_rpc_method_handler(
                send_message,
                request_deserializer=pb.SendMessageRequest.FromString,
                response_serializer=pb.SendMessageResponse.SerializeToString,
            ),
            "GetSession": grpc.unary_unary_rpc_method_handler(
                get_session,
                request_deserializer=pb.GetSessionRequest.FromString,
                response_serializer=pb.GetSessionResponse.SerializeToString,
            ),
            "StreamEvents": grpc.unary_stream_rpc_method_handler(
                stream_events,
                request_deserializer=pb.StreamEventsRequest.FromString,
                response_serializer=None,  # events are published serialized
            ),
        },
    )


def _bad(status: int, reason: str) -> JSONResponse:
    return JSONResponse({"error": reason}, status_code=status)


def webhook_app(fanout: Fanout) -> Starlette:
    """``POST /webhooks/{provider}``: verify, convert, fan out, answer."""
    agent = pb.Agent(id="agent@bench.example")

    async def webhook(request: Request) -> Response:
        body = await request.body()
        try:
            data = json.loads(body)
        except ValueError:
            return _bad(400, "the body is not JSON")
        if not isinstance(data, dict):
            return _bad(400, "the body is not a JSON object")
        secret = data.get("secret_key", data.get("secret"))
        if not isinstance(secret, str) or not any(
            hmac.compare_digest(secret.encode(), s) for s in SECRETS
        ):
            return _bad(401, "secret is missing or wrong")
        payload = data.get("payload")
        if isinstance(payload, dict):  # a LiveChat envelope
            event = payload.get("event") or {}
            chat_id, text = str(payload.get("chat_id", "")), str(event.get("text", ""))
        else:
            chat_id, text = str(data.get("chat_id", "")), str(data.get("text", ""))
        fanout.cursor += 1
        fanout.publish(
            pb.Event(
                cursor=str(fanout.cursor),
                session_id=chat_id,
                agent_message=pb.AgentMessage(
                    message=pb.Message(text=text, author=pb.AUTHOR_AGENT), agent=agent
                ),
            ).SerializeToString()
        )
        return JSONResponse({"accepted": 1, "duplicates": 0, "ignored": 0})

    return Starlette(routes=[Route("/webhooks/{provider}", webhook, methods=["POST"])])


def _split(addr: str) -> tuple[str, int]:
    host, _, port = addr.rpartition(":")
    return host, int(port)


async def serve(grpc_addr: str, http_addr: str) -> None:
    """Serves until SIGTERM/SIGINT."""
    fanout = Fanout()
    server = grpc.aio.server(options=GRPC_OPTIONS)
    server.add_generic_rpc_handlers((grpc_handlers(fanout),))
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    await health_servicer.set(SERVICE_NAME, health_pb2.HealthCheckResponse.NOT_SERVING)
    server.add_insecure_port(grpc_addr)
    await server.start()
    host, port = _split(http_addr)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(1024)
    sock.setblocking(False)
    http = build_http_server(webhook_app(fanout), host, port)
    http_task = asyncio.create_task(http.serve(sockets=[sock]))
    await health_servicer.set(SERVICE_NAME, health_pb2.HealthCheckResponse.SERVING)
    await health_servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    freeze_startup_heap()  # as `hitl-service serve` does: same runtime settings
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    await stop.wait()
    http.should_exit = True
    await http_task
    await server.stop(0)


def main() -> None:
    """Entry point."""
    parser = argparse.ArgumentParser(prog="python -m bench.floor", description=__doc__)
    parser.add_argument("--grpc-addr", default="127.0.0.1:50151")
    parser.add_argument("--http-addr", default="127.0.0.1:8180")
    args = parser.parse_args()
    run_with_loop(serve(args.grpc_addr, args.http_addr), os.environ.get("HITL_EVENT_LOOP", "auto"))


if __name__ == "__main__":
    main()
