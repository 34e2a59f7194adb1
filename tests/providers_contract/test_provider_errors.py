"""What a provider's errors become for gRPC callers."""

from __future__ import annotations

from collections.abc import Awaitable

import grpc
import pytest

from hitl_service.gen.hitl.v1 import hitl_service_pb2 as pb
from providers import ProviderAuthError, ProviderRejected, ProviderUnavailable
from tests.providers_contract.contract import send, served, start
from tests.providers_contract.ticket_desk import Desk
from tests.support import TIMEOUT, RichError, expect_error, make_user

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
    got = await _failing(env, desk, operation, error, grpc.StatusCode[code])
    assert got.reason == reason
    assert "é" * 10 in got.message
    assert len(got.message.encode()) < 1200


@pytest.mark.parametrize("refusal", ["", "not allowed", "X" * 64, "TRAILING_"])
@pytest.mark.parametrize(
    ("operation", "reason"),
    [("start", "START_REFUSED"), ("send", "DELIVERY_FAILED"), ("stop", "STOP_FAILED")],
)
async def test_a_provider_code_that_is_no_reason_becomes_the_generic_one(
    env: dict[str, str], desk: Desk, refusal: str, operation: str, reason: str
) -> None:
    """Clients branch on the ErrorInfo reason, which google.rpc requires to
    be UPPER_SNAKE; a third-party provider may refuse with any code."""
    got = await _refused(env, desk, operation, ProviderRejected(refusal, "refused"))
    assert (got.code, got.reason) == (grpc.StatusCode.FAILED_PRECONDITION, reason)


async def _refused(env: dict[str, str], desk: Desk, operation: str, error: Exception) -> RichError:
    return await _failing(env, desk, operation, error, grpc.StatusCode.FAILED_PRECONDITION)


async def _failing(
    env: dict[str, str], desk: Desk, operation: str, error: Exception, code: grpc.StatusCode
) -> RichError:
    """The error a call gets when the desk raises ``error`` for ``operation``
    (start, send or stop)."""

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
            call = stub.StopHitl(pb.StopHitlRequest(session_id=session.id), timeout=TIMEOUT)
        return await expect_error(call, code)


@pytest.mark.parametrize("operation", ["start", "send", "stop"])
async def test_a_long_setting_name_keeps_the_status_whole(
    env: dict[str, str], desk: Desk, operation: str
) -> None:
    """ErrorInfo metadata goes out in the trailers too: a third party's
    setting name of any length made them too large (RESOURCE_EXHAUSTED)."""
    error = ProviderAuthError("HITL_DESK_" + "K" * 20_000, "the desk refused our key")
    got = await _failing(env, desk, operation, error, grpc.StatusCode.FAILED_PRECONDITION)
    assert got.reason == "PROVIDER_CREDENTIALS"
    assert got.metadata["setting"].startswith("HITL_DESK_KKK")
    assert len(got.metadata["setting"].encode()) < 300
