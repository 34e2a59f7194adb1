"""What a provider's errors become for gRPC callers."""

from __future__ import annotations

from collections.abc import Awaitable

import grpc
import pytest

from hitl_service.gen.hitl.v1 import hitl_service_pb2 as pb
from providers import ProviderRejected, ProviderUnavailable
from tests.providers_contract.service import send, served, start
from tests.providers_contract.ticket_desk import Desk
from tests.support import TIMEOUT, expect_error, make_user

LONG = "é" * 20_000  # a provider quoting a whole error page


@pytest.mark.parametrize(
    ("operation", "error", "code", "reason"),
    [
        (
            "start",
            ProviderRejected("TICKET_REFUSED", LONG),
            "FAILED_PRECONDITION",
            "TICKET_REFUSED",
        ),
        ("start", ProviderUnavailable(LONG), "UNAVAILABLE", "PROVIDER_UNAVAILABLE"),
        ("send", ProviderRejected("TOO_LONG", LONG), "FAILED_PRECONDITION", "TOO_LONG"),
        ("stop", ProviderRejected("LOCKED", LONG), "FAILED_PRECONDITION", "LOCKED"),
    ],
)
async def test_a_long_provider_error_keeps_its_status_and_reason(
    env: dict[str, str],
    desk: Desk,
    operation: str,
    error: Exception,
    code: str,
    reason: str,
) -> None:
    """Quoted whole, the text made the trailers too large for gRPC
    clients, which then got RESOURCE_EXHAUSTED without the reason."""

    async def fail(*_args: object) -> None:
        raise error

    async with served(env) as (_app, stub):
        user = await make_user(stub)
        session = await start(stub, user.id) if operation != "start" else None
        desk.hooks[operation] = fail
        call: Awaitable[object]
        if session is None:
            call = start(stub, user.id)
        elif operation == "send":
            call = send(stub, session.id, text="x")
        else:
            stop = pb.StopHitlRequest(session_id=session.id)
            call = stub.StopHitl(stop, timeout=TIMEOUT)
        got = await expect_error(call, grpc.StatusCode[code])
        assert got.reason == reason
        assert "é" * 10 in got.message
        assert len(got.message.encode()) < 1200
