"""One test per defect of the best-known public bridge (livechat-api.md §12)."""

from __future__ import annotations

import json
from typing import Any

import pytest
import structlog

from providers.errors import ProviderRejected, ProviderUnavailable, WebhookRejected
from providers.livechat import LiveChatProvider
from providers.types import (
    AgentAssigned,
    AgentMessage,
    Author,
    ButtonKind,
    Card,
    CardButton,
    Media,
    MediaKind,
    Message,
    Queued,
    Transferred,
    UserProfile,
)
from tests.fake_livechat import FakeClock, FakeLiveChat
from tests.livechat.conftest import WEBHOOK_SECRET, Receiver, kind_of, start_session


def envelope(action: str, payload: dict[str, Any], secret: str = WEBHOOK_SECRET, **extra) -> bytes:
    body = {"webhook_id": "w", "secret_key": secret, "action": action, "payload": payload, **extra}
    return json.dumps(body).encode()


# -- methods that do not exist ---------------------------------------------------------


async def test_pitfall_close_chat_is_never_used(
    provider: LiveChatProvider, fake: FakeLiveChat
) -> None:
    session = await start_session(provider)
    await provider.stop(session.chat, session.user, "done", timeout=5)
    assert not fake.chat(session.chat_id).active  # really closed at LiveChat
    assert fake.calls("close_chat") == []
    assert [c.method for c in fake.calls(api="agent")][-1] == "deactivate_chat"


async def test_pitfall_fake_refuses_close_chat_and_get_groups(
    provider: LiveChatProvider, fake: FakeLiveChat
) -> None:
    """The fake answers the non-existent methods with an error, so a
    regression to them fails loudly instead of passing against a lenient fake."""
    from providers.livechat.client import ApiError

    with pytest.raises(ApiError) as info:
        await provider.client.agent("close_chat", {"chat_id": "X"}, timeout=5)
    assert info.value.type == "not_found"
    with pytest.raises(ApiError) as info:
        await provider.client.configuration("get_groups", {}, timeout=5)
    assert info.value.type == "not_found"


async def test_pitfall_group_check_uses_get_group(
    provider: LiveChatProvider, fake: FakeLiveChat
) -> None:
    assert await provider.probe(timeout=5) == []
    assert fake.calls("get_groups") == []
    assert fake.calls("get_group", api="configuration")


async def test_pitfall_stop_failure_is_not_swallowed(
    provider: LiveChatProvider, fake: FakeLiveChat
) -> None:
    session = await start_session(provider)
    fake.add_fault("deactivate_chat", error_type="not_found", message="Method not found")
    with pytest.raises(ProviderRejected):
        await provider.stop(session.chat, session.user, "done", timeout=5)


# -- secret handling -------------------------------------------------------------------


def test_pitfall_wrong_webhook_secret_is_refused_in_constant_time(
    provider: LiveChatProvider, monkeypatch: pytest.MonkeyPatch
) -> None:
    import hmac

    compared: list[bytes] = []
    original = hmac.compare_digest

    def spy(a: bytes, b: bytes) -> bool:
        compared.append(a)
        return original(a, b)

    monkeypatch.setattr(hmac, "compare_digest", spy)
    with structlog.testing.capture_logs() as logs, pytest.raises(WebhookRejected) as info:
        provider.parse_webhook({}, envelope("incoming_event", {"chat_id": "C"}, secret="guess"))
    assert info.value.status == 401  # not 200
    assert compared == [b"guess"]  # hmac.compare_digest, not ==
    assert "guess" not in repr(logs)
    assert WEBHOOK_SECRET not in repr(logs)


async def test_pitfall_no_raw_payload_or_message_text_in_logs(
    provider: LiveChatProvider, fake: FakeLiveChat, receiver: Receiver
) -> None:
    with structlog.testing.capture_logs() as logs:
        session = await start_session(provider)
        await provider.send(
            session.chat,
            session.user,
            Message("my card number is 4111"),
            request_id="m",
            uncertain=False,
            timeout=5,
        )
        fake.agent_join(session.chat_id)
        fake.agent_message(session.chat_id, text="agent says 12345-secret-ish")
        await fake.delivery.idle()
    text = repr(logs)
    assert "4111" not in text
    assert "12345-secret-ish" not in text
    assert WEBHOOK_SECRET not in text


# -- customer token --------------------------------------------------------------------


async def test_pitfall_customer_cookies_are_kept(
    provider: LiveChatProvider, fake: FakeLiveChat
) -> None:
    first = await start_session(provider)
    await provider.stop(first.chat, first.user, "done", timeout=5)
    for n in range(3):
        user = await provider.upsert_user(
            UserProfile(id="u-1", name=f"Ada {n}"), first.user, timeout=5
        )
        assert user.external_user_id == first.user.external_user_id
    again = await start_session(
        provider, user=first.user, session_id="s-2", request_id="r-2", previous_chat=first.chat
    )
    assert again.user.external_user_id == first.user.external_user_id
    assert len(fake.state.customers) == 1


async def test_pitfall_customer_token_is_refreshed(
    provider: LiveChatProvider, fake: FakeLiveChat, clock: FakeClock
) -> None:
    session = await start_session(provider)
    clock.advance(9 * 3600)  # past the 8 h lifetime
    result = await provider.send(
        session.chat,
        session.user,
        Message("still here"),
        request_id="m",
        uncertain=False,
        timeout=5,
    )
    assert result.external_message_id  # no silent failure


# -- text only -------------------------------------------------------------------------


async def test_pitfall_files_and_rich_messages_are_sent(
    provider: LiveChatProvider, fake: FakeLiveChat
) -> None:
    session = await start_session(provider)
    media = Media(
        MediaKind.IMAGE, f"{fake.url}/_media/64/a.png?type=image/png", "a.png", "image/png"
    )
    await provider.send(
        session.chat, session.user, Message(media), request_id="m1", uncertain=False, timeout=5
    )
    card = Card("Choose", buttons=(CardButton("A", ButtonKind.MESSAGE, "a"),))
    await provider.send(
        session.chat, session.user, Message(card), request_id="m2", uncertain=False, timeout=5
    )
    types = [e["type"] for e in fake.events(session.chat_id) if e.get("custom_id") in ("m1", "m2")]
    assert types == ["file", "rich_message"]


def test_pitfall_incoming_file_rich_and_system_events_are_handled(
    provider: LiveChatProvider,
) -> None:
    file_event = {
        "id": "T_1",
        "type": "file",
        "author_id": "jane@x",
        "url": "https://cdn/x",
        "name": "x",
        "content_type": "image/png",
        "size": 3,
    }
    rich_event = {
        "id": "T_2",
        "type": "rich_message",
        "author_id": "jane@x",
        "template_id": "cards",
        "elements": [{"title": "t"}],
    }
    system_event = {
        "id": "T_3",
        "type": "system_message",
        "system_message_type": "routing.idle",
        "text": "idle",
    }
    results = [
        provider.parse_webhook(
            {}, envelope("incoming_event", {"chat_id": "C", "thread_id": "T", "event": e})
        )
        for e in (file_event, rich_event, system_event)
    ]
    assert isinstance(kind_of(results[0].events[0], AgentMessage).message.body, Media)
    assert isinstance(kind_of(results[1].events[0], AgentMessage).message.body, Card)
    assert results[2].events == ()
    assert results[2].ignored  # dropped on purpose, and said why


# -- schemas ---------------------------------------------------------------------------


def test_pitfall_lenient_schemas(provider: LiveChatProvider) -> None:
    payload = {
        "chat_id": "C",
        "reason": "manual",
        "transferred_to": {"group_ids": [19]},
        "queue": {
            "position": 2,
            "wait_time": 30,
            "queued_at": "2026-03-02T10:15:00.000000Z",
            "extra": 1,
        },
        "unknown_key": {"x": 1},
    }  # no requester_id, no thread_id, no agent_ids
    batch = provider.parse_webhook(
        {}, envelope("chat_transferred", payload, unexpected_top_level="ok")
    )
    assert [type(e.kind) for e in batch.events] == [Transferred, Queued]


def test_pitfall_invalid_payload_is_not_acknowledged(provider: LiveChatProvider) -> None:
    with pytest.raises(WebhookRejected) as info:
        provider.parse_webhook({}, envelope("incoming_event", {"chat_id": "C", "event": "oops"}))
    assert info.value.status == 400  # LiveChat retries; nothing vanishes behind a 200


# -- dedupe and failed sends -----------------------------------------------------------


def test_pitfall_redelivered_webhooks_share_a_dedupe_key(provider: LiveChatProvider) -> None:
    body = envelope(
        "incoming_event",
        {
            "chat_id": "C",
            "thread_id": "T",
            "event": {"id": "T_7", "type": "message", "author_id": "jane@x", "text": "hi"},
        },
    )
    keys = {provider.parse_webhook({}, body).events[0].dedupe_key for _ in range(4)}
    assert keys == {"ev:T_7"}


async def test_pitfall_failed_send_is_an_error_with_custom_id(
    provider: LiveChatProvider, fake: FakeLiveChat
) -> None:
    session = await start_session(provider)
    fake.add_fault("send_event", error_type="service_unavailable")
    with pytest.raises(ProviderUnavailable):  # not a silent {success: false}
        await provider.send(
            session.chat,
            session.user,
            Message("hi"),
            request_id="req-9",
            uncertain=False,
            timeout=5,
        )
    assert fake.calls("send_event")[0].body["event"]["custom_id"] == "req-9"


# -- assignee --------------------------------------------------------------------------


async def test_pitfall_startup_transfer_is_not_an_assignment(
    provider: LiveChatProvider, fake: FakeLiveChat, receiver: Receiver
) -> None:
    await start_session(provider)
    await fake.delivery.idle()
    assert receiver.kinds(AgentAssigned) == []
    assert receiver.kinds(Transferred) == []
    assert len(receiver.kinds(Queued)) == 1


def test_pitfall_assignee_comes_from_transferred_to_agent_ids(provider: LiveChatProvider) -> None:
    payload = {
        "chat_id": "C",
        "thread_id": "T",
        "reason": "manual",
        "transferred_to": {"agent_ids": ["joe@acme.com"]},
    }
    [event] = provider.parse_webhook({}, envelope("chat_transferred", payload)).events
    to_agent = kind_of(event, Transferred).to_agent
    assert to_agent is not None
    assert to_agent.id == "joe@acme.com"


async def test_pitfall_agent_identity_is_the_real_agent(
    provider: LiveChatProvider, fake: FakeLiveChat, receiver: Receiver
) -> None:
    session = await start_session(provider)
    fake.agent_join(session.chat_id, "joe@acme.example")
    await fake.delivery.idle()
    [assigned] = receiver.kinds(AgentAssigned)
    assert assigned.agent.id == "joe@acme.example"
    assert assigned.agent.name == "Joe Roe"
    assert assigned.agent.id != session.user.external_user_id


# -- echo and internal-note filter in code ---------------------------------------------


async def test_pitfall_filters_work_without_webhook_filters(
    provider: LiveChatProvider, fake: FakeLiveChat, receiver: Receiver
) -> None:
    for hook in fake.state.webhooks.values():
        hook.filters = {}  # as if set up by hand without author_type
    session = await start_session(provider, history=[Message("hello bot", Author.USER)])
    await provider.send(
        session.chat,
        session.user,
        Message("customer text"),
        request_id="m",
        uncertain=False,
        timeout=5,
    )
    fake.agent_join(session.chat_id)
    fake.agent_message(session.chat_id, text="internal only", visibility="agents")
    fake.agent_message(session.chat_id, text="for the user")
    await fake.delivery.idle()
    assert [m.message.body for m in receiver.kinds(AgentMessage)] == ["for the user"]


async def test_pitfall_echo_filter_with_account_id_authors(
    provider: LiveChatProvider, fake: FakeLiveChat, receiver: Receiver
) -> None:
    fake.state.config.pat_author = "account_id"  # ❓ whose id a PAT writes as
    fake.state.config.initial_events_webhook = True  # ❓ initial events as incoming_event
    session = await start_session(provider, title="Echo?")
    fake.agent_join(session.chat_id)
    fake.agent_message(session.chat_id, text="real reply")
    await fake.delivery.idle()
    assert [m.message.body for m in receiver.kinds(AgentMessage)] == ["real reply"]


# -- the rest of the list --------------------------------------------------------------


async def test_pitfall_transfer_ignores_availability_and_reports_failure(
    provider: LiveChatProvider, fake: FakeLiveChat
) -> None:
    session = await start_session(provider)
    body = fake.calls("transfer_chat")[0].body
    assert body["ignore_agents_availability"] is True
    assert fake.chat(session.chat_id).thread.queue is not None  # queued, not failed
    fake.add_fault(
        "transfer_chat",
        error_type="validation",
        message="Cannot assign any agent from requested groups",
    )
    with pytest.raises(ProviderRejected) as info:
        await start_session(
            provider, UserProfile(id="u-2", name="Bob"), session_id="s-2", request_id="r-2"
        )
    assert info.value.code == "NO_AGENT_AVAILABLE"


async def test_pitfall_transcript_is_sent(provider: LiveChatProvider, fake: FakeLiveChat) -> None:
    session = await start_session(
        provider, title="T", description="D", history=[Message("the whole story", Author.USER)]
    )
    texts = " ".join(e.get("text", "") for e in fake.events(session.chat_id))
    assert "the whole story" in texts


async def test_pitfall_no_undocumented_keys(provider: LiveChatProvider, fake: FakeLiveChat) -> None:
    fake.state.config.reject_unknown_keys = True  # ❓ whether LiveChat rejects them
    session = await start_session(provider)
    await provider.send(
        session.chat, session.user, Message("hi"), request_id="m", uncertain=False, timeout=5
    )
    await provider.stop(session.chat, session.user, "done", timeout=5)
    assert all(c.error_type == "" for c in fake.calls())
    assert fake.calls("add_user_to_chat") == []


async def test_pitfall_uses_api_v3_6(provider: LiveChatProvider, fake: FakeLiveChat) -> None:
    session = await start_session(provider)
    await provider.stop(session.chat, session.user, "done", timeout=5)
    chat_calls = [c for c in fake.calls() if c.api in ("agent", "customer", "configuration")]
    assert chat_calls
    assert all(c.path.startswith("/v3.6/") for c in chat_calls)


async def test_pitfall_webhooks_are_provisioned_by_command(
    provider: LiveChatProvider, fake: FakeLiveChat
) -> None:
    import io

    assert (
        await provider.run_command(
            ["register-webhooks", "--url", "https://b.example/webhooks/livechat"], io.StringIO()
        )
        == 0
    )
    assert len(fake.state.webhooks) == 6


def test_pitfall_events_of_other_chats_keep_their_chat_id(provider: LiveChatProvider) -> None:
    """License webhooks cover every chat: events name their chat, so the core can
    drop those that are not a session's (the provider never guesses)."""
    payload = {
        "chat_id": "SOMEONEELS",
        "thread_id": "T",
        "event": {"id": "T_1", "type": "message", "author_id": "x@y", "text": "hi"},
    }
    [event] = provider.parse_webhook({}, envelope("incoming_event", payload)).events
    assert event.external_chat_id == "SOMEONEELS"
