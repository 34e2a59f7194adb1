"""Customer identities LiveChat forgot or replaced, through the real gRPC API."""

from __future__ import annotations

import asyncio
import time
from datetime import datetime

import grpc
import pytest

from hitl_service.gen.hitl.v1 import hitl_service_pb2 as pb
from tests.fake_livechat import FakeLiveChat
from tests.integration.conftest import LiveChatService, MakeService
from tests.support import TIMEOUT, expect_error, rid


class WallClock:
    """The service's clock: the fake's wall time (tests can jump it), real
    monotonic time and real sleeps (so upkeep loops do not spin)."""

    def __init__(self, fake: FakeLiveChat) -> None:
        self._fake = fake

    def now(self) -> datetime:
        return self._fake.state.clock.now()

    def monotonic(self) -> float:
        return time.monotonic()

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(seconds)


@pytest.fixture
async def svc(make_service: MakeService, fake: FakeLiveChat) -> LiveChatService:
    return await make_service(clock=WallClock(fake))


async def test_a_replaced_customer_identity_does_not_resume_the_old_customers_chat(
    svc: LiveChatService,
) -> None:
    lc = svc
    user = await lc.user()
    first = await lc.start(user.id, title="First visit")
    await lc.stub.StopHitl(pb.StopHitlRequest(session_id=first.id), timeout=TIMEOUT)
    old_customer = lc.fake.chat(first.external_chat_id).customer_id
    # LiveChat no longer recognizes the saved cookies (the customer's data was
    # deleted, or the cookies ran out): the next grant answers for a new
    # customer, which upsert_user adopts (livechat.customer_replaced).
    lc.fake.state.customers[old_customer].cst = "forgotten"
    lc.fake.advance_clock(24 * 3600)  # the user comes back the next day

    second = await lc.start(user.id, title="Second visit")
    new_customers = [c for c in lc.fake.state.customers if c != old_customer]
    assert len(new_customers) == 1  # the identity was replaced
    chat = lc.fake.chat(second.external_chat_id)
    # The handoff must live in a chat the user's (new) customer belongs to ...
    assert chat.customer_id == new_customers[0], (
        f"session 2 resumed chat {chat.id} of the OLD customer {old_customer}; "
        f"the user's identity is now {new_customers[0]}"
    )
    # ... so the end user's messages reach the agent.
    request_id = rid()
    await lc.send(second.id, "hello again", request_id)
    assert lc.with_custom_id(second.external_chat_id, request_id)


async def test_after_customer_identity_lost_the_next_handoff_works_again(
    lc: LiveChatService,
) -> None:
    user = await lc.user()
    first = await lc.start(user.id, title="First visit")
    old_customer = lc.fake.chat(first.external_chat_id).customer_id
    # LiveChat forgets the customer: its cookies and its tokens stop working.
    lc.fake.state.customers[old_customer].cst = "forgotten"
    lc.fake.state.expire_customer_tokens()
    error = await expect_error(
        lc.send(first.id, "still there?"), grpc.StatusCode.FAILED_PRECONDITION
    )
    assert "CUSTOMER_IDENTITY_LOST" in (error.reason + error.message)
    await lc.stub.StopHitl(pb.StopHitlRequest(session_id=first.id), timeout=TIMEOUT)

    # The caller does what it can: a new handoff for the user, minutes later.
    second = await lc.start(user.id, title="Second visit")
    request_id = rid()
    try:
        await lc.send(second.id, "hello again", request_id)
    except grpc.aio.AioRpcError as exc:
        raise AssertionError(
            f"the user's next handoff cannot carry a message either: {exc.details()}"
        ) from None
    assert lc.with_custom_id(second.external_chat_id, request_id)


async def test_an_accounts_outage_does_not_fail_a_start_with_a_fresh_token(
    lc: LiveChatService,
) -> None:
    """Each handoff renews the customer token as a check; while the token is
    hours from expiry, an outage of the token endpoint alone (the agent API,
    which opens and routes chats, is up) must not fail the start."""
    user = await lc.user()
    first = await lc.start(user.id, title="First visit")
    await lc.stub.StopHitl(pb.StopHitlRequest(session_id=first.id), timeout=TIMEOUT)
    lc.fake.add_fault("customer_token", api="accounts", kind="status", status=503, times=None)
    second = await lc.start(user.id, title="Second visit")
    assert second.state != pb.SESSION_STATE_FAILED
