"""Catch-up keeps what it learns: a renewed customer token, the chat's present state."""

from __future__ import annotations

from hitl_service.gen.hitl.v1 import hitl_service_pb2 as pb
from tests.integration.conftest import JANE, LiveChatService, MakeService, kinds
from tests.ports import free_port
from tests.support import wait_for


async def test_catch_up_as_the_customer_keeps_the_token_it_refreshed(
    lc: LiveChatService,
) -> None:
    session = await lc.start()
    chat_id = session.external_chat_id
    lc.fake.agent_join(chat_id, JANE[0])
    await lc.delivered()
    # An agent moved the chat to a group the bridge agent cannot see: catch-up
    # reads it as the customer (provider.catch_up's fallback) ...
    lc.fake.add_fault("get_chat", api="agent", error_type="missing_access", times=None)
    # ... and the customer token it has stored has expired.
    lc.fake.state.expire_customer_tokens()
    maintenance = lc.app.core.maintenance
    grants = len(lc.fake.calls("customer_token"))
    for _ in range(3):
        await maintenance.sweep(force_catch_up=True)
    refreshed = len(lc.fake.calls("customer_token")) - grants
    refused = [c for c in lc.fake.calls("get_chat", api="customer") if c.error_type]
    assert (refreshed, len(refused)) == (1, 1), (
        f"3 sweeps renewed the customer token {refreshed} times "
        f"({len(refused)} customer get_chat calls refused as unauthenticated): "
        "the renewed token is never saved"
    )


async def test_after_a_restart_catch_up_leaves_a_requeued_chat_queued(
    make_service: MakeService,
) -> None:
    """The service is down while an agent takes the chat, answers, and puts
    it back in the queue (a transfer to the group). Every webhook of that is
    lost; catch-up must bring the answer and the chat's present state: queued,
    not assigned to an agent who is gone."""
    env = {"HITL_HTTP_ADDR": f"127.0.0.1:{free_port()}", "HITL_RECONCILE_INTERVAL": "1h"}
    first = await make_service(**env)
    fake = first.fake
    session = await first.start()
    chat_id = session.external_chat_id
    await first.delivered()
    await first.app.stop(grace=1)  # the service is down

    fake.agent_join(chat_id, JANE[0])
    fake.agent_message(chat_id, JANE[0], text="Let me pass you to billing")
    fake.transfer(chat_id, queue=True, requester_id=JANE[0])  # back to the queue
    await first.delivered()

    second = await make_service(register=False, **env)
    await wait_for(
        lambda: (
            fake.calls("get_chat", api="agent") and (second.app.core.maintenance._start_pass_done)
        ),
        what="the start-up catch-up pass",
    )
    events = await second.log(session.id)
    texts = [e.agent_message.message.text for e in events if e.HasField("agent_message")]
    assert texts == ["Let me pass you to billing"]
    current = await second.session(session.id)
    assert current.state == pb.SESSION_STATE_QUEUED, (
        f"after catch-up the session is {pb.SessionState.Name(current.state)} "
        f"with agent {current.agent.id!r}, but the chat waits in LiveChat's queue "
        f"and {current.agent.id or 'nobody'} has left it (log: {kinds(events)})"
    )
