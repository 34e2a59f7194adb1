"""Customer identity: one stable LiveChat customer per end user, fresh tokens."""

from __future__ import annotations

import asyncio
import copy

import pytest

from providers.errors import ProviderAuthError, ProviderRejected, ProviderUnavailable
from providers.livechat import LiveChatProvider
from providers.types import Message, ProviderUser, UserProfile
from tests.fake_livechat import FakeClock, FakeLiveChat
from tests.livechat.conftest import MakeProvider, Session, start_session

ADA = UserProfile(
    id="u-1", name="Ada Lovelace", email="ada@example.com", picture_url="https://x/ada.png"
)
BOB = UserProfile(id="u-2", name="Bob")


async def test_upsert_creates_a_customer_and_sets_the_profile(
    provider: LiveChatProvider, fake: FakeLiveChat
) -> None:
    user = await provider.upsert_user(ADA, None, timeout=5)
    customer = fake.state.customers[user.external_user_id]
    assert (customer.name, customer.email, customer.avatar) == (
        "Ada Lovelace",
        "ada@example.com",
        "https://x/ada.png",
    )
    assert user.state["customer_id"] == user.external_user_id
    assert set(user.state["cookies"]) == {"__lc_cid", "__lc_cst"}
    assert user.state["expires_at"] > fake.state.clock.now().timestamp()


async def test_repeated_upserts_keep_one_customer(
    provider: LiveChatProvider, fake: FakeLiveChat
) -> None:
    user = await provider.upsert_user(ADA, None, timeout=5)
    again = await provider.upsert_user(ADA, user, timeout=5)
    assert again.external_user_id == user.external_user_id
    assert len(fake.state.customers) == 1
    # Nothing changed: no second update_customer.
    assert len(fake.calls("update_customer")) == 1
    renamed = await provider.upsert_user(UserProfile(id="u-1", name="Ada King"), again, timeout=5)
    assert renamed.external_user_id == user.external_user_id
    assert fake.state.customers[user.external_user_id].name == "Ada King"


async def test_two_users_get_two_customers(provider: LiveChatProvider, fake: FakeLiveChat) -> None:
    # The fake sets host-only cookies: a client jar keeping them would make the
    # second grant return the first user's customer.
    ada = await provider.upsert_user(ADA, None, timeout=5)
    bob = await provider.upsert_user(BOB, None, timeout=5)
    assert ada.external_user_id != bob.external_user_id
    grants = fake.calls("customer_token")
    assert all("cookie" not in c.headers for c in grants)


async def test_token_is_refreshed_before_expiry_with_the_same_identity(
    provider: LiveChatProvider, fake: FakeLiveChat, clock: FakeClock
) -> None:
    session = await start_session(provider)
    old_token = session.user.state["access_token"]
    clock.advance(8 * 3600 - 10 * 60)  # inside the refresh margin
    await provider.send(
        session.chat, session.user, Message("later"), request_id="m1", uncertain=False, timeout=5
    )
    assert session.user.state["access_token"] != old_token
    assert session.user.external_user_id == session.user.state["customer_id"]
    assert len(fake.state.customers) == 1
    refresh = fake.calls("customer_token")[-1]
    assert "__lc_cid=" in refresh.headers["cookie"]
    # The send went through after the refresh, with no authentication error.
    assert [c.error_type for c in fake.calls("send_event")] == [""]


async def test_a_short_lived_token_is_renewed_at_half_its_life_not_on_every_call(
    make_provider: MakeProvider, fake: FakeLiveChat, clock: FakeClock
) -> None:
    """Tokens shorter-lived than the 15-minute margin (10 minutes here) are
    renewed when half their lifetime is left, not by every call."""
    fake.state.config.token_lifetime = 600
    provider = await make_provider()
    session = await start_session(provider)
    grants = len(fake.calls("customer_token"))
    assert grants == 1  # the new customer's, and none for its first calls

    async def send(request_id: str) -> None:
        await provider.send(
            session.chat,
            session.user,
            Message("hi"),
            request_id=request_id,
            timeout=5,
            uncertain=False,
        )

    await send("m1")
    await send("m2")
    clock.advance(299)  # 301 s left: more than half
    await send("m3")
    assert len(fake.calls("customer_token")) == grants
    clock.advance(2)  # 299 s left
    await send("m4")
    await send("m5")
    assert len(fake.calls("customer_token")) == grants + 1
    assert [c.error_type for c in fake.calls("send_event")] == [""] * 5


async def test_a_token_of_unknown_lifetime_keeps_the_15_minute_margin(
    provider: LiveChatProvider, fake: FakeLiveChat, clock: FakeClock
) -> None:
    """State saved before the lifetime was kept."""
    session = await start_session(provider)
    session.user.state.pop("lifetime", None)
    grants = len(fake.calls("customer_token"))
    clock.advance(8 * 3600 - 16 * 60)
    await provider.send(
        session.chat, session.user, Message("a"), request_id="m1", uncertain=False, timeout=5
    )
    assert len(fake.calls("customer_token")) == grants
    clock.advance(2 * 60)
    await provider.send(
        session.chat, session.user, Message("b"), request_id="m2", uncertain=False, timeout=5
    )
    assert len(fake.calls("customer_token")) == grants + 1


async def test_authentication_error_refreshes_once_and_retries(
    provider: LiveChatProvider, fake: FakeLiveChat
) -> None:
    session = await start_session(provider)
    fake.state.expire_customer_tokens()  # LiveChat revoked it early
    result = await provider.send(
        session.chat, session.user, Message("hi"), request_id="m1", uncertain=False, timeout=5
    )
    assert result.external_message_id
    sends = fake.calls("send_event")
    assert [c.error_type for c in sends] == ["authentication", ""]
    assert len(fake.state.customers) == 1


async def test_persistent_authentication_error_is_not_retried_forever(
    provider: LiveChatProvider, fake: FakeLiveChat
) -> None:
    session = await start_session(provider)
    fake.add_fault("send_event", error_type="authentication", times=None)
    with pytest.raises(ProviderRejected):
        await provider.send(
            session.chat, session.user, Message("hi"), request_id="m1", uncertain=False, timeout=5
        )
    assert len(fake.calls("send_event")) == 2


def _copies(user: ProviderUser, n: int) -> list[ProviderUser]:
    """What concurrent core operations hold: each its own copy from the store."""
    return [copy.deepcopy(user) for _ in range(n)]


async def _send_all(
    provider: LiveChatProvider, session: Session, users: list[ProviderUser]
) -> list[str]:
    results = await asyncio.gather(
        *(
            provider.send(
                session.chat, u, Message(f"m{i}"), request_id=f"m{i}", uncertain=False, timeout=5
            )
            for i, u in enumerate(users)
        )
    )
    return [r.external_message_id for r in results]


async def test_concurrent_calls_of_an_expired_token_renew_it_once(
    provider: LiveChatProvider, fake: FakeLiveChat, clock: FakeClock
) -> None:
    session = await start_session(provider)
    clock.advance(9 * 3600)
    grants = len(fake.calls("customer_token"))
    users = _copies(session.user, 4)
    assert all(await _send_all(provider, session, users))
    assert len(fake.calls("customer_token")) == grants + 1
    # Every copy carries the one new token (the core saves each).
    assert len({u.state["access_token"] for u in users}) == 1
    assert users[0].state["access_token"] != session.user.state["access_token"]


async def test_concurrent_calls_refused_mid_call_renew_the_token_once(
    provider: LiveChatProvider, fake: FakeLiveChat
) -> None:
    session = await start_session(provider)
    fake.state.expire_customer_tokens()  # revoked early: every call is refused
    grants = len(fake.calls("customer_token"))
    assert all(await _send_all(provider, session, _copies(session.user, 4)))
    assert len(fake.calls("customer_token")) == grants + 1
    assert len(fake.state.customers) == 1


async def test_a_failed_renewal_fails_each_waiting_call_clearly(
    provider: LiveChatProvider, fake: FakeLiveChat, clock: FakeClock
) -> None:
    session = await start_session(provider)
    clock.advance(9 * 3600)
    fake.add_fault("customer_token", kind="status", status=503, times=None)
    outcomes = await asyncio.gather(
        *(
            provider.send(
                session.chat, u, Message("x"), request_id=f"m{i}", uncertain=False, timeout=5
            )
            for i, u in enumerate(_copies(session.user, 3))
        ),
        return_exceptions=True,
    )
    assert all(isinstance(o, ProviderUnavailable) for o in outcomes), outcomes
    assert all("customer token" in str(o) for o in outcomes)
    assert fake.calls("send_event") == []  # nothing went out with the dead token
    fake.clear_faults()
    # The next call renews it (a failure is not remembered as a renewal).
    result = await provider.send(
        session.chat, session.user, Message("y"), request_id="m9", uncertain=False, timeout=5
    )
    assert result.external_message_id


@pytest.mark.parametrize(
    ("oauth_exception", "code", "setting"),
    [
        ("invalid_grant", "CUSTOMER_TOKEN_REFUSED", None),
        ("access_denied", "PROVIDER_CREDENTIALS", "HITL_LIVECHAT_CLIENT_ID"),
    ],
)
async def test_a_renewal_refused_mid_call_is_reported_not_retried_with_the_dead_token(
    provider: LiveChatProvider,
    fake: FakeLiveChat,
    oauth_exception: str,
    code: str,
    setting: str | None,
) -> None:
    session = await start_session(provider)
    fake.state.expire_customer_tokens()  # refused mid-call ...
    fake.add_fault("customer_token", error_type=oauth_exception, message="Refused")  # ... for good
    with pytest.raises(ProviderRejected) as info:
        await provider.send(
            session.chat, session.user, Message("hi"), request_id="m1", uncertain=False, timeout=5
        )
    assert info.value.code == code
    assert getattr(info.value, "setting", None) == setting
    assert oauth_exception in str(info.value) or setting
    assert [c.error_type for c in fake.calls("send_event")] == ["authentication"]


async def test_a_new_handoff_still_checks_the_identity_after_a_recent_renewal(
    provider: LiveChatProvider, fake: FakeLiveChat, clock: FakeClock
) -> None:
    session = await start_session(provider)
    clock.advance(9 * 3600)
    await provider.send(
        session.chat, session.user, Message("x"), request_id="m1", uncertain=False, timeout=5
    )
    grants = len(fake.calls("customer_token"))
    # A copy holding the renewed token: nothing to take over, so it asks.
    await provider.upsert_user(ADA, copy.deepcopy(session.user), timeout=5)
    assert len(fake.calls("customer_token")) == grants + 1


async def test_upsert_refreshes_an_expired_identity(
    provider: LiveChatProvider, fake: FakeLiveChat, clock: FakeClock
) -> None:
    user = await provider.upsert_user(ADA, None, timeout=5)
    clock.advance(9 * 3600)
    again = await provider.upsert_user(ADA, user, timeout=5)
    assert again.external_user_id == user.external_user_id
    assert len(fake.state.customers) == 1


async def test_lost_identity_during_a_send_is_reported(
    provider: LiveChatProvider, fake: FakeLiveChat
) -> None:
    session = await start_session(provider)
    session.user.state["cookies"] = {"__lc_cid": "forgotten", "__lc_cst": "forgotten"}
    fake.state.expire_customer_tokens()
    with pytest.raises(ProviderRejected) as info:
        await provider.send(
            session.chat, session.user, Message("hi"), request_id="m1", uncertain=False, timeout=5
        )
    assert info.value.code == "CUSTOMER_IDENTITY_LOST"


async def test_user_without_cookies_gets_a_new_identity(
    provider: LiveChatProvider, fake: FakeLiveChat
) -> None:
    user = await provider.upsert_user(ADA, ProviderUser("old-id", {}), timeout=5)
    assert user.external_user_id in fake.state.customers


async def test_invalid_email_does_not_fail_the_upsert(
    provider: LiveChatProvider, fake: FakeLiveChat
) -> None:
    user = await provider.upsert_user(
        UserProfile(id="u", name="N", email="not-an-email"), None, timeout=5
    )
    assert user.external_user_id in fake.state.customers


@pytest.mark.parametrize(
    ("env", "setting"),
    [
        ({"HITL_LIVECHAT_CLIENT_ID": "someone-elses-client"}, "HITL_LIVECHAT_CLIENT_ID"),
        ({"HITL_LIVECHAT_REDIRECT_URI": "https://evil.example/cb"}, "HITL_LIVECHAT_REDIRECT_URI"),
        (
            {"HITL_LIVECHAT_ORGANIZATION_ID": "11111111-2222-4333-8444-555555555555"},
            "HITL_LIVECHAT_ORGANIZATION_ID",
        ),
    ],
)
async def test_token_grant_refusals_name_the_setting(
    make_provider: MakeProvider, env: dict[str, str], setting: str
) -> None:
    provider = await make_provider(**env)
    with pytest.raises(ProviderAuthError) as info:
        await provider.upsert_user(ADA, None, timeout=5)
    assert info.value.setting == setting
