"""abandon: closing the chat a given-up start opened, and nothing else."""

from __future__ import annotations

from providers.livechat import LiveChatProvider
from providers.types import ProviderUser, UserProfile
from tests.fake_livechat import FakeLiveChat
from tests.livechat.conftest import start_session


async def test_abandon_closes_only_the_chat_this_start_opened(
    provider: LiveChatProvider, fake: FakeLiveChat
) -> None:
    session = await start_session(provider, session_id="s-1", request_id="start-1")
    chat_id = session.chat.external_chat_id
    # The state the core kept may predate the chat (a crash before it was saved).
    user = ProviderUser(session.user.external_user_id, {})

    assert not await provider.abandon(user, session_id="s-2", request_id="start-2", timeout=5)
    assert fake.chat(chat_id).active  # another start's thread: left alone
    assert fake.calls("deactivate_chat") == []

    assert await provider.abandon(user, session_id="s-1", request_id="start-1", timeout=5)
    assert not fake.chat(chat_id).active
    assert not await provider.abandon(user, session_id="s-1", request_id="start-1", timeout=5)
    assert len(fake.calls("deactivate_chat")) == 1


async def test_abandon_without_a_chat_does_nothing(
    provider: LiveChatProvider, fake: FakeLiveChat
) -> None:
    user = await provider.upsert_user(UserProfile(id="u-9", name="Grace"), None, timeout=5)
    assert not await provider.abandon(user, session_id="s-9", request_id="start-9", timeout=5)
    assert fake.calls("deactivate_chat") == []


async def test_abandon_reads_and_closes_as_the_customer_without_agent_access(
    provider: LiveChatProvider, fake: FakeLiveChat
) -> None:
    session = await start_session(provider, session_id="s-1", request_id="start-1")
    chat_id = session.chat.external_chat_id
    # An agent moved the waiting chat to a group the bridge agent cannot
    # access (as StopHitl and catch-up handle it).
    fake.add_fault("get_chat", api="agent", error_type="missing_access", times=None)
    fake.add_fault("deactivate_chat", api="agent", error_type="missing_access", times=None)

    assert await provider.abandon(session.user, session_id="s-1", request_id="start-1", timeout=5)
    assert not fake.chat(chat_id).active
    assert fake.calls("get_chat", api="customer")


async def test_abandon_looks_up_the_customers_chat_when_the_stored_one_is_gone(
    provider: LiveChatProvider, fake: FakeLiveChat
) -> None:
    session = await start_session(provider, session_id="s-1", request_id="start-1")
    chat_id = session.chat.external_chat_id
    # The state the core kept names the chat of an earlier handoff, which
    # LiveChat no longer has: ``start`` then opened a new one, and its answer
    # (with the new id) was lost.
    user = ProviderUser(session.user.external_user_id, {**session.user.state, "chat_id": "GONE"})

    assert await provider.abandon(user, session_id="s-1", request_id="start-1", timeout=5)
    assert not fake.chat(chat_id).active
