"""Catch-up (issue 5): agent messages whose webhooks were never delivered reach
the stream anyway, in order and once.

LiveChat retries a webhook only a few times within a minute; the fake here
gives up within a fraction of a second. While the service is down every
delivery fails for good, and the service must recover the messages from the
chat's history when it starts again (and periodically, every
``HITL_RECONCILE_INTERVAL``, for deliveries lost while it runs).
"""

from __future__ import annotations

from hitl_service.gen.hitl.v1 import hitl_service_pb2 as pb
from tests.integration.conftest import JANE, MakeService, kinds
from tests.ports import free_port
from tests.support import EventCollector, wait_for


def agent_texts(events: list[pb.Event]) -> list[str]:
    return [e.agent_message.message.text for e in events if e.WhichOneof("kind") == "agent_message"]


async def test_agent_messages_sent_while_the_service_is_down_arrive_after_restart(
    make_service: MakeService,
) -> None:
    # A fixed sidecar port: the registered webhook URL stays right after the restart.
    env = {"HITL_HTTP_ADDR": f"127.0.0.1:{free_port()}", "HITL_RECONCILE_INTERVAL": "1h"}
    first = await make_service(**env)
    fake = first.fake
    session = await first.start()
    chat_id = session.external_chat_id
    fake.agent_join(chat_id, JANE[0])
    fake.agent_message(chat_id, JANE[0], text="before the outage")
    await first.delivered()
    assert agent_texts(await first.log(session.id)) == ["before the outage"]
    head = await first.app.store.head()

    await first.app.stop(grace=1)  # the service is down
    during = [f"while down {i}" for i in range(5)]
    for text in during:
        fake.agent_message(chat_id, JANE[0], text=text)
    await first.delivered()
    lost = [d for d in fake.delivery.deliveries if d.outcome == "failed"]
    assert len(lost) == len(during)  # LiveChat gave up on every one of them
    assert all(len(d.attempts) == fake.state.config.webhook_attempts for d in lost)

    second = await make_service(register=False, **env)
    async with EventCollector(second.stub, session_id=session.id, after=str(head)) as stream:
        # Catch-up runs as the service starts.
        await wait_for(
            lambda: len(agent_texts(stream.events)) >= len(during), what="caught-up messages"
        )
        fake.agent_message(chat_id, JANE[0], text="after the restart")
        await wait_for(
            lambda: "after the restart" in agent_texts(stream.events), what="a live message"
        )
    events = await second.log(session.id)
    assert agent_texts(events) == ["before the outage", *during, "after the restart"]
    assert kinds(events).count("agent_assigned") == 1
    agents = {e.agent_message.agent.name for e in events if e.WhichOneof("kind") == "agent_message"}
    assert agents == {"Jane Doe"}
    cursors = [int(e.cursor) for e in await second.log()]
    assert cursors == list(range(1, len(cursors) + 1))


async def test_deliveries_lost_while_the_service_runs_are_caught_up_periodically(
    make_service: MakeService,
) -> None:
    lc = await make_service(HITL_RECONCILE_INTERVAL="1s")
    session = await lc.start()
    chat_id = session.external_chat_id
    lc.fake.agent_join(chat_id, JANE[0])
    lc.fake.delivery.drop_next = 3  # never sent, as after LiveChat's last retry
    for i in range(3):
        lc.fake.agent_message(chat_id, JANE[0], text=f"dropped {i}")
    lc.fake.agent_message(chat_id, JANE[0], text="delivered")
    assert [d.outcome for d in lc.fake.delivery.deliveries[-4:]][:3] == ["dropped"] * 3
    async with EventCollector(lc.stub, session_id=session.id, after="0") as stream:
        await wait_for(lambda: len(agent_texts(stream.events)) == 4, what="4 agent messages")
    events = await lc.log(session.id)
    assert sorted(agent_texts(events)) == sorted(
        ["dropped 0", "dropped 1", "dropped 2", "delivered"]
    )
    assert len(agent_texts(events)) == 4
