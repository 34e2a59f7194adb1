"""start: transcript, routing, queueing, resuming, idempotency."""

from __future__ import annotations

import pytest

from providers.base import SupportsValidation
from providers.errors import ProviderAuthError, ProviderRejected, ProviderUnavailable
from providers.livechat import LiveChatProvider
from providers.types import (
    AgentAssigned,
    Author,
    Location,
    Media,
    MediaKind,
    Message,
    Queued,
    StartFields,
    Transferred,
)
from tests.fake_livechat import FakeLiveChat
from tests.livechat.conftest import MakeProvider, Receiver, start_session

HISTORY = [
    Message("My parcel never came", Author.USER),
    Message("Let me find a human for you", Author.BOT),
    Message(Media(MediaKind.IMAGE, "https://x.example/receipt.png", "receipt.png"), Author.USER),
    Message(Location(52.52, 13.405, "Depot"), Author.USER),
]


def agent_visible_text(fake: FakeLiveChat, chat_id: str) -> str:
    return "\n".join(e.get("text", "") for e in fake.events(chat_id) if e["type"] == "message")


async def test_start_posts_title_description_and_transcript(
    provider: LiveChatProvider, fake: FakeLiveChat
) -> None:
    session = await start_session(
        provider,
        title="Refund",
        description="Order #123 missing",
        history=HISTORY,
        metadata={"plan": "pro"},
    )
    text = agent_visible_text(fake, session.chat_id)
    assert "Title: Refund" in text
    assert "Description: Order #123 missing" in text
    assert "plan: pro" in text
    assert "User: My parcel never came" in text
    assert "Bot: Let me find a human for you" in text
    assert "User: 📎 receipt.png: https://x.example/receipt.png" in text
    assert "https://maps.google.com/?q=52.520000,13.405000" in text
    chat = fake.chat(session.chat_id)
    assert chat.customer_id == session.user.external_user_id
    assert chat.active


async def test_long_transcript_is_chunked_under_the_limit(
    provider: LiveChatProvider, fake: FakeLiveChat
) -> None:
    history = [Message("ü" * 4000, Author.USER) for _ in range(12)]
    session = await start_session(provider, history=history)
    messages = [e for e in fake.events(session.chat_id) if e["type"] == "message"]
    assert len(messages) >= 4
    assert all(len(e["text"].encode()) <= 16 * 1024 for e in messages)


async def test_default_group_and_requested_group(
    provider: LiveChatProvider, fake: FakeLiveChat
) -> None:
    first = await start_session(provider)
    assert first.result.group_id == "0"
    assert fake.chat(first.chat_id).group_ids == [0]
    from providers.types import UserProfile

    second = await start_session(provider, UserProfile(id="u-2", name="Bob"), group_id="19")
    assert second.result.group_id == "19"
    assert fake.chat(second.chat_id).group_ids == [19]
    transfer = fake.calls("transfer_chat")[-1].body
    assert transfer == {
        "id": second.chat_id,
        "target": {"type": "group", "ids": [19]},
        "ignore_agents_availability": True,
        "ignore_requester_presence": True,
    }
    assert second.chat.state["group_id"] == "19"


async def test_queue_position_is_reported(provider: LiveChatProvider, fake: FakeLiveChat) -> None:
    session = await start_session(provider)
    queued = [e for e in session.result.events if isinstance(e.kind, Queued)]
    assert len(queued) == 1
    assert queued[0].kind == Queued(position=1, wait_seconds=60)
    assert queued[0].dedupe_key.startswith(f"queued:{session.chat_id}:")


async def test_a_group_id_that_is_no_number_fails_validation(provider: LiveChatProvider) -> None:
    assert isinstance(provider, SupportsValidation)
    assert provider.validate_start(StartFields()) == ()
    for accepted in ("19", "019", "2147483647"):
        assert provider.validate_start(StartFields(group_id=accepted)) == ()
    # Arabic-Indic digits are decimal, not ASCII; past int32 is no LiveChat
    # group, and 5000 digits are past what int() parses.
    for group_id in ("support", "1.5", "-1", "١٩", "2147483648", "9" * 30, "1" * 5000):
        (violation,) = provider.validate_start(StartFields(group_id=group_id))
        assert violation.field == "group_id"
        assert "decimal numbers" in violation.description


async def test_non_numeric_group_is_rejected(provider: LiveChatProvider) -> None:
    """The start refuses it too, for a service that does not validate first."""
    with pytest.raises(ProviderRejected) as info:
        await start_session(provider, group_id="support")
    assert info.value.code == "INVALID_GROUP_ID"


async def test_unknown_requested_group_is_rejected(provider: LiveChatProvider) -> None:
    with pytest.raises(ProviderRejected) as info:
        await start_session(provider, group_id="42")
    assert info.value.code == "GROUP_NOT_FOUND"
    assert not isinstance(info.value, ProviderAuthError)


async def test_unknown_default_group_names_the_setting(make_provider: MakeProvider) -> None:
    provider = await make_provider(HITL_LIVECHAT_GROUP_ID="42")
    with pytest.raises(ProviderAuthError) as info:
        await start_session(provider)
    assert info.value.setting == "HITL_LIVECHAT_GROUP_ID"


async def test_no_agent_available_fails_the_start_and_closes_the_chat(
    provider: LiveChatProvider, fake: FakeLiveChat
) -> None:
    fake.add_fault(
        "transfer_chat",
        error_type="validation",
        message="Cannot assign any agent from requested groups",
    )
    with pytest.raises(ProviderRejected) as info:
        await start_session(provider)
    assert info.value.code == "NO_AGENT_AVAILABLE"
    chat = next(iter(fake.state.chats.values()))
    assert not chat.active


async def test_returning_customer_resumes_the_same_chat(
    provider: LiveChatProvider, fake: FakeLiveChat
) -> None:
    first = await start_session(provider)
    await provider.stop(first.chat, first.user, "done", timeout=5)
    second = await start_session(
        provider, user=first.user, session_id="s-2", request_id="start-2", previous_chat=first.chat
    )
    assert second.chat_id == first.chat_id
    assert second.chat.state["thread_id"] != first.chat.state["thread_id"]
    assert len(fake.state.customers) == 1
    assert len(fake.state.chats) == 1
    assert fake.chat(first.chat_id).active
    assert len(fake.calls("resume_chat")) == 1


async def test_returning_customer_found_without_previous_chat(
    provider: LiveChatProvider, fake: FakeLiveChat
) -> None:
    first = await start_session(provider)
    await provider.stop(first.chat, first.user, "done", timeout=5)
    first.user.state.pop("chat_id")  # the core lost it: get_customer finds it
    second = await start_session(provider, user=first.user, session_id="s-2", request_id="start-2")
    assert second.chat_id == first.chat_id
    assert len(fake.state.chats) == 1


async def test_start_again_after_a_lost_answer_reuses_the_chat(
    provider: LiveChatProvider, fake: FakeLiveChat
) -> None:
    from providers.types import StartRequest, UserProfile

    profile = UserProfile(id="u-1", name="Ada")
    user = await provider.upsert_user(profile, None, timeout=5)
    fake.add_fault("start_chat", kind="lost_response")
    request = StartRequest(session_id="s-1", user=profile, title="Refund", request_id="start-1")
    with pytest.raises(ProviderUnavailable) as info:
        await provider.start(request, user, timeout=5)
    assert info.value.uncertain is True
    result = await provider.start(request, user, timeout=5)
    assert len(fake.state.chats) == 1
    assert result.chat.external_chat_id in fake.state.chats
    # The transcript is there once, not twice.
    assert agent_visible_text(fake, result.chat.external_chat_id).count("Title: Refund") == 1


async def test_resumed_chat_that_is_still_active_is_reused(
    provider: LiveChatProvider, fake: FakeLiveChat
) -> None:
    first = await start_session(provider, title="First")
    # Stop never reached LiveChat; the next start must not fail.
    second = await start_session(
        provider,
        user=first.user,
        session_id="s-2",
        request_id="start-2",
        title="Second",
        previous_chat=first.chat,
    )
    assert second.chat_id == first.chat_id
    assert "Title: Second" in agent_visible_text(fake, first.chat_id)


async def test_start_chat_refused_for_existing_customer_falls_back_to_resume(
    provider: LiveChatProvider, fake: FakeLiveChat
) -> None:
    first = await start_session(provider)
    await provider.stop(first.chat, first.user, "done", timeout=5)
    first.user.state.pop("chat_id")
    fake.add_fault("get_customer", error_type="not_found")  # stale read hides the chat
    second = await start_session(provider, user=first.user, session_id="s-2", request_id="start-2")
    assert second.chat_id == first.chat_id
    assert [c.error_type for c in fake.calls("start_chat")] == ["", "validation"]


async def test_a_start_up_transfer_routed_to_a_free_agent_is_an_assignment(
    provider: LiveChatProvider, fake: FakeLiveChat, receiver: Receiver
) -> None:
    """With an agent free, LiveChat routes the start-up transfer straight to
    that agent (``ignore_agents_availability`` only queues what no agent can
    take): the caller sees the agent join, not a transfer."""
    fake.state.agents["jane@acme.example"].accepting = True
    session = await start_session(provider)
    chat = fake.chat(session.chat_id)
    assert chat.thread.queue is None  # the fake routes as LiveChat does
    assert chat.users["jane@acme.example"].present
    await fake.delivery.idle()
    assert [a.agent.id for a in receiver.kinds(AgentAssigned)] == ["jane@acme.example"]
    assert receiver.kinds(Transferred) == []
