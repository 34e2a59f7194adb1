"""A start given up without LiveChat's answer (an outage, a crash) closes the
chat it opened ``HITL_ABANDON_AFTER`` later, unless the user has a handoff
open again by then: a retry reuses that chat instead."""

from __future__ import annotations

import grpc
import pytest

from hitl_service.gen.hitl.v1 import hitl_service_pb2 as pb
from tests.fake_livechat import FakeLiveChat
from tests.integration.conftest import LiveChatService, MakeService, start_cut_off
from tests.support import TIMEOUT, rich_error, rid, wait_for

SHORT = {
    "HITL_REQUEST_BUDGET": "0.5s",
    "HITL_PROVIDER_TIMEOUT": "0.5s",
    "HITL_ABANDON_AFTER": "0.3s",
}


NO_AGENT = "Cannot assign any agent from requested groups"


def _no_agent_takes_chats(fake: FakeLiveChat, *, times: int | None = 1) -> None:
    """LiveChat refuses the start-up transfer (NO_AGENT_AVAILABLE)."""
    fake.add_fault("transfer_chat", error_type="validation", message=NO_AGENT, times=times)


async def _failed_start(service: LiveChatService) -> grpc.aio.AioRpcError:
    """A StartHitl for a new user that must fail; its error."""
    user = await service.user()
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await service.stub.StartHitl(
            pb.StartHitlRequest(user_id=user.id, request_id=rid(), title="Refund"),
            timeout=TIMEOUT,
        )
    return caught.value


async def _given_up_with_its_chat_open(service: LiveChatService, fake: FakeLiveChat) -> str:
    """A StartHitl that ends PROVIDER_UNAVAILABLE with the one chat it opened
    still open at LiveChat; that chat's id."""
    failed = await _failed_start(service)
    assert failed.code() == grpc.StatusCode.UNAVAILABLE
    assert rich_error(failed).reason == "PROVIDER_UNAVAILABLE"
    [chat_id] = fake.state.chats
    assert fake.chat(chat_id).active
    return chat_id


def _settled_stops(service: LiveChatService) -> float:
    value = service.app.metrics.registry.get_sample_value(
        "hitl_outbox_attempts_total", {"kind": "stop", "outcome": "done"}
    )
    return value or 0.0


async def _start_cut_off(
    make_service: MakeService, monkeypatch: pytest.MonkeyPatch, fake: FakeLiveChat
) -> tuple[LiveChatService, pb.StartHitlRequest, str]:
    """A start whose process "dies" after LiveChat opened the chat; a second
    service on the same store gives it up (START_INTERRUPTED)."""
    second, request = await start_cut_off(make_service, monkeypatch, **SHORT)
    [chat_id] = fake.state.chats
    [session] = (
        await second.stub.ListSessions(
            pb.ListSessionsRequest(user_id=request.user_id), timeout=TIMEOUT
        )
    ).sessions
    await wait_for(
        lambda: _given_up(second, session.id), timeout=30, what="the start to be given up"
    )
    return second, request, chat_id


async def _given_up(service: LiveChatService, session_id: str) -> bool:
    await service.app.core.maintenance.sweep()
    found = await service.stub.GetSession(
        pb.GetSessionRequest(session_id=session_id), timeout=TIMEOUT
    )
    return found.session.state == pb.SESSION_STATE_FAILED


async def test_a_start_cut_off_and_never_retried_has_its_chat_closed(
    make_service: MakeService, fake: FakeLiveChat, monkeypatch: pytest.MonkeyPatch
) -> None:
    service, _, chat_id = await _start_cut_off(make_service, monkeypatch, fake)
    assert fake.chat(chat_id).active  # waiting in the agents' queue, nobody listening

    await wait_for(
        lambda: not fake.chat(chat_id).active, timeout=30, what="the abandoned chat to close"
    )
    assert len(fake.calls("deactivate_chat")) == 1
    await wait_for(lambda: _settled_stops(service) == 1, timeout=10, what="the close to settle")
    assert await service.app.store.outbox_stats() == (0, None)  # nothing left to do


async def test_a_start_retried_in_time_keeps_the_chat_it_reused(
    make_service: MakeService, fake: FakeLiveChat, monkeypatch: pytest.MonkeyPatch
) -> None:
    service, request, chat_id = await _start_cut_off(make_service, monkeypatch, fake)
    retried = (await service.stub.StartHitl(request, timeout=TIMEOUT)).session
    assert retried.external_chat_id == chat_id  # the retry reused the chat

    # The close falls due and finds the user's handoff open: it does nothing.
    await wait_for(lambda: _settled_stops(service) == 1, timeout=30, what="the close to settle")
    assert fake.chat(chat_id).active
    assert fake.calls("deactivate_chat") == []
    found = await service.stub.GetSession(
        pb.GetSessionRequest(session_id=retried.id), timeout=TIMEOUT
    )
    assert found.session.state not in (pb.SESSION_STATE_ENDED, pb.SESSION_STATE_FAILED)


async def test_a_start_answered_unavailable_after_the_chat_opened_has_it_closed(
    make_service: MakeService, fake: FakeLiveChat
) -> None:
    service = await make_service(**SHORT)
    # start_chat opens the chat but its answer is lost; the retries find the
    # chat, but every look into it fails: the start ends UNAVAILABLE.
    fake.add_fault("start_chat", api="agent", kind="lost_response", times=1)
    fake.add_fault("get_chat", api="agent", kind="status", status=503, times=None)
    chat_id = await _given_up_with_its_chat_open(service, fake)

    # Still unreachable when the close falls due: it is retried, not dropped.
    looks = len(fake.calls("get_chat"))
    await wait_for(
        lambda: len(fake.calls("get_chat")) >= looks + 2, timeout=30, what="the close to retry"
    )
    assert fake.chat(chat_id).active
    fake.clear_faults()
    await wait_for(
        lambda: not fake.chat(chat_id).active, timeout=30, what="the abandoned chat to close"
    )
    await wait_for(lambda: _settled_stops(service) == 1, timeout=10, what="the close to settle")


async def test_a_refused_start_schedules_nothing(lc: LiveChatService, fake: FakeLiveChat) -> None:
    _no_agent_takes_chats(fake)
    assert rich_error(await _failed_start(lc)).reason == "NO_AGENT_AVAILABLE"
    [chat] = fake.state.chats.values()
    assert not chat.active  # the provider closed what it opened
    # Nothing scheduled, not even for later: a refusal is an answer.
    assert await lc.app.store.outbox_stats() == (0, None)


async def test_a_refused_start_whose_chat_could_not_be_closed_at_once_closes_it_on_retry(
    make_service: MakeService, fake: FakeLiveChat
) -> None:
    service = await make_service(HITL_REQUEST_BUDGET="5s", HITL_PROVIDER_TIMEOUT="1s")
    _no_agent_takes_chats(fake, times=None)
    # LiveChat refuses the transfer, then is briefly unreachable for the
    # close: the refusal is no answer while the chat it opened is open.
    fake.add_fault("deactivate_chat", api="agent", kind="status", status=503, times=1)
    assert rich_error(await _failed_start(service)).reason == "NO_AGENT_AVAILABLE"
    [chat] = fake.state.chats.values()
    assert not chat.active  # closed on the start's retry, which reused it


async def test_a_refused_start_whose_chat_stays_open_is_given_up_and_closed_later(
    make_service: MakeService, fake: FakeLiveChat
) -> None:
    # A budget that fits the start and a few of its retries.
    service = await make_service(**{**SHORT, "HITL_REQUEST_BUDGET": "2s"})
    _no_agent_takes_chats(fake, times=None)
    fake.add_fault("deactivate_chat", api="agent", kind="status", status=503, times=None)
    # Not a refusal: the chat is open, the start unfinished (retry it).
    chat_id = await _given_up_with_its_chat_open(service, fake)

    fake.clear_faults()
    await wait_for(
        lambda: not fake.chat(chat_id).active, timeout=30, what="the given-up chat to close"
    )
    await wait_for(lambda: _settled_stops(service) == 1, timeout=10, what="the close to settle")
