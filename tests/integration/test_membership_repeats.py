"""An agent who leaves a thread, comes back and leaves again.

LiveChat's ``user_removed_from_chat`` carries no event id or time, so a
second real leave looks exactly like a redelivery of the first. Recorded
as a dedupe key, the second leave was dropped and the session stayed
ASSIGNED to an agent no longer in the chat (no queue timeout, no catch-up
could repair it). A leave now applies whenever its agent holds the
session, which is also what makes a redelivery harmless.
"""

from __future__ import annotations

from hitl_service.gen.hitl.v1 import hitl_service_pb2 as pb
from tests.integration.conftest import JANE, LiveChatService, kinds


def _after_start(events: list[pb.Event]) -> list[str]:
    names = kinds(events)
    return names[names.index("agent_assigned") :]


async def test_an_agent_who_comes_back_and_leaves_again_leaves_the_session_queued(
    lc: LiveChatService,
) -> None:
    session = await lc.start()
    chat_id = session.external_chat_id
    await lc.delivered()
    lc.fake.agent_join(chat_id, JANE[0])
    await lc.delivered()
    lc.fake.agent_leave(chat_id, JANE[0])
    await lc.delivered()
    lc.fake.agent_join(chat_id, JANE[0])  # back: the join's key is known, so ...
    lc.fake.agent_message(chat_id, JANE[0], text="I'm back")  # ... her message re-assigns
    await lc.delivered()
    assert (await lc.session(session.id)).state == pb.SESSION_STATE_ASSIGNED
    lc.fake.agent_leave(chat_id, JANE[0])
    await lc.delivered()

    current = await lc.session(session.id)
    assert current.state == pb.SESSION_STATE_QUEUED
    assert not current.HasField("agent")
    assert _after_start(await lc.log(session.id)) == [
        "agent_assigned",
        "transferred",  # the first leave
        "agent_assigned",
        "agent_message",
        "transferred",  # the second leave
    ]


async def test_a_redelivered_leave_changes_nothing(lc: LiveChatService) -> None:
    session = await lc.start()
    chat_id = session.external_chat_id
    await lc.delivered()
    lc.fake.agent_join(chat_id, JANE[0])
    await lc.delivered()
    lc.fake.delivery.duplicate_next = 1
    lc.fake.agent_leave(chat_id, JANE[0])
    await lc.delivered()
    leaves = [d for d in lc.fake.delivery.deliveries if d.action == "user_removed_from_chat"]
    assert [d.outcome for d in leaves] == ["delivered", "delivered"]  # answered 200 twice

    assert _after_start(await lc.log(session.id)) == ["agent_assigned", "transferred"]
    assert (await lc.session(session.id)).state == pb.SESSION_STATE_QUEUED
