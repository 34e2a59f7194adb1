"""The HTTP client: auth schemes, headers, and error mapping by error type."""

from __future__ import annotations

import socket
import tracemalloc
from typing import Any

import httpx
import pytest
import respx
import structlog

from providers.errors import (
    ChatInactive,
    ProviderAuthError,
    ProviderRejected,
    ProviderUnavailable,
)
from providers.livechat import LiveChatProvider, media_guard
from providers.types import Message
from tests.fake_livechat import FakeLiveChat
from tests.livechat.conftest import MakeProvider, start_session


async def test_agent_and_configuration_calls_use_basic_auth(
    provider: LiveChatProvider, fake: FakeLiveChat
) -> None:
    problems = await provider.probe(timeout=5)
    assert problems == []
    for call in fake.calls(api="agent") + fake.calls(api="configuration"):
        assert call.auth == "basic"
        assert "organization_id" not in call.query


async def test_customer_calls_use_bearer_and_organization_id(
    provider: LiveChatProvider, fake: FakeLiveChat
) -> None:
    session = await start_session(provider)
    await provider.send(
        session.chat, session.user, Message("hi"), request_id="m1", uncertain=False, timeout=5
    )
    customer_calls = fake.calls(api="customer")
    assert {c.method for c in customer_calls} >= {"update_customer", "send_event"}
    for call in customer_calls:
        assert call.auth == "bearer"
        assert call.query["organization_id"] == fake.state.seed.organization_id


async def test_region_header_is_optional(make_provider: MakeProvider, fake: FakeLiveChat) -> None:
    plain = await make_provider()
    await plain.probe(timeout=5)
    assert all("x-region" not in c.headers for c in fake.calls())
    fake.state.calls.clear()
    regional = await make_provider(HITL_LIVECHAT_REGION="fra")
    await regional.probe(timeout=5)
    assert fake.calls()
    assert all(c.headers.get("x-region") == "fra" for c in fake.calls())


async def test_rate_limit_maps_to_unavailable_with_retry_after(
    provider: LiveChatProvider, fake: FakeLiveChat
) -> None:
    session = await start_session(provider)
    fake.add_fault("send_event", error_type="too_many_requests", retry_after="7")
    with pytest.raises(ProviderUnavailable) as info:
        await provider.send(
            session.chat, session.user, Message("hi"), request_id="m1", uncertain=False, timeout=5
        )
    assert info.value.retry_after == 7.0
    assert info.value.uncertain is False  # LiveChat refused it: nothing happened


async def test_rate_limit_without_retry_after_asks_for_at_least_a_second(
    provider: LiveChatProvider, fake: FakeLiveChat
) -> None:
    """LiveChat publishes no rate limits and says to back off from 1 s; the
    core's back-off alone would start at 0.2 s against a blocked API."""
    session = await start_session(provider)
    fake.add_fault("send_event", error_type="too_many_requests")
    with pytest.raises(ProviderUnavailable) as info:
        await provider.send(
            session.chat, session.user, Message("hi"), request_id="m1", uncertain=False, timeout=5
        )
    assert info.value.retry_after == 1.0


async def test_a_rate_limit_that_persists_backs_off_exponentially_until_an_answer(
    provider: LiveChatProvider, fake: FakeLiveChat
) -> None:
    """livechat-api.md §10: 1 s, 2 s, 4 s ... capped at about 30 s. The
    limit is the account's, so the streak is the client's, not one call's."""
    session = await start_session(provider)
    fake.add_fault("send_event", error_type="too_many_requests", times=7)
    waits = []
    for n in range(7):
        with pytest.raises(ProviderUnavailable) as info:
            await provider.send(
                session.chat,
                session.user,
                Message("hi"),
                request_id=f"m{n}",
                uncertain=False,
                timeout=5,
            )
        waits.append(info.value.retry_after)
    assert waits == [1.0, 2.0, 4.0, 8.0, 16.0, 30.0, 30.0]
    await provider.send(
        session.chat, session.user, Message("hi"), request_id="ok", uncertain=False, timeout=5
    )
    fake.add_fault("send_event", error_type="too_many_requests")
    with pytest.raises(ProviderUnavailable) as info:
        await provider.send(
            session.chat, session.user, Message("hi"), request_id="m9", uncertain=False, timeout=5
        )
    assert info.value.retry_after == 1.0  # an answer ended the streak


@pytest.mark.parametrize(("header", "wait"), [(None, 1.0), ("5", 5.0)])
async def test_a_rate_limited_customer_token_backs_off_like_the_chat_apis(
    provider: LiveChatProvider, fake: FakeLiveChat, header: str | None, wait: float
) -> None:
    """The accounts host has its own error format, but the same advice holds."""
    fake.add_fault("customer_token", kind="status", status=429, retry_after=header)
    with pytest.raises(ProviderUnavailable) as info:
        await start_session(provider)
    assert info.value.retry_after == wait


@pytest.mark.parametrize("error_type", ["internal", "service_unavailable", "request_timeout"])
async def test_server_errors_on_a_send_are_uncertain(
    provider: LiveChatProvider, fake: FakeLiveChat, error_type: str
) -> None:
    session = await start_session(provider)
    fake.add_fault("send_event", error_type=error_type)
    with pytest.raises(ProviderUnavailable) as info:
        await provider.send(
            session.chat, session.user, Message("hi"), request_id="m1", uncertain=False, timeout=5
        )
    assert info.value.uncertain is True


async def test_server_error_on_an_idempotent_call_is_certain(
    provider: LiveChatProvider, fake: FakeLiveChat
) -> None:
    session = await start_session(provider)
    fake.add_fault("deactivate_chat", kind="status", status=502)
    with pytest.raises(ProviderUnavailable) as info:
        await provider.stop(session.chat, session.user, "done", timeout=5)
    assert info.value.uncertain is False
    assert fake.chat(session.chat_id).active


async def test_error_type_decides_not_status(
    provider: LiveChatProvider, fake: FakeLiveChat
) -> None:
    session = await start_session(provider)
    # Statuses are undocumented: a 400-coded rate limit is still a rate limit.
    fake.state.config.status_map["too_many_requests"] = 400
    fake.add_fault("send_event", error_type="too_many_requests")
    with pytest.raises(ProviderUnavailable):
        await provider.send(
            session.chat, session.user, Message("hi"), request_id="m1", uncertain=False, timeout=5
        )


async def test_a_closed_chat_is_closed_whatever_status_livechat_gives_it(
    provider: LiveChatProvider, fake: FakeLiveChat
) -> None:
    # The other way round: a permanent type on a 5xx is no outage to retry
    # (the core would retry it until the caller's deadline: UNAVAILABLE
    # instead of "the chat has ended").
    session = await start_session(provider)
    fake.state.config.status_map["chat_inactive"] = 500
    fake.agent_close(session.chat_id)
    with pytest.raises(ChatInactive):
        await provider.send(
            session.chat, session.user, Message("hi"), request_id="m1", uncertain=False, timeout=5
        )


async def test_an_expired_token_is_renewed_whatever_status_livechat_gives_it(
    provider: LiveChatProvider, fake: FakeLiveChat
) -> None:
    session = await start_session(provider)
    fake.state.config.status_map["authentication"] = 500
    fake.state.expire_customer_tokens()
    result = await provider.send(
        session.chat, session.user, Message("hi"), request_id="m1", uncertain=False, timeout=5
    )
    assert result.external_message_id
    assert [c.error_type for c in fake.calls("send_event")] == ["authentication", ""]


async def test_an_unknown_type_on_a_5xx_is_still_worth_retrying(
    provider: LiveChatProvider, fake: FakeLiveChat
) -> None:
    session = await start_session(provider)
    fake.add_fault("send_event", error_type="brand_new_trouble", status=503)
    with pytest.raises(ProviderUnavailable):
        await provider.send(
            session.chat, session.user, Message("hi"), request_id="m1", uncertain=False, timeout=5
        )


async def test_timeout_after_sending_is_uncertain(
    provider: LiveChatProvider, fake: FakeLiveChat
) -> None:
    session = await start_session(provider)
    fake.add_fault("send_event", kind="delay", delay=30)
    with pytest.raises(ProviderUnavailable) as info:
        await provider.send(
            session.chat, session.user, Message("hi"), request_id="m1", uncertain=False, timeout=0.5
        )
    assert info.value.uncertain is True


async def test_method_timeout_bounds_the_whole_method(
    provider: LiveChatProvider, fake: FakeLiveChat
) -> None:
    fake.add_fault("customer_token", kind="delay", delay=30)
    with pytest.raises(ProviderUnavailable):
        await start_session(provider, timeout=0.5)


async def test_connection_refused_is_unavailable_and_certain(make_provider: MakeProvider) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    provider = await make_provider(
        HITL_LIVECHAT_API_URL=f"http://127.0.0.1:{port}",
        HITL_LIVECHAT_ACCOUNTS_URL=f"http://127.0.0.1:{port}",
    )
    with pytest.raises(ProviderUnavailable) as info:
        await provider.probe(timeout=5)
    assert info.value.uncertain is False


async def test_lost_response_is_uncertain(provider: LiveChatProvider, fake: FakeLiveChat) -> None:
    session = await start_session(provider)
    fake.add_fault("send_event", kind="lost_response")
    with pytest.raises(ProviderUnavailable) as info:
        await provider.send(
            session.chat, session.user, Message("hi"), request_id="m1", uncertain=False, timeout=5
        )
    assert info.value.uncertain is True
    assert [e.get("custom_id") for e in fake.events(session.chat_id)].count("m1") == 1


async def test_bad_json_on_success_is_unavailable(
    provider: LiveChatProvider, fake: FakeLiveChat
) -> None:
    session = await start_session(provider)
    fake.add_fault("send_event", kind="bad_json")
    with pytest.raises(ProviderUnavailable) as info:
        await provider.send(
            session.chat, session.user, Message("hi"), request_id="m1", uncertain=False, timeout=5
        )
    assert info.value.uncertain is True


async def test_wrong_pat_is_an_auth_error_naming_the_token(
    make_provider: MakeProvider, fake: FakeLiveChat
) -> None:
    import base64

    token = base64.b64encode(f"{fake.state.seed.bridge_account_id}:dal:wrong".encode()).decode()
    provider = await make_provider(HITL_LIVECHAT_AGENT_TOKEN=token)
    with pytest.raises(ProviderAuthError) as info:
        await start_session(provider)
    assert info.value.setting == "HITL_LIVECHAT_AGENT_TOKEN"


async def test_missing_scope_is_an_auth_error(
    provider: LiveChatProvider, fake: FakeLiveChat
) -> None:
    fake.add_fault("start_chat", error_type="authorization", message="Missing scope chats--all:rw")
    with pytest.raises(ProviderAuthError) as info:
        await start_session(provider)
    assert info.value.setting == "HITL_LIVECHAT_AGENT_TOKEN"


async def test_misdirected_request_names_the_region(
    provider: LiveChatProvider, fake: FakeLiveChat
) -> None:
    fake.add_fault("get_customer", error_type="misdirected_request", data={"region": "fra"})
    with pytest.raises(ProviderAuthError) as info:
        await start_session(provider)
    assert info.value.setting == "HITL_LIVECHAT_REGION"
    assert "HITL_LIVECHAT_REGION=fra" in str(info.value)  # error.data.region


async def test_other_refusals_get_a_stable_code(
    provider: LiveChatProvider, fake: FakeLiveChat
) -> None:
    fake.add_fault("start_chat", error_type="limit_reached")
    with pytest.raises(ProviderRejected) as info:
        await start_session(provider)
    assert info.value.code == "LIMIT_REACHED"


async def test_lifecycle_headers_and_debug_id_are_logged(
    provider: LiveChatProvider, fake: FakeLiveChat
) -> None:
    fake.state.config.legacy_header = "2026-09-01"
    with structlog.testing.capture_logs() as logs:
        await provider.probe(timeout=5)
        await provider.probe(timeout=5)
    warnings = [e for e in logs if e["event"] == "livechat.api_lifecycle"]
    assert len(warnings) == 1  # once per value, not per call
    assert warnings[0]["until"] == "2026-09-01"
    calls = [e for e in logs if e["event"] == "livechat.call" and e["api"] == "agent"]
    assert calls
    assert all(len(e["debug_id"]) == 16 for e in calls)


async def test_media_fetch_sends_no_credentials(
    provider: LiveChatProvider, fake: FakeLiveChat
) -> None:
    from providers.types import Media, MediaKind

    session = await start_session(provider)
    media = Media(
        MediaKind.IMAGE, f"{fake.url}/_media/100/cat.png?type=image/png", "cat.png", "image/png"
    )
    await provider.send(
        session.chat, session.user, Message(media), request_id="m1", uncertain=False, timeout=5
    )
    fetches = fake.calls(api="media")
    assert len(fetches) == 1
    assert fetches[0].auth == "none"
    assert "cookie" not in fetches[0].headers


async def send_media(provider: LiveChatProvider, fake: FakeLiveChat, url: str) -> dict[str, Any]:
    """Sends one image message; returns the event the fake received."""
    from providers.types import Media, MediaKind

    session = await start_session(provider)
    await provider.send(
        session.chat,
        session.user,
        Message(Media(MediaKind.IMAGE, url, "cat.png", "image/png")),
        request_id=f"m-{url[-12:]}",
        uncertain=False,
        timeout=5,
    )
    return fake.events(session.chat.external_chat_id)[-1]


@pytest.mark.parametrize(
    ("hosts", "fetched"),
    [
        ("", False),  # 127.0.0.1 is not public: sent as a link, never fetched
        ("127.0.0.1", True),
        ("cdn.example.com, *.files.example.com", False),  # not listed
    ],
)
async def test_media_urls_on_private_addresses_are_fetched_only_when_listed(
    make_provider: MakeProvider, fake: FakeLiveChat, hosts: str, fetched: bool
) -> None:
    provider = await make_provider(HITL_LIVECHAT_MEDIA_HOSTS=hosts)
    event = await send_media(provider, fake, f"{fake.url}/_media/100/cat.png?type=image/png")
    assert len(fake.calls(api="media")) == (1 if fetched else 0)
    if fetched:
        assert event["type"] == "file"
        assert event["url"].startswith(f"{fake.url}/cdn/")
    else:
        assert event["type"] == "message"
        assert f"{fake.url}/_media/100/cat.png" in event["text"]


async def test_a_compressed_media_answer_is_never_inflated(
    make_provider: MakeProvider, fake: FakeLiveChat
) -> None:
    """A few hundred bytes gzipped twice over inflate to 128 MB: httpx would
    decode each chunk whole before the upload limit is checked. The fetch
    asks for ``identity`` and refuses an encoded answer, unread."""
    provider = await make_provider(HITL_LIVECHAT_MEDIA_HOSTS="127.0.0.1")
    url = f"{fake.url}/_media/{128 * 1024 * 1024}/bomb.png?gzip_layers=2"
    tracemalloc.start()
    try:
        event = await send_media(provider, fake, url)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert len(fake.calls(api="media")) == 1
    assert event["type"] == "message"  # sent as a link
    assert url in event["text"]
    assert peak < 32 * 1024 * 1024  # the fake's own 128 MB of zeros is freed before


async def test_a_redirect_is_checked_like_the_url_itself(
    make_provider: MakeProvider, fake: FakeLiveChat
) -> None:
    """Allowed ``localhost`` redirects to 127.0.0.1, which is not listed."""
    provider = await make_provider(HITL_LIVECHAT_MEDIA_HOSTS="localhost")
    port = fake.url.rsplit(":", 1)[1]
    target = f"http://127.0.0.1:{port}/_media/100/inner.png"
    event = await send_media(
        provider, fake, f"http://localhost:{port}/_media/100/outer.png?redirect={target}"
    )
    assert [c.method for c in fake.calls(api="media")] == ["outer.png"]  # never followed
    assert event["type"] == "message"


@pytest.mark.parametrize(
    "address",
    ["127.0.0.1", "10.1.2.3", "169.254.169.254", "192.168.0.10", "::1", "fd00::1", "0.0.0.0"],  # noqa: S104 - addresses to refuse
)
async def test_the_guard_refuses_non_public_addresses(address: str) -> None:
    host = f"[{address}]" if ":" in address else address
    with pytest.raises(media_guard.MediaRefused, match="private or local"):
        await media_guard.vet(f"http://{host}/x.png", ())
    pinned = await media_guard.vet(f"http://{host}:8080/x.png?a=1", (address,))
    assert pinned.url == f"http://{host}:8080/x.png?a=1"
    assert pinned.host_header == f"{host}:8080"


async def test_the_guard_pins_a_public_host_to_the_address_it_checked() -> None:
    pinned = await media_guard.vet("https://8.8.8.8/a/b.png", ())
    assert pinned == media_guard.Pinned("https://8.8.8.8/a/b.png", "8.8.8.8", "8.8.8.8")
    for url in ("ftp://8.8.8.8/x", "https:///x", "https://8.8.8.8:99999/x"):
        with pytest.raises(media_guard.MediaRefused):
            await media_guard.vet(url, ())


def test_host_patterns() -> None:
    patterns = ("cdn.example.com", "*.files.example.com")
    assert media_guard.host_allowed("cdn.example.com", patterns)
    assert media_guard.host_allowed("CDN.example.com.", patterns)
    assert media_guard.host_allowed("a.b.files.example.com", patterns)
    assert not media_guard.host_allowed("files.example.com", patterns)
    assert not media_guard.host_allowed("evil-cdn.example.com", patterns)
    assert not media_guard.host_allowed("cdn.example.com.evil.test", patterns)


@respx.mock(assert_all_called=True)
async def test_request_building_for_start_chat(
    make_provider: MakeProvider, respx_mock: respx.MockRouter
) -> None:
    """A narrow check of the exact request: path, version, body, headers."""
    provider = await make_provider(
        HITL_LIVECHAT_API_URL="https://api.test", HITL_LIVECHAT_ACCOUNTS_URL="https://acc.test"
    )
    customer = respx_mock.post("https://api.test/v3.6/agent/action/get_customer").mock(
        return_value=httpx.Response(200, json={"id": "c", "chat_ids": []})
    )
    start = respx_mock.post("https://api.test/v3.6/agent/action/start_chat").mock(
        return_value=httpx.Response(
            200,
            json={
                "chat_id": "PX1QZ8RK2M",
                "thread_id": "RT5M2K9QAA",
                "event_ids": ["RT5M2K9QAA_1"],
            },
        )
    )
    respx_mock.post("https://api.test/v3.6/agent/action/transfer_chat").mock(
        return_value=httpx.Response(200, json={})
    )
    respx_mock.post("https://api.test/v3.6/agent/action/get_chat").mock(
        return_value=httpx.Response(
            200, json={"id": "PX1QZ8RK2M", "thread": {"id": "RT5M2K9QAA", "active": True}}
        )
    )
    from providers.types import ProviderUser, StartRequest, UserProfile

    user = ProviderUser("5f1c2a8e-9b7d-4e2a-8c11-0c3f7d2b6a90", {"cookies": {"__lc_cid": "x"}})
    await provider.start(
        StartRequest(
            session_id="s", user=UserProfile(id="u", name="n"), title="Refund", group_id="19"
        ),
        user,
        timeout=5,
    )
    request = start.calls.last.request
    assert request.headers["authorization"].startswith("Basic ")
    assert request.headers["content-type"] == "application/json"
    assert "cookie" not in request.headers
    import json

    body = json.loads(request.content)
    assert body["continuous"] is True
    assert body["chat"]["access"] == {"group_ids": [19]}
    assert body["chat"]["users"] == [{"id": user.external_user_id, "type": "customer"}]
    assert customer.called


async def test_calls_are_counted_by_outcome(
    make_provider: MakeProvider, fake: FakeLiveChat
) -> None:
    from prometheus_client import CollectorRegistry

    registry = CollectorRegistry()
    provider = await make_provider(registry=registry)
    session = await start_session(provider)
    fake.add_fault("send_event", error_type="too_many_requests")
    with pytest.raises(ProviderUnavailable):
        await provider.send(
            session.chat, session.user, Message("hi"), request_id="m1", uncertain=False, timeout=5
        )

    def sample(api: str, method: str, outcome: str) -> float | None:
        labels = {"api": api, "method": method, "outcome": outcome}
        return registry.get_sample_value("hitl_livechat_api_requests_total", labels)

    assert sample("agent", "start_chat", "ok") == 1
    assert sample("accounts", "customer_token", "ok") == 1
    assert sample("customer", "send_event", "unavailable") == 1
