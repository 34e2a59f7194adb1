"""stop: deactivate_chat for real; closing a closed chat is a no-op."""

from __future__ import annotations

import pytest

from providers.errors import ProviderAuthError, ProviderRejected
from providers.livechat import LiveChatProvider
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
