"""catch_up: what missed webhooks would have said, with the same dedupe keys."""

from __future__ import annotations

from providers.livechat import LiveChatProvider
from providers.types import AgentAssigned, AgentMessage, Ended, EndedBy, Queued
from tests.fake_livechat import FakeLiveChat
from tests.livechat.conftest import Receiver, kind_of, start_session


async def test_recovers_missed_agent_messages_with_webhook_keys(
    provider: LiveChatProvider, fake: FakeLiveChat, receiver: Receiver
) -> None:
    session = await start_session(provider)
    fake.agent_join(session.chat_id)
    fake.agent_message(session.chat_id, text="delivered")
    await fake.delivery.idle()
    fake.delivery.drop_next = 3  # LiveChat gave up on these
    fake.agent_message(session.chat_id, text="lost one")
    fake.agent_message(session.chat_id, text="secret note", visibility="agents")
    fake.agent_message(session.chat_id, text="lost two")
    await fake.delivery.idle()
    assert [m.message.body for m in receiver.kinds(AgentMessage)] == ["delivered"]

    caught = await provider.catch_up(session.chat, session.user, "", timeout=5)
    messages = [e for e in caught.events if isinstance(e.kind, AgentMessage)]
    assert [kind_of(e, AgentMessage).message.body for e in messages] == [
        "delivered",
        "lost one",
        "lost two",
    ]
    # The one the webhook delivered has the same key: the core dedupes it.
    assert messages[0].dedupe_key in receiver.keys
    assert kind_of(messages[0], AgentMessage).agent.name == "Jane Doe"
    assignment = [e for e in caught.events if isinstance(e.kind, AgentAssigned)]
    assert [e.dedupe_key for e in assignment] == [
        k for k, v in receiver.keys.items() if isinstance(v.kind, AgentAssigned)
    ]
    # Our own summary and the customer's messages are not reported.
    assert all(kind_of(e, AgentMessage).agent.id == "jane@acme.example" for e in messages)


async def test_a_message_the_agent_deleted_is_not_recovered(
    provider: LiveChatProvider, fake: FakeLiveChat, receiver: Receiver
) -> None:
    """Events carry ``deleted`` once their author deleted them (events and
    data structures): one whose webhook was lost must not reach the user
    through catch-up."""
    session = await start_session(provider)
    fake.agent_join(session.chat_id)
    await fake.delivery.idle()
    fake.delivery.drop_next = 2
    retracted = fake.agent_message(session.chat_id, text="wrong customer, sorry")
    fake.agent_message(session.chat_id, text="kept")
    await fake.delivery.idle()
    (stored,) = [e for e in fake.chat(session.chat_id).thread.events if e["id"] == retracted["id"]]
    stored["deleted"] = True  # the agent deleted it at LiveChat
    caught = await provider.catch_up(session.chat, session.user, "", timeout=5)
    texts = [
        kind_of(e, AgentMessage).message.body
        for e in caught.events
        if isinstance(e.kind, AgentMessage)
    ]
    assert texts == ["kept"]


async def test_checkpoint_returns_only_newer_events(
    provider: LiveChatProvider, fake: FakeLiveChat
) -> None:
    session = await start_session(provider)
    fake.agent_join(session.chat_id)
    fake.agent_message(session.chat_id, text="one")
    first = await provider.catch_up(session.chat, session.user, "", timeout=5)
    fake.agent_message(session.chat_id, text="two")
    second = await provider.catch_up(session.chat, session.user, first.checkpoint, timeout=5)
    bodies = [
        kind_of(e, AgentMessage).message.body
        for e in second.events
        if isinstance(e.kind, AgentMessage)
    ]
    assert bodies == ["two"]
    assert second.checkpoint != first.checkpoint
    third = await provider.catch_up(session.chat, session.user, second.checkpoint, timeout=5)
    assert not [e for e in third.events if isinstance(e.kind, AgentMessage)]


async def test_ended_thread_has_the_chat_deactivated_key(
    provider: LiveChatProvider, fake: FakeLiveChat, receiver: Receiver
) -> None:
    session = await start_session(provider)
    fake.agent_join(session.chat_id)
    fake.agent_close(session.chat_id)
    await fake.delivery.idle()
    [webhook_end] = [e for e in receiver.events if isinstance(e.kind, Ended)]
    caught = await provider.catch_up(session.chat, session.user, "", timeout=5)
    [end] = [e for e in caught.events if isinstance(e.kind, Ended)]
    assert end.dedupe_key == webhook_end.dedupe_key
    assert kind_of(end, Ended).by is EndedBy.AGENT


async def test_router_close_is_reported_as_provider(
    provider: LiveChatProvider, fake: FakeLiveChat
) -> None:
    session = await start_session(provider)
    fake.router_close(session.chat_id)
    caught = await provider.catch_up(session.chat, session.user, "", timeout=5)
    [end] = [e for e in caught.events if isinstance(e.kind, Ended)]
    assert kind_of(end, Ended).by is EndedBy.PROVIDER


async def test_queue_is_reported_with_the_start_key(
    provider: LiveChatProvider, fake: FakeLiveChat
) -> None:
    session = await start_session(provider)
    caught = await provider.catch_up(session.chat, session.user, "", timeout=5)
    queued = [e for e in caught.events if isinstance(e.kind, Queued)]
    assert [e.dedupe_key for e in queued] == [
        e.dedupe_key for e in session.result.events if isinstance(e.kind, Queued)
    ]


async def test_only_the_sessions_thread_is_read(
    provider: LiveChatProvider, fake: FakeLiveChat
) -> None:
    first = await start_session(provider)
    fake.agent_join(first.chat_id)
    fake.agent_message(first.chat_id, text="old session")
    await provider.stop(first.chat, first.user, "done", timeout=5)
    second = await start_session(
        provider, user=first.user, session_id="s-2", request_id="start-2", previous_chat=first.chat
    )
    caught = await provider.catch_up(second.chat, second.user, "", timeout=5)
    assert not [e for e in caught.events if isinstance(e.kind, (AgentMessage, Ended))]


async def test_falls_back_to_the_customer_view_without_agent_access(
    provider: LiveChatProvider, fake: FakeLiveChat
) -> None:
    session = await start_session(provider)
    fake.agent_join(session.chat_id)
    fake.agent_message(session.chat_id, text="from a group we cannot see")
    fake.add_fault("get_chat", api="agent", error_type="missing_access")
    caught = await provider.catch_up(session.chat, session.user, "", timeout=5)
    assert [
        kind_of(e, AgentMessage).message.body
        for e in caught.events
        if isinstance(e.kind, AgentMessage)
    ] == ["from a group we cannot see"]
    assert fake.calls("get_chat", api="customer")
