"""Fault injection at the fake LiveChat: one accepted message is one message
the agent sees (issue 5, "Tests that prove it").

Each fault hits the customer ``send_event`` (or the upload) the way LiveChat
or the network could fail: a 429 with ``Retry-After``, a burst of 5xx, an
answer slower than ``HITL_PROVIDER_TIMEOUT`` (the fake acts after the delay,
while the service has already given up), a response lost after the event was
stored, a connection dropped before it, an unreadable answer. In every case
``SendMessage`` returns OK (or DELIVERY_PENDING, then OK when retried with the
same ``request_id``) and the chat holds exactly one event with the
``custom_id``.
"""

from __future__ import annotations

import asyncio
from typing import Any

import grpc
import pytest

from hitl_service.gen.hitl.v1 import hitl_service_pb2 as pb
from tests.integration.conftest import LiveChatService, MakeService
from tests.support import rich_error, rid, wait_for

# The fake's "slow" answers take longer than the provider timeout, and the
# service must not look for an unanswered event before LiveChat can no
# longer store it (HITL_LIVECHAT_SERVER_TIMEOUT, 15 s at LiveChat).
PROVIDER_TIMEOUT = 1.0
SLOW = 1.5
SERVER_TIMEOUT = 2.5

SEND = {"method": "send_event", "api": "customer"}
FAULTS: dict[str, list[dict[str, Any]]] = {
    "429 with Retry-After": [
        {**SEND, "kind": "error", "error_type": "too_many_requests", "retry_after": "1", "times": 2}
    ],
    "5xx burst": [{**SEND, "kind": "error", "error_type": "internal", "times": 3}],
    "503 without a JSON body": [{**SEND, "kind": "status", "status": 503, "times": 2}],
    "request_timeout": [{**SEND, "kind": "error", "error_type": "request_timeout", "times": 1}],
    "slow answer (acts after the timeout)": [{**SEND, "kind": "delay", "delay": SLOW, "times": 1}],
    "lost response": [{**SEND, "kind": "lost_response", "times": 1}],
    "dropped before acting": [{**SEND, "kind": "drop", "times": 2}],
    "dropped, then the answer lost": [
        {**SEND, "kind": "drop", "times": 1},
        {**SEND, "kind": "lost_response", "times": 1},
    ],
    "answer lost, then the check fails": [
        {**SEND, "kind": "lost_response", "times": 1},
        {"method": "list_threads", "kind": "error", "error_type": "internal", "times": 1},
    ],
    "answer not JSON (after acting)": [{**SEND, "kind": "bad_json", "times": 1}],
}


def calls_finished(lc: LiveChatService) -> bool:
    """True when every customer send_event the fake received has run its course."""
    return all(c.status or c.error_type for c in lc.fake.calls("send_event", api="customer"))


async def send_until_ok(
    lc: LiveChatService, session_id: str, message: pb.Message, request_id: str, *, rounds: int = 5
) -> tuple[pb.SendMessageResponse, list[str]]:
    """SendMessage, retried with the same request id while DELIVERY_PENDING."""
    pending: list[str] = []
    for _ in range(rounds):
        try:
            return await lc.send(session_id, message, request_id), pending
        except grpc.aio.AioRpcError as exc:
            error = rich_error(exc)
            assert error.code == grpc.StatusCode.UNAVAILABLE, error
            assert error.reason == "DELIVERY_PENDING", error
            pending.append(error.reason)
    raise AssertionError(f"not delivered after {rounds} SendMessage calls")


@pytest.fixture
async def flaky(make_service: MakeService) -> LiveChatService:
    return await make_service(
        HITL_PROVIDER_TIMEOUT=f"{PROVIDER_TIMEOUT}s",
        HITL_REQUEST_BUDGET="4s",
        HITL_LIVECHAT_SERVER_TIMEOUT=str(SERVER_TIMEOUT),
    )


@pytest.mark.parametrize("fault", list(FAULTS), ids=list(FAULTS))
async def test_a_failing_send_reaches_the_agent_exactly_once(
    flaky: LiveChatService, fault: str
) -> None:
    session = await flaky.start()
    chat_id = session.external_chat_id
    injected = [flaky.fake.add_fault(**spec) for spec in FAULTS[fault]]
    request_id = rid()
    sent, _ = await send_until_ok(flaky, session.id, pb.Message(text="exactly once"), request_id)
    assert [f.hits for f in injected] == [f.times for f in injected]  # the faults happened
    [event] = flaky.with_custom_id(chat_id, request_id)
    assert event["text"] == "exactly once"
    assert sent.external_message_id == event["id"]
    # A request the service gave up on may still be running at the fake (the
    # slow answer acts after its delay): once every call has finished, the
    # chat still holds the message once.
    await wait_for(lambda: calls_finished(flaky), what="the fake to finish every send_event")
    assert len(flaky.with_custom_id(chat_id, request_id)) == 1


async def test_a_lost_response_in_the_middle_of_a_split_message_sends_each_part_once(
    flaky: LiveChatService,
) -> None:
    session = await flaky.start()
    chat_id = session.external_chat_id
    text = "".join(f"paragraph {i}: " + "x" * 90 + "\n" for i in range(400))  # three parts
    # The first part goes through (a zero delay is a pass-through: faults
    # match in order), the second is stored but its answer lost.
    flaky.fake.add_fault("send_event", api="customer", kind="delay", delay=0, times=1)
    flaky.fake.add_fault("send_event", api="customer", kind="lost_response", times=1)
    request_id = rid()
    await send_until_ok(flaky, session.id, pb.Message(text=text), request_id)
    parts = [e for e in flaky.fake.events(chat_id) if e.get("custom_id", "").startswith(request_id)]
    assert [p["custom_id"] for p in parts] == [request_id, f"{request_id}#2", f"{request_id}#3"]
    assert "".join(p["text"] for p in parts) == text


async def test_a_media_upload_failing_then_the_send_losing_its_answer_gives_one_file(
    flaky: LiveChatService,
) -> None:
    session = await flaky.start()
    chat_id = session.external_chat_id
    flaky.fake.add_fault("upload_file", api="customer", kind="error", error_type="internal")
    flaky.fake.add_fault("send_event", api="customer", kind="lost_response", times=1)
    media = pb.Media(
        kind=pb.MEDIA_KIND_IMAGE,
        url=flaky.media.url("receipt.jpg", "image/jpeg", 4096),
        name="receipt.jpg",
        mime_type="image/jpeg",
    )
    request_id = rid()
    await send_until_ok(flaky, session.id, pb.Message(media=media), request_id)
    [event] = flaky.with_custom_id(chat_id, request_id)
    assert event["type"] == "file"
    assert event["name"] == "receipt.jpg"


async def test_livechat_down_longer_than_the_deadline_then_back_delivers_once(
    flaky: LiveChatService,
) -> None:
    session = await flaky.start()
    chat_id = session.external_chat_id
    outage = flaky.fake.add_fault(
        "send_event", api="customer", kind="status", status=503, times=None
    )
    request_id = rid()
    message = pb.Message(text="sent during the outage")
    try:
        await flaky.send(session.id, message, request_id, timeout=3)
    except grpc.aio.AioRpcError as exc:
        error = rich_error(exc)
        assert (error.code, error.reason) == (grpc.StatusCode.UNAVAILABLE, "DELIVERY_PENDING")
        assert error.metadata.get("message_id")
    else:
        raise AssertionError("the send succeeded during the outage")
    assert outage.hits >= 2  # retried in the meantime
    assert flaky.with_custom_id(chat_id, request_id) == []
    flaky.fake.clear_faults()
    sent, _ = await send_until_ok(flaky, session.id, message, request_id)
    [event] = flaky.with_custom_id(chat_id, request_id)
    assert sent.external_message_id == event["id"]


async def test_a_request_id_retried_concurrently_is_sent_once(flaky: LiveChatService) -> None:
    session = await flaky.start()
    flaky.fake.add_fault("send_event", api="customer", kind="lost_response", times=1)
    request_id = rid()
    message = pb.Message(text="double click")
    results = await asyncio.gather(
        *(send_until_ok(flaky, session.id, message, request_id) for _ in range(4))
    )
    assert len({r.message_id for r, _ in results}) == 1
    assert len(flaky.with_custom_id(session.external_chat_id, request_id)) == 1


# (a) HITL_PROVIDER_TIMEOUT ends the attempt; (b) the HTTP call's own timeout
# (HITL_LIVECHAT_REQUEST_TIMEOUT) does, inside the provider.
NO_ANSWER = {
    "the provider timeout": {"HITL_PROVIDER_TIMEOUT": "1.5s"},
    "the HTTP request timeout": {
        "HITL_PROVIDER_TIMEOUT": "3s",
        "HITL_LIVECHAT_REQUEST_TIMEOUT": "1.5",
    },
}


@pytest.mark.parametrize("ended_by", list(NO_ANSWER), ids=list(NO_ANSWER))
async def test_a_send_livechat_still_carries_out_is_not_sent_again_by_the_next_process(
    make_service: MakeService, ended_by: str
) -> None:
    """The service stops (a rolling restart, or another replica takes over)
    while LiveChat works on a send for longer than the service waited: the
    process that retries it does not look for the message before LiveChat
    can no longer store it, so the agent sees it once."""
    env = {**NO_ANSWER[ended_by], "HITL_LIVECHAT_SERVER_TIMEOUT": "6", "HITL_REQUEST_BUDGET": "4s"}
    first = await make_service(**env)
    session = await first.start()
    chat_id = session.external_chat_id
    # LiveChat stores the event 5 s after the call (within its server timeout).
    slow = first.fake.add_fault("send_event", api="customer", kind="delay", delay=5.0, times=1)
    request_id = rid()
    message = pb.Message(text="sent while LiveChat is slow")
    with pytest.raises(grpc.aio.AioRpcError):
        await first.send(session.id, message, request_id, timeout=0.3)
    await wait_for(lambda: slow.hits == 1, what="the slow send_event at the fake")
    await first.app.stop(grace=5)  # the attempt ends unanswered, its retry left to the next
    second = await make_service(register=False, **env)
    sent, _ = await send_until_ok(second, session.id, message, request_id)
    await wait_for(lambda: calls_finished(second), what="the fake to finish every send_event")
    [event] = second.with_custom_id(chat_id, request_id)
    assert sent.external_message_id == event["id"]


async def test_a_send_cut_off_late_in_its_attempt_is_not_sent_again_by_the_next_process(
    make_service: MakeService,
) -> None:
    """The process dies (here: stopped without grace, its attempt cut off)
    while LiveChat works on the second part of a split message, sent late in
    the attempt: the process that takes the claim over finds that part
    rather than sending it again (the claim outlasts the attempt plus the
    time LiveChat may still work on its last call)."""
    env = {
        "HITL_PROVIDER_TIMEOUT": "3s",
        "HITL_LIVECHAT_SERVER_TIMEOUT": "8",
        "HITL_REQUEST_BUDGET": "4s",
    }
    first = await make_service(**env)
    session = await first.start()
    chat_id = session.external_chat_id
    # Part one is answered after 2.5 s; part two, sent then, is stored
    # 7.5 s later (within LiveChat's server timeout).
    first.fake.add_fault("send_event", api="customer", kind="delay", delay=2.5, times=1)
    slow = first.fake.add_fault("send_event", api="customer", kind="delay", delay=7.5, times=1)
    text = "".join(f"paragraph {i}: " + "x" * 90 + "\n" for i in range(200))  # two parts
    request_id = rid()
    message = pb.Message(text=text)
    with pytest.raises(grpc.aio.AioRpcError):
        await first.send(session.id, message, request_id, timeout=0.3)
    await wait_for(lambda: slow.hits == 1, what="the second part at the fake")
    await first.app.stop(grace=0)  # the attempt is cut off: its claim stays
    second = await make_service(register=False, **env)
    await send_until_ok(second, session.id, message, request_id)
    await wait_for(lambda: calls_finished(second), what="the fake to finish every send_event")
    events = second.fake.events(chat_id)
    parts = [e for e in events if e.get("custom_id", "").startswith(request_id)]
    assert [p["custom_id"] for p in parts] == [request_id, f"{request_id}#2"]
