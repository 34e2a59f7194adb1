"""The agent's last messages survive a close whose webhook comes first.

LiveChat does not order webhook deliveries across actions, and a failed
delivery comes back up to a minute later: the ``chat_deactivated`` of an
agent's "here is your reference, bye" + close can reach us before the
message. Once the session has ended, the message would be refused (and if
LiveChat gave up on it, the periodic catch-up, which reads open sessions
only, would never bring it). So before a provider's end is applied, the
service reads the chat's history once more and logs the messages it lacks.
The same holds for our own stop: what the agent wrote before it was
requested still arrives, and before the end.
"""

from __future__ import annotations

from hitl_service.gen.hitl.v1 import hitl_service_pb2 as pb
from tests.integration.conftest import JANE, LiveChatService, kinds
from tests.integration.test_catch_up import agent_texts
from tests.support import TIMEOUT

GOODBYE = "your refund reference is R-42, bye"


async def _assigned(lc: LiveChatService) -> tuple[pb.Session, str]:
    session = await lc.start()
    chat_id = session.external_chat_id
    await lc.delivered()
    lc.fake.agent_join(chat_id, JANE[0])
    await lc.delivered()
    return session, chat_id


def _after_assignment(events: list[pb.Event]) -> list[str]:
    names = kinds(events)
    return names[names.index("agent_assigned") + 1 :]


async def test_a_goodbye_delivered_after_the_close_is_logged_before_the_end(
    lc: LiveChatService,
) -> None:
    session, chat_id = await _assigned(lc)
    lc.fake.delivery.hold()
    lc.fake.agent_message(chat_id, JANE[0], text=GOODBYE)
    lc.fake.agent_close(chat_id, JANE[0])
    lc.fake.delivery.release("reverse")  # the close's webhook first
    await lc.delivered()

    events = await lc.log(session.id)
    assert _after_assignment(events) == ["agent_message", "ended"]
    assert agent_texts(events) == [GOODBYE]
    assert events[-1].ended.by == pb.ENDED_BY_AGENT  # the webhook's own attribution
    assert (await lc.session(session.id)).state == pb.SESSION_STATE_ENDED


async def test_a_goodbye_livechat_gave_up_on_is_read_from_the_history(
    lc: LiveChatService,
) -> None:
    # Periodic catch-up is off (the fixture's HITL_RECONCILE_INTERVAL=0), and
    # would not read an ended session anyway.
    session, chat_id = await _assigned(lc)
    lc.fake.delivery.drop_next = 1  # LiveChat gave up on this delivery
    lc.fake.agent_message(chat_id, JANE[0], text=GOODBYE)
    await lc.delivered()
    assert [d.outcome for d in lc.fake.delivery.deliveries][-1] == "dropped"
    lc.fake.agent_close(chat_id, JANE[0])
    await lc.delivered()

    events = await lc.log(session.id)
    assert _after_assignment(events) == ["agent_message", "ended"]
    assert agent_texts(events) == [GOODBYE]


async def test_the_end_applies_when_the_history_cannot_be_read(lc: LiveChatService) -> None:
    session, chat_id = await _assigned(lc)
    lc.fake.add_fault("get_chat", kind="status", status=503, times=None)
    asked = len(lc.fake.calls("get_chat"))
    lc.fake.agent_close(chat_id, JANE[0])
    await lc.delivered()

    assert [d.outcome for d in lc.fake.delivery.deliveries][-1] == "delivered"
    assert len(lc.fake.calls("get_chat")) > asked  # the history was asked for
    ended = await lc.session(session.id)
    assert ended.state == pb.SESSION_STATE_ENDED
    assert ended.ended_by == pb.ENDED_BY_AGENT


async def test_messages_already_delivered_are_not_logged_twice(lc: LiveChatService) -> None:
    session, chat_id = await _assigned(lc)
    for n in range(3):
        lc.fake.agent_message(chat_id, JANE[0], text=f"message {n}")
    await lc.delivered()
    asked = len(lc.fake.calls("get_chat"))
    lc.fake.agent_close(chat_id, JANE[0])
    await lc.delivered()

    events = await lc.log(session.id)
    assert agent_texts(events) == ["message 0", "message 1", "message 2"]
    assert _after_assignment(events)[-1] == "ended"
    assert len(lc.fake.calls("get_chat")) > asked  # the history was read, and matched


async def test_a_message_written_before_our_stop_is_logged_before_its_end(
    lc: LiveChatService,
) -> None:
    session, chat_id = await _assigned(lc)
    lc.fake.delivery.hold()  # its webhook is late (a retry), and so is the close's
    lc.fake.agent_message(chat_id, JANE[0], text=GOODBYE)
    stopped = await lc.stub.StopHitl(
        pb.StopHitlRequest(session_id=session.id, reason="resolved"), timeout=TIMEOUT
    )
    assert stopped.session.state == pb.SESSION_STATE_ENDED

    events = await lc.log(session.id)
    assert _after_assignment(events) == ["agent_message", "ended"]
    assert events[-1].ended.by == pb.ENDED_BY_CALLER
    lc.fake.delivery.release()
    await lc.delivered()
    assert agent_texts(await lc.log(session.id)) == [GOODBYE]  # the late webhook adds nothing
