"""A start that dies after LiveChat opened the chat, before the session
recorded it."""

from __future__ import annotations

import grpc
import pytest

from hitl_service.gen.hitl.v1 import hitl_service_pb2 as pb
from tests.fake_livechat import FakeLiveChat
from tests.integration.conftest import MakeService, start_cut_off
from tests.support import TIMEOUT, rich_error, wait_for

SHORT = {"HITL_REQUEST_BUDGET": "0.5s", "HITL_PROVIDER_TIMEOUT": "0.5s"}


async def test_the_retry_of_a_start_cut_off_after_the_chat_opened_gets_that_chat(
    make_service: MakeService, fake: FakeLiveChat, monkeypatch: pytest.MonkeyPatch
) -> None:
    second, request = await start_cut_off(make_service, monkeypatch, **SHORT)
    [opened] = fake.calls("start_chat")

    async def answered() -> pb.Session | None:
        try:
            return (await second.stub.StartHitl(request, timeout=TIMEOUT)).session
        except grpc.aio.AioRpcError as exc:
            if rich_error(exc).reason != "START_IN_PROGRESS":
                raise AssertionError(f"{rich_error(exc).reason}: {exc.details()}") from None
            await second.app.core.maintenance.sweep()  # the interrupted start is noticed
            return None

    session = await wait_for(answered, timeout=30, what="an answer to the retried start")
    chats = set(fake.state.chats)  # one chat for the customer, the one opened
    assert len(chats) == 1, chats
    assert session.external_chat_id in chats
    assert fake.chat(session.external_chat_id).active
    assert len(fake.calls("start_chat")) == 1, opened
