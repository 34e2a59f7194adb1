"""The service on the ticket desk, and the calls the tests make to it."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING

import grpc

from hitl_service.gen.hitl.v1 import hitl_service_pb2 as pb
from hitl_service.gen.hitl.v1 import hitl_service_pb2_grpc as pb_grpc
from providers import Agent
from tests.conftest import start_app
from tests.providers_contract.ticket_desk import TicketDeskProvider
from tests.support import TIMEOUT, rid

if TYPE_CHECKING:
    from hitl_service.app import App

    Stub = pb_grpc.HitlServiceAsyncStub

JANE = Agent(id="agent-jane", name="Jane")


@asynccontextmanager
async def served(env: dict[str, str]) -> AsyncIterator[tuple[App, Stub]]:
    """The service, started by the production factory, and a stub on a
    real channel to it; stopped on exit."""
    app = await start_app(env)
    assert isinstance(app.provider, TicketDeskProvider)  # the registry found it
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{app.grpc_port}") as channel:
            yield app, pb_grpc.HitlServiceStub(channel)
    finally:
        await app.stop(grace=1)


async def start(stub: Stub, user_id: str, **fields: object) -> pb.Session:
    """StartHitl; a fresh request id unless given."""
    fields.setdefault("request_id", rid())
    fields.setdefault("title", "Refund")
    response = await stub.StartHitl(
        pb.StartHitlRequest(user_id=user_id, **fields),  # type: ignore[arg-type]
        timeout=TIMEOUT,
    )
    return response.session


async def send(stub: Stub, session_id: str, request_id: str = "", **body: object) -> str:
    """SendMessage with the given body; returns the message id."""
    response = await stub.SendMessage(
        pb.SendMessageRequest(
            session_id=session_id,
            message=pb.Message(**body),  # type: ignore[arg-type]
            request_id=request_id or rid(),
        ),
        timeout=TIMEOUT,
    )
    return response.message_id


async def get(stub: Stub, session_id: str) -> pb.Session:
    """GetSession."""
    response = await stub.GetSession(pb.GetSessionRequest(session_id=session_id), timeout=TIMEOUT)
    return response.session
