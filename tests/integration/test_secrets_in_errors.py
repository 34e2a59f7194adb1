"""Secrets never reach the error a gRPC caller gets.

A provider's refusal is quoted in the status message, and a backend's
message may quote what it was sent; the log lines had the redactor, the
status went out as it was.
"""

from __future__ import annotations

import grpc
import pytest

from hitl_service.gen.hitl.v1 import hitl_service_pb2 as pb
from tests.integration.conftest import WEBHOOK_SECRET, LiveChatService
from tests.support import TIMEOUT, rich_error


async def test_a_provider_refusal_quoting_a_secret_is_masked_for_the_caller(
    lc: LiveChatService,
) -> None:
    session = await lc.start()
    token = lc.fake.agent_token
    quoted = f"cannot use {token} with {WEBHOOK_SECRET}"
    lc.fake.add_fault("send_event", api="customer", error_type="validation", message=quoted)
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await lc.send(session.id, "hello")
    lc.fake.add_fault("deactivate_chat", api="agent", error_type="validation", message=quoted)
    with pytest.raises(grpc.aio.AioRpcError) as not_stopped:
        await lc.stub.StopHitl(pb.StopHitlRequest(session_id=session.id), timeout=TIMEOUT)
    for failed in (refused.value, not_stopped.value):
        assert failed.code() == grpc.StatusCode.FAILED_PRECONDITION
        error = rich_error(failed)
        shown = f"{failed.details()} {error.metadata} {error.violations}"
        assert "cannot use ********** with **********" in shown
        assert token not in shown
        assert WEBHOOK_SECRET not in shown
