"""stop: deactivate_chat for real; closing a closed chat is a no-op."""

from __future__ import annotations

import pytest
import structlog
from structlog.testing import capture_logs

from providers.errors import ProviderAuthError, ProviderRejected
from providers.livechat import LiveChatProvider
from providers.types import ProviderChat
from tests.fake_livechat import FakeLiveChat
from tests.livechat.conftest import start_session


async def test_stop_deactivates_the_chat(provider: LiveChatProvider, fake: FakeLiveChat) -> None:
    session = await start_session(provider)
    await provider.stop(session.chat, session.user, "resolved by bot", timeout=5)
    assert not fake.chat(session.chat_id).active
    [call] = fake.calls("deactivate_chat")
    assert call.body == {"id": session.chat_id, "ignore_requester_presence": True}
    assert fake.calls("close_chat") == []
    last = fake.events(session.chat_id)[-1]
    assert last["system_message_type"] == "manual_archived_agent"


@pytest.mark.parametrize("behaviour", ["error", "noop"])
async def test_stop_on_an_inactive_chat_is_a_noop(
    provider: LiveChatProvider, fake: FakeLiveChat, behaviour: str
) -> None:
    fake.state.config.deactivate_inactive = behaviour  # ❓ which one LiveChat does
    session = await start_session(provider)
    fake.agent_join(session.chat_id)
    fake.agent_close(session.chat_id)
    await provider.stop(session.chat, session.user, "done", timeout=5)
    await provider.stop(session.chat, session.user, "done", timeout=5)
    assert not fake.chat(session.chat_id).active


async def test_stop_with_other_inactive_answer_checks_the_chat(
    provider: LiveChatProvider, fake: FakeLiveChat
) -> None:
    session = await start_session(provider)
    fake.router_close(session.chat_id)
    fake.add_fault("deactivate_chat", error_type="validation", message="Chat is not active")
    await provider.stop(session.chat, session.user, "done", timeout=5)


async def test_stop_failure_is_never_swallowed(
    provider: LiveChatProvider, fake: FakeLiveChat
) -> None:
    session = await start_session(provider)
    fake.add_fault("deactivate_chat", error_type="validation", message="Something else")
    with pytest.raises(ProviderRejected):
        await provider.stop(session.chat, session.user, "done", timeout=5)
    assert fake.chat(session.chat_id).active


async def test_stop_without_access_names_the_token(
    provider: LiveChatProvider, fake: FakeLiveChat
) -> None:
    session = await start_session(provider)
    # Refused as the agent and, in the fallback, as the customer too.
    fake.add_fault("deactivate_chat", error_type="missing_access", times=2)
    with pytest.raises(ProviderAuthError) as info:
        await provider.stop(session.chat, session.user, "done", timeout=5)
    assert info.value.setting == "HITL_LIVECHAT_AGENT_TOKEN"


async def test_stop_leaves_a_newer_thread_of_the_chat_alone(
    provider: LiveChatProvider, fake: FakeLiveChat
) -> None:
    """A customer has one chat: deactivate_chat closes whatever thread is
    active in it, which after the router closed ours (its webhook lost or
    not yet processed) may be a later handoff of the same end user."""
    old = await start_session(provider, session_id="s-1", request_id="start-1")
    fake.router_close(old.chat_id)
    new = await start_session(provider, user=old.user, session_id="s-2", request_id="start-2")
    assert new.chat_id == old.chat_id
    old_thread, new_thread = old.chat.state["thread_id"], new.chat.state["thread_id"]
    assert old_thread != new_thread

    with structlog.testing.capture_logs() as logs:
        await provider.stop(old.chat, old.user, "done", timeout=5)
    assert fake.chat(old.chat_id).active
    assert fake.chat(old.chat_id).thread.id == new_thread
    assert fake.calls("deactivate_chat") == []
    [line] = [e for e in logs if e["event"] == "livechat.stop_left_newer_thread"]
    assert (line["thread_id"], line["active_thread_id"]) == (old_thread, new_thread)
    # The newer thread's own end is not taken for the bot's stop.
    assert not provider.memory.facts(old.chat_id).stopped_by_us

    await provider.stop(new.chat, new.user, "done", timeout=5)
    assert not fake.chat(new.chat_id).active
    assert len(fake.calls("deactivate_chat")) == 1


async def test_stop_without_a_known_thread_closes_the_active_one(
    provider: LiveChatProvider, fake: FakeLiveChat
) -> None:
    """State from before the thread id was kept: stop closes the chat as before."""
    session = await start_session(provider)
    reads = len(fake.calls("get_chat"))
    await provider.stop(ProviderChat(session.chat_id, {}), session.user, "done", timeout=5)
    assert not fake.chat(session.chat_id).active
    assert len(fake.calls("get_chat")) == reads  # nothing to compare: no read


@pytest.mark.parametrize("thread_known", [True, False])
async def test_a_chat_livechat_no_longer_has_counts_as_closed(
    provider: LiveChatProvider, fake: FakeLiveChat, thread_known: bool
) -> None:
    """A chat deleted or anonymised at LiveChat: ``deactivate_chat`` answers
    ``not_found``. Raised, it failed every stop for good, so the session
    stayed open for ever and the end user could start no other handoff."""
    session = await start_session(provider)
    del fake.state.chats[session.chat_id]
    chat = session.chat
    if not thread_known:  # state saved before the thread was kept
        chat = ProviderChat(chat.external_chat_id, {})
    with capture_logs() as logs:
        await provider.stop(chat, session.user, "done", timeout=5)
    assert [(e["event"], e["log_level"]) for e in logs if e["event"] == "livechat.chat_gone"] == [
        ("livechat.chat_gone", "warning")
    ]


async def test_a_refused_close_is_reported_even_when_the_check_after_it_fails(
    provider: LiveChatProvider, fake: FakeLiveChat
) -> None:
    """After an unexpected refusal the stop reads the chat, to tell a chat
    already closed; that read failing reported its own error (here the
    token's) instead of the close's."""
    session = await start_session(provider)
    chat = ProviderChat(session.chat.external_chat_id, {})  # no thread id: no read before
    fake.add_fault("deactivate_chat", error_type="validation", message="Something else")
    fake.add_fault("get_chat", error_type="authentication")
    with pytest.raises(ProviderRejected) as info:
        await provider.stop(chat, session.user, "done", timeout=5)
    assert "Something else" in str(info.value)
    assert fake.chat(session.chat_id).active
